"""``python -m bench.groupby`` on the real broker: each of its trips brings every event of the window back, once,
and the two trips through a cluster's partition count the event in the cluster's table entry.

The numbers in BENCHMARKS.md (*What a group_by stage would cost*) are only as good as the trips they time: a trip
that dropped events, or timed only the probe, would read fast. Each mode here runs briefly at a low rate.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import groupby

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", groupby.MODES)
def test_every_event_of_the_window_comes_back_once(kafka_bootstrap: str, tmp_path: Path, mode: str) -> None:
    r = groupby.measure_paced(kafka_bootstrap, mode, rate=200, warmup_s=1.0, window_s=2.0, tmp=tmp_path,
                              run=f"t{tmp_path.name[-8:]}")
    assert r["window_events"] >= 350  # 2 s at 200/s, give or take the pacing's last step
    assert r["not_back"] == 0 and r["back_twice"] == 0
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    tally = groupby.cluster_tally(Path(r["output"]))
    if mode == "direct":
        assert all(top == 0 for _, top in tally.values())  # no table on the way
    else:  # every event of a cluster went through its one table entry (probes and warm-up included)
        assert len(tally) > 100 and all(top == back for back, top in tally.values())
