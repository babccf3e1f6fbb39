"""One picture of a benchmark run: throughput, latency and memory against the targets of the performance issue.

    python -m bench.plot                                   # bench/results/latest.json -> bench/results/latest.png
    python -m bench.plot results.json --out run.png

``make bench`` draws it at the end of a run (when matplotlib is installed: ``pip install -e '.[plots]'``).
Three panels, each from the results' own numbers, nothing recomputed:

* throughput, events/s on a log scale: the raw consumer (the baseline), the worker draining envelopes and
  single events, two workers, replay; the ratio target is a line at a quarter of the raw rate;
* latency at the offered loads: p50 and p99 over every message (the worker's message histogram) where the
  run has them, else over the risk-score records; the p99 target is a line at 1 s;
* memory: resident set size against account ids, for 1M distinct accounts (grows about 1 KiB each) and for
  an account-id flood with ``max_accounts`` = 100k (flat once the bound is reached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _throughput(r: dict[str, Any]) -> list[tuple[str, float]]:
    d = r.get("details", {})
    single = d.get("single_message", {})
    bars = [("raw consumer (baseline)", r.get("raw_events_per_s")),
            ("worker, envelopes", r.get("worker_events_per_s")),
            ("2 workers, envelopes", (d.get("worker_2") or {}).get("events_per_s")),
            ("worker, one event per message", single.get("worker_events_per_s")),
            ("replay, one core", r.get("replay_events_per_s"))]
    return [(name, float(v)) for name, v in bars if v]


def _latency(r: dict[str, Any]) -> list[tuple[str, float, float]]:
    d = r.get("details", {})
    out = []
    for key, name in (("latency", "envelopes, 80%"), ("latency_single", "single, 80%"),
                      ("latency_low_load", "envelopes, 25%"), ("latency_low_load_single", "single, 25%")):
        lat = d.get(key) or {}
        p50 = lat.get("message_p50_ms", lat.get("p50_ms"))
        p99 = lat.get("message_p99_ms", lat.get("p99_ms"))
        if p50 is not None and p99 is not None:
            out.append((name, float(p50), float(p99)))
    return out


def _memory(r: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    mem = r.get("details", {}).get("memory") or {}
    series = {}
    for key, name in (("accounts", "1M distinct accounts"), ("flood", "id flood, max_accounts=100k")):
        part = mem.get(key) or {}
        points = [(0, part["rss0_mib"])] if "rss0_mib" in part else []
        points += [(m["ids"], m["rss_mib"]) for m in part.get("marks", [])]
        if points:
            series[name] = points
    return series


def plot(results: dict[str, Any], out: Path) -> Path:
    """Draw ``results`` (a ``bench/results/*.json`` document) to ``out`` (PNG); return ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l, ax_m) = plt.subplots(1, 3, figsize=(17, 5.2))
    machine = results.get("machine", {})
    fig.suptitle(f"make bench, {machine.get('git_commit', '?')}: {machine.get('cores', '?')} cores, "
                 f"{machine.get('cpu', '?')}, Kafka {machine.get('kafka', '?')}", fontsize=11)

    bars = _throughput(results)
    if bars:
        names, rates = zip(*bars, strict=True)
        ax_t.barh(names, rates, color=["#888888"] + ["#3b75af"] * (len(rates) - 1))
        ax_t.set_xscale("log")
        ax_t.invert_yaxis()
        raw = results.get("raw_events_per_s")
        if raw:
            ax_t.axvline(0.25 * raw, color="#c0392b", ls="--", lw=1)
            ax_t.text(0.25 * raw, len(rates) - 0.5, " target: 25% of raw", color="#c0392b", fontsize=8, va="bottom")
        for y, v in enumerate(rates):
            ax_t.text(v, y, f" {v:,.0f}/s", va="center", fontsize=8)
        ratio = results.get("ratio")
        ax_t.set_title(f"throughput (ratio {ratio:.3f})" if ratio else "throughput", fontsize=10)
        ax_t.set_xlabel("events per second (log)")

    lats = _latency(results)
    if lats:
        xs = range(len(lats))
        ax_l.bar([x - 0.2 for x in xs], [p for _, p, _ in lats], width=0.4, label="p50", color="#7fb3d5")
        ax_l.bar([x + 0.2 for x in xs], [p for _, _, p in lats], width=0.4, label="p99", color="#1f4e79")
        ax_l.axhline(1000, color="#c0392b", ls="--", lw=1, label="p99 target (80% load)")
        ax_l.set_xticks(list(xs), [n for n, _, _ in lats], fontsize=8)
        ax_l.set_ylabel("ms (every message; older runs: records)")
        ax_l.set_title("event-to-score latency at the offered share of the worker's rate", fontsize=10)
        ax_l.legend(fontsize=8)

    series = _memory(results)
    for name, points in series.items():
        ax_m.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    if series:
        bpa = results.get("bytes_per_account")
        ax_m.set_title(f"memory ({bpa:,.0f} B per account at 1M)" if bpa else "memory", fontsize=10)
        ax_m.set_xlabel("account ids sent")
        ax_m.set_ylabel("RSS, MiB")
        ax_m.ticklabel_format(axis="x", style="plain")
        ax_m.legend(fontsize=8)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="?", default=RESULTS, help="results JSON (default: latest)")
    p.add_argument("--out", type=Path, help="PNG to write (default: beside the results, .png)")
    args = p.parse_args(argv)
    try:
        results = orjson.loads(args.results.read_bytes())
        out = plot(results, args.out or args.results.with_suffix(".png"))
    except FileNotFoundError as exc:
        print(f"bench.plot: error: no such file: {exc.filename}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError as exc:
        print(f"bench.plot: error: {args.results} is not JSON: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("bench.plot: error: matplotlib is not installed (pip install -e '.[plots]')", file=sys.stderr)
        return 2
    print(f"bench.plot: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
