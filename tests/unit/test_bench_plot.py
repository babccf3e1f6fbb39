"""``python -m bench.plot`` draws a benchmark's results; its panels read the numbers the run wrote."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import plot

RESULTS = plot.RESULTS  # the committed results of the last full run


def test_panels_read_the_results_own_numbers() -> None:
    r = orjson.loads(RESULTS.read_bytes())
    bars = dict(plot._throughput(r))
    assert bars["raw consumer (baseline)"] == r["raw_events_per_s"]
    assert bars["worker, envelopes"] == r["worker_events_per_s"]
    series = plot._memory(r)
    flood = series["id flood, max_accounts=100k"]
    last = r["details"]["memory"]["flood"]["marks"][-1]  # the flood's size is the plan's (2M ids since run T)
    assert flood[-1] == (last["ids"], last["rss_mib"])


def test_latency_prefers_every_message_over_the_records() -> None:
    r = {"details": {"latency": {"p50_ms": 500.0, "p99_ms": 900.0, "message_p50_ms": 450.0, "message_p99_ms": 980.0},
                     "latency_single": {"p50_ms": 300.0, "p99_ms": 510.0},
                     "latency_low_load": {"p50_ms": None, "p99_ms": None}}}  # no record in its window
    assert plot._latency(r) == [("envelopes, 80%", 450.0, 980.0), ("single, 80%", 300.0, 510.0)]


def test_main_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    assert plot.main([str(RESULTS), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench.plot: error: no such file")


def test_the_group_by_plot_draws_the_committed_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench import groupby

    results = tmp_path / "groupby.json"
    results.write_bytes((plot.RESULTS.parent / "groupby.json").read_bytes())
    assert groupby.main(["--plot", str(results)]) == 0
    assert (tmp_path / "groupby.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("content", "says"), [
    (None, "error: no such file"),
    (b'{"paced": []}', "is not a bench.groupby results file (KeyError: 'drain')"),
])
def test_the_group_by_plot_of_a_bad_file_is_one_line(content: bytes | None, says: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from bench import groupby

    results = tmp_path / "groupby.json"
    if content is not None:
        results.write_bytes(content)
    assert groupby.main(["--plot", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
