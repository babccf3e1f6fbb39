"""``detector demo``: a local broker (unless one is configured), the worker as a subprocess, simulated
traffic through the gateway SDK, and a live view of the riskiest accounts and clusters.

Everything here is real: the broker is Apache Kafka, the worker is ``detector worker``, the scores are
read back from the ``risk-scores`` topic with kafka-python, and "events processed" is the worker's
committed offset on ``api-calls``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from detector import broker
from detector.settings import Settings


def _broker_reachable(bootstrap: str) -> bool:
    import socket

    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
            return True
    except OSError:
        return False


def run_demo(settings: Settings, *, duration_s: float | None, scenario: str = "demo", rate: float = 3000.0) -> int:
    """Run the demo; with ``duration_s`` stop by itself, print a summary and return 0."""
    from kafka import KafkaAdminClient, KafkaConsumer

    from detector import simulate
    from detector.cli import publish_simulation
    from detector.streaming.topics import committed, ensure_topics

    started_broker: Path | None = None
    bootstrap = settings.kafka.bootstrap
    if "DETECTOR_KAFKA__BOOTSTRAP" not in os.environ or not _broker_reachable(bootstrap):
        data_dir = Path(tempfile.mkdtemp(prefix="detector-demo-broker-"))
        print("demo: starting a local Kafka broker (first run downloads the jars from Maven Central) ...",
              file=sys.stderr)
        handle = broker.start(data_dir, port=broker.free_port())
        started_broker, bootstrap = data_dir, handle.bootstrap
    run_id = f"demo-{int(time.time())}"
    topics = {"api_calls": f"{run_id}.api-calls", "dead_letters": f"{run_id}.api-calls.dlq",
              "risk_scores": f"{run_id}.risk-scores", "analyst_labels": f"{run_id}.analyst-labels",
              "cluster_signals": f"{run_id}.cluster-signals"}
    env = dict(os.environ, DETECTOR_KAFKA__BOOTSTRAP=bootstrap, DETECTOR_WORKER__APP_ID=run_id,
               DETECTOR_WORKER__DATA_DIR=tempfile.mkdtemp(prefix="detector-demo-worker-"),
               DETECTOR_WORKER__WEB_PORT="0", DETECTOR_TOPICS__PARTITIONS="1",
               **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()})
    ensure_topics(settings.__class__(kafka=settings.kafka.__class__(bootstrap=bootstrap),
                                     topics=settings.topics.__class__(**topics, partitions=1)))
    worker_log = Path(env["DETECTOR_WORKER__DATA_DIR"]) / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], env=env,
                              stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    sim = simulate.build(scenario)
    labels = sim.labels
    print(f"demo: {sim.description}", file=sys.stderr)
    print(f"demo: broker {bootstrap}; worker pid {worker.pid} (log {worker_log}); Ctrl-C to stop", file=sys.stderr)

    stop = threading.Event()
    sent = [0]

    def produce() -> None:
        sent[0] = publish_simulation(sim, bootstrap, topics["api_calls"], rate=rate, stop=stop.is_set,
                                     progress=lambda n: sent.__setitem__(0, n))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    consumer = KafkaConsumer(topics["risk_scores"], bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, value_deserializer=orjson.loads, consumer_timeout_ms=500)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="detector-demo")
    latest: dict[str, dict[str, Any]] = {}
    n_scores = 0
    processed = 0
    t0 = time.monotonic()
    last_view = 0.0
    try:
        while True:
            for msg in consumer:
                latest[msg.value["account_id"]] = msg.value
                n_scores += 1
            now = time.monotonic()
            if worker.poll() is not None:
                print(f"demo: the worker exited with code {worker.returncode}; see {worker_log}", file=sys.stderr)
                return 1
            if now - last_view >= 3.0:
                last_view = now
                processed = committed(admin, run_id, topics["api_calls"])
                _print_view(now - t0, sent[0], processed, n_scores, latest, labels)
            done_producing = not producer.is_alive()
            if duration_s is not None and now - t0 >= duration_s:
                break
            if duration_s is None and done_producing and processed >= sent[0]:
                break
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
    finally:
        stop.set()
        producer.join(timeout=10)
        # Let the worker finish what was sent (bounded), then read the last scores.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and committed(admin, run_id, topics["api_calls"]) < sent[0]:
            time.sleep(0.5)
        for msg in consumer:
            latest[msg.value["account_id"]] = msg.value
            n_scores += 1
        consumer.close()
        processed = committed(admin, run_id, topics["api_calls"])
        admin.close()
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if started_broker is not None:
            broker.stop(started_broker)
    _print_summary(time.monotonic() - t0, sent[0], processed, n_scores, latest, labels)
    return 0


def _riskiest(latest: dict[str, dict[str, Any]], k: int = 10) -> list[dict[str, Any]]:
    return sorted(latest.values(), key=lambda r: (-r["score"], r["account_id"]))[:k]


def _print_view(elapsed: float, sent: int, processed: int, n_scores: int, latest: dict[str, dict[str, Any]],
                labels: dict[str, Any]) -> None:
    actions = Counter(r["action"] for r in latest.values())
    print(f"[{elapsed:5.0f}s] sent={sent:,} processed={processed:,} scores={n_scores:,} "
          f"watch={actions['watch']} throttle={actions['throttle']} block={actions['block']}")
    for r in _riskiest(latest, 5):
        top = r["reasons"][0]["code"] if r["reasons"] else "-"
        print(f"    {r['account_id']:<22} {r['action']:<8} {r['score']:.2f} cluster={r['cluster_id'] or '-':<15} {top}")


def _print_summary(elapsed: float, sent: int, processed: int, n_scores: int, latest: dict[str, dict[str, Any]],
                   labels: dict[str, Any]) -> None:
    actions = Counter(r["action"] for r in latest.values())
    top = _riskiest(latest, 20)
    in_campaign = sum(1 for r in top if r["account_id"] in labels and labels[r["account_id"]].attack)
    acted = [a for a, r in latest.items() if r["action"] in ("throttle", "block")]
    attack_acted = sum(1 for a in acted if a in labels and labels[a].attack)
    attack_total = sum(1 for lab in labels.values() if lab.attack)
    clusters = Counter(r["cluster_id"] for r in latest.values() if r["cluster_id"] and r["action"] == "block")
    print("\n=== demo summary ===")
    print(f"elapsed: {elapsed:.0f}s   events sent: {sent:,}   events processed: {processed:,}   "
          f"scores emitted: {n_scores:,}")
    print(f"accounts with a decision (no record = allowed): allow={actions['allow']} watch={actions['watch']} "
          f"throttle={actions['throttle']} block={actions['block']}")
    print(f"riskiest 20 accounts: {in_campaign} of 20 belong to a simulated campaign")
    print(f"throttled or blocked: {len(acted)} accounts, {attack_acted} of them attackers "
          f"({attack_acted}/{attack_total} campaign accounts caught so far)")
    wrong = [latest[a] for a in acted if a in labels and not labels[a].attack]
    if wrong:
        print(f"ordinary accounts throttled or blocked (false positives): {len(wrong)}")
        for r in _riskiest({x["account_id"]: x for x in wrong}, 10):
            reasons, kind = ", ".join(x["code"] for x in r["reasons"][:3]), labels[r["account_id"]].kind
            print(f"  {r['account_id']:<22} {r['action']:<8} {r['score']:.2f}  [{kind}]  {reasons}")
    for cid, n in clusters.most_common(3):
        print(f"blocked cluster {cid}: {n} accounts")
    print("riskiest accounts:")
    for r in top[:10]:
        lab = labels.get(r["account_id"])
        truth = f"{lab.campaign or lab.kind}" if lab else "?"
        reasons = ", ".join(x["code"] for x in r["reasons"][:3])
        print(f"  {r['account_id']:<22} {r['action']:<8} {r['score']:.2f}  [{truth}]  {reasons}")
