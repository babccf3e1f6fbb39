"""``make chaos`` in CI, shorter: kill -9 a worker, restart the broker, fail over to a second worker, all
under load against a real broker, and every event counted exactly once in the recovered state.

Single events, as ``make chaos``. With envelopes (``detector chaos --envelope 4096``), one CI run of three lost
one event of 14,517 (2026-11-23; not yet explained): envelope mode is experimental until that is found, and
this test goes back to envelopes with the fix."""

from __future__ import annotations

import logging
from pathlib import Path

from detector.chaos import FAILOVER_LIMIT_S, run_chaos

log = logging.getLogger(__name__)


def test_no_event_lost_or_counted_twice_across_faults(tmp_path: Path) -> None:
    result = run_chaos(duration_s=50, rate=300, say=log.info, work_dir=tmp_path)
    print(result.summary())
    assert result.events_in > 10_000
    assert result.resent > 0  # the gateway's duplicates were in the traffic
    assert [f.recovered_in_s is not None for f in result.faults] == [True, True, True], result.faults
    assert result.faults[-1].recovered_in_s <= FAILOVER_LIMIT_S  # type: ignore[operator]
    assert (result.lost, result.duplicated) == (0, 0), result.summary()
    assert result.reflected == result.events_in
