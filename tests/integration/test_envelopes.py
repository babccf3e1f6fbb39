"""Envelopes end to end: the gateway SDK's envelope mode, a real broker, the worker as a subprocess.

One module run, on a topic of 2 partitions, with its own topics and consumer group::

    EventPublisher(envelope_max_events=64) ──▶ <run>.api-calls (2 partitions) ──▶ detector worker ──▶ risk-scores
    hand-made envelopes (KafkaProducer)   ──┘                                          └──▶ api-calls.dlq
      ├ a valid event, an invalid one (index 1), one on the other partition (index 2)
      └ a malformed envelope (refused whole)
    then: stop the worker, rewind the group to offset 0, start it again (a redelivery of everything)

Checks: every valid event is counted once in the account-state changelog (the durable counts ``make chaos``
reads), the bad ones are dead-lettered with their reason and index, scores come out, every message is
committed, and after the rewind the restarted worker skips every event it had applied (by position: most
accounts have more events than the 8 recent ids an account remembers) and the counts do not move.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector import broker, envelope, simulate
from detector.chaos import read_state
from detector.detection import load_account
from detector.gateway import EventPublisher
from detector.schemas import DEAD_LETTER_SCHEMA, SCORE_SCHEMA, validate
from detector.settings import load_settings
from detector.streaming.app import ACCOUNT_TABLE
from detector.streaming.topics import ensure_topics, read_to_end
from tests.integration.conftest import create_topic
from tests.integration.kafka_io import stop_worker, wait_for_worker, worker_stats

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 2
EVENTS = 1500
WAIT_S = 90.0


@dataclass
class Run:
    bootstrap: str
    topics: dict[str, str]
    app_id: str
    valid: list[dict[str, Any]] = field(default_factory=list)  # every valid event sent (the SDK's and hand-made)
    bad: dict[tuple[int, int, int | None], str] = field(default_factory=dict)  # (partition, offset, index) -> reason
    envelopes: int = 0  # envelope messages on the topic
    first: dict[str, Any] = field(default_factory=dict)  # the first worker's stats
    second: dict[str, Any] = field(default_factory=dict)  # after the rewind
    state_first: dict[str, int] = field(default_factory=dict)  # account -> events, from the changelog
    state_second: dict[str, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)
    sdk_partitions: dict[str, int] = field(default_factory=dict)  # the SDK's choice per account
    kafka_partitions: dict[str, int] = field(default_factory=dict)  # kafka-python's, for key = account_id
    scores: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


class _Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], cwd=ROOT, env=env,
                                         stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, what: str, done: Any) -> None:
        wait_for_worker(what, done, self.proc, self.log, WAIT_S, tail_lines=40)

    def stop(self) -> str:
        stop_worker(self.proc)
        return self.log.read_text(errors="replace")


def _offsets(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        end = {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
        done = {tp.partition: meta.offset for tp, meta in admin.list_group_offsets([group]).get(group, {}).items()
                if tp.topic == topic}
        return {p: done.get(p, 0) for p in range(PARTITIONS)}, end
    finally:
        admin.close()
        consumer.close()


def _rewind(bootstrap: str, group: str, topic: str) -> None:
    """Commit offset 0 on every partition of ``topic`` for ``group`` (which must have no member)."""
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.structs import OffsetAndMetadata

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        result = admin.alter_group_offsets(group, {TopicPartition(topic, p): OffsetAndMetadata(0, "", -1)
                                                   for p in range(PARTITIONS)})
        assert all(err.__name__ == "NoError" for err in result.values()), result
    finally:
        admin.close()


def _counts(bootstrap: str, app_id: str) -> dict[str, int]:
    state = read_state(bootstrap, f"{app_id}-{ACCOUNT_TABLE}-changelog")
    return {aid: load_account(blob)[0].state.events for aid, blob in state.items()}


def _hand_made(run: Run, events: list[dict[str, Any]]) -> None:
    """Envelopes the SDK never makes, sent to chosen partitions with a plain kafka-python producer."""
    from kafka import KafkaProducer

    here = next(e for e in events if envelope.account_partition(e["account_id"], PARTITIONS) == 1)
    there = next(e for e in events if envelope.account_partition(e["account_id"], PARTITIONS) == 0)
    valid = {**here, "event_id": f"{here['event_id']}-handmade"}
    invalid = {**here, "event_id": f"{here['event_id']}-negative", "output_tokens": -3}
    misplaced = {**there, "event_id": f"{there['event_id']}-misplaced"}
    producer = KafkaProducer(bootstrap_servers=run.bootstrap, acks="all")
    try:
        mixed = envelope.encode([orjson.dumps(valid), orjson.dumps(invalid), orjson.dumps(misplaced)])
        meta = producer.send(run.topics["api_calls"], value=mixed, partition=1).get(timeout=30)
        run.bad[(1, meta.offset, 1)] = "schema"
        run.bad[(1, meta.offset, 2)] = "wrong_partition"
        run.valid.append(valid)
        malformed = b'{"schema_version":1,"kind":"envelope","events":[],"note":"empty"}'
        meta = producer.send(run.topics["api_calls"], value=malformed, partition=0).get(timeout=30)
        run.bad[(0, meta.offset, None)] = "schema"
        run.envelopes += 2
        # kafka-python's own choice for key = account_id, to compare with the SDK's
        for aid in sorted({e["account_id"] for e in events})[:50]:
            run.kafka_partitions[aid] = producer.send(run.topics["api_calls"] + ".keys", key=aid.encode(),
                                                      value=b"{}").get(timeout=30).partition
    finally:
        producer.close()


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    run_id = f"env-{uuid.uuid4().hex[:10]}"
    topics = {"api_calls": f"{run_id}.api-calls", "dead_letters": f"{run_id}.api-calls.dlq",
              "risk_scores": f"{run_id}.risk-scores", "analyst_labels": f"{run_id}.analyst-labels",
              "cluster_signals": f"{run_id}.cluster-signals"}
    work = tmp_path_factory.mktemp("envelopes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    env.update({"DETECTOR_KAFKA__BOOTSTRAP": kafka_bootstrap, "DETECTOR_WORKER__APP_ID": run_id,
                "DETECTOR_WORKER__WEB_PORT": str(broker.free_port()), "DETECTOR_WORKER__METRICS_PORT": "0",
                "DETECTOR_TOPICS__PARTITIONS": str(PARTITIONS), "DETECTOR_WORKER__BATCH_WITHIN_S": "0.05",
                "DETECTOR_DETECTION__IDLE_EVICT_S": str(10 * 365 * 86400),  # every count stays checkable
                **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()}})
    ensure_topics(load_settings({k: v for k, v in env.items() if k.startswith("DETECTOR_")}))
    create_topic(kafka_bootstrap, topics["api_calls"] + ".keys", partitions=PARTITIONS)  # conftest's
    web = int(env["DETECTOR_WORKER__WEB_PORT"])
    result = Run(kafka_bootstrap, topics, run_id)
    events = list(simulate.build("smoke").events())[:EVENTS]

    first = _Worker(dict(env, DETECTOR_WORKER__DATA_DIR=str(work / "data-1")), work / "worker-1.log")
    try:
        first.wait("its web server", lambda: worker_stats(web) is not None)
        with EventPublisher(kafka_bootstrap, topics["api_calls"], envelope_max_events=64,
                            envelope_linger_ms=20) as pub:
            acks = [pub.publish(ev) for ev in events]
            result.sdk_partitions = {aid: pub.partition_for(aid) for aid in {e["account_id"] for e in events}}
        result.envelopes += len({(f.value.partition, f.value.offset) for f in acks})
        result.valid += events
        _hand_made(result, events)
        total = len(result.valid) + len(result.bad)
        first.wait(f"{total} events", lambda: (worker_stats(web) or {}).get("events") == total)
        first.wait("every offset committed",
                   lambda: (lambda c, e: c == e)(*_offsets(kafka_bootstrap, run_id, topics["api_calls"])))
        result.first = worker_stats(web) or {}
    finally:
        result.logs.append(first.stop())
    result.committed, result.end = _offsets(kafka_bootstrap, run_id, topics["api_calls"])
    result.state_first = _counts(kafka_bootstrap, run_id)

    _rewind(kafka_bootstrap, run_id, topics["api_calls"])  # the whole topic is redelivered to a fresh worker
    second = _Worker(dict(env, DETECTOR_WORKER__DATA_DIR=str(work / "data-2")), work / "worker-2.log")
    try:
        second.wait("the redelivered events", lambda: (worker_stats(web) or {}).get("events") == total)
        second.wait("every offset committed again",
                    lambda: (lambda c, e: c == e)(*_offsets(kafka_bootstrap, run_id, topics["api_calls"])))
        result.second = worker_stats(web) or {}
    finally:
        result.logs.append(second.stop())
    result.state_second = _counts(kafka_bootstrap, run_id)
    result.scores = [(m.key, orjson.loads(m.value)) for m in
                     read_to_end(kafka_bootstrap, topics["risk_scores"])]
    result.dead_letters = [orjson.loads(m.value) for m in read_to_end(kafka_bootstrap, topics["dead_letters"])]
    yield result


def test_the_sdk_puts_each_account_where_kafka_python_puts_its_key(run: Run) -> None:
    assert len(run.kafka_partitions) == 50 and set(run.kafka_partitions.values()) == {0, 1}
    for aid, partition in run.kafka_partitions.items():
        assert run.sdk_partitions[aid] == partition, aid


def test_envelopes_carry_many_events_each(run: Run) -> None:
    assert run.first["envelopes"] == run.envelopes < len(run.valid) / 20
    assert run.first["messages"] == run.envelopes == sum(run.end.values())


def test_every_valid_event_is_counted_once_and_every_message_committed(run: Run) -> None:
    s = run.first
    assert s["events_processed"] == len(run.valid)
    assert s["events_invalid"] == len(run.bad) == 3 and s["envelopes_invalid"] == 1
    assert s["detector"]["duplicates"] == 0
    assert run.committed == run.end
    expected = Counter(e["account_id"] for e in run.valid)
    assert run.state_first == dict(expected)


def test_bad_events_are_dead_lettered_with_their_reason_and_index(run: Run) -> None:
    got: dict[tuple[int, int, int | None], str] = {}
    for d in run.dead_letters:
        validate(DEAD_LETTER_SCHEMA, d)
        got[(d["source_partition"], d["source_offset"], d.get("envelope_index"))] = d["reason"]
    assert got == run.bad  # each dead-lettered again on the redelivery: same key, same reason
    assert len(run.dead_letters) == 2 * len(run.bad)
    assert run.first["invalid_by_reason"] == {"schema": 2, "wrong_partition": 1}


def test_scores_come_out_keyed_by_account(run: Run) -> None:
    assert run.first["records"] > 20
    for key, rec in run.scores:
        validate(SCORE_SCHEMA, rec)
        assert key == rec["account_id"].encode()


def test_a_redelivery_after_a_restart_counts_nothing_twice(run: Run) -> None:
    s = run.second
    assert s["detector"]["restored"] >= len(run.state_first)  # the state came back from the changelog
    assert s["detector"]["duplicates"] == len(run.valid)  # every redelivered event recognised...
    assert s["detector"]["events"] == 0  # ...and none folded in again
    assert run.state_second == run.state_first
    assert max(run.state_first.values()) > 8  # more than an account's recent ids: positions did the skipping


def test_both_workers_stopped_cleanly(run: Run) -> None:
    for log in run.logs:
        assert "Traceback" not in log, log[-3000:]
        assert "worker stopped: messages=" in log
