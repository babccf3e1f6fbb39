"""What a Faust ``group_by`` stage keyed by cluster id would add to an event's trip, measured on a real broker.

The detector keeps each cluster's windows in every worker (README, *Why a copy per worker, not a stage keyed by
cluster id*). The alternative the detection issue named repartitions events by cluster id, so one worker owns each
cluster's windows, and brings the cluster's state back to the account's worker, which scores the event. This
module measures that trip's transport alone, without detection, against the one hop an event makes today::

    direct    events ──▶ agent (the account's partition)                               latency recorded
    group_by  events ──▶ agent ──group_by(cluster)──▶ the same agent, on the cluster's partition:
                  a Faust table keyed by cluster id (+1, a changelog write) ──▶ replies, keyed by account
                  ──▶ agent on the account's partition                                 latency recorded

    bundled   events ──▶ agent, take(2000, within 0.2 s) ──▶ a message per cluster partition and batch ──▶
                  agent on the cluster's partition: the table, once per cluster and bundle ──▶ replies, a message
                  per account partition and bundle ──▶ agent on the account's partition      latency recorded

``group_by`` is Faust's, one event per message, as ``group_by`` works; ``bundled`` is the same trip repartitioned
by hand in batches, as the gateway SDK's envelopes carry events to the detector today. Each measurement is a fresh
worker subprocess (``python -m bench.groupby worker ...``) that writes a line per event back; the harness
paces events at a fixed rate for a warm-up and a window, then drains a backlog to find the sustained rate::

    python -m bench.groupby                       # about 13 minutes; results to bench/results/groupby.json
    python -m bench.groupby --rates 500,2000 --window-s 30
    python -m bench.groupby --plot bench/results/groupby.json   # redraw bench/results/groupby.png

A lower bound on the stage's cost: a real one would also carry the cluster's windows back (hundreds of bytes, not
a count), re-key them when clusters merge, and score after the reply. How often that re-keying would happen is the
last measurement, with no broker: the linker's merges over a scenario's replay, and how many of them join two
clusters that both hold windows (keyed state a stage would move between partitions)::

    python -m bench.groupby --merges-only         # default, seed 7: about 3 minutes; into the results JSON
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "groupby.json"
PARTITIONS = 4
CLUSTERS = 600  # distinct cluster ids in the offered events
ACCOUNTS = 20_000
FLUSH_S = 0.5  # how often the worker appends what it measured to its output file
MODES = ("direct", "group_by", "bundled")
BATCH, BATCH_WITHIN_S = 2000, 0.2  # bundled: what the first agent takes at a time (the worker's defaults)


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[groupby {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# The worker (a subprocess): a Faust app in one of the modes.

def worker(bootstrap: str, prefix: str, mode: str, out: Path, within_s: float = BATCH_WITHIN_S) -> None:
    from detector.envelope import account_partition
    from detector.settings import WorkerSettings
    from detector.streaming.app import CONSUMER_MAX_FETCH_BYTES, WorkerApp

    # The detector worker's Faust app (detector.streaming.app): its consumer waits at most fetch_max_wait_ms
    # for a quiet partition (Faust's own 1.5 s is a latency floor), with the worker's fetch size and buffers.
    w = WorkerSettings()
    app = WorkerApp(
        f"{prefix}-app", broker=f"kafka://{bootstrap}", store="memory://", topic_partitions=PARTITIONS,
        topic_replication_factor=1, consumer_auto_offset_reset="earliest", web_enabled=False,
        table_standby_replicas=0, autodiscover=False, producer_acks=-1, datadir=out.with_suffix(".data"),
        consumer_max_fetch_size=CONSUMER_MAX_FETCH_BYTES, stream_buffer_maxsize=max(4096, 4 * w.batch_size),
    )
    app.conf.detector_fetch_max_wait_ms = w.fetch_max_wait_ms  # type: ignore[attr-defined]
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(f"{prefix}-events", **raw)
    replies = app.topic(f"{prefix}-replies", partitions=PARTITIONS, **raw)
    clusters = app.Table(f"{prefix}-clusters", default=int, partitions=PARTITIONS, key_type=bytes, value_type=int)
    # (event index, sent_at, latency, cluster id, the cluster's count in the table the reply came from); seconds
    seen: list[tuple[int, float, float, str, int]] = []

    def cluster_of(value: bytes) -> bytes:
        return orjson.loads(value)["c"].encode()

    if mode == "direct":
        @app.agent(events)
        async def direct(stream: Any) -> None:
            async for value in stream:
                ev = orjson.loads(value)
                seen.append((ev["i"], ev["t"], time.time() - ev["t"], ev["c"], 0))
    elif mode == "group_by":
        @app.agent(events)
        async def by_cluster(stream: Any) -> None:
            async for value in stream.group_by(cluster_of, name="cluster"):  # now on the cluster's partition
                ev = orjson.loads(value)
                key = ev["c"].encode()
                clusters[key] += 1
                await replies.send(key=ev["a"].encode(), value=orjson.dumps([{**ev, "n": clusters[key]}]))
    else:  # bundled: repartition by hand, as the SDK's envelopes do: a message per batch and cluster partition
        bundles = app.topic(f"{prefix}-bundles", partitions=PARTITIONS, **raw)

        @app.agent(events)
        async def to_clusters(stream: Any) -> None:
            async for batch in stream.take(BATCH, within=within_s):
                by_partition: dict[int, list[Any]] = {}
                for value in batch:
                    ev = orjson.loads(value)
                    by_partition.setdefault(account_partition(ev["c"], PARTITIONS), []).append(ev)
                for partition, evs in by_partition.items():
                    await bundles.send(value=orjson.dumps(evs), partition=partition)

        @app.agent(bundles)
        async def at_cluster(stream: Any) -> None:
            async for value in stream:  # the clusters of one partition, from one batch
                evs = orjson.loads(value)
                counts: dict[str, int] = {}
                for ev in evs:
                    counts[ev["c"]] = counts.get(ev["c"], 0) + 1
                for cid, n in counts.items():  # one table write (and changelog message) per cluster and bundle
                    clusters[cid.encode()] += n
                back_to: dict[int, list[Any]] = {}
                for ev in evs:
                    back_to.setdefault(account_partition(ev["a"], PARTITIONS), []).append(
                        {**ev, "n": clusters[ev["c"].encode()]})
                for partition, part in back_to.items():
                    await replies.send(value=orjson.dumps(part), partition=partition)

    if mode != "direct":
        @app.agent(replies)
        async def back(stream: Any) -> None:
            async for value in stream:  # on the account's partition
                now = time.time()
                seen.extend((ev["i"], ev["t"], now - ev["t"], ev["c"], ev["n"]) for ev in orjson.loads(value))

    @app.timer(FLUSH_S)
    async def flush() -> None:
        if seen:
            with out.open("a") as f:
                f.write("".join(f"{i} {s:.6f} {lat:.6f} {c} {n}\n" for i, s, lat, c, n in seen))
            seen.clear()

    @app.task
    async def ready() -> None:
        out.with_suffix(".ready").write_text("1")

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()


# ------------------------------------------------------------------------------------------------------
# The harness.

def _event(i: int, now: float) -> tuple[bytes, bytes]:
    """(key, value) of the ``i``-th event: an account (cycling through :data:`ACCOUNTS`), its cluster and the send
    time."""
    aid = f"acct_{i * 7919 % ACCOUNTS:06d}"
    return aid.encode(), orjson.dumps({"i": i, "a": aid, "c": f"c_{i * 7919 % ACCOUNTS % CLUSTERS:04d}", "t": now})


def _create_topics(bootstrap: str, prefix: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-groupby-admin")
    try:
        admin.create_topics([NewTopic(f"{prefix}-{name}", PARTITIONS, 1) for name in ("events", "replies", "bundles")])
    finally:
        admin.close()


def _producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, client_id="bench-groupby")


def _start_worker(bootstrap: str, prefix: str, mode: str, tmp: Path,
                  within_s: float = BATCH_WITHIN_S) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{prefix}.lat"
    proc = subprocess.Popen([sys.executable, "-m", "bench.groupby", "worker", bootstrap, prefix, mode, str(out),
                             str(within_s)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out.with_suffix(".log").open("wb"))
    return proc, out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Returns:
    """What came back to a worker, from its output file, read as it grows: each line is parsed once. (The harness
    polls while the worker it measures runs on the same cores; parsing the whole file at every poll took a
    growing share of them.)"""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.first: dict[int, float] = {}  # event index: its first latency, in seconds
        self.again: list[int] = []  # the index of each event back once more
        self._read_to = 0

    def poll(self) -> _Returns:
        if self.out.exists():
            with self.out.open("rb") as f:
                f.seek(self._read_to)
                chunk = f.read()
            whole = chunk.rfind(b"\n") + 1  # a line the worker is still writing waits for the next poll
            self._read_to += whole
            for line in chunk[:whole].splitlines():
                fields = line.split()
                i = int(fields[0])
                if i in self.first:
                    self.again.append(i)
                else:
                    self.first[i] = float(fields[2])
        return self

    def back(self, lo: int, hi: int) -> tuple[list[float], int]:
        """The first latencies of the events of indices ``lo`` to ``hi - 1`` that came back, and how many of them
        came back more than once."""
        return ([lat for i, lat in self.first.items() if lo <= i < hi],
                sum(1 for i in self.again if lo <= i < hi))


def cluster_tally(out: Path) -> dict[str, tuple[int, int]]:
    """Per cluster id, the events back and the highest count a reply carried from the cluster's table: equal when
    every event went through the one table entry of its cluster (modes other than ``direct``)."""
    tally: dict[str, tuple[int, int]] = {}
    for f in (line.split() for line in out.read_text().splitlines() if line):
        back, top = tally.get(f[3], (0, 0))
        tally[f[3]] = (back + 1, max(top, int(f[4])))
    return tally


class GroupByBenchError(Exception):
    """A measurement that could not be made (printed as one line)."""


def _failed(what: str, out: Path) -> GroupByBenchError:
    """``what`` went wrong, with the last error line of the worker's log (beside its output file)."""
    log = out.with_suffix(".log")
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "ERROR" in ln] or lines
    return GroupByBenchError(f"{what}; worker log: {errors[-1].strip()[:300]}" if errors else what)


def _wait(cond: Any, proc: subprocess.Popen[bytes], out: Path, timeout_s: float, what: str) -> None:
    began = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise _failed(f"the {what} worker exited with code {proc.returncode}", out)
        if time.monotonic() - began > timeout_s:
            raise _failed(f"{what}: not done within {timeout_s:.0f} s", out)
        time.sleep(0.1)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure_paced(bootstrap: str, mode: str, rate: float, warmup_s: float, window_s: float, tmp: Path,
                  run: str, within_s: float = BATCH_WITHIN_S) -> dict[str, Any]:
    """Offer ``rate`` events/s to a fresh worker; latency percentiles of the events sent in the window.
    ``within_s``: how long the bundled mode's first agent waits to fill a batch."""
    prefix = f"gb-{run}-{mode.replace('_', '')}-{int(rate)}"
    _create_topics(bootstrap, prefix)
    proc, out = _start_worker(bootstrap, prefix, mode, tmp, within_s)
    returns = _Returns(out)
    producer = _producer(bootstrap)
    topic = f"{prefix}-events"
    try:
        _wait(out.with_suffix(".ready").exists, proc, out, 90, mode)
        # The first events wait for the group to form (and, with group_by, for the repartition topic): send a
        # probe (negative indices) until one comes back, then pace.
        probes = 0
        began = time.monotonic()
        while not returns.poll().first:
            probes += 1
            key, value = _event(-probes, time.time())
            producer.send(topic, key=key, value=value)
            producer.flush()
            if proc.poll() is not None:
                raise _failed(f"the {mode} worker exited with code {proc.returncode}", out)
            time.sleep(0.5)
            if time.monotonic() - began > 120:
                raise _failed(f"{mode}: no event came back within 120 s", out)
        say(f"{mode} at {rate:,.0f}/s: worker answering after {time.monotonic() - began:.1f}s; "
            f"{warmup_s:.0f}s warm-up, {window_s:.0f}s measured")
        t0 = time.monotonic()
        sent, window_from = 0, None
        while (el := time.monotonic() - t0) < warmup_s + window_s:
            if window_from is None and el >= warmup_s:
                window_from = sent
            while sent < int(el * rate):
                key, value = _event(sent, time.time())
                producer.send(topic, key=key, value=value)
                sent += 1
            time.sleep(0.002)
        producer.flush()
        lo = sent if window_from is None else window_from
        # Wait until every event of the window came back (or 60 s: a trip slower than the offered rate).
        drained = time.monotonic()
        while len(returns.poll().back(lo, sent)[0]) < sent - lo and time.monotonic() - drained < 60:
            time.sleep(0.5)
    finally:
        producer.close()
        _stop(proc)
    lat, again = returns.poll().back(lo, sent)
    # Percentiles of the events back; none when the trip fell so far behind that none came back in time.
    p50, p99, top = ((round(1000 * _pct(lat, 0.5), 1), round(1000 * _pct(lat, 0.99), 1), round(1000 * max(lat), 1))
                     if lat else (None, None, None))
    return {"mode": mode, "offered_per_s": rate, "bundle_within_s": within_s if mode == "bundled" else None,
            "sent": sent, "window_events": sent - lo,
            "not_back": sent - lo - len(lat), "back_twice": again, "output": str(out),
            "p50_ms": p50, "p99_ms": p99, "max_ms": top}


def measure_drain(bootstrap: str, mode: str, n: int, tmp: Path, run: str) -> dict[str, Any]:
    """Publish ``n`` events, then start a worker; the rate from its first event back to its last."""
    prefix = f"gb-{run}-{mode.replace('_', '')}-drain"
    _create_topics(bootstrap, prefix)
    producer = _producer(bootstrap)
    topic = f"{prefix}-events"
    now = time.time()
    for i in range(n):
        key, value = _event(i, now)
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    proc, out = _start_worker(bootstrap, prefix, mode, tmp)
    returns = _Returns(out)
    try:
        _wait(lambda: len(returns.poll().first) >= n, proc, out, 600, f"{mode} drain")
    finally:
        _stop(proc)
    # The worker's receive times, from each latency and its send time (all sent at ``now``).
    received = sorted(now + lat for lat in returns.poll().back(0, n)[0])
    first, last = received[0], received[-1]
    rate = (n - 1) / (last - first)
    say(f"{mode}: drained {n:,} events at {rate:,.0f}/s")
    return {"mode": mode, "events": n, "events_per_s": round(rate)}


def count_merges(events: Iterable[dict[str, Any]], start_ts: int | None = None) -> dict[str, Any]:
    """Fold ``events`` (valid, in time order) into a detector; count the linker's merges, and those that joined two
    clusters that both held windows (``Detector.clusters``): the keyed state a stage keyed by cluster id would
    move between partitions. ``moves_by_hour`` counts the latter by hours from ``start_ts`` (the first event's)."""
    from detector.detection import Detector

    class Counting(Detector):
        def _apply_merges(self) -> None:
            for absorbed, _ in self.linker.merges:
                tally["merges"] += 1
                if absorbed in self.clusters:
                    tally["moves"] += 1
                    moves_at.append(self._last_ts)
            super()._apply_merges()

    tally = {"events": 0, "merges": 0, "moves": 0}
    moves_at: list[int] = []
    det = Counting()
    for ev in events:
        if start_ts is None:
            start_ts = ev["ts"]
        det.process(ev)
        tally["events"] += 1
    by_hour: dict[int, int] = {}
    for ts in moves_at:
        by_hour[(ts - (start_ts or 0)) // 3_600_000] = by_hour.get((ts - (start_ts or 0)) // 3_600_000, 0) + 1
    return {**tally, "moves_by_hour": by_hour, "clusters_with_windows": len(det.clusters)}


def measure_merges(scenario: str, seed: int) -> dict[str, Any]:
    """:func:`count_merges` over a simulated scenario (scale 1), with progress."""
    from detector import simulate

    sim = simulate.build(scenario, seed=seed)
    say(f"merges: replaying {scenario} (seed {seed}) through one detector")
    began = time.monotonic()

    def paced() -> Iterator[dict[str, Any]]:
        for i, ev in enumerate(sim.events(), 1):
            if i % 100_000 == 0:
                say(f"merges: {i:,} events ({time.monotonic() - began:.0f}s)")
            yield ev

    out = {"scenario": scenario, "seed": seed, **count_merges(paced(), sim.start_ts)}
    say(f"merges: {out['merges']:,} merges over {out['events']:,} events, {out['moves']} of them between two clusters "
        f"with windows")
    return out


def draw(result: dict[str, Any], out: Path, worker_drain: float | None = None) -> Path:
    """Two panels of ``result`` (a ``groupby.json``): latency against the offered rate per mode (a cross at the top
    where no event of the window came back), and each mode's drain beside the detector worker's (``worker_drain``,
    from ``bench/results/latest.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"direct": "#888888", "group_by": "#c0392b", "bundled": "#3b75af"}
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    machine = result.get("machine", {})
    fig.suptitle(f"make bench-groupby, {machine.get('git_commit', '?')}: the trip to a cluster's partition and back, "
                 f"transport only ({machine.get('cores', '?')} cores)", fontsize=11)
    top = max([r["p99_ms"] for r in result["paced"] if r["p99_ms"]] + [1.0]) * 2
    for mode, colour in colours.items():
        runs = [r for r in result["paced"] if r["mode"] == mode]
        if not runs:
            continue
        rates = [r["offered_per_s"] for r in runs]
        for q, style in (("p50_ms", "-"), ("p99_ms", ":")):
            ax_l.plot(rates, [r[q] if r[q] is not None else float("nan") for r in runs], style, marker="o",
                      color=colour, label=f"{mode} {q[:3]}")
        lost = [r["offered_per_s"] for r in runs if r["p50_ms"] is None]
        ax_l.plot(lost, [top] * len(lost), "x", color=colour, ms=10, mew=2,
                  label=f"{mode}: none back within 60 s" if lost else None)
    ax_l.axhline(1000, color="#555555", ls="--", lw=1, label="the worker's p99 target (1 s)")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("offered events per second")
    ax_l.set_ylabel("event sent to back on the account's partition, ms (log)")
    ax_l.set_title("latency of the trip", fontsize=10)
    ax_l.legend(fontsize=7, ncol=2, loc="upper left")

    bars = [(r["mode"], float(r["events_per_s"])) for r in result["drain"]]
    if worker_drain:
        bars.append(("detector worker\n(all of detection)", worker_drain))
    ax_d.bar([n for n, _ in bars], [v for _, v in bars],
             color=[colours.get(n, "#2e8b57") for n, _ in bars])
    for x, (_, v) in enumerate(bars):
        ax_d.text(x, v, f"{v:,.0f}/s", ha="center", va="bottom", fontsize=8)
    ax_d.set_ylabel("events per second")
    ax_d.set_title("backlog drain", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _worker_drain() -> float | None:
    """The detector worker's drain (envelopes) in the last ``make bench``, if there is one."""
    try:
        return float(json.loads((ROOT / "bench" / "results" / "latest.json").read_text())["worker_events_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        bootstrap, prefix, mode, out, within_s = argv[1:6]
        worker(bootstrap, prefix, mode, Path(out), float(within_s))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.groupby", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="500,2000", help="offered events/s, comma-separated")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--drain", type=int, default=30_000, help="events in the backlog drained by each mode")
    p.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    p.add_argument("--bundle-within-s", type=float, default=BATCH_WITHIN_S,
                   help="how long the bundled mode waits to fill a batch of 2,000 (default: the worker's 0.2 s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (the plot goes beside it, .png)")
    p.add_argument("--plot", type=Path, metavar="RESULTS",
                   help="only draw the plot of a results JSON written before (beside it, .png)")
    p.add_argument("--merges", default="default", metavar="SCENARIO",
                   help="the scenario whose cluster merges are counted (seed 7, scale 1; about 3 minutes); none: skip")
    p.add_argument("--merges-only", action="store_true",
                   help="only count the merges (no broker); into the results JSON, the rest of it kept")
    args = p.parse_args(argv)
    from detector.simulate import scenario_names

    if args.merges != "none" and args.merges not in scenario_names():
        print(f"error: --merges takes a scenario ({', '.join(scenario_names())}) or none, got {args.merges!r}",
              file=sys.stderr)
        return 2
    if args.merges_only:
        if args.merges == "none":
            print("error: --merges-only needs a scenario (--merges)", file=sys.stderr)
            return 2
        try:
            kept = json.loads(args.out.read_text()) if args.out.exists() else {}
        except ValueError:
            print(f"error: {args.out} is not JSON", file=sys.stderr)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**kept, "merges": measure_merges(args.merges, 7)}, indent=2) + "\n")
        return 0
    if args.plot is not None:
        try:
            say(f"plot: {draw(json.loads(args.plot.read_text()), args.plot.with_suffix('.png'), _worker_drain())}")
        except FileNotFoundError:
            print(f"error: no such file: {args.plot}", file=sys.stderr)
            return 2
        except (ValueError, KeyError, TypeError) as exc:
            print(f"error: {args.plot} is not a bench.groupby results file ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            return 2
        except ImportError:
            print("error: matplotlib is not installed (pip install -e '.[plots]')", file=sys.stderr)
            return 2
        return 0
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        print(f"error: --rates must be numbers separated by commas, got {args.rates!r}", file=sys.stderr)
        return 2

    from bench.run import BenchError, machine_info, start_broker
    from detector import broker as local_broker

    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        print(f"error: --modes takes some of {', '.join(MODES)}, got {args.modes!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-groupby-") as d:
        tmp = Path(d)
        say("broker: starting a local Kafka broker")
        try:
            bootstrap = start_broker(tmp / "kafka").bootstrap
            run = f"{os.getpid()}"
            try:
                paced = []
                for rate in rates:
                    for mode in modes:
                        r = measure_paced(bootstrap, mode, rate, args.warmup_s, args.window_s, tmp, run,
                                          args.bundle_within_s)
                        paced.append(r)
                        say(f"{mode} at {rate:,.0f}/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms; "
                            f"{r['not_back']:,} of {r['window_events']:,} events not back within 60 s")
                drains = [measure_drain(bootstrap, mode, args.drain, tmp, run) for mode in modes]
            finally:
                local_broker.stop(tmp / "kafka")
        except (GroupByBenchError, BenchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for r in paced:
        del r["output"]  # in the temporary directory, gone now
    merges = measure_merges(args.merges, 7) if args.merges != "none" else None
    result = {"machine": machine_info(), "paced": paced, "drain": drains, "merges": merges,
              "method": "faust-streaming agents, 4 partitions; a fresh worker subprocess per measurement; latency = "
                        "receipt in the last agent minus the producer's send time (kafka-python, linger 5 ms); drain "
                        "= events over the time from the first event back to the last"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':>9} {'offered/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'not back in 60 s':>17}")
    for r in paced:
        print(f"{r['mode']:>9} {r['offered_per_s']:>10,.0f} {r['p50_ms'] or '-':>8} {r['p99_ms'] or '-':>8} "
              f"{r['not_back']:>8,} of {r['window_events']:,}")
    for r in drains:
        print(f"{r['mode']:>9} drain {r['events_per_s']:>10,}/s")
    try:
        say(f"plot: {draw(result, args.out.with_suffix('.png'), _worker_drain())}")
    except ImportError:
        say("plot: skipped (matplotlib is not installed: pip install -e '.[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
