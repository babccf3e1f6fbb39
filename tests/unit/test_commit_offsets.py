"""The worker's commit position (``detector.streaming.app.next_commit``) against Faust's own ``_new_offset``.

Faust moves the gaps it knows of into a partition's acked list without asking whether those offsets were acked
too; after a rebalance the consumer seeks back and delivers them after all, so the list holds duplicates and
Faust's commit creeps one offset at a time. The chaos runs stalled that way (OPERATIONS.md)."""

from __future__ import annotations

from types import SimpleNamespace

from faust.transport.consumer import Consumer
from intervaltree import IntervalTree

from detector.streaming.app import next_commit


def _state(acked: list[int], gap: list[tuple[int, int]], committed: int) -> tuple[list[int], set[int], IntervalTree]:
    return list(acked), set(acked), IntervalTree.from_tuples(gap)


def _faust(acked: list[int], index: set[int], gap: IntervalTree, committed: int) -> int | None:
    tp = "p0"
    fake = SimpleNamespace(_acked={tp: acked}, _acked_index={tp: index}, _gap={tp: gap},
                           _committed_offset={tp: committed})
    return Consumer._new_offset(fake, tp)  # type: ignore[arg-type]


def test_gap_offsets_that_were_acked_too_commit_in_one_step() -> None:
    # 100-199 acked; 120-159 were refilled (a gap) and then delivered and acked after all.
    acked, index, gap = _state(list(range(100, 200)), [(120, 160)], committed=100)
    assert next_commit(acked, index, gap, 100) == 200
    assert acked == [] and len(gap) == 0


def test_faust_alone_creeps_on_the_same_state() -> None:
    acked, index, gap = _state(list(range(100, 200)), [(120, 160)], committed=100)
    assert _faust(acked, index, gap, 100) == 121  # stops at the first duplicate (120 twice)
    assert len(acked) > 0  # the other duplicates wait for the next commits, one or two offsets each


def test_a_real_hole_still_waits_and_one_missing_offset_at_the_committed_position_does_not() -> None:
    acked, index, gap = _state([103, 104], [], committed=100)
    assert next_commit(acked, index, gap, 100) is None  # 100-102 neither acked nor known missing
    acked, index, gap = _state([101, 102], [], committed=100)
    assert next_commit(acked, index, gap, 100) == 103  # as Faust: tolerates the committed offset itself


def test_offsets_below_the_committed_position_are_dropped() -> None:
    acked, index, gap = _state([95, 96, 100, 101, 102], [], committed=100)
    assert next_commit(acked, index, gap, 100) == 103
    acked, index, gap = _state([97, 98], [], committed=100)
    assert next_commit(acked, index, gap, 100) is None and acked == []


def test_the_gap_beyond_the_acked_offsets_stays() -> None:
    acked, index, gap = _state([10, 11], [(20, 25)], committed=10)
    assert next_commit(acked, index, gap, 10) == 12
    assert sorted((i.begin, i.end) for i in gap) == [(20, 25)]
