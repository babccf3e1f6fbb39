"""``detector chaos`` (``make chaos``): inject faults into a real broker and real workers under load, then
count every event's effect.

Everything is real: an Apache Kafka broker started by :mod:`detector.broker`, ``detector worker``
subprocesses, and simulated traffic published through the gateway SDK while faults are injected::

    traffic ───────────────────────────────────────────────────────────────▶ drained
      │  kill -9 worker A      restart broker      start B     kill -9 A
      │  restart A 2 s later   (same port, data)   (rebalance) (B takes over every partition)
      ▼        ▼                      ▼                 ▼           ▼
     t=0     0.15                   0.40              0.60        0.72   (share of the traffic phase)

Besides the faults, 1% of events are sent twice by the gateway (a retry after a lost acknowledgement).
With ``envelope_max_events`` (``detector chaos --envelope N``) the gateway sends envelopes of up to N events
(:mod:`detector.envelope`), and a share of the events (:data:`SINGLE_SHARE`) still one per message, at
random, so each partition holds both kinds and the worker's dedup positions are checked across them.
At the end the workers have committed every offset; the account snapshots are read back from the
``account-state`` changelog, and each account's event count is compared with the distinct events the
broker acknowledged for it::

    chaos: faults=3 events_in=N reflected=N lost=0 duplicated=0 uncommitted=0

``lost`` sums, over accounts, the events the state is missing; ``duplicated`` the events it counts
twice; ``uncommitted`` the offsets the workers had still not committed after waiting 180 s for them (a
stalled commit: a restart would process them again). Each fault also reports how long until every
partition with a backlog was being committed again (a worker killed while holding partitions must be
replaced within 30 s). The exit code is 0 only when
nothing was lost or duplicated, everything was committed, and every fault recovered in time.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector import broker

#: A worker killed while holding partitions must be replaced within this long (the issue's target).
FAILOVER_LIMIT_S = 30.0
#: How long a fault may take to recover before the run counts it as failed.
RECOVERY_LIMIT_S = 60.0
PARTITIONS = 4
RESEND_SHARE = 0.01  # events the gateway sends twice (its retry after a lost acknowledgement)
SINGLE_SHARE = 0.2  # with envelopes: events still sent one per message (chosen at random)
ENVELOPE_LINGER_MS = 50
TEN_YEARS_S = 10 * 365 * 24 * 3600  # no account is evicted during the run: every count stays checkable


@dataclass
class Fault:
    name: str
    at_s: float  # seconds since traffic started
    recovered_in_s: float | None = None
    limit_s: float = RECOVERY_LIMIT_S

    @property
    def ok(self) -> bool:
        return self.recovered_in_s is not None and self.recovered_in_s <= self.limit_s


@dataclass
class Result:
    faults: list[Fault]
    events_in: int
    reflected: int
    lost: int
    duplicated: int
    resent: int
    worker_restarts: int
    accounts: int
    uncommitted: int = 0  # offsets of api-calls still not committed when the run gave up waiting (a stalled commit)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicated == 0 and self.uncommitted == 0 and all(f.ok for f in self.faults)
                and self.events_in > 0)

    def summary(self) -> str:
        return (f"chaos: faults={len(self.faults)} events_in={self.events_in} reflected={self.reflected} "
                f"lost={self.lost} duplicated={self.duplicated} uncommitted={self.uncommitted}")


class _Worker:
    """One ``detector worker`` subprocess (its own process group, so a kill takes all of it)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"worker-{name}.log"
        self.retired = False  # killed on purpose and not to be restarted
        env = dict(env, DETECTOR_WORKER__DATA_DIR=str(log_dir / f"data-{name}"))
        self.proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class _Traffic(threading.Thread):
    """Publishes simulated events at ``rate`` per second; counts the distinct events the broker acked."""

    def __init__(self, bootstrap: str, topic: str, events: list[dict[str, Any]], rate: float, seed: int,
                 envelope_max_events: int = 0) -> None:
        super().__init__(daemon=True, name="chaos-traffic")
        self.bootstrap, self.topic, self.events, self.rate = bootstrap, topic, events, rate
        self.envelope_max_events = envelope_max_events
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.sent = 0
        self.resent = 0
        self.failed = 0
        self.acked: set[str] = set()
        self.per_account: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _on_ack(self, event: dict[str, Any]) -> Callable[[Any], None]:
        def done(_: Any) -> None:
            with self._lock:
                if event["event_id"] not in self.acked:
                    self.acked.add(event["event_id"])
                    self.per_account[event["account_id"]] += 1
        return done

    def _on_error(self, _: Exception) -> None:
        with self._lock:
            self.failed += 1

    def run(self) -> None:
        from detector.gateway import EventPublisher

        # Retries outlast a broker restart; one request in flight keeps each partition in send order.
        options: dict[str, Any] = dict(retries=1000, retry_backoff_ms=250, max_in_flight_requests_per_connection=1,
                                       request_timeout_ms=10_000)
        with contextlib.ExitStack() as publishers:
            single = publishers.enter_context(EventPublisher(self.bootstrap, self.topic, **options))
            enveloped = single
            if self.envelope_max_events:
                enveloped = publishers.enter_context(EventPublisher(
                    self.bootstrap, self.topic, envelope_max_events=self.envelope_max_events,
                    envelope_linger_ms=ENVELOPE_LINGER_MS, **options))
            start = time.monotonic()
            for ev in self.events:
                if self.stop.is_set():
                    break
                copies = 2 if self.rng.random() < RESEND_SHARE else 1
                # A gateway's resend goes through the publisher that sent the first copy. (Through the other
                # one, the copies can reach the partition seconds apart, and more than RECENT_PER_ACCOUNT of the
                # account's events and a rebalance between them defeat the id check: OPERATIONS.md.)
                pub = enveloped if self.rng.random() >= SINGLE_SHARE else single
                for _ in range(copies):
                    pub.publish(ev).add_callback(self._on_ack(ev)).add_errback(self._on_error)
                self.resent += copies - 1
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            enveloped.flush(timeout=120)
            single.flush(timeout=120)


def _offsets(admin: Any, consumer: Any, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]] | None:
    """(committed, end) offsets per partition, or None while the broker does not answer."""
    from kafka import TopicPartition

    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        end = {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
        offsets = admin.list_group_offsets([group]).get(group, {})
        done = {tp.partition: max(meta.offset, 0) for tp, meta in offsets.items() if tp.topic == topic}
    except Exception:  # noqa: BLE001 - the broker is restarting; ask again
        return None
    return {p: done.get(p, 0) for p in range(PARTITIONS)}, end


def _await_progress(fault: Fault, t0: float, probe: Callable[[], tuple[dict[int, int], dict[int, int]] | None],
                    baseline: dict[int, int], deadline_s: float, say: Callable[[str], None]) -> None:
    """Wait until every partition that had a backlog at the fault has committed past ``baseline``."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        got = probe()
        if got is not None:
            done, end = got
            waiting = [p for p in range(PARTITIONS) if end[p] > baseline[p] and done[p] <= baseline[p]]
            if not waiting:
                fault.recovered_in_s = round(time.monotonic() - t0 - fault.at_s, 1)
                say(f"{fault.name}: every partition committing again after {fault.recovered_in_s:.1f}s")
                return
        time.sleep(0.5)
    say(f"{fault.name}: NOT recovered within {deadline_s:.0f}s")


def read_state(bootstrap: str, topic: str, timeout_s: float = 60.0) -> dict[str, bytes]:
    """The latest snapshot of every account in the changelog ``topic`` (tombstones remove accounts)."""
    from detector.streaming.topics import read_to_end

    state: dict[str, bytes] = {}
    for r in read_to_end(bootstrap, topic, timeout_s):
        if r.value is None:
            state.pop(r.key.decode(), None)
        else:
            state[r.key.decode()] = r.value
    return state


def _worker_env(bootstrap: str, run_id: str, topics: Any) -> dict[str, str]:
    """The environment of a ``detector worker`` in this run (no web or metrics port: two run side by side)."""
    return dict(os.environ, DETECTOR_KAFKA__BOOTSTRAP=bootstrap, DETECTOR_WORKER__APP_ID=run_id,
                DETECTOR_WORKER__WEB_PORT="0", DETECTOR_WORKER__METRICS_PORT="0",
                DETECTOR_DETECTION__IDLE_EVICT_S=str(TEN_YEARS_S),
                DETECTOR_TOPICS__API_CALLS=topics.api_calls, DETECTOR_TOPICS__DEAD_LETTERS=topics.dead_letters,
                DETECTOR_TOPICS__RISK_SCORES=topics.risk_scores,
                DETECTOR_TOPICS__ANALYST_LABELS=topics.analyst_labels,
                DETECTOR_TOPICS__CLUSTER_SIGNALS=topics.cluster_signals, DETECTOR_TOPICS__PARTITIONS=str(PARTITIONS))


def run_chaos(*, duration_s: float = 90.0, rate: float = 500.0, seed: int = 7,
              say: Callable[[str], None] = print, work_dir: Path | None = None, envelope_max_events: int = 0) -> Result:
    """Run the whole exercise (about ``duration_s`` plus a minute) and return its counts. The broker's
    files and the workers' logs go to ``work_dir`` (default: a new temporary directory), and stay.
    ``envelope_max_events`` > 0: the gateway sends most events in envelopes of up to that many."""
    from kafka import KafkaAdminClient, KafkaConsumer

    from detector import simulate
    from detector.detection import load_account
    from detector.settings import KafkaSettings, Settings, TopicSettings
    from detector.streaming.app import ACCOUNT_TABLE
    from detector.streaming.topics import ensure_topics

    work = work_dir or Path(tempfile.mkdtemp(prefix="detector-chaos-"))
    port = broker.free_port()
    say(f"chaos: starting a Kafka broker in {work} (jars from Maven Central on the first run)")
    handle = broker.start(work / "broker", port=port)
    try:
        bootstrap = handle.bootstrap
        run_id = f"chaos-{int(time.time())}"
        topics = TopicSettings(api_calls=f"{run_id}.api-calls", dead_letters=f"{run_id}.api-calls.dlq",
                               risk_scores=f"{run_id}.risk-scores", analyst_labels=f"{run_id}.analyst-labels",
                               cluster_signals=f"{run_id}.cluster-signals", partitions=PARTITIONS)
        ensure_topics(Settings(kafka=KafkaSettings(bootstrap=bootstrap), topics=topics))
        env = _worker_env(bootstrap, run_id, topics)
        n_events = int(duration_s * rate)
        events = []
        # The smoke scenario (one simulated day, ~4,800 events at scale 1) scaled up to the events needed.
        for ev in simulate.build("smoke", seed=seed, scale=max(1.0, n_events / 4500)).events():
            events.append(ev)
            if len(events) >= n_events:
                break
        mode = (f"envelopes of up to {envelope_max_events} events ({SINGLE_SHARE:.0%} single)" if envelope_max_events
                else "one event per message")
        say(f"chaos: {len(events):,} events at {rate:.0f}/s over {PARTITIONS} partitions, {mode}; run {run_id}")

        workers = {"A": _Worker("A", env, work)}
        restarts = 0
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="detector-chaos")
        probe_consumer = KafkaConsumer(bootstrap_servers=bootstrap)

        def probe() -> tuple[dict[int, int], dict[int, int]] | None:
            return _offsets(admin, probe_consumer, run_id, topics.api_calls)

        def supervise() -> None:  # what Kubernetes would do: restart a worker that exited by itself
            nonlocal restarts
            for name, w in list(workers.items()):
                if w.proc.poll() is not None and not w.retired:
                    say(f"chaos: worker {name} exited with {w.proc.returncode}; restarting it (log {w.log})")
                    workers[name] = _Worker(name, env, work)
                    restarts += 1

        traffic = _Traffic(bootstrap, topics.api_calls, events, rate, seed, envelope_max_events)
        plan = [Fault("kill -9 worker A, restart it", 0.15 * duration_s),
                Fault("restart the broker", 0.35 * duration_s),
                Fault("kill -9 worker A while B runs (failover)", 0.65 * duration_s, limit_s=FAILOVER_LIMIT_S)]
        t0 = time.monotonic()
        traffic.start()
        last_report = [0.0]

        def wait_until(at_s: float, done: Callable[[], bool] = lambda: False) -> None:
            while time.monotonic() - t0 < at_s and not done():
                if time.monotonic() - last_report[0] >= 5:
                    last_report[0] = time.monotonic()
                    got = probe()
                    committed = f"{sum(got[0].values()):,}" if got else "?"
                    say(f"[{time.monotonic() - t0:5.0f}s] sent={traffic.sent:,} committed={committed}")
                supervise()
                time.sleep(0.2)

        try:
            for fault in plan:
                if fault is plan[-1]:
                    say(f"chaos: starting worker B at {time.monotonic() - t0:.0f}s (a rebalance)")
                    workers["B"] = _Worker("B", env, work)
                    wait_until(time.monotonic() - t0 + 90, lambda: "restored" in workers["B"].log.read_text())
                wait_until(fault.at_s)
                fault.at_s = time.monotonic() - t0
                if not traffic.is_alive():
                    say(f"chaos: warning: traffic ended before '{fault.name}'; use a longer --duration")
                got = probe()
                while got is None:
                    time.sleep(0.5)
                    got = probe()
                baseline = got[0]
                say(f"chaos: fault at {fault.at_s:.0f}s: {fault.name}")
                if fault is plan[0]:
                    workers["A"].kill()
                    time.sleep(2)
                    workers["A"] = _Worker("A", env, work)
                elif fault is plan[1]:
                    broker.stop(work / "broker")
                    time.sleep(2)
                    broker.start(work / "broker", port=port)
                else:
                    workers["A"].retired = True
                    workers["A"].kill()
                _await_progress(fault, t0, probe, baseline, fault.limit_s + 30, say)
                supervise()
            traffic.join(timeout=duration_s * 3)
            traffic.stop.set()
            say(f"chaos: traffic done: {traffic.sent:,} events, {traffic.resent} sent twice, "
                f"{traffic.failed} sends failed; waiting for the workers to commit everything")
            deadline = time.monotonic() + 180
            uncommitted = -1
            while time.monotonic() < deadline:
                supervise()
                got = probe()
                if got is not None:
                    uncommitted = sum(got[1].values()) - sum(got[0].get(p, 0) for p in got[1])
                    if uncommitted == 0:
                        break
                time.sleep(1)
            else:
                say(f"chaos: the workers did not commit every offset within 180 s ({uncommitted} behind)")
        finally:
            for w in workers.values():
                w.stop()
            admin.close()
            probe_consumer.close()
        state = read_state(bootstrap, f"{run_id}-{ACCOUNT_TABLE}-changelog")
    finally:
        broker.stop(work / "broker")

    expected = traffic.per_account
    got_counts = {aid: load_account(blob)[0].state.events for aid, blob in state.items()}
    lost = sum(max(0, n - got_counts.get(aid, 0)) for aid, n in expected.items())
    duplicated = sum(max(0, got_counts.get(aid, 0) - expected.get(aid, 0)) for aid in got_counts)
    result = Result(faults=plan, events_in=sum(expected.values()), reflected=sum(got_counts.values()),
                    lost=lost, duplicated=duplicated, resent=traffic.resent, worker_restarts=restarts,
                    accounts=len(expected), uncommitted=uncommitted,  # -1: the broker never answered
                    details={"work_dir": str(work), "sends_failed": traffic.failed})
    for f in plan:
        status = "ok" if f.ok else "FAILED"
        say(f"  {f.name}: recovered in {f.recovered_in_s}s (limit {f.limit_s:.0f}s) {status}")
    say(f"  accounts={result.accounts} gateway re-sends={result.resent} worker restarts by the supervisor="
        f"{restarts} sends failed={traffic.failed} logs={work}")
    return result
