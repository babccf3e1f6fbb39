"""The Faust worker as a real subprocess (``detector worker``) against a real broker.

One worker run per module (starting a worker costs a few seconds), with its own topics and consumer group::

    EventPublisher ──▶ <run>.api-calls (1 partition) ──▶ detector worker ──▶ <run>.risk-scores (compacted)
     valid events + invalid raw payloads                        │      └──▶ <run>.api-calls.dlq
    analyst labels ──▶ <run>.analyst-labels ────────────────────┘

The tests then read the output topics back with kafka-python and check them: scores match the schema,
every invalid payload is dead-lettered with the right reason, every valid event is counted, and the
worker's records equal those of the same ``Detector`` run in-process over the topic's events in offset
order (what ``detector replay`` does with a file). Valid events come from the simulator's ``smoke`` scenario
(about 5,500 events, one simulated day, four campaigns among ordinary traffic).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaAdminClient

from detector import broker, simulate
from detector.detection import Detector
from detector.gateway import EventPublisher
from detector.schemas import DEAD_LETTER_SCHEMA, SCORE_SCHEMA, InvalidEvent, decode_event, validate
from detector.settings import load_settings
from detector.streaming.topics import committed, ensure_topics
from tests.integration.kafka_io import read_topic, wait_for_worker, worker_health, worker_stats

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3_600_000
WAIT_S = 60.0
HEALTH_SAMPLES = 12  # /healthz once a second once the worker is idle: over two stall limits and two watch periods

def invalid_payloads(valid: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(expected dead-letter reason, payload) for each kind of bad input."""
    missing = {k: v for k, v in valid.items() if k not in ("ts", "prompt")}
    negative = {**valid, "event_id": "evt_negative_tokens", "input_tokens": -5}
    return [
        ("not_json", b'{"account_id": "acct_broken", "ts": '),
        ("not_object", b"[1, 2, 3]"),
        ("schema", orjson.dumps(missing)),
        ("schema", orjson.dumps(negative)),
        ("too_large", b'{"pad": "' + b"x" * 100_000 + b'"}'),
    ]


def labels(sim: simulate.Simulation) -> list[tuple[str | None, bytes]]:
    """(expected dead-letter reason, or None for a valid label; payload): an ordinary account reported as
    an attack, an attacker cleared as benign, and two invalid labels."""
    ordinary = min(a for a, lab in sim.labels.items() if not lab.attack)
    attacker = min(a for a, lab in sim.labels.items() if lab.attack)
    ts = sim.end_ts + HOUR
    return [
        (None, orjson.dumps({"schema_version": 1, "account_id": ordinary, "label": "attack", "analyst": "kim",
                             "ts": ts, "note": "confirmed by the trust team"})),
        ("not_json", b'{"account_id": '),
        ("schema", orjson.dumps({"schema_version": 1, "account_id": ordinary, "label": "maybe", "analyst": "kim",
                                 "ts": ts})),
        (None, orjson.dumps({"schema_version": 1, "account_id": attacker, "label": "benign", "analyst": "lee",
                             "ts": ts})),
    ]


@dataclass
class Run:
    """What one worker run was given and what it produced."""

    bootstrap: str
    topics: dict[str, str]
    app_id: str
    labels: list[tuple[str | None, bytes]]
    valid: int = 0
    invalid: dict[int, tuple[str, bytes, str]] = field(default_factory=dict)  # offset -> (reason, payload, key)
    stats: dict[str, Any] = field(default_factory=dict)
    health: list[tuple[int, dict[str, Any]] | None] = field(default_factory=list)  # /healthz, every 1 s, once idle
    metrics: dict[str, float] = field(default_factory=dict)  # 'name{label="v"}' -> value, scraped before stop
    scores: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, dict[str, Any]]] = field(default_factory=list)
    returncode: int | None = None
    log: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _wait(what: str, done: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    wait_for_worker(what, done, proc, log, WAIT_S, tail_lines=40)


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    t0 = time.monotonic()
    run_id = f"wt-{uuid.uuid4().hex[:10]}"
    topics = {"api_calls": f"{run_id}.api-calls", "dead_letters": f"{run_id}.api-calls.dlq",
              "risk_scores": f"{run_id}.risk-scores", "analyst_labels": f"{run_id}.analyst-labels",
              "cluster_signals": f"{run_id}.cluster-signals"}
    work = tmp_path_factory.mktemp("worker")
    web_port, metrics_port = broker.free_port(), broker.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    env.update({"DETECTOR_KAFKA__BOOTSTRAP": kafka_bootstrap, "DETECTOR_WORKER__APP_ID": run_id,
                "DETECTOR_WORKER__DATA_DIR": str(work / "data"), "DETECTOR_WORKER__WEB_PORT": str(web_port),
                "DETECTOR_WORKER__METRICS_PORT": str(metrics_port), "DETECTOR_TOPICS__PARTITIONS": "1",
                "DETECTOR_WORKER__BATCH_WITHIN_S": "0.05", "DETECTOR_WORKER__COMMIT_STALL_S": "3",
                **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()}})
    ensure_topics(load_settings({k: v for k, v in env.items() if k.startswith("DETECTOR_")}))
    log = work / "worker.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        sim = simulate.build("smoke")  # while the worker starts
        events = list(sim.events())
        result = Run(kafka_bootstrap, topics, run_id, labels(sim))
        _wait("its web server", lambda: worker_stats(web_port) is not None, proc, log)
        result.timings["sim_built_and_worker_up_s"] = time.monotonic() - t0

        bad = invalid_payloads(events[0])
        slots = {len(events) * (i + 1) // (len(bad) + 1): item for i, item in enumerate(bad)}
        with EventPublisher(kafka_bootstrap, topics["api_calls"]) as pub:
            for i, ev in enumerate(events):
                if i in slots:  # invalid payloads in between valid events: they must not disturb them
                    reason, payload = slots[i]
                    key = f"acct_bad{i}"
                    offset = pub.publish_raw(key, payload).get(timeout=30).offset
                    result.invalid[offset] = (reason, payload, key)
                pub.publish(ev)
        result.valid = len(events)
        total = len(events) + len(bad)
        _wait(f"{total} events", lambda: (worker_stats(web_port) or {}).get("events") == total, proc, log)
        result.timings["events_done_s"] = time.monotonic() - t0

        # Labels only once every event is processed, so where they fall among the events is deterministic.
        with EventPublisher(kafka_bootstrap, topics["analyst_labels"], validate=False) as pub:
            for _, payload in result.labels:
                pub.publish_raw("analyst", payload)  # keyed by account in production; any key will do here
        _wait("the labels", lambda: (worker_stats(web_port) or {}).get("labels") == len(result.labels), proc, log)
        result.stats = worker_stats(web_port) or {}
        # Caught up: every input committed. On a loaded machine the last commit can trail the last event by more
        # than COMMIT_STALL_S, and /healthz rightly reports that as a stall; the samples below are of an idle worker.
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            _wait("the last commit", lambda: committed(admin, run_id, topics["api_calls"]) == total, proc, log)
        finally:
            admin.close()
        # Idle and caught up for longer than COMMIT_STALL_S (3 s here): never stalled.
        for _ in range(HEALTH_SAMPLES):
            time.sleep(1.0)
            result.health.append(worker_health(web_port))
        result.metrics = _scrape(metrics_port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        returncode, log_text = proc.returncode, log.read_text(errors="replace")
    result.returncode, result.log = returncode, log_text
    result.timings["stopped_s"] = time.monotonic() - t0
    result.scores = [(m.key, orjson.loads(m.value)) for m in
                     read_topic(kafka_bootstrap, topics["risk_scores"], result.stats["records"])]
    result.dead_letters = [(m.key, orjson.loads(m.value)) for m in
                           read_topic(kafka_bootstrap, topics["dead_letters"], result.stats["dead_letters"])]
    yield result
    print(f"\nworker run timings: {result.timings}")


def test_every_valid_event_is_processed_and_every_input_committed(run: Run) -> None:
    s = run.stats
    assert s["events_processed"] == run.valid
    assert s["events_invalid"] == len(run.invalid)
    assert s["events_internal"] == 0
    assert s["events"] == run.valid + len(run.invalid)
    admin = KafkaAdminClient(bootstrap_servers=run.bootstrap)
    try:
        committed = admin.list_group_offsets([run.app_id])[run.app_id]
    finally:
        admin.close()
    offsets = {tp.topic: meta.offset for tp, meta in committed.items()}
    assert offsets[run.topics["api_calls"]] == s["events"]
    assert offsets[run.topics["analyst_labels"]] == len(run.labels)


def test_scores_are_valid_records_keyed_by_account(run: Run) -> None:
    assert len(run.scores) == run.stats["records"] > 20
    for key, rec in run.scores:
        validate(SCORE_SCHEMA, rec)
        assert key == rec["account_id"].encode()
    assert {rec["action"] for _, rec in run.scores} >= {"block", "allow"}
    assert any(rec["cluster_id"] for _, rec in run.scores)


def test_invalid_payloads_are_dead_lettered_with_their_reason(run: Run) -> None:
    events_dlq = [(k, d) for k, d in run.dead_letters if d["source_topic"] == run.topics["api_calls"]]
    assert len(events_dlq) == len(run.invalid) == 5
    for key, dl in events_dlq:
        validate(DEAD_LETTER_SCHEMA, dl)
        reason, payload, sent_key = run.invalid[dl["source_offset"]]
        assert (dl["reason"], dl["source_partition"], key) == (reason, 0, sent_key.encode())
        assert dl["payload_bytes"] == len(payload)
        assert len(dl["payload_b64"]) <= 6 * 1024
        assert payload.startswith(base64.b64decode(dl["payload_b64"]))
    assert run.stats["invalid_by_reason"] == {"not_json": 2, "not_object": 1, "schema": 3, "too_large": 1}


def test_invalid_labels_are_dead_lettered_and_valid_ones_applied(run: Run) -> None:
    labels_dlq = [d for _, d in run.dead_letters if d["source_topic"] == run.topics["analyst_labels"]]
    expected = [(reason, payload) for reason, payload in run.labels if reason is not None]
    assert [(d["reason"], base64.b64decode(d["payload_b64"])) for d in labels_dlq] == expected
    assert run.stats["labels_applied"] == 2
    reported = orjson.loads(run.labels[0][1])["account_id"]
    last = {rec["account_id"]: rec for _, rec in run.scores}
    assert (last[reported]["action"], last[reported]["reasons"][0]["code"]) == ("block", "analyst_label")


def test_worker_gives_the_same_records_as_the_detector_in_offset_order(run: Run) -> None:
    """What ``detector replay`` computes from a file of the topic's events equals what the worker published."""
    det = Detector(load_settings({}).detection)
    expected: list[dict[str, Any]] = []
    for message in read_topic(run.bootstrap, run.topics["api_calls"], run.stats["events"]):
        try:
            ev = decode_event(message.value)
        except InvalidEvent:
            continue
        if (rec := det.process(ev)) is not None:
            expected.append(rec)
    for reason, payload in run.labels:
        if reason is None and (rec := det.apply_label(orjson.loads(payload))) is not None:
            expected.append(rec)

    def comparable(rec: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in rec.items() if k != "emitted_at"}

    published = [comparable(rec) for _, rec in run.scores]
    assert len(published) == len(expected)
    assert published == [comparable(rec) for rec in expected]


def test_prometheus_metrics_count_the_same(run: Run) -> None:
    m, s = run.metrics, run.stats
    assert m['detector_events_total{result="valid"}'] == s["events_processed"]
    assert m['detector_events_total{result="invalid"}'] == s["events_invalid"]
    assert m["detector_events_scored_total{}"] == s["events_processed"]
    for reason, n in s["invalid_by_reason"].items():
        assert m[f'detector_dead_letters_total{{reason="{reason}"}}'] == n
    assert sum(v for k, v in m.items() if k.startswith("detector_scores_total{")) == s["records"]
    assert m['detector_analyst_labels_total{label="attack"}'] == 1
    assert m["detector_worker_up{}"] == 1
    assert m["detector_rebalances_total{}"] >= 1
    assert m['detector_consumer_lag_events{partition="0"}'] == 0
    # Every message read is observed once, from its timestamp to the end of its batch (no offset hole to read back
    # in this run: a refilled message is routed outside the batch and not observed).
    assert m["detector_message_latency_seconds_count{}"] == s["messages"] > 0
    assert m['detector_message_latency_seconds_bucket{le="+Inf"}'] == s["messages"]
    assert 0 < m["detector_message_latency_seconds_sum{}"] < 600 * s["messages"]


def test_an_idle_caught_up_worker_is_healthy(run: Run) -> None:
    # Idle for 12 s with COMMIT_STALL_S=3 s: a partition with nothing left to read is never stalled.
    assert run.health == [(200, {"status": "ok"})] * HEALTH_SAMPLES
    assert 0 <= run.metrics["detector_commit_stalled_seconds{}"] < 3


def test_worker_stops_cleanly_on_sigterm(run: Run) -> None:
    assert run.returncode == 0, run.log[-3000:]
    assert "Signal received: 15" in run.log
    assert "worker stopped: messages=" in run.log
    assert "Traceback" not in run.log
