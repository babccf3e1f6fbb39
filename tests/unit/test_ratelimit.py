"""The rate limiter without a broker: DecisionBook, token buckets with an injected clock, and the HTTP API
on a real loopback server fed by a DecisionBook directly."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from detector.ratelimit import (
    ACTIONS,
    Buckets,
    DecisionBook,
    Limit,
    Policy,
    RateLimiter,
    RateLimitMetrics,
    RateLimitServer,
    TokenBucket,
    parse_record,
)
from detector.schemas import SCORE_SCHEMA, InvalidEvent, load_schema
from detector.settings import RateLimitSettings, SettingsError, load_settings

NOW_S = 1_775_000_100.0  # the book's wall clock in these tests
T0 = 1_775_000_000_000  # emitted_at of the first records (100 s before NOW_S)


def record(account_id: str = "acct_1", action: str = "block", *, emitted_at: int = T0, event_ts: int = T0 - 5_000,
           **overrides: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "schema_version": 1, "account_id": account_id, "cluster_id": "c_00000000abcd", "score": 0.91,
        "action": action, "reasons": [{"code": "shared_template", "detail": "shares a template", "weight": 0.7},
                                      {"code": "cot_requests", "detail": "asks for chain of thought", "weight": 0.3}],
        "event_ts": event_ts, "emitted_at": emitted_at, "model_version": "fusion-1",
    }
    rec.update(overrides)
    return rec


def raw(rec: dict[str, Any]) -> bytes:
    return orjson.dumps(rec)


@pytest.fixture
def book() -> DecisionBook:
    return DecisionBook(wall_clock=lambda: NOW_S)


# ------------------------------------------------------------------------------------------------ book
def test_actions_match_the_schema() -> None:
    assert tuple(load_schema(SCORE_SCHEMA)["properties"]["action"]["enum"]) == ACTIONS


def test_valid_record_is_applied(book: DecisionBook) -> None:
    assert book.apply(b"acct_1", raw(record())) == "applied"
    d = book.get("acct_1")
    assert d is not None and d.action == "block" and d.score == 0.91 and d.cluster_id == "c_00000000abcd"
    assert [r["code"] for r in d.reasons] == ["shared_template", "cot_requests"]
    assert book.counts() == {"allow": 0, "watch": 0, "throttle": 0, "block": 1}
    assert book.get("acct_2") is None


def _without(field: str) -> dict[str, Any]:
    rec = record(action="allow")
    del rec[field]
    return rec


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (b"acct_1", b"{not json", "not_json"),
        (b"acct_1", b'{"score": NaN}', "not_json"),
        (b"acct_1", b"[1, 2]", "not_object"),
        (b"acct_1", raw(_without("model_version")), "schema"),
        (b"acct_1", raw(_without("emitted_at")), "schema"),
        (b"acct_1", raw(record(action="allow", score=7)), "schema"),
        (b"acct_1", raw(record(action="unblock")), "schema"),
        (b"acct_1", raw(record(action="allow", schema_version=2)), "schema"),
        (b"acct_1", raw(record(action="allow", extra="x")), "schema"),
        (b"acct_1", raw(record(action="allow", emitted_at=True)), "schema"),
        (b"acct_1", raw(record(action="allow", reasons=[{"code": "X!", "detail": "", "weight": 2}])), "schema"),
        (b"acct_1", raw(record(account_id="acct_2", action="allow")), "key_mismatch"),
        (None, raw(record(action="allow")), "no_key"),
        (None, None, "no_key"),
        (b"acct_1", raw(record(action="allow", emitted_at=T0 + 3_600_000)), "future"),
        (b"acct_1", raw(record(action="allow", model_version="x" * 70_000)), "too_large"),
    ],
)
def test_invalid_record_is_counted_and_never_applied(book: DecisionBook, key: bytes | None, value: bytes | None,
                                                     reason: str) -> None:
    book.apply(b"acct_1", raw(record(action="block")))
    assert book.apply(key, value) == "invalid"
    assert book.invalid == {reason: 1} and book.invalid_total() == 1
    held = book.get("acct_1")
    assert held is not None and held.action == "block"  # the malformed "allow" did not unblock it


def test_invalid_record_for_an_unknown_account_changes_nothing_live(book: DecisionBook) -> None:
    assert book.apply(b"acct_new", b"garbage") == "invalid"
    assert book.get("acct_new") is None and len(book) == 0


def test_invalid_record_seen_first_at_rebuild_gets_the_fallback(book: DecisionBook) -> None:
    # Compaction may have removed the valid "block" this malformed record followed: do not fall back to allow.
    assert book.apply(b"acct_1", raw(_without("model_version")), rebuilding=True) == "fallback"
    d = book.get("acct_1")
    assert d is not None and d.action == "throttle" and d.score is None and d.reasons[0]["code"] == "invalid_record"
    # ... and any valid record (however old) replaces the fallback; so does a tombstone.
    assert book.apply(b"acct_1", raw(record(action="watch", emitted_at=T0 - 10**9))) == "applied"
    assert book.get("acct_1").action == "watch"  # type: ignore[union-attr]
    assert book.apply(b"acct_2", b"{}", rebuilding=True) == "fallback"
    assert book.apply(b"acct_2", None) == "deleted" and book.get("acct_2") is None
    # A held valid decision wins over an invalid record even while rebuilding; bad keys get no fallback.
    assert book.apply(b"acct_1", b"{}", rebuilding=True) == "invalid" and book.get("acct_1").action == "watch"  # type: ignore[union-attr]
    assert book.apply(b"not a valid id!", b"{}", rebuilding=True) == "invalid" and len(book) == 1


def test_fallback_action_is_configurable() -> None:
    book = DecisionBook(rebuild_invalid_action="block", wall_clock=lambda: NOW_S)
    book.apply(b"acct_1", b"{}", rebuilding=True)
    assert book.get("acct_1").action == "block"  # type: ignore[union-attr]


def test_older_records_are_ignored(book: DecisionBook) -> None:
    assert book.apply(b"acct_1", raw(record(action="block", emitted_at=T0))) == "applied"
    assert book.apply(b"acct_1", raw(record(action="allow", emitted_at=T0 - 1))) == "stale"
    # same emitted_at: the event time breaks the tie
    assert book.apply(b"acct_1", raw(record(action="allow", emitted_at=T0, event_ts=T0 - 6_000))) == "stale"
    assert book.get("acct_1").action == "block"  # type: ignore[union-attr]
    # an equal record is re-applied (idempotent re-delivery); a newer one replaces
    assert book.apply(b"acct_1", raw(record(action="block", emitted_at=T0))) == "applied"
    assert book.apply(b"acct_1", raw(record(action="throttle", emitted_at=T0 + 1))) == "applied"
    assert book.get("acct_1").action == "throttle"  # type: ignore[union-attr]
    assert book.counts()["throttle"] == 1 and book.counts()["block"] == 0
    assert book.outcomes["stale"] == 2 and book.outcomes["applied"] == 3


def test_tombstone_deletes(book: DecisionBook) -> None:
    book.apply(b"acct_1", raw(record()))
    assert book.apply(b"acct_1", None) == "deleted"
    assert book.get("acct_1") is None and book.counts()["block"] == 0
    assert book.apply("acct_unknown", None) == "deleted"  # harmless
    assert book.apply(b"acct_1", raw(record(action="watch", emitted_at=T0 - 1))) == "applied"  # nothing held


def test_small_clock_skew_is_accepted(book: DecisionBook) -> None:
    assert book.apply(b"acct_1", raw(record(emitted_at=int(NOW_S * 1000) + 60_000))) == "applied"


def test_parse_record_accepts_str_keys() -> None:
    assert parse_record("acct_1", raw(record()), now_ms=int(NOW_S * 1000)).account_id == "acct_1"
    with pytest.raises(InvalidEvent) as err:
        parse_record(b"\xff\xfe", raw(record()), now_ms=int(NOW_S * 1000))
    assert err.value.reason == "key_mismatch"


def test_book_is_consistent_under_concurrent_writers(book: DecisionBook) -> None:
    def write(i: int) -> None:
        for n in range(300):
            book.apply(f"acct_{n % 50}".encode(), raw(record(f"acct_{n % 50}", ACTIONS[(i + n) % 4],
                                                             emitted_at=T0 + n)))
            if n % 7 == 0:
                book.apply(f"acct_{n % 50}".encode(), None)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(book.counts().values()) == len(book)


# ------------------------------------------------------------------------------------------------ buckets
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_burst_then_refill() -> None:
    b = TokenBucket.full(Limit(per_minute=10, burst=5), now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [None] * 5
    assert b.take(0.0) == 6.0
    assert b.peek(3.0) == 3.0  # half a token back
    assert b.take(6.0) is None and b.take(6.0) == 6.0
    assert b.peek(1000.0) is None and b.tokens == 5.0  # never above burst
    assert not b.idle(0.0) or b.tokens == 5.0


def test_zero_limit_refuses_forever() -> None:
    b = TokenBucket.full(Limit(0, 0), now=0.0)
    assert b.take(0.0) == float("inf") and b.take(10**9) == float("inf")


def test_policy_from_settings() -> None:
    p = Policy.from_settings(RateLimitSettings(throttle_per_minute=30, throttle_burst=3, allow_per_minute=6000,
                                               watch_per_minute=0))
    assert p.limit("allow") == Limit(6000, 6000) and p.limit("watch") is None
    assert p.limit("throttle") == Limit(30, 3) and p.limit("block") == Limit(0, 0)


def test_ratelimit_settings_from_env_and_checks() -> None:
    s = load_settings({"DETECTOR_RATELIMIT__PORT": "9000", "DETECTOR_RATELIMIT__THROTTLE_PER_MINUTE": "20",
                       "DETECTOR_RATELIMIT__REBUILD_INVALID_ACTION": "block"})
    assert (s.ratelimit.port, s.ratelimit.throttle_per_minute, s.ratelimit.metrics_port) == (9000, 20, 9465)
    for name, value in [("THROTTLE_BURST", "0"), ("WATCH_PER_MINUTE", "-1"), ("REBUILD_INVALID_ACTION", "unblock")]:
        with pytest.raises(SettingsError):
            load_settings({f"DETECTOR_RATELIMIT__{name}": value})


def test_buckets_evict_idle_and_respect_the_bound() -> None:
    clock = Clock()
    bk = Buckets(max_buckets=3, clock=clock)
    lim = Limit(per_minute=60, burst=2)  # full again 2 s after the last take
    for acct in ("a", "b", "c", "d"):
        assert bk.check(acct, lim) is None
    assert len(bk) == 3  # "a" dropped: least recently used beyond the bound
    clock.t += 10
    bk.check("e", lim)
    assert len(bk) == 1  # the others were full again: swept


def test_buckets_reset_when_the_limit_changes_and_peek_does_not_consume() -> None:
    clock = Clock()
    bk = Buckets(clock=clock)
    slow, fast = Limit(10, 1), Limit(60, 3)
    assert bk.check("a", slow) is None and bk.check("a", slow, consume=False) == 6.0
    assert bk.check("a", fast, consume=False) is None  # a fresh bucket would be full
    assert [bk.check("a", fast) for _ in range(4)] == [None, None, None, 1.0]
    assert bk.check("z", fast, consume=False) is None and len(bk) == 1  # a peek creates nothing


def test_limiter_per_action(book: DecisionBook) -> None:
    clock = Clock()
    limiter = RateLimiter(book, Policy.from_settings(RateLimitSettings()), clock=clock)
    book.apply(b"acct_w", raw(record("acct_w", "watch")))
    book.apply(b"acct_t", raw(record("acct_t", "throttle")))
    book.apply(b"acct_b", raw(record("acct_b", "block")))
    assert all(limiter.decide("acct_w")["allowed"] for _ in range(1000))
    assert all(limiter.decide("nobody")["allowed"] for _ in range(1000))
    assert len(limiter.buckets) == 0  # unlimited actions hold no bucket
    verdicts = [limiter.decide("acct_t") for _ in range(8)]
    assert [v["allowed"] for v in verdicts] == [True] * 5 + [False] * 3
    assert verdicts[-1]["retry_after_s"] == 6.0 and verdicts[0]["retry_after_s"] is None
    clock.t += 6
    assert limiter.decide("acct_t")["allowed"]
    b = limiter.decide("acct_b")
    assert (b["allowed"], b["retry_after_s"], b["action"], b["score"]) == (False, None, "block", 0.91)
    assert set(b) == {"account_id", "action", "allowed", "retry_after_s", "score", "reasons", "cluster_id"}


# ------------------------------------------------------------------------------------------------ HTTP
class Api:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # one keep-alive connection

    def get(self, path: str) -> tuple[int, bytes, str]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""

    def json(self, path: str) -> tuple[int, Any]:
        status, body, ctype = self.get(path)
        assert ctype == "application/json"
        return status, orjson.loads(body)


@pytest.fixture
def served(book: DecisionBook) -> Iterator[tuple[Api, DecisionBook, threading.Event, RateLimitMetrics]]:
    ready = threading.Event()
    limiter = RateLimiter(book, Policy.from_settings(RateLimitSettings(throttle_per_minute=6, throttle_burst=2)))
    metrics = RateLimitMetrics(book, ready=ready.is_set, buckets=lambda: len(limiter.buckets))
    limiter.metrics = metrics
    server = RateLimitServer(limiter, "127.0.0.1", 0, ready=ready.is_set, metrics=metrics).start()
    api = Api(server.port)
    try:
        yield api, book, ready, metrics
    finally:
        api.conn.close()
        server.stop()


def test_http_not_ready_then_ready(served: tuple[Api, DecisionBook, threading.Event, RateLimitMetrics]) -> None:
    api, book, ready, _ = served
    assert api.json("/healthz") == (503, {"ready": False, "accounts": 0})
    status, body = api.json("/v1/decision?account_id=acct_1")
    assert status == 503 and "not ready" in body["error"]
    book.apply(b"acct_1", raw(record()))
    ready.set()
    assert api.json("/healthz") == (200, {"ready": True, "accounts": 1})


def test_http_decisions(served: tuple[Api, DecisionBook, threading.Event, RateLimitMetrics]) -> None:
    api, book, ready, _ = served
    ready.set()
    assert api.json("/v1/decision?account_id=acct_free") == (200, {
        "account_id": "acct_free", "action": "allow", "allowed": True, "retry_after_s": None, "score": None,
        "reasons": [], "cluster_id": None})
    book.apply(b"acct_t", raw(record("acct_t", "throttle")))
    answers = [api.json("/v1/decision?account_id=acct_t")[1] for _ in range(3)]
    assert [a["allowed"] for a in answers] == [True, True, False]
    assert answers[2]["retry_after_s"] == pytest.approx(10.0, abs=0.1) and answers[2]["action"] == "throttle"
    assert answers[0]["reasons"][0] == {"code": "shared_template", "detail": "shares a template", "weight": 0.7}
    # peek consumes nothing: still limited, and repeated peeks do not make it worse
    peeks = [api.json("/v1/decision/peek?account_id=acct_t")[1] for _ in range(3)]
    assert [p["allowed"] for p in peeks] == [False] * 3
    book.apply(b"acct_t", raw(record("acct_t", "block", emitted_at=T0 + 1)))
    status, blocked = api.json("/v1/decision?account_id=acct_t")
    assert status == 200 and (blocked["allowed"], blocked["action"], blocked["retry_after_s"]) == (False, "block", None)
    book.apply(b"acct_t", raw(record("acct_t", "allow", emitted_at=T0 + 2)))
    assert api.json("/v1/decision?account_id=acct_t")[1]["allowed"] is True


def test_http_metrics(served: tuple[Api, DecisionBook, threading.Event, RateLimitMetrics]) -> None:
    api, book, ready, _ = served
    ready.set()
    book.apply(b"acct_b", raw(record("acct_b", "block")))
    book.apply(b"acct_b", b"{}")
    for _ in range(3):
        api.json("/v1/decision?account_id=acct_b")
    api.json("/v1/decision?account_id=acct_ok")
    api.json("/v1/decision/peek?account_id=acct_ok")  # not counted
    status, body, ctype = api.get("/metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain")
    for line in ['detector_ratelimit_decisions_total{action="block"} 3.0',
                 'detector_ratelimit_decisions_total{action="allow"} 1.0',
                 'detector_ratelimit_requests_total{verdict="limited"} 3.0',
                 'detector_ratelimit_requests_total{verdict="allowed"} 1.0',
                 "detector_ratelimit_invalid_records_total 1.0",
                 'detector_ratelimit_accounts{action="block"} 1.0',
                 'detector_ratelimit_records_total{outcome="invalid"} 1.0',
                 "detector_ratelimit_ready 1.0"]:
        assert line in text, line


@pytest.mark.parametrize(
    "path, status, fragment",
    [
        ("/v1/decision", 400, "missing query parameter account_id"),
        ("/v1/decision?account_id=", 400, "account_id must be"),
        ("/v1/decision?account_id=a%20b", 400, "account_id must be"),
        ("/v1/decision?account_id=" + "a" * 129, 400, "account_id must be"),
        ("/v1/decision/peek?account_id=a&account_id=b", 400, "give account_id once"),
        ("/v2/nothing", 404, "no such path"),
    ],
)
def test_http_bad_requests(served: tuple[Api, DecisionBook, threading.Event, RateLimitMetrics], path: str,
                           status: int, fragment: str) -> None:
    api, _, ready, _ = served
    ready.set()
    got, body, ctype = api.get(path)
    assert got == status and ctype == "application/json"
    assert b"\n" not in body and fragment in orjson.loads(body)["error"]


def test_http_post_is_refused(served: tuple[Api, DecisionBook, threading.Event, RateLimitMetrics]) -> None:
    api, *_ = served
    api.conn.request("POST", "/v1/decision?account_id=a", body=b"{}")
    resp = api.conn.getresponse()
    assert resp.status == 405 and b"use GET" in resp.read()


def test_stopping_the_server_ends_keep_alive_connections(book: DecisionBook) -> None:
    server = RateLimitServer(RateLimiter(book, Policy.from_settings(RateLimitSettings())), "127.0.0.1", 0).start()
    api = Api(server.port)
    try:
        assert api.json("/healthz")[0] == 200
        server.stop()
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            api.get("/healthz")
    finally:
        api.conn.close()
        server.stop()  # idempotent


def test_service_takes_kafka_security_from_settings() -> None:
    from detector.ratelimit import RateLimiterService
    from detector.settings import KafkaSettings, Secret, Settings, TopicSettings

    s = Settings(kafka=KafkaSettings(bootstrap="k1:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                                     sasl_username="limiter", sasl_password=Secret("pw"), ssl_cafile="/ca.pem"),
                 topics=TopicSettings(risk_scores="scores"), ratelimit=RateLimitSettings(client_id="rl-1"))
    svc = RateLimiterService(s)  # constructing opens nothing
    cfg = svc.follower.kafka_config
    assert (cfg["bootstrap_servers"], cfg["security_protocol"], cfg["sasl_mechanism"]) == (["k1:9093"], "SASL_SSL",
                                                                                          "SCRAM-SHA-512")
    assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"], cfg["ssl_cafile"]) == ("limiter", "pw", "/ca.pem")
    assert svc.follower.topic == "scores" and svc.follower.client_id == "rl-1"
    assert not svc.follower.is_alive()


def test_service_without_a_broker_serves_503_and_stops_promptly() -> None:
    import time

    from detector.broker import free_port
    from detector.ratelimit import RateLimiterService
    from detector.settings import KafkaSettings, Settings

    metrics_port = free_port()
    s = Settings(kafka=KafkaSettings(bootstrap="127.0.0.1:1"),
                 ratelimit=RateLimitSettings(host="127.0.0.1", port=0, metrics_port=metrics_port))
    with RateLimiterService(s) as svc:
        api = Api(svc.server.port)  # type: ignore[union-attr]
        assert api.json("/healthz")[0] == 503
        metrics = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
        metrics.request("GET", "/metrics")
        assert b"detector_ratelimit_ready 0.0" in metrics.getresponse().read()
        metrics.close()
        api.conn.close()
        started = time.monotonic()
    assert time.monotonic() - started < 6 and not svc.follower.is_alive()
