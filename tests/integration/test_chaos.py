"""``make chaos`` in CI, shorter: kill -9 a worker, restart the broker, fail over to a second worker, all
under load against a real broker, and every event counted exactly once in the recovered state.

The gateway sends most events in envelopes and a fifth one per message, at random (``--envelope``): one run
covers both kinds of message and the dedup positions across them. ``make chaos`` runs single events only."""

from __future__ import annotations

import logging
from pathlib import Path

from detector.chaos import FAILOVER_LIMIT_S, run_chaos

log = logging.getLogger(__name__)


def test_no_event_lost_or_counted_twice_across_faults(tmp_path: Path) -> None:
    result = run_chaos(duration_s=50, rate=300, say=log.info, work_dir=tmp_path, envelope_max_events=4096)
    print(result.summary())
    assert result.events_in > 10_000
    assert result.resent > 0  # the gateway's duplicates were in the traffic
    assert [f.recovered_in_s is not None for f in result.faults] == [True, True, True], result.faults
    assert result.faults[-1].recovered_in_s <= FAILOVER_LIMIT_S  # type: ignore[operator]
    assert (result.lost, result.duplicated) == (0, 0), result.summary()
    assert result.reflected == result.events_in
