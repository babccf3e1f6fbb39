"""The rate limiter against a real broker: rebuild of a compacted risk-scores topic at start, then live
decisions over HTTP (watch → throttle → block), and malformed records that must not unblock anyone.

Records are produced with kafka-python exactly as the worker publishes them (key = account_id, JSON value);
each test uses its own topic and an in-process :class:`RateLimiterService` on a free loopback port.
"""

from __future__ import annotations

import http.client
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest

from detector.ratelimit import RateLimiterService
from detector.settings import KafkaSettings, RateLimitSettings, Settings, TopicSettings

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

CreateTopic = Callable[..., str]
T = TypeVar("T")
VISIBLE_WITHIN_S = 5.0  # a produced record must show in the HTTP answer within this


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _settings(bootstrap: str, topic: str) -> Settings:
    return Settings(kafka=KafkaSettings(bootstrap=bootstrap), topics=TopicSettings(risk_scores=topic),
                    ratelimit=RateLimitSettings(host="127.0.0.1", port=0, metrics_port=0, throttle_per_minute=10,
                                                throttle_burst=5))


def _record(account_id: str, action: str, score: float, **overrides: Any) -> dict[str, Any]:
    now = int(time.time() * 1000)
    rec: dict[str, Any] = {
        "schema_version": 1, "account_id": account_id, "cluster_id": "c_0000000000ab", "score": score,
        "action": action, "reasons": [{"code": "shared_template", "detail": "fills a template shared by 40 "
                                       "accounts", "weight": 1.0}],
        "event_ts": now - 1000, "emitted_at": now, "model_version": "fusion-test",
    }
    rec.update(overrides)
    return rec


class Producer:
    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)

    def send(self, key: str, value: dict[str, Any] | bytes | None) -> float:
        """Produce one record and wait for the broker's ack; return when it was handed to the client."""
        payload = orjson.dumps(value) if isinstance(value, dict) else value
        sent = time.monotonic()
        self._producer.send(self.topic, key=key.encode(), value=payload).get(timeout=10)
        return sent

    def close(self) -> None:
        self._producer.close(timeout=5)


class Api:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def json(self, path: str) -> tuple[int, Any]:
        status, body = self.get(path)
        return status, orjson.loads(body)

    def decision(self, account_id: str, *, peek: bool = False) -> dict[str, Any]:
        status, body = self.json(f"/v1/decision{'/peek' if peek else ''}?account_id={account_id}")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def metric(self, line_start: str) -> float:
        _, body = self.get("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {line_start}")


def _wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.02) -> tuple[T, float]:
    """Call ``probe`` until it returns something truthy; return it and the seconds waited."""
    start = time.monotonic()
    while True:
        got = probe()
        if got:
            return got, time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def producer_for(kafka_bootstrap: str) -> Iterator[Callable[[str], Producer]]:
    made: list[Producer] = []

    def make(topic: str) -> Producer:
        made.append(Producer(kafka_bootstrap, topic))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_rebuild_then_live_watch_throttle_block(kafka_bootstrap: str, create_topic: CreateTopic,
                                                producer_for: Callable[[str], Producer]) -> None:
    topic = create_topic(kafka_bootstrap, _unique("risk-scores"), partitions=3, compacted=True)
    prod = producer_for(topic)
    # Before the limiter starts: history it must rebuild.
    prod.send("acct_pre_block", _record("acct_pre_block", "watch", 0.55))
    prod.send("acct_pre_block", _record("acct_pre_block", "block", 0.93))
    prod.send("acct_pre_gone", _record("acct_pre_gone", "block", 0.90))
    prod.send("acct_pre_gone", None)  # tombstone: back to "no record, allowed"
    prod.send("acct_pre_bad", _record("acct_pre_bad", "block", 0.88))
    prod.send("acct_pre_bad", orjson.dumps({k: v for k, v in _record("acct_pre_bad", "allow", 0.0).items()
                                           if k != "model_version"}))
    prod.send("acct_pre_stale", _record("acct_pre_stale", "throttle", 0.75))
    prod.send("acct_pre_stale", _record("acct_pre_stale", "allow", 0.10, emitted_at=int(time.time() * 1000) - 60_000))

    svc = RateLimiterService(_settings(kafka_bootstrap, topic)).start()
    api = Api(svc.url)
    restarted: RateLimiterService | None = None
    try:
        assert svc.wait_ready(30), "the limiter did not catch up with the topic"
        assert api.json("/healthz")[0] == 200
        # Rebuilt at start, no polling needed.
        pre = api.decision("acct_pre_block")
        assert (pre["action"], pre["allowed"], pre["score"], pre["cluster_id"]) == ("block", False, 0.93,
                                                                                      "c_0000000000ab")
        assert api.decision("acct_pre_gone") == {"account_id": "acct_pre_gone", "action": "allow", "allowed": True,
                                                 "retry_after_s": None, "score": None, "reasons": [],
                                                 "cluster_id": None}
        assert api.decision("acct_pre_bad")["action"] == "block"  # the malformed "allow" was rejected
        assert api.decision("acct_pre_stale", peek=True)["action"] == "throttle"  # the older "allow" ignored
        assert api.metric("detector_ratelimit_invalid_records_total") == 1.0
        assert api.metric("detector_ratelimit_ready") == 1.0

        latencies: dict[str, float] = {}
        acct = "acct_live"
        # watch: counted, not limited
        sent = prod.send(acct, _record(acct, "watch", 0.6))
        _, _ = _wait_for(lambda: api.decision(acct, peek=True)["action"] == "watch", VISIBLE_WITHIN_S, "watch")
        latencies["watch"] = time.monotonic() - sent
        assert all(api.decision(acct)["allowed"] for _ in range(30))

        # throttle: a burst of 5, then limited with a retry hint
        sent = prod.send(acct, _record(acct, "throttle", 0.75))
        _wait_for(lambda: api.decision(acct, peek=True)["action"] == "throttle", VISIBLE_WITHIN_S, "throttle")
        latencies["throttle"] = time.monotonic() - sent
        answers = [api.decision(acct) for _ in range(8)]
        allowed = [a["allowed"] for a in answers]
        assert allowed[:5] == [True] * 5 and not any(allowed[5:]), allowed
        assert all(0 < a["retry_after_s"] <= 6.0 for a in answers[5:])

        # block: refused, no retry hint
        sent = prod.send(acct, _record(acct, "block", 0.95))
        blocked, _ = _wait_for(lambda: (d := api.decision(acct))["action"] == "block" and d, VISIBLE_WITHIN_S, "block")
        latencies["block"] = time.monotonic() - sent
        assert blocked["allowed"] is False and blocked["retry_after_s"] is None and blocked["score"] == 0.95

        # Malformed records that try to unblock: rejected, counted, never applied.
        before = api.metric("detector_ratelimit_invalid_records_total")
        no_model = {k: v for k, v in _record(acct, "allow", 0.0).items() if k != "model_version"}
        bad: list[dict[str, Any] | bytes] = [
            no_model,
            _record(acct, "allow", 7),
            _record(acct, "unblock", 0.0),
            _record("acct_other", "allow", 0.0),  # key says acct_live, value another account
            _record(acct, "allow", 0.0, emitted_at=int(time.time() * 1000) + 86_400_000),  # dated tomorrow
            b"{not json",
        ]
        for value in bad:
            prod.send(acct, value)
        _wait_for(lambda: api.metric("detector_ratelimit_invalid_records_total") >= before + len(bad),
                  VISIBLE_WITHIN_S, "the malformed records to be read")
        still = api.decision(acct)
        assert (still["action"], still["allowed"], still["score"]) == ("block", False, 0.95)
        assert api.metric('detector_ratelimit_accounts{action="block"}') == 3.0  # pre_block, pre_bad, live
        assert api.metric('detector_ratelimit_requests_total{verdict="limited"}') >= 4.0

        # A second limiter rebuilds the same state, the malformed tail included.
        restarted = RateLimiterService(_settings(kafka_bootstrap, topic)).start()
        assert restarted.wait_ready(30)
        again = Api(restarted.url)
        assert again.decision(acct)["action"] == "block" and again.decision("acct_pre_bad")["action"] == "block"
        assert again.decision("acct_pre_gone")["action"] == "allow"
        again.conn.close()

        log.warning("record produced -> decision visible over HTTP: %s",
                    ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in latencies.items()))
        print(f"\nlatency produced->visible: {latencies}")
        assert all(v < VISIBLE_WITHIN_S for v in latencies.values())
    finally:
        api.conn.close()
        svc.stop()
        if restarted is not None:
            restarted.stop()
    assert not svc.follower.is_alive()


def test_waits_for_a_missing_topic(kafka_bootstrap: str, create_topic: CreateTopic,
                                   producer_for: Callable[[str], Producer]) -> None:
    topic = _unique("risk-scores-later")
    svc = RateLimiterService(_settings(kafka_bootstrap, topic)).start()
    api = Api(svc.url)
    try:
        time.sleep(1.0)
        assert api.json("/healthz") == (503, {"ready": False, "accounts": 0})
        assert api.json("/v1/decision?account_id=acct_1")[0] == 503
        create_topic(kafka_bootstrap, topic, partitions=2, compacted=True)
        assert svc.wait_ready(15), "not ready after the topic was created"
        assert api.json("/healthz")[0] == 200
        sent = producer_for(topic).send("acct_1", _record("acct_1", "block", 0.9))
        _wait_for(lambda: api.decision("acct_1", peek=True)["action"] == "block", VISIBLE_WITHIN_S, "block")
        assert time.monotonic() - sent < VISIBLE_WITHIN_S
    finally:
        api.conn.close()
        svc.stop()
