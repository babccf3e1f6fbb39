"""``make bench``: throughput, latency and memory of the detector on this machine, in one run.

    python -m bench.run            # full run: about 10 minutes on a quiet 2-core machine (12 busy)
    python -m bench.run --quick    # smaller backlog, shorter latency window, 100k accounts: 2-3 minutes

Everything is real: a local Apache Kafka broker (:mod:`detector.broker`, a free port, a temporary data
directory) and the worker as ``python -m detector.cli worker`` subprocesses. Simulated events are
generated once (:func:`detector.simulate.build`) and kept as bytes; every phase reuses them::

    generate ─▶ publish backlog (one topic, 4 partitions, one event per message)
                  ├─▶ raw_events_per_s      plain aiokafka consumer + orjson.loads per message (the baseline)
                  ├─▶ details.single_message  one worker, then two, drain the backlog (committed offsets reach the end)
              └─▶ publish the same events in envelopes (the SDK's envelope mode: grouped per partition)
                  ├─▶ worker_events_per_s   one worker drains the envelope backlog (the recommended configuration)
                  └─▶ two_worker_speedup    two workers, one consumer group, drain the same envelopes
              fresh topic, one worker ─▶ p50/p99_latency_ms   envelopes (SDK linger included), paced at 80% of
                                         worker_events_per_s, ts = now; one event per message in
                                         details.latency_single (full run: both again at 25%)
              fresh topic ─▶ details.warmup   a restarted worker's warm start: the events' cluster signals
                                              read back from the broker and folded in (warm_up)
              in-process ─▶ replay_events_per_s   decode + Detector.process over the events (replay)
              subprocesses ─▶ bytes_per_account, flood   1M synthetic accounts; a 1M-id flood, max_accounts=100k

How each number is measured is written next to it in the results (``method`` keys) and in BENCHMARKS.md.
Results go to ``bench/results/latest.json``, a table is printed, and :mod:`bench.plot` draws them to
``bench/results/latest.png``; progress lines go to stderr.
The machine may be shared: the load average at start and end is recorded, so a noisy run shows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from detector.streaming.topics import committed

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
PARTITIONS = 4
FETCH_BYTES = 8 * 1024 * 1024  # per partition and fetch, as the worker (detector.streaming.app)
POLL_S = 0.2  # how often committed offsets and the workers' /metrics are read
LOAD_SHARE = 0.8  # the latency run offers this share of the measured worker rate
#: Settings every worker of this run gets (``--worker-env NAME=VALUE``), e.g. a batch bound to compare with the
#: default; recorded in the results (``worker_env``).
WORKER_ENV: dict[str, str] = {}
LAG_POLL_S = 0.1  # how often the latency run reads the worker's routed-event count
MESSAGE_LATENCY = "detector_message_latency_seconds"  # the worker's per-message histogram (detector.metrics)
#: The recommended gateway configuration: envelopes of up to 4,096 events (at ~1 KB an event, the SDK's 1 MB
#: bound ends them first, at about 1,000), sent at the latest 50 ms after their first event.
ENVELOPE_EVENTS = 4096
ENVELOPE_LINGER_MS = 50

TARGETS = {
    "ratio": ">= 0.25 (worker at least 25% of raw)",
    "p99_latency_ms": "<= 1000 ms at 80% of max sustained rate",
    "bytes_per_account": "<= 1024 bytes per active account, flat RSS under an account-id flood",
    "replay_events_per_s": ">= 100,000 events/s on one core",
}


@dataclass(frozen=True)
class Plan:
    """What one run measures, and at which size."""

    mode: str
    scenario: str
    scale: float
    raw_repeats: int
    latency_warmup_s: float
    latency_s: float
    accounts: int  # distinct accounts fed to one Detector for bytes_per_account
    account_checkpoints: tuple[int, ...]
    flood_ids: int  # random account ids fed to a Detector bounded at flood_max_accounts
    flood_max_accounts: int
    flood_checkpoints: tuple[int, ...]
    drain_timeout_s: float
    low_load_share: float = 0.0  # also measure latency at this share of the worker rate (0: not)
    low_load_s: float = 15.0


FULL = Plan(mode="full", scenario="demo", scale=1.5, raw_repeats=3, latency_warmup_s=5.0, latency_s=30.0,
            accounts=1_000_000, account_checkpoints=(100_000, 200_000, 500_000, 1_000_000),
            flood_ids=2_000_000, flood_max_accounts=100_000,
            flood_checkpoints=(100_000, 200_000, 500_000, 1_000_000, 1_500_000, 2_000_000), drain_timeout_s=300.0,
            low_load_share=0.25)
QUICK = Plan(mode="quick", scenario="demo", scale=0.35, raw_repeats=3, latency_warmup_s=3.0, latency_s=10.0,
             accounts=100_000, account_checkpoints=(20_000, 50_000, 100_000),
             flood_ids=400_000, flood_max_accounts=20_000,
             flood_checkpoints=(20_000, 50_000, 100_000, 200_000, 300_000, 400_000),
             drain_timeout_s=180.0)


FLOOD_FLAT_FROM = 10  # the flood's RSS is judged flat from this many times max_accounts ids to the end


class BenchError(RuntimeError):
    """A phase could not be measured; the message is one line."""


_T0 = time.monotonic()


def say(msg: str) -> None:
    """One progress line on stderr, stamped with the time since the run began."""
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ==== machine ============================================================================================


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    from detector.broker import KAFKA_VERSION

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    packages: dict[str, str | None] = {}
    for name in ("aiokafka", "kafka-python", "faust-streaming", "river", "orjson", "fastjsonschema"):
        try:
            packages[name] = version(name)
        except Exception:  # noqa: BLE001 - informational
            packages[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "detector"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.split("\n")
        modified = sorted(line[3:] for line in changed if line.strip())
    except (OSError, subprocess.SubprocessError):
        commit, modified = None, []
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kafka": KAFKA_VERSION,
        "packages": packages,
        "git_commit": commit,
        "detector_files_modified": modified,  # uncommitted changes measured along with the commit
        "loadavg_start": list(os.getloadavg()),
    }


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/self/status (Linux only)")


# ==== events =============================================================================================


@dataclass
class Events:
    keys: list[str]
    values: list[bytes]
    start_ts: int  # the simulation's start (event time, ms)

    def __len__(self) -> int:
        return len(self.values)


def generate(plan: Plan, seed: int, cache_dir: Path | None) -> Events:
    """The simulation's events as bytes, generated once (or read from ``cache_dir`` if given and present)."""
    from detector import simulate

    sim = simulate.build(plan.scenario, scale=plan.scale, seed=seed)
    cache = cache_dir / f"{plan.scenario}-{plan.scale}-{seed}.jsonl" if cache_dir else None
    if cache is not None and cache.exists():
        values = [line for line in cache.read_bytes().split(b"\n") if line]
        keys = [orjson.loads(v)["account_id"] for v in values]
        say(f"events: {len(values):,} read from {cache}")
        return Events(keys, values, sim.start_ts)
    say(f"events: generating scenario {plan.scenario!r} at scale {plan.scale} (about {sim.count_hint():,} events)")
    keys, values = [], []
    began = time.perf_counter()
    for ev in sim.events():
        keys.append(ev["account_id"])
        values.append(orjson.dumps(ev))
        if len(values) % 10_000 == 0:
            say(f"events: {len(values):,} generated")
    say(f"events: {len(values):,} in {time.perf_counter() - began:.1f}s "
        f"({sum(map(len, values)) / len(values):.0f} bytes each on average)")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(b"\n".join(values) + b"\n")
    return Events(keys, values, sim.start_ts)


# ==== Kafka helpers ======================================================================================


def start_broker(data_dir: Path, attempts: int = 3) -> Any:
    """:func:`detector.broker.start` on a free port, retried: a start can fail for reasons outside the
    benchmark (a port taken between choosing and binding it; a random cluster id beginning with ``-``,
    which kafka-storage reads as an option)."""
    from detector import broker

    for attempt in range(1, attempts + 1):
        try:
            return broker.start(data_dir, port=broker.free_port())
        except broker.BrokerError as exc:
            if attempt == attempts:
                raise BenchError(f"could not start the broker: {exc}") from None
            say(f"broker: start failed ({str(exc).splitlines()[0][:120]}); retrying")
            broker.stop(data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


def topic_names(prefix: str, api_calls: str | None = None) -> dict[str, str]:
    return {"api_calls": api_calls or f"{prefix}.api-calls", "dead_letters": f"{prefix}.api-calls.dlq",
            "risk_scores": f"{prefix}.risk-scores", "analyst_labels": f"{prefix}.analyst-labels",
              "cluster_signals": f"{prefix}.cluster-signals"}


def create_topics(bootstrap: str, topics: dict[str, str]) -> None:
    from detector.settings import KafkaSettings, Settings, TopicSettings
    from detector.streaming.topics import ensure_topics

    ensure_topics(Settings(kafka=KafkaSettings(bootstrap=bootstrap), topics=TopicSettings(**topics,
                                                                                          partitions=PARTITIONS)))


def end_offsets(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-offsets")
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def publish_backlog(bootstrap: str, topic: str, events: Events) -> float:
    """Publish every event (key = account id) through the gateway SDK; return the seconds it took."""
    from detector.gateway import EventPublisher

    began = time.perf_counter()
    with EventPublisher(bootstrap, topic, validate=False) as pub:
        for key, value in zip(events.keys, events.values, strict=True):
            pub.publish_raw(key, value)
    took = time.perf_counter() - began
    on_broker = end_offsets(bootstrap, topic)
    if on_broker != len(events):
        raise BenchError(f"published {len(events)} events but {topic} holds {on_broker}")
    return took


def publish_envelopes(bootstrap: str, topic: str, events: Events) -> tuple[float, int]:
    """Publish the same events through the SDK's envelope mode (each in the envelope of its account's partition);
    return the seconds it took and the messages on the topic."""
    from detector.gateway import EventPublisher

    began = time.perf_counter()
    with EventPublisher(bootstrap, topic, validate=False, envelope_max_events=ENVELOPE_EVENTS,
                        envelope_linger_ms=ENVELOPE_LINGER_MS) as pub:
        for value in events.values:
            pub.publish(orjson.loads(value))
    took = time.perf_counter() - began
    return took, end_offsets(bootstrap, topic)


def scrape(port: int) -> dict[str, float]:
    """A worker's /metrics as {series: value} ({} while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                continue
    return out


def processed(metrics: dict[str, float]) -> float:
    """Events the worker has read and routed (valid + invalid), from its metrics."""
    return metrics.get('detector_events_total{result="valid"}', 0.0) + \
        metrics.get('detector_events_total{result="invalid"}', 0.0)


# ==== raw baseline =======================================================================================


async def _raw_once(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=FETCH_BYTES,
                                client_id="bench-raw")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first_n, first_t = 0, 0, 0.0
        began = time.perf_counter()
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for messages in batch.values():
                for m in messages:
                    orjson.loads(m.value)
                    seen += 1
            if not first_t and seen:
                first_t, first_n = time.perf_counter(), seen
            if time.perf_counter() - began > 120:
                raise BenchError(f"raw consumer read only {seen} of {n} events in 120 s")
        done = time.perf_counter()
        return {"events_per_s": (n - first_n) / (done - first_t), "seconds": done - began,
                "first_batch_events": first_n}
    finally:
        await consumer.stop()


def measure_raw(bootstrap: str, topic: str, n: int, repeats: int) -> dict[str, Any]:
    runs = []
    for i in range(repeats):
        r = asyncio.run(_raw_once(bootstrap, topic, n))
        runs.append(r["events_per_s"])
        say(f"raw: run {i + 1}/{repeats}: {r['events_per_s']:,.0f} events/s")
    return {"events_per_s": statistics.median(runs), "runs": runs,
            "method": "aiokafka consumer, partitions assigned (no group), one event per message, orjson.loads "
                      "each; rate = events after the first fetched batch / time from that batch to the last "
                      f"event; median of {repeats} runs"}


# ==== workers ============================================================================================


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path


def _bench_sets(name: str) -> bool:
    """Whether :func:`start_workers` sets the worker setting ``name`` itself (the broker, group, ports, topics)."""
    return name.startswith("DETECTOR_TOPICS__") or name in (
        "DETECTOR_KAFKA__BOOTSTRAP", "DETECTOR_WORKER__APP_ID", "DETECTOR_WORKER__DATA_DIR",
        "DETECTOR_WORKER__WEB_PORT", "DETECTOR_WORKER__METRICS_PORT")


def start_workers(bootstrap: str, app_id: str, topics: dict[str, str], count: int, tmp: Path,
                  extra_env: dict[str, str] | None = None) -> list[Worker]:
    """``count`` worker subprocesses of one app (one consumer group); each in its own process group."""
    from detector.broker import free_port

    base = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    workers = []
    for i in range(count):
        data_dir = tmp / f"{app_id}-{i}"
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # --worker-env first, so that a phase's own setting (extra_env) wins over it; the names set here are
        # refused by --worker-env (_bench_sets).
        env = dict(base, **WORKER_ENV, DETECTOR_KAFKA__BOOTSTRAP=bootstrap, DETECTOR_WORKER__APP_ID=app_id,
                   DETECTOR_WORKER__DATA_DIR=str(data_dir), DETECTOR_WORKER__WEB_PORT="0",
                   DETECTOR_WORKER__METRICS_PORT=str(port), DETECTOR_TOPICS__PARTITIONS=str(PARTITIONS),
                   **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()})
        env.update(extra_env or {})
        log = data_dir / "worker.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], env=env, cwd=ROOT,
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        workers.append(Worker(proc, port, log))
    return workers


def stop_workers(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(timeout=10)


def check_alive(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is not None:
            tail = w.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"worker exited with code {w.proc.returncode}: {' | '.join(tail)}")


def _crossing(samples: list[tuple[float, float]], level: float) -> float | None:
    """Time at which a rising series first reaches ``level`` (linear between samples)."""
    prev_t, prev_v = 0.0, 0.0
    for t, v in samples:
        if v >= level:
            if v == prev_v:
                return t
            return prev_t + (t - prev_t) * (level - prev_v) / (v - prev_v)
        prev_t, prev_v = t, v
    return None


def measure_drain(bootstrap: str, topic: str, n: int, count: int, run_id: str, tmp: Path,
                  timeout_s: float, messages: int | None = None, extra_env: dict[str, str] | None = None,
                  ) -> dict[str, Any]:
    """Start ``count`` workers of a fresh app on the backlog of ``n`` events in ``messages`` messages (default
    ``n``: one event each); time them until committed offsets reach the end. ``extra_env``: settings of the
    workers (e.g. ``DETECTOR_WORKER__SHARE_CLUSTERS``)."""
    from kafka import KafkaAdminClient

    messages = n if messages is None else messages
    app_id = f"{run_id}-w{count}" + ("-alone" if extra_env else "")
    topics = topic_names(app_id, api_calls=topic)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    began = time.monotonic()
    workers = start_workers(bootstrap, app_id, topics, count, tmp, extra_env)
    commits: list[tuple[float, float]] = []  # (seconds since spawn, committed offsets)
    counted: list[tuple[float, float]] = []  # (seconds since spawn, events routed by all workers)
    last_say = 0.0
    try:
        while True:
            check_alive(workers)
            c = committed(admin, app_id, topic)
            p = sum(processed(scrape(w.metrics_port)) for w in workers)
            t = time.monotonic() - began
            commits.append((t, c))
            counted.append((t, p))
            if c >= messages:
                break
            if t > timeout_s:
                raise BenchError(f"{count} worker(s) committed {c} of {messages} messages in {timeout_s:.0f} s")
            if t - last_say >= 5:
                last_say = t
                say(f"worker x{count}: {t:5.1f}s routed {p:,.0f} of {n:,} events, committed {c:,} of {messages:,} "
                    "messages")
            time.sleep(POLL_S)
    finally:
        stop_workers(workers)
        admin.close()
    first = next((t, c) for t, c in commits if c > 0)
    done_t = commits[-1][0]
    first_event_t = next((t for t, p in counted if p > 0), first[0])
    t10, t90 = _crossing(counted, 0.1 * n), _crossing(counted, 0.9 * n)
    steady = 0.8 * n / (t90 - t10) if t10 is not None and t90 is not None and t90 > t10 else None
    after_commit = ((messages - first[1]) / (done_t - first[0]) * n / messages
                    if first[1] < messages and done_t > first[0] else None)
    result = {
        "events": n,
        "messages": messages,
        "events_per_s": n / (done_t - first_event_t),
        "startup_s": first_event_t,
        "first_commit_s": first[0],
        "all_committed_s": done_t,
        "steady_events_per_s": steady,
        "after_first_commit_events_per_s": after_commit,
        "wall_events_per_s": n / done_t,
        "method": "committed offsets (kafka-python admin list_group_offsets) and the workers' detector_events_total "
                  "polled every 0.2 s; events_per_s = backlog / (time all offsets are committed - time the first "
                  "event is routed): startup (spawn, imports, topic check, group join, until the first event) is "
                  "excluded, the wait for the last commit is included (Faust commits every 2.8 s or 10,000 acks, "
                  "so up to 2.8 s). steady_events_per_s = 80% of the backlog / time between 10% and 90% routed; "
                  "after_first_commit = events committed after the first commit / time from it to the last "
                  "(for envelopes: messages committed, times events per message).",
    }
    say(f"worker x{count}: {n:,} events; startup {first_event_t:.1f}s; {result['events_per_s']:,.0f} events/s "
        f"(steady {steady or 0:,.0f}/s, from first commit {after_commit or 0:,.0f}/s)")
    return result


# ==== latency ============================================================================================


class ScoreReader(threading.Thread):
    """Reads risk-scores and keeps (event_ts, received_at) of every record, wall-clock ms."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.seen: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        try:
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, client_id="bench-scores",
                                     enable_auto_commit=False, fetch_max_wait_ms=10)
            tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while not self.stop.is_set():
                batch = consumer.poll(timeout_ms=50)
                now = time.time() * 1000
                for messages in batch.values():
                    for m in messages:
                        self.seen.append((orjson.loads(m.value)["event_ts"], now))
            consumer.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc


def _headline(latency: dict[str, Any] | None, q: str) -> float | None:
    """The headline latency percentile ``q`` ("p50", "p99") of a latency phase: over every message (the worker's
    message histogram) when it has one, else over the risk-score records of the window (older workers)."""
    if not latency:
        return None
    value = latency.get(f"message_{q}_ms")
    return value if value is not None else latency.get(f"{q}_ms")


def _histogram(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of a Prometheus histogram."""
    out = []
    for series, value in metrics.items():
        if series.startswith(name + "_bucket{"):
            le = series.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), value))
    return sorted(out)


def _histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile: linear within the bucket that holds it."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return None


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _lag_latencies(sends: list[tuple[float, int]], routed: list[tuple[float, float]]) -> list[float]:
    """For each (t, k) in ``routed``: t - the time the k-th event was sent, in ms (k > 0 only)."""
    import bisect

    counts = [c for _, c in sends]
    out = []
    for t, k in routed:
        i = bisect.bisect_left(counts, k)
        if k > 0 and i < len(sends):
            out.append(max(0.0, (t - sends[i][0]) * 1000))
    return out


def measure_latency(bootstrap: str, events: Events, rate: float, warmup_s: float, window_s: float, app_id: str,
                    tmp: Path, envelope_max_events: int = 0) -> dict[str, Any]:
    """Offer ``rate`` events/s (ts = now) to a fresh worker; event-to-score latency of the records it emits.
    ``envelope_max_events`` > 0: the gateway SDK sends them in envelopes (linger :data:`ENVELOPE_LINGER_MS`)."""
    from kafka import KafkaAdminClient

    from detector.gateway import EventPublisher

    run_id = app_id
    topics = topic_names(app_id)
    create_topics(bootstrap, topics)
    workers = start_workers(bootstrap, app_id, topics, 1, tmp)
    port = workers[0].metrics_port
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    reader = ScoreReader(bootstrap, topics["risk_scores"])
    try:
        began = time.monotonic()
        while scrape(port).get("detector_rebalances_total", 0.0) < 1:  # partitions assigned
            check_alive(workers)
            if time.monotonic() - began > 90:
                raise BenchError("the latency worker got no partitions within 90 s")
            time.sleep(POLL_S)
        say(f"latency: worker ready after {time.monotonic() - began:.1f}s; offering {rate:,.0f} events/s "
            f"({warmup_s:.0f}s warm-up, {window_s:.0f}s measured)")
        reader.start()
        shift = int(time.time() * 1000) - events.start_ts  # keeps account ages as in the simulation
        n = len(events)
        sent = 0
        lag_max = 0.0
        sends: list[tuple[float, int]] = []  # (monotonic time, events sent so far)
        routed: list[tuple[float, float]] = []  # (monotonic time, events the worker has routed)
        hist_start: list[tuple[float, float]] = []
        msg_start: list[tuple[float, float]] = []
        window_start_ms = window_end_ms = 0.0
        total = warmup_s + window_s
        with EventPublisher(bootstrap, topics["api_calls"], validate=False, envelope_max_events=envelope_max_events,
                            envelope_linger_ms=ENVELOPE_LINGER_MS) as pub:
            t0 = time.monotonic()
            next_poll = t0
            while True:
                el = time.monotonic() - t0
                if el >= total:
                    break
                if not window_start_ms and el >= warmup_s:
                    window_start_ms = time.time() * 1000
                    at_start = scrape(port)
                    hist_start = _histogram(at_start, "detector_event_to_score_latency_seconds")
                    msg_start = _histogram(at_start, MESSAGE_LATENCY)
                due = int(el * rate)
                while sent < due:
                    ev = orjson.loads(events.values[sent % n])
                    now_ms = int(time.time() * 1000)
                    ev["ts"] = now_ms
                    ev["event_id"] = f"{run_id}-{sent:012d}"
                    created = ev["billing"].get("account_created_ts")
                    if created is not None:
                        ev["billing"]["account_created_ts"] = min(created + shift, now_ms)
                    if envelope_max_events:
                        pub.publish(ev)  # into its partition's envelope (validate=False: encoded, not checked)
                    else:
                        pub.publish_raw(ev["account_id"], orjson.dumps(ev))
                    sent += 1
                    sends.append((time.monotonic(), sent))
                if window_start_ms and time.monotonic() >= next_poll:  # how far behind is the worker?
                    next_poll = time.monotonic() + LAG_POLL_S
                    routed.append((time.monotonic(), processed(scrape(port))))
                    lag_max = max(lag_max, sent - routed[-1][1])
                time.sleep(0.002)
            window_end_ms = time.time() * 1000
        offered_s = time.monotonic() - t0
        messages = end_offsets(bootstrap, topics["api_calls"])
        say(f"latency: sent {sent:,} events in {messages:,} messages in {offered_s:.1f}s ({sent / offered_s:,.0f}/s); "
            "waiting for the worker")
        drain_began = time.monotonic()
        while committed(admin, app_id, topics["api_calls"]) < messages and time.monotonic() - drain_began < 60:
            check_alive(workers)
            time.sleep(POLL_S)
        drain_s = time.monotonic() - drain_began
        time.sleep(1.0)
        at_end = scrape(port)
        hist_end = _histogram(at_end, "detector_event_to_score_latency_seconds")
        msg_end = _histogram(at_end, MESSAGE_LATENCY)
    finally:
        reader.stop.set()
        stop_workers(workers)
        admin.close()
    reader.join(timeout=10)
    if reader.error is not None:
        raise BenchError(f"risk-scores reader failed: {reader.error}")
    lat = [recv - ets for ets, recv in reader.seen if window_start_ms <= ets < window_end_ms]
    start_counts = dict(hist_start)
    window_hist = [(b, c - start_counts.get(b, 0.0)) for b, c in hist_end]
    h50, h99 = _histogram_quantile(window_hist, 0.5), _histogram_quantile(window_hist, 0.99)
    # Every message of the window and after (the drain): its timestamp to the end of the batch that processed it.
    msg_counts = dict(msg_start)
    msg_hist = [(b, c - msg_counts.get(b, 0.0)) for b, c in msg_end]
    m50, m90, m99 = (_histogram_quantile(msg_hist, q) for q in (0.5, 0.9, 0.99))
    lag_lat = _lag_latencies(sends, routed)
    result = {
        "offered_events_per_s": rate,
        "achieved_events_per_s": sent / offered_s,
        "events_sent": sent,
        "messages_sent": messages,
        "envelope_max_events": envelope_max_events,
        "records_in_window": len(lat),
        "p50_ms": _percentile(lat, 0.5) if lat else None,
        "p90_ms": _percentile(lat, 0.9) if lat else None,
        "p99_ms": _percentile(lat, 0.99) if lat else None,
        "max_ms": max(lat) if lat else None,
        "histogram_p50_ms": h50 * 1000 if h50 is not None else None,
        "histogram_p99_ms": h99 * 1000 if h99 is not None else None,
        "messages_in_window": int(msg_hist[-1][1]) if msg_hist else 0,
        "message_p50_ms": m50 * 1000 if m50 is not None else None,
        "message_p90_ms": m90 * 1000 if m90 is not None else None,
        "message_p99_ms": m99 * 1000 if m99 is not None else None,
        "lag_estimate_p50_ms": _percentile(lag_lat, 0.5) if lag_lat else None,
        "lag_estimate_p99_ms": _percentile(lag_lat, 0.99) if lag_lat else None,
        "lag_estimate_samples": len(lag_lat),
        "max_lag_events": lag_max,
        "drain_after_offer_s": drain_s,
        "method": "events from the simulation re-sent in order (cycled) through EventPublisher (linger 20 ms; with "
                  f"envelopes, envelope_linger_ms={ENVELOPE_LINGER_MS}, so an event waits up to that long in the "
                  "gateway and the latency includes it) at "
                  "the offered rate with ts = now and fresh event ids; a kafka-python reader consumes risk-scores "
                  "and latency = time the record is read - its event_ts (same clock), over records whose event_ts "
                  "falls in the measured window (after the warm-up). Records are only emitted on decision "
                  "changes, so they are a sample of events; each record goes through the same batches as every "
                  "other event. histogram_* are estimated from the worker's detector_event_to_score_latency_seconds "
                  "(observed per record, from the event's Kafka timestamp, here the same moment as ts, or with "
                  "envelopes the moment the envelope's first event was buffered, to when the record is built, "
                  "before it is sent; coarse buckets), over the same window. "
                  f"lag_estimate_*: every {LAG_POLL_S} s the worker's routed-event count k is read and compared with "
                  "the time the k-th event was sent (events of all partitions assumed routed in send order): a "
                  f"per-event estimate of event-to-detector delay over all events, to about {LAG_POLL_S} s. "
                  f"message_*: the worker's {MESSAGE_LATENCY} histogram (50 ms buckets to 2 s, linear within a "
                  "bucket), observed for every message from its Kafka timestamp (single event: when the gateway sent "
                  "it; envelope: when the gateway buffered its first event) to the end of the batch that processed it, "
                  "its records and changelog writes delivered; over the messages processed after the warm-up "
                  "(the window and the drain). An event's score is computed within its message's latency, so these "
                  "bound every event's event-to-score latency, not a sample of them: the headline p50/p99.",
    }
    if m99 is not None:
        say(f"latency: {result['messages_in_window']:,} messages: p50 {result['message_p50_ms']:.0f} ms, "
            f"p99 {result['message_p99_ms']:.0f} ms (every message, from its timestamp to its batch's end)")
    if lat:
        say(f"latency: {len(lat):,} records: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms; worker "
            f"histogram p50 {result['histogram_p50_ms'] or 0:.0f} ms, p99 {result['histogram_p99_ms'] or 0:.0f} ms; "
            f"lag estimate p50 {result['lag_estimate_p50_ms'] or 0:.0f} ms, "
            f"p99 {result['lag_estimate_p99_ms'] or 0:.0f} ms")
    else:
        say("latency: no records in the measured window")
    return result


# ==== replay =============================================================================================


def measure_replay(events: Events) -> dict[str, Any]:
    """``detector replay`` in-process: decode + validate each line, then Detector.process, one thread."""
    from collections import Counter

    from detector.detection import Detector
    from detector.replay import read_events, replay
    from detector.schemas import decode_event

    gc.collect()
    invalid: Counter[str] = Counter()
    det = Detector()
    wall, cpu = time.perf_counter(), time.process_time()
    result = replay(read_events(events.values, invalid), det)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.events != len(events):
        raise BenchError(f"replay read {result.events} of {len(events)} events ({dict(invalid)} invalid)")
    d_wall = time.perf_counter()
    for v in events.values:
        decode_event(v)
    d_wall = time.perf_counter() - d_wall
    out = {
        "events_per_s": result.events / wall,
        "events_per_cpu_s": result.events / cpu,
        "seconds": wall,
        "records": len(result.records),
        "decode_only_events_per_s": len(events) / d_wall,
        "decode_share": d_wall / wall,
        "method": "detector.replay.replay(read_events(lines)) over the pre-generated events held in memory (no file "
                  "I/O), default Detector, one thread; events / wall-clock seconds (events_per_cpu_s: / CPU "
                  "seconds of the process). decode_only = decode_event (orjson + schema check) alone.",
    }
    say(f"replay: {result.events:,} events in {wall:.1f}s: {out['events_per_s']:,.0f} events/s "
        f"({out['events_per_cpu_s']:,.0f} per CPU-second; decode alone {out['decode_only_events_per_s']:,.0f}/s)")
    return out


def _foreign_bytes_per_account(n: int = 200_000) -> float:
    """RSS growth per account of a Detector that folds in one cluster signal of each of ``n`` other workers'
    accounts: what every worker holds for the accounts it does not own (their linker entries)."""
    from detector.detection import Detector
    from detector.signals import ARRIVAL

    def signal(i: int) -> tuple[Any, ...]:
        asn = 64500 + i % 1000
        keys = (("pay", f"pm_{i:016x}"), ("ip24", f"10.{i % 250}.{i // 250 % 250}"), ("asn", asn),
                ("tls", "t13d1516h2_8daaf6152771"), ("ua", "python-httpx/0.27.0"), ("cohort", (i // 3600, asn)))
        return ("e", f"acct_{i:012x}", 1_775_000_000_000 + i, keys, (i, i + 1), ARRIVAL, None)

    det = Detector(share_clusters=True)
    det.apply_signals([signal(i) for i in range(1000)])
    gc.collect()
    before = rss_bytes()
    for start in range(1000, n, 10_000):
        det.apply_signals([signal(i) for i in range(start, min(n, start + 10_000))])
    gc.collect()
    return (rss_bytes() - before) / (n - 1000)


def measure_signals(events: Events) -> dict[str, Any]:
    """What sharing clusters between workers costs, in-process: an own event with and without publishing its
    cluster signal, and another worker's event (decoding its signal and folding it in), CPU time per event."""
    from detector.detection import Detector
    from detector.schemas import decode_event
    from detector.signals import decode_batch, encode_batches

    evs = [decode_event(v) for v in events.values]
    own: dict[bool, float] = {}
    signals: list[Any] = []
    for share in (False, True):
        gc.collect()
        det = Detector(share_clusters=share)
        cpu = time.process_time()
        for i, ev in enumerate(evs):
            det.process(ev)
            if share and i % 2000 == 1999:  # a worker publishes its signals once per batch
                signals += det.drain_signals()
        own[share] = (time.process_time() - cpu) / len(evs)
        signals += det.drain_signals()
    cpu = time.process_time()
    messages = encode_batches("bench", signals)
    encode = time.process_time() - cpu
    gc.collect()
    other = Detector(share_clusters=True)
    cpu = time.process_time()
    for raw in messages:
        other.apply_signals(decode_batch(raw)[1])
    fold = time.process_time() - cpu
    n = len(signals)
    del other
    foreign = _foreign_bytes_per_account()
    out: dict[str, Any] = {
        "own_event_us": 1e6 * own[False],
        "own_event_sharing_us": 1e6 * own[True],
        "publish_us": 1e6 * encode / n,
        "foreign_event_us": 1e6 * fold / n,
        "foreign_share": fold / n / own[False],
        "bytes_per_signal": sum(map(len, messages)) / n,
        "foreign_bytes_per_account": foreign,
        "method": "Detector.process over the events in memory without and with share_clusters (signals drained every "
                  "2,000 events, as per batch); then encode_batches, and in a second Detector decode_batch + "
                  "apply_signals of every signal. CPU seconds of this process per event. foreign_bytes_per_account: "
                  "RSS growth of a Detector folding in one signal each of 200,000 other workers' accounts (a card and "
                  "an IP /24 of their own, shared network keys), per account.",
    }
    say(f"signals: an own event {out['own_event_us']:.0f} us ({out['own_event_sharing_us']:.0f} us publishing its "
        f"signal), another worker's {out['foreign_event_us']:.0f} us ({100 * out['foreign_share']:.0f}%), "
        f"{out['bytes_per_signal']:.0f} bytes a signal; {foreign:,.0f} bytes per other worker's account")
    return out


def measure_warmup(bootstrap: str, events: Events, run_id: str) -> dict[str, Any]:
    """A restarted worker's warm start on the real broker: the cluster signals of every event (published as a
    worker publishes them, one message per batch of 2,000 events) read back and folded into a new detector by
    :func:`detector.streaming.app.warm_up`, as ``detector worker`` does before it joins its group."""
    from kafka import KafkaProducer

    from detector.detection import Detector
    from detector.schemas import decode_event
    from detector.settings import KafkaSettings, Settings, TopicSettings
    from detector.signals import encode_batches
    from detector.streaming.app import warm_up
    from detector.streaming.routing import Router
    from detector.streaming.topics import Follower, ensure_topics, kafka_client_config

    topic = f"{run_id}-warm.cluster-signals"
    settings = Settings(kafka=KafkaSettings(bootstrap=bootstrap), topics=TopicSettings(cluster_signals=topic))
    ensure_topics(settings)
    old = Detector(share_clusters=True)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_request_size=2 * 1024 * 1024)
    messages = 0
    signal_bytes = 0
    try:
        for i, raw in enumerate(events.values):
            old.process(decode_event(raw))
            if i % 2000 == 1999 or i == len(events) - 1:
                for msg in encode_batches("bench-old", old.drain_signals()):
                    producer.send(topic, key=b"bench-old", value=msg)
                    messages += 1
                    signal_bytes += len(msg)
        producer.flush()
    finally:
        producer.close()
    del old
    gc.collect()
    router = Router(Detector(share_clusters=True), settings, worker_id="bench-new")
    follower = Follower(kafka_client_config(settings.kafka), topic)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        got = warm_up(follower, router, lookback_s=86_400, max_s=600, dead=[])
    finally:
        follower.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {"signals": got["signals"], "messages": got["messages"], "left": got["left"], "bytes": signal_bytes,
           "seconds": wall, "signals_per_s": got["signals"] / wall if wall else None,
           "cpu_us_per_signal": 1e6 * cpu / got["signals"] if got["signals"] else None,
           "method": "the events' cluster signals (a Detector with share_clusters, drained every 2,000 events) "
                     "published to a fresh one-partition topic; then warm_up (Follower + Router.on_signals into a "
                     "new Detector) reads them back from the broker; wall and CPU time of that call."}
    say(f"warm start: {out['signals']:,} signals from {out['messages']:,} messages in {wall:.1f}s "
        f"({out['signals_per_s']:,.0f} signals/s, {out['cpu_us_per_signal']:.0f} us of CPU each)")
    return out


# ==== memory (runs in a fresh subprocess: python -m bench.run --memory-probe ...) ========================


def memory_probe(base: dict[str, Any], ids: int, max_accounts: int, checkpoints: list[int], flood: bool,
                 label: str) -> dict[str, Any]:
    """Feed ``ids`` accounts one event each (copies of ``base``) to one Detector; RSS at the checkpoints."""
    from detector.detection import Detector
    from detector.settings import DetectionSettings

    det = Detector(DetectionSettings(max_accounts=max_accounts))
    det.process(dict(base))  # allocates what the first event allocates (the sketch is allocated already)
    gc.collect()
    rss0 = rss_bytes()
    rng = random.Random(1)
    ts0 = base["ts"]
    marks = []
    began = time.perf_counter()
    want = sorted(checkpoints)
    for i in range(1, ids + 1):
        ev = dict(base)
        ev["account_id"] = f"flood_{rng.getrandbits(64):016x}" if flood else f"acct_{i:09d}"
        ev["event_id"] = f"mem-{i:012d}"
        ev["ts"] = ts0 + i * 50  # 1M accounts span 14 h of event time: none idle long enough to be evicted
        det.process(ev)
        if want and i == want[0]:
            want.pop(0)
            gc.collect()
            rss = rss_bytes()
            marks.append({"ids": i, "rss_mib": rss / 2**20, "growth_bytes": rss - rss0,
                          "tracked_accounts": len(det.accounts), "clusters": len(det.clusters),
                          "linker_accounts": det.linker.members(), "evicted": det.stats["evicted"],
                          "seconds": time.perf_counter() - began})
            print(f"[bench memory {label}] {i:,} ids: RSS {rss / 2**20:,.0f} MiB (+{(rss - rss0) / 2**20:,.0f}), "
                  f"tracked {len(det.accounts):,}, clusters {len(det.clusters):,}, linker {det.linker.members():,}, "
                  f"{i / (time.perf_counter() - began):,.0f} events/s", file=sys.stderr, flush=True)
    return {"rss0_mib": rss0 / 2**20, "marks": marks, "events_per_s": ids / (time.perf_counter() - began)}


def measure_memory(events: Events, plan: Plan) -> dict[str, Any]:
    """Two fresh interpreters in parallel (RSS is not disturbed by CPU contention): 1M accounts; a flood."""
    base = orjson.loads(events.values[0])
    runs = {
        "accounts": ["--memory-probe", str(plan.accounts), "--max-accounts", str(max(plan.accounts * 2, 2_000_000)),
                     "--checkpoints", ",".join(map(str, plan.account_checkpoints))],
        "flood": ["--memory-probe", str(plan.flood_ids), "--max-accounts", str(plan.flood_max_accounts),
                  "--checkpoints", ",".join(map(str, plan.flood_checkpoints)), "--flood"],
    }
    say(f"memory: {plan.accounts:,} distinct accounts, and a flood of {plan.flood_ids:,} random ids with "
        f"max_accounts={plan.flood_max_accounts:,} (two subprocesses)")
    procs = {}
    for name, args in runs.items():
        proc = procs[name] = subprocess.Popen([sys.executable, "-m", "bench.run", *args, "--label", name],
                                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(orjson.dumps(base))
        proc.stdin.close()
    out = {}
    try:
        for name, proc in procs.items():
            assert proc.stdout is not None
            data = proc.stdout.read()
            if proc.wait() != 0:
                raise BenchError(f"memory probe {name!r} exited with code {proc.returncode}")
            out[name] = orjson.loads(data.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    acc = out["accounts"]
    last = acc["marks"][-1]
    per_account = last["growth_bytes"] / last["ids"]
    flood = out["flood"]
    by_ids = {m["ids"]: m for m in flood["marks"]}
    # Judged from ten times the bound on: until then the linker's holder lists of the keys every flood id shares
    # are still growing to their ceiling (pruned lazily at twice their live holders: Linker._drop_holder), a
    # one-off rise of about 20 MiB at 100k (BENCHMARKS.md, run S). A leak would go on growing past it.
    after_bound = [m for m in flood["marks"] if m["ids"] >= FLOOD_FLAT_FROM * plan.flood_max_accounts]
    first, final = after_bound[0], after_bound[-1]
    growth = (final["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    return {
        "bytes_per_account": per_account,
        "accounts": acc,
        "flood": flood,
        "flood_rss_mib": {str(k): round(v["rss_mib"], 1) for k, v in by_ids.items()},
        "flood_growth_after_bound": growth,
        "flood_bytes_per_id_after_bound": (final["rss_mib"] - first["rss_mib"]) * 2**20 / (final["ids"] - first["ids"]),
        "flood_flat": growth <= 0.05,
        "method": "fresh interpreter; one Detector; each account gets one copy of a valid simulated event with its "
                  "own account_id, event_id and ts (50 ms apart); VmRSS after gc.collect(), before (after one warm-up "
                  "event) and at checkpoints; bytes_per_account = RSS growth / accounts. Flood: random 64-bit ids, "
                  f"DetectionSettings(max_accounts={plan.flood_max_accounts:,}); flat = RSS grows <= 5% from "
                  f"{first['ids']:,} to {final['ids']:,} ids.",
    }


# ==== the run ============================================================================================


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}{unit}" if abs(v) < 10 else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def table(r: dict[str, Any]) -> str:
    met = r.get("met", {})
    rows = [
        ("raw_events_per_s", _fmt(r["raw_events_per_s"], "/s"), "baseline", ""),
        ("worker_events_per_s", _fmt(r["worker_events_per_s"], "/s"), "", ""),
        ("ratio", _fmt(r["ratio"]), TARGETS["ratio"], met.get("ratio", "")),
        ("p50_latency_ms", _fmt(r["p50_latency_ms"], " ms"), "", ""),
        ("p99_latency_ms", _fmt(r["p99_latency_ms"], " ms"), TARGETS["p99_latency_ms"], met.get("p99_latency_ms", "")),
        ("bytes_per_account", _fmt(r["bytes_per_account"], " B"), TARGETS["bytes_per_account"],
         met.get("bytes_per_account", "")),
        ("two_worker_speedup", _fmt(r["two_worker_speedup"], "x"), "", ""),
        ("replay_events_per_s", _fmt(r["replay_events_per_s"], "/s"), TARGETS["replay_events_per_s"],
         met.get("replay_events_per_s", "")),
    ]
    w = [max(len(str(row[i])) for row in rows + [("metric", "value", "target", "met")]) for i in range(4)]
    lines = [" | ".join(str(c).ljust(w[i]) for i, c in enumerate(("metric", "value", "target", "met"))),
             "-+-".join("-" * x for x in w)]
    lines += [" | ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(lines)


def notes(r: dict[str, Any]) -> str:
    """The numbers behind the table that explain it."""
    d = r["details"]
    lines = [f"configuration: {r.get('configuration', '-')}"]
    env = d.get("envelopes")
    if env:
        lines.append(f"envelopes: {env['messages']:,} for {d['events']:,} events ({env['events_per_envelope']:,.0f} "
                     f"events, {env['bytes_per_envelope'] / 1024:,.0f} KiB each)")
    single = d.get("single_message") or {}
    for w, label in ((d.get("worker_1"), "1 worker, envelopes"),
                     (d.get("worker_2"), "2 workers sharing clusters, envelopes"),
                     (d.get("worker_2_unshared"), "2 workers, clusters not shared, envelopes"),
                     (single.get("worker_1"), "1 worker, one event per message"),
                     (single.get("worker_2"), "2 workers, one event per message")):
        if w:
            lines.append(f"{label}: startup {w['startup_s']:.1f}s (spawn to first event), "
                         f"{w['events_per_s']:,.0f}/s to all committed, "
                         f"{w['steady_events_per_s'] or 0:,.0f}/s steady (10-90% routed)")
    if d.get("two_worker_speedup_unshared"):
        lines.append(f"two-worker speedup: {_fmt(r['two_worker_speedup'], 'x')} sharing clusters (the default), "
                     f"{_fmt(d['two_worker_speedup_unshared'], 'x')} without")
    if single.get("ratio"):
        lines.append(f"one event per message: ratio {single['ratio']:.3f}, two-worker speedup "
                     f"{_fmt(single['two_worker_speedup'], 'x')}")
    for key, label in (("latency", "latency, envelopes"), ("latency_low_load", "latency, envelopes, low load"),
                       ("latency_single", "latency, one event per message"),
                       ("latency_low_load_single", "latency, one event per message, low load")):
        lat = d.get(key)
        if lat:
            lines.append(f"{label}: offered {lat['offered_events_per_s']:,.0f}/s; "
                         f"{lat.get('messages_in_window', 0):,} messages: "
                         f"p50 {_fmt(lat.get('message_p50_ms'), ' ms')}, "
                         f"p99 {_fmt(lat.get('message_p99_ms'), ' ms')}; {lat['records_in_window']} records: "
                         f"p50 {_fmt(lat['p50_ms'], ' ms')}, p99 {_fmt(lat['p99_ms'], ' ms')}; "
                         f"worker histogram p99 {_fmt(lat['histogram_p99_ms'], ' ms')}; "
                         f"lag estimate p50 {_fmt(lat['lag_estimate_p50_ms'], ' ms')}, "
                         f"p99 {_fmt(lat['lag_estimate_p99_ms'], ' ms')}; "
                         f"max backlog {lat['max_lag_events']:,.0f} events")
    rep = d.get("replay")
    if rep:
        lines.append(f"replay: {rep['events_per_cpu_s']:,.0f} events per CPU-second; decode_event alone "
                     f"{rep['decode_only_events_per_s']:,.0f}/s ({100 * rep['decode_share']:.0f}% of replay time)")
    warm = d.get("warmup")
    if warm:
        lines.append(f"warm start: {warm['signals']:,} cluster signals read back and folded in, "
                     f"{warm['signals_per_s']:,.0f} signals/s ({warm['cpu_us_per_signal']:.0f} us of CPU each)")
    sig = d.get("signals")
    if sig:
        lines.append(f"cluster signals: an own event {sig['own_event_us']:.0f} us of CPU "
                     f"({sig['own_event_sharing_us']:.0f} us publishing its signal); another worker's event "
                     f"{sig['foreign_event_us']:.0f} us ({100 * sig['foreign_share']:.0f}% of an own one); "
                     f"{sig['bytes_per_signal']:.0f} bytes a signal; {sig['foreign_bytes_per_account']:,.0f} bytes "
                     f"held per account of another worker")
    mem = d.get("memory")
    if mem:
        rss = ", ".join(f"{int(k):,}: {v:,.0f} MiB" for k, v in mem["flood_rss_mib"].items())
        lines.append(f"flood (max_accounts={r['plan']['flood_max_accounts']:,}): RSS at {rss}; "
                     f"{mem['flood_bytes_per_id_after_bound']:,.0f} bytes per new id after the bound; "
                     f"flat: {'yes' if mem['flood_flat'] else 'no'}")
    return "\n".join(lines)


def _met(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("met" if ok else "NOT met")


def run(plan: Plan, phases: set[str], out: Path, seed: int, cache_dir: Path | None) -> dict[str, Any]:
    from detector import broker

    began = time.monotonic()
    machine = machine_info()
    say(f"{plan.mode} run on {machine['cores']} cores, {machine['ram_gib']} GiB, Python {machine['python']}, "
        f"Kafka {machine['kafka']}; load average {machine['loadavg_start'][0]:.2f} at start")
    events = generate(plan, seed, cache_dir)
    details: dict[str, Any] = {"events": len(events), "scenario": plan.scenario, "scale": plan.scale}
    run_id = f"bench-{int(time.time())}"
    tmp = Path(tempfile.mkdtemp(prefix="detector-bench-"))
    raw = drain1 = drain2 = env1 = env2 = env2_alone = latency = low_latency = None
    latency_single = low_latency_single = replay_r = memory = signals_r = warmup = None
    try:
        if phases & {"throughput", "latency", "warmup"}:
            broker.ensure_jars()
            say("broker: starting a local Kafka broker")
            handle = start_broker(tmp / "broker")
            try:
                bootstrap = handle.bootstrap
                n = len(events)
                topic = f"{run_id}.api-calls"
                create_topics(bootstrap, topic_names(run_id))
                took = publish_backlog(bootstrap, topic, events)
                details["publish_events_per_s"] = n / took
                say(f"backlog: {n:,} events on {topic} ({PARTITIONS} partitions) in {took:.1f}s")
                env_topic = f"{run_id}-env.api-calls"
                create_topics(bootstrap, topic_names(f"{run_id}-env"))
                took, env_messages = publish_envelopes(bootstrap, env_topic, events)
                details["envelopes"] = {"messages": env_messages, "events_per_envelope": n / env_messages,
                                        "bytes_per_envelope": (sum(map(len, events.values)) + n) / env_messages,
                                        "publish_events_per_s": n / took, "envelope_max_events": ENVELOPE_EVENTS,
                                        "envelope_linger_ms": ENVELOPE_LINGER_MS}
                say(f"backlog: the same events in {env_messages:,} envelopes ({n / env_messages:,.0f} events each) "
                    f"on {env_topic} in {took:.1f}s")

                def drain(count: int, enveloped: bool, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
                    if enveloped:
                        return measure_drain(bootstrap, env_topic, n, count, f"{run_id}-env", tmp,
                                             plan.drain_timeout_s, messages=env_messages, extra_env=extra_env)
                    return measure_drain(bootstrap, topic, n, count, run_id, tmp, plan.drain_timeout_s)

                if "throughput" in phases:
                    raw = measure_raw(bootstrap, topic, n, plan.raw_repeats)
                    drain1, env1 = drain(1, False), drain(1, True)
                    drain2, env2 = drain(2, False), drain(2, True)
                    # Two workers that share no clusters (each links only its own accounts): what sharing costs.
                    env2_alone = drain(2, True, {"DETECTOR_WORKER__SHARE_CLUSTERS": "false"})
                if "latency" in phases:
                    drain1 = drain1 or drain(1, False)
                    env1 = env1 or drain(1, True)

                    def latency_at(share: float, enveloped: bool, name: str, window_s: float) -> dict[str, Any]:
                        rate = share * (env1 if enveloped else drain1)["events_per_s"]  # type: ignore[index]
                        return measure_latency(bootstrap, events, rate, plan.latency_warmup_s, window_s,
                                               f"{run_id}-{name}", tmp, ENVELOPE_EVENTS if enveloped else 0)

                    latency = latency_at(LOAD_SHARE, True, "lat-env", plan.latency_s)
                    latency_single = latency_at(LOAD_SHARE, False, "lat", plan.latency_s)
                    if plan.low_load_share:  # below capacity: what the pipeline adds when the worker keeps up
                        low_latency = latency_at(plan.low_load_share, True, "low-env", plan.low_load_s)
                        low_latency_single = latency_at(plan.low_load_share, False, "low", plan.low_load_s)
                if "warmup" in phases:
                    warmup = measure_warmup(bootstrap, events, run_id)
            finally:
                say("broker: stopping")
                broker.stop(tmp / "broker")
        if "replay" in phases:
            replay_r = measure_replay(events)
            signals_r = measure_signals(events)
        if "memory" in phases:
            memory = measure_memory(events, plan)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    machine["loadavg_end"] = list(os.getloadavg())
    raw_rate = raw["events_per_s"] if raw else None

    def rates(one: dict[str, Any] | None, two: dict[str, Any] | None) -> dict[str, Any]:
        w1 = one["events_per_s"] if one else None
        w2 = two["events_per_s"] if two else None
        s1 = one.get("steady_events_per_s") if one else None
        s2 = two.get("steady_events_per_s") if two else None
        return {"worker_events_per_s": w1, "ratio": w1 / raw_rate if raw_rate and w1 else None,
                "two_worker_speedup": w2 / w1 if w1 and w2 else None,
                "steady_ratio": s1 / raw_rate if raw_rate and s1 else None,
                "steady_two_worker_speedup": s2 / s1 if s1 and s2 else None}

    enveloped, single = rates(env1, env2), rates(drain1, drain2)
    results: dict[str, Any] = {
        "raw_events_per_s": raw_rate,
        "worker_events_per_s": enveloped["worker_events_per_s"],
        "ratio": enveloped["ratio"],
        "p50_latency_ms": _headline(latency, "p50"),
        "p99_latency_ms": _headline(latency, "p99"),
        "bytes_per_account": memory["bytes_per_account"] if memory else None,
        "two_worker_speedup": enveloped["two_worker_speedup"],
        "replay_events_per_s": replay_r["events_per_s"] if replay_r else None,
        "configuration": f"gateway envelopes (envelope_max_events={ENVELOPE_EVENTS}, "
                         f"envelope_linger_ms={ENVELOPE_LINGER_MS}); one event per message in details.single_message",
    }
    results["met"] = {
        "ratio": _met(results["ratio"], (results["ratio"] or 0) >= 0.25),
        "p99_latency_ms": _met(results["p99_latency_ms"], (results["p99_latency_ms"] or 1e9) <= 1000),
        "bytes_per_account": _met(results["bytes_per_account"], memory is not None
                                  and memory["bytes_per_account"] <= 1024 and memory["flood_flat"]),
        "replay_events_per_s": _met(results["replay_events_per_s"], (results["replay_events_per_s"] or 0) >= 100_000),
    }
    results.update({
        "mode": plan.mode,
        "phases": sorted(phases),
        "runtime_s": time.monotonic() - began,
        "targets": TARGETS,
        "machine": machine,
        "plan": asdict(plan),
        "worker_env": dict(WORKER_ENV),
        "details": {**details, "raw": raw,
                    "worker_1": env1, "worker_2": env2, "worker_2_unshared": env2_alone,
                    "two_worker_speedup_unshared": rates(env1, env2_alone)["two_worker_speedup"],
                    "steady_ratio": enveloped["steady_ratio"],
                    "steady_two_worker_speedup": enveloped["steady_two_worker_speedup"],
                    "single_message": {**single, "worker_1": drain1, "worker_2": drain2,
                                       "p50_latency_ms": _headline(latency_single, "p50"),
                                       "p99_latency_ms": _headline(latency_single, "p99")},
                    "latency": latency, "latency_low_load": low_latency,
                    "latency_single": latency_single, "latency_low_load_single": low_latency_single,
                    "replay": replay_r, "signals": signals_r, "warmup": warmup, "memory": memory},
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run (2-3 minutes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default: {DEFAULT_OUT})")
    p.add_argument("--phases", default="throughput,latency,warmup,replay,memory",
                   help="comma-separated subset of throughput,latency,warmup,replay,memory")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a DETECTOR_* setting for every worker of the run (repeatable), e.g. "
                        "DETECTOR_WORKER__BATCH_MAX_BYTES=2097152 to measure another batch bound")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the generated events here and reuse them on the next run (same scenario/scale/seed)")
    # Internal: the memory probe runs in a fresh interpreter (measure_memory starts it).
    p.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-accounts", type=int, default=2_000_000, help=argparse.SUPPRESS)
    p.add_argument("--checkpoints", default="", help=argparse.SUPPRESS)
    p.add_argument("--flood", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe is not None:
        base = orjson.loads(sys.stdin.buffer.read())
        checkpoints = [int(x) for x in args.checkpoints.split(",") if x]
        res = memory_probe(base, args.memory_probe, args.max_accounts, checkpoints, args.flood, args.label)
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "aiokafka"):  # client chatter (e.g. "group_id is None") is not a result
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # kafka-python 3 on plain serializer callables
    from detector.settings import SettingsError, load_settings

    for item in args.worker_env:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("DETECTOR_"):
            p.error(f"--worker-env takes DETECTOR_NAME=VALUE, not {item!r}")
        if _bench_sets(name):
            p.error(f"--worker-env: {name} is set by the benchmark itself (its broker, group, ports and topics)")
        WORKER_ENV[name] = value
    try:
        load_settings(WORKER_ENV)  # a misspelt or malformed setting fails here, not in every worker
    except SettingsError as exc:
        p.error(f"--worker-env: {exc}")
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    unknown = phases - {"throughput", "latency", "warmup", "replay", "memory"}
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    try:
        results = run(QUICK if args.quick else FULL, phases, args.out, args.seed, args.cache_dir)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    print(notes(results))
    m = results["machine"]
    print(f"\n{results['mode']} run, {results['details']['events']:,} events, {results['runtime_s']:.0f}s; "
          f"{m['cores']} cores, load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; "
          f"results in {args.out}")
    try:
        from bench.plot import plot

        print(f"plot: {plot(results, args.out.with_suffix('.png'))}")
    except ImportError:
        print("plot: skipped (matplotlib is not installed: pip install -e '.[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
