"""Account snapshots: a detector restored from a changelog and fed the redelivered tail counts every event
exactly once, as if it had never stopped. The worker does the same against Kafka (``make chaos``)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from detector import simulate
from detector.content import ContentIndex
from detector.detection import Detector, dump_account, load_account
from detector.settings import DetectionSettings

PARTITIONS = 4
BATCH = 150
SETTINGS = DetectionSettings(idle_evict_s=10 * 365 * 24 * 3600)


@pytest.fixture(scope="module")
def stream() -> list[tuple[int, int, dict[str, Any]]]:
    """(partition, offset, event), interleaved across partitions as a worker reads them; 1 in 50 events
    is sent twice by the gateway (same event id, a later offset)."""
    offsets = [0] * PARTITIONS
    out = []
    for i, ev in enumerate(simulate.build("smoke", scale=0.4).events()):
        for _ in range(2 if i % 50 == 0 else 1):
            p = zlib.crc32(ev["account_id"].encode()) % PARTITIONS
            out.append((p, offsets[p], ev))
            offsets[p] += 1
    return out


def detector() -> Detector:
    return Detector(SETTINGS, content=ContentIndex(width=1 << 12), track_changes=True)


def counts(det: Detector) -> dict[str, int]:
    return {aid: acct.state.events for aid, acct in det.accounts.items()}


def test_restored_detector_counts_every_event_once(stream: list[tuple[int, int, dict[str, Any]]]) -> None:
    reference = detector()
    for p, o, ev in stream:
        reference.process(ev, position=(p, o))
    distinct = {ev["event_id"] for _, _, ev in stream}
    assert sum(counts(reference).values()) == len(distinct) < len(stream)

    changelog: dict[str, bytes] = {}
    committed = [0] * PARTITIONS  # next offset to read, per partition
    det = detector()
    crash_at = len(stream) * 2 // 3 + 37  # mid-batch
    for start in range(0, crash_at, BATCH):
        batch = stream[start:min(start + BATCH, crash_at)]
        for p, o, ev in batch:
            det.process(ev, position=(p, o))
        if start + BATCH > crash_at:
            break  # the crash: this batch's changes never reach the changelog
        for aid, _, blob in det.drain_changes():  # written, then flushed...
            if blob is None:
                changelog.pop(aid, None)
            else:
                changelog[aid] = blob
        if (start // BATCH) % 3 != 2:  # ...but one commit in three is lost with the crash
            for p, o, _ in batch:
                committed[p] = o + 1

    restored = detector()
    assert restored.restore(changelog.items()) == len(changelog)
    redelivered = [(p, o, ev) for p, o, ev in stream if o >= committed[p]]
    assert len(redelivered) > len(stream) - crash_at  # some events are read a second time
    for p, o, ev in redelivered:
        restored.process(ev, position=(p, o))
    assert counts(restored) == counts(reference)
    assert restored.stats["duplicates"] > 0


def test_snapshot_round_trip_keeps_the_decision_and_the_windows(stream: list[tuple[int, int, dict[str, Any]]]) -> None:
    det = detector()
    for p, o, ev in stream[:2000]:
        det.process(ev, position=(p, o))
    for aid, acct in list(det.accounts.items())[:200]:
        back, _ = load_account(dump_account(acct))
        assert dump_account(back) == dump_account(acct)
        assert (back.action, back.score, back.seq, back.shard, back.recent) == \
            (acct.action, acct.score, acct.seq, acct.shard, acct.recent)
        assert list(back.state.day) == list(acct.state.day), aid


def test_drop_shards_forgets_moved_accounts_without_tombstones(stream: list[tuple[int, int, dict[str, Any]]]) -> None:
    det = detector()
    for p, o, ev in stream[:1000]:
        det.process(ev, position=(p, o))
    det.drain_changes()
    on_two = sum(1 for acct in det.accounts.values() if acct.shard == 2)
    assert on_two > 0
    assert det.drop_shards({2}) == on_two
    assert all(acct.shard != 2 for acct in det.accounts.values())
    assert det.drain_changes() == []  # moved, not evicted: nothing to delete from the changelog


def test_damaged_snapshots_are_skipped_and_counted() -> None:
    det = detector()
    good = dump_account(load_account(dump_account(Detector().accounts.setdefault("x", _fresh())))[0])
    assert det.restore([("a", good), ("b", b""), ("c", good[:-1]), ("d", b"\x09" + good[1:])]) == 1
    assert det.stats["restore_errors"] == 3


def _fresh() -> Any:
    from detector.detection import _Account

    return _Account(None)


def test_partitions_moving_away_and_back_lose_nothing(stream: list[tuple[int, int, dict[str, Any]]]) -> None:
    """A rebalance takes partitions away after a batch whose changes were not yet written, and gives them
    back: the same detector restores them from the changelog and is redelivered the uncommitted events.
    Its worker-wide id memory must not skip them (they left with the dropped accounts)."""
    reference = detector()
    for p, o, ev in stream:
        reference.process(ev, position=(p, o))
    det = detector()
    changelog: dict[str, bytes] = {}
    half = len(stream) // 2
    for p, o, ev in stream[:half]:
        det.process(ev, position=(p, o))
    changelog.update((aid, blob) for aid, _, blob in det.drain_changes() if blob is not None)
    committed = {p: o + 1 for p, o, _ in stream[:half]}
    for p, o, ev in stream[half:half + 300]:  # processed, then the rebalance: never written, never committed
        det.process(ev, position=(p, o))
    det.drop_shards(range(PARTITIONS))
    det.drain_changes()
    det.restore(changelog.items())
    for p, o, ev in stream:
        if o >= committed.get(p, 0):
            det.process(ev, position=(p, o))
    assert counts(det) == counts(reference)


def test_a_version_1_snapshot_written_before_the_echo_slot_still_loads(stream: list[tuple[int, int, dict[str, Any]]]
                                                                       ) -> None:
    """Version 1 had no ECHO slot in the window: a changelog written before it restores every other slot in place
    and an empty echo count (a rolling upgrade restores the old workers' accounts)."""
    from detector import features as feat

    det = detector()
    for p, o, ev in stream[:2000]:
        det.process(ev, position=(p, o))
    for acct in list(det.accounts.values())[:50]:
        acct.day[feat.ECHO] = 0.0
        v2 = dump_account(acct)
        slots = 8 * feat.N_SLOTS
        window = v2[-slots:]
        at = 8 * feat.ECHO
        v1 = b"\x01" + v2[1:-slots] + window[:at] + window[at + 8:]  # as the version-1 code wrote it
        assert len(v1) == len(v2) - 8
        back, _ = load_account(v1)
        assert dump_account(back) == v2
