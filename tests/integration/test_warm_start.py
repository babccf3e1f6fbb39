"""A restarted worker gets its cross-account state back from ``cluster-signals`` (the warm start,
``detector.streaming.app.warm_up``), on a real broker with real workers, one after the other::

    worker 1: a cluster of 12 accounts on one card, an analyst blocks one (the cluster is blocked); stops
    worker 2: signals lookback 0.5 s (cold): a newcomer on the card is not blocked; stops
    worker 3: default lookback (warm): another newcomer on the card is blocked on its first call

Each worker gets its accounts back from the changelog either way (the blocked account stays blocked). What
only the warm start brings back is the cluster: its links, its windows, that it is blocked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector import broker
from detector.gateway import EventPublisher
from detector.settings import load_settings
from detector.streaming.topics import ensure_topics
from tests.factory import BASE_TS, event
from tests.integration.kafka_io import read_topic, stop_worker, wait_for_worker, worker_stats

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 90.0
MINUTE = 60_000
HYDRA = [f"acct_hydra{i}" for i in range(12)]
CARD = {"payment_fp": "pm_campaign", "tier": "build", "account_created_ts": BASE_TS - 86_400_000}


class Worker:
    """One ``detector worker`` subprocess on the run's topics (one partition)."""

    def __init__(self, env: dict[str, str], work: Path, name: str) -> None:
        self.port = broker.free_port()
        self.log = work / f"worker-{name}.log"
        env = {**env, "DETECTOR_WORKER__WEB_PORT": str(self.port), "DETECTOR_WORKER__DATA_DIR": str(work / name)}
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], cwd=ROOT, env=env,
                                         stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stats(self) -> dict[str, Any]:
        return worker_stats(self.port) or {}

    def wait(self, what: str, done: Callable[[], bool]) -> None:
        wait_for_worker(what, done, self.proc, self.log, WAIT_S)

    def ready(self) -> None:
        self.wait("the worker to follow cluster-signals and take its partition",
                  lambda: "following " in self.log.read_text(errors="replace")
                  and "Ready" in self.log.read_text(errors="replace") and bool(self.stats()))

    def stop(self) -> tuple[int | None, str]:
        return stop_worker(self.proc), self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def outcome(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("warm")
    run_id = f"ws-{uuid.uuid4().hex[:10]}"
    names = ("api_calls", "risk_scores", "dead_letters", "analyst_labels", "blocked_keys", "cluster_signals")
    topics = {name: f"{run_id}.{name.replace('_', '-')}" for name in names}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    env.update({"DETECTOR_KAFKA__BOOTSTRAP": kafka_bootstrap, "DETECTOR_WORKER__APP_ID": run_id,
                "DETECTOR_TOPICS__PARTITIONS": "1", "DETECTOR_WORKER__BATCH_WITHIN_S": "0.05",
                "DETECTOR_WORKER__METRICS_PORT": "0",
                **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()}})
    ensure_topics(load_settings({k: v for k, v in env.items() if k.startswith("DETECTOR_")}))
    client = {"ip": "203.0.113.9", "asn": 64999, "country": "SG", "user_agent": "httpx/0.27", "tls_fp": "t13d_bot"}
    newcomer_client = {"ip": "198.51.100.77", "asn": 64512, "country": "DE", "user_agent": "curl/8.5",
                       "tls_fp": "t13d_other"}
    result: dict[str, Any] = {"stopped": []}

    def newcomer(worker: Worker, account: str, ts: int) -> None:
        before = worker.stats().get("events_processed", 0)
        with EventPublisher(kafka_bootstrap, topics["api_calls"]) as pub:
            pub.publish(event(account, ts, "Hello, what can you do?", billing=CARD, client=newcomer_client))
        worker.wait(f"{account}'s event", lambda: worker.stats().get("events_processed", 0) > before)

    # 1. The cluster, and an analyst's verdict that blocks it.
    first = Worker(env, work, "1")
    try:
        first.ready()
        hydra = [event(a, BASE_TS + (i * len(HYDRA) + j) * MINUTE, f"Task {i}: sort list {j}", billing=CARD,
                       client={**client, "ip": f"203.0.113.{j}"})
                 for i in range(2) for j, a in enumerate(HYDRA)]
        with EventPublisher(kafka_bootstrap, topics["api_calls"]) as pub:
            for ev in hydra:
                pub.publish(ev)
        result["n"] = n = len(hydra)
        first.wait(f"{n} events", lambda: first.stats().get("events_processed", 0) == n)
        label = {"schema_version": 1, "account_id": HYDRA[0], "label": "attack", "analyst": "kim",
                 "ts": BASE_TS + 3 * len(HYDRA) * MINUTE}
        with EventPublisher(kafka_bootstrap, topics["analyst_labels"], validate=False) as pub:
            pub.publish_raw(HYDRA[0], orjson.dumps(label))
        # The events' signals, the verdict and the cluster blocked: n + 2.
        first.wait("the verdict's signals", lambda: first.stats().get("signals_published", 0) >= n + 2)
        result["published"] = first.stats()["signals_published"]
    finally:
        result["stopped"].append(first.stop())
    # 2. Cold: a lookback shorter than the time since worker 1's last signal reads none of them.
    # 3. Warm: the default lookback (a day) folds in everything workers 1 and 2 signalled.
    for i, (how, lookback) in enumerate((("cold", "0.5"), ("warm", None)), start=1):
        restarted = Worker({**env, "DETECTOR_WORKER__SIGNALS_LOOKBACK_S": lookback} if lookback else env, work, how)
        try:
            restarted.ready()
            result[f"{how}_stats_start"] = restarted.stats()
            newcomer(restarted, f"acct_fresh{i}", BASE_TS + (3 + i) * len(HYDRA) * MINUTE)
        finally:
            result["stopped"].append(restarted.stop())
    result["scores"] = [orjson.loads(m.value) for m in read_topic(kafka_bootstrap, topics["risk_scores"], 1)]
    yield result


def _last(scores: list[dict[str, Any]], account: str) -> dict[str, Any]:
    """The account's latest risk-score record; an account never scored above allow has none."""
    return ([{"action": "allow"}] + [r for r in scores if r["account_id"] == account])[-1]


def test_a_cold_start_does_not_know_the_blocked_cluster(outcome: dict[str, Any]) -> None:
    assert outcome["cold_stats_start"]["warmup_signals"] == 0
    assert _last(outcome["scores"], "acct_fresh1")["action"] not in ("throttle", "block")


def test_a_warm_start_blocks_a_newcomer_on_the_blocked_clusters_card_on_first_sight(outcome: dict[str, Any]) -> None:
    # Worker 1's signals (its events, the verdict, the cluster blocked) and worker 2's (the first newcomer).
    assert outcome["warm_stats_start"]["warmup_signals"] == outcome["published"] + 1
    rec = _last(outcome["scores"], "acct_fresh2")
    assert rec["action"] == "block", rec
    assert "linked_to_blocked" in {r["code"] for r in rec["reasons"]}
    assert _last(outcome["scores"], HYDRA[0])["action"] == "block"


def test_the_workers_stop_cleanly_and_log_their_warm_start(outcome: dict[str, Any]) -> None:
    for code, log in outcome["stopped"]:
        assert code == 0, log[-3000:]
        assert "Traceback" not in log
    warm_log = outcome["stopped"][2][1]
    folded = re.search(r"warm start: (\d+) signals from (\d+) messages folded in", warm_log)
    assert folded is not None, warm_log[-3000:]
    assert int(folded.group(1)) == outcome["published"] + 1
