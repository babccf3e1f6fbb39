"""Two real workers share one view of the clusters through ``cluster-signals`` (detector/signals.py).

::

    EventPublisher ──▶ <run>.api-calls (2 partitions) ──▶ worker A (partition 0) ──┐
                                                    └──▶ worker B (partition 1) ──┤
                           <run>.cluster-signals ◀── each worker's signals ───────┘ ──▶ read by the other

A cluster of 12 accounts on one card lives on partition 0 (worker A); an analyst blocks one of them, which
blocks the cluster on A. Then a new account on the same card makes its first call on partition 1, held by
worker B, which has never seen the cluster's events: it is blocked on first sight, because B folded in A's
signals. Without them (each worker links only its own accounts, ``tests/unit/test_signals.py`` shows the
counterfactual in-process) B would allow it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector import broker
from detector.envelope import account_partition
from detector.gateway import EventPublisher
from detector.settings import load_settings
from detector.streaming.topics import ensure_topics
from tests.factory import BASE_TS, event
from tests.integration.kafka_io import log_tail, worker_stats

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 90.0
MINUTE = 60_000
HYDRA = [a for a in (f"acct_hydra{i}" for i in range(200)) if account_partition(a, 2) == 0][:12]
NEWCOMER = next(a for a in (f"acct_fresh{i}" for i in range(200)) if account_partition(a, 2) == 1)
CARD = {"payment_fp": "pm_campaign", "tier": "build", "account_created_ts": BASE_TS - 86_400_000}


class Workers:
    """Two ``detector worker`` subprocesses in one consumer group."""

    def __init__(self, bootstrap: str, work: Path) -> None:
        run_id = f"sc-{uuid.uuid4().hex[:10]}"
        self.bootstrap, self.group = bootstrap, run_id
        names = ("api_calls", "risk_scores", "dead_letters", "analyst_labels", "blocked_keys", "cluster_signals")
        self.topics = {name: f"{run_id}.{name.replace('_', '-')}" for name in names}
        base = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
        base.update({"DETECTOR_KAFKA__BOOTSTRAP": bootstrap, "DETECTOR_WORKER__APP_ID": run_id,
                     "DETECTOR_TOPICS__PARTITIONS": "2", "DETECTOR_WORKER__BATCH_WITHIN_S": "0.05",
                     "DETECTOR_WORKER__METRICS_PORT": "0",
                     **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in self.topics.items()}})
        ensure_topics(load_settings({k: v for k, v in base.items() if k.startswith("DETECTOR_")}))
        self.ports, self.procs, self.logs = [], [], []
        for name in ("a", "b"):
            port = broker.free_port()
            env = {**base, "DETECTOR_WORKER__WEB_PORT": str(port), "DETECTOR_WORKER__DATA_DIR": str(work / name)}
            log = work / f"worker-{name}.log"
            with open(log, "wb") as sink:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], cwd=ROOT, env=env,
                                                   stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            self.ports.append(port)
            self.logs.append(log)

    def stats(self) -> list[dict[str, Any]]:
        return [worker_stats(p) or {} for p in self.ports]

    def wait(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    pytest.fail(f"a worker exited ({proc.returncode}) before {what}:\n{self.tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {WAIT_S:.0f} s waiting for {what}; stats {self.stats()}\n"
                            + "\n".join(self.tail(log) for log in self.logs))
            time.sleep(0.2)

    def group_stable(self) -> bool:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        logging.getLogger("kafka.admin").setLevel(logging.ERROR)  # it cannot decode Faust's assignor metadata: fine
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            info = admin.describe_groups([self.group])[self.group]
        except KafkaError:  # the coordinator is not ready yet (the broker creates __consumer_offsets on demand)
            return False
        finally:
            admin.close()
        return info.get("group_state") == "Stable" and len(info.get("members", ())) == 2

    def stop(self) -> list[tuple[int | None, str]]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        out = []
        for proc, log in zip(self.procs, self.logs, strict=True):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.append((proc.returncode, log.read_text(errors="replace")))
        return out

    tail = staticmethod(log_tail)


def read_scores(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1500)
    try:
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return [orjson.loads(m.value) for m in consumer]
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def outcome(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workers = Workers(kafka_bootstrap, tmp_path_factory.mktemp("shared"))
    result: dict[str, Any] = {}
    try:
        workers.wait("both web servers", lambda: all(workers.stats()))
        workers.wait("a stable group of two", workers.group_stable)
        workers.wait("both following cluster-signals",
                     lambda: all("following " in log.read_text(errors="replace") for log in workers.logs))
        hydra = [event(a, BASE_TS + (i * len(HYDRA) + j) * MINUTE, f"Task {i}: sort list {j}", billing=CARD,
                       client={"ip": f"203.0.113.{j}", "asn": 64999, "country": "SG", "user_agent": "httpx/0.27",
                               "tls_fp": "t13d_bot"})
                 for i in range(2) for j, a in enumerate(HYDRA)]
        with EventPublisher(kafka_bootstrap, workers.topics["api_calls"]) as pub:
            for ev in hydra:
                pub.publish(ev)
        n = len(hydra)
        workers.wait(f"{n} events and their signals on the other worker",
                     lambda: sum(s.get("events_processed", 0) for s in workers.stats()) == n
                     and max(s.get("signals_applied", 0) for s in workers.stats()) >= n)
        label = {"schema_version": 1, "account_id": HYDRA[0], "label": "attack", "analyst": "kim",
                 "ts": BASE_TS + 3 * len(HYDRA) * MINUTE}
        with EventPublisher(kafka_bootstrap, workers.topics["analyst_labels"], validate=False) as pub:
            pub.publish_raw(HYDRA[0], orjson.dumps(label))  # keyed by account: partition 0, worker A
        workers.wait("the label's signals on the other worker (the verdict, the cluster blocked)",
                     lambda: max(s.get("signals_applied", 0) for s in workers.stats()) >= n + 2)
        fresh = event(NEWCOMER, BASE_TS + 4 * len(HYDRA) * MINUTE, "Hello, what can you do?", billing=CARD,
                      client={"ip": "198.51.100.77", "asn": 64512, "country": "DE", "user_agent": "curl/8.5",
                              "tls_fp": "t13d_other"})
        with EventPublisher(kafka_bootstrap, workers.topics["api_calls"]) as pub:
            pub.publish(fresh)
        workers.wait("the newcomer's event, and its signals on the other worker",
                     lambda: sum(s.get("events_processed", 0) for s in workers.stats()) == n + 1
                     and min(s.get("signals_applied", 0) for s in workers.stats()) >= 2)
        result["stats"] = workers.stats()
    finally:
        result["stopped"] = workers.stop()
    result["scores"] = read_scores(kafka_bootstrap, workers.topics["risk_scores"])
    yield result


def test_the_cluster_and_the_newcomer_were_on_different_workers(outcome: dict[str, Any]) -> None:
    processed = sorted(s["events_processed"] for s in outcome["stats"])
    assert processed == [1, 2 * len(HYDRA)]
    # Each worker applied the other's signals: A the newcomer's event and its being caught (blocked on first sight),
    # B the cluster's events, the analyst's verdict (its fusion model learned it too) and the cluster blocked.
    assert sorted(s["signals_applied"] for s in outcome["stats"]) == [2, 2 * len(HYDRA) + 2]


def test_a_newcomer_on_a_blocked_clusters_card_is_blocked_on_first_sight_by_the_other_worker(
        outcome: dict[str, Any]) -> None:
    [rec] = [r for r in outcome["scores"] if r["account_id"] == NEWCOMER]
    assert rec["action"] == "block", rec
    assert "linked_to_blocked" in {r["code"] for r in rec["reasons"]}
    labelled = [r for r in outcome["scores"] if r["account_id"] == HYDRA[0]]
    assert labelled[-1]["action"] == "block" and rec["cluster_id"] is not None


def test_both_workers_stop_cleanly(outcome: dict[str, Any]) -> None:
    for code, log in outcome["stopped"]:
        assert code == 0, log[-3000:]
        assert "Traceback" not in log
        assert "following " in log  # the signal follower started
