"""Account snapshots: a detector restored from a changelog and fed the redelivered tail counts every event
exactly once, as if it had never stopped. The worker does the same against Kafka (``make chaos``)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from detector import features as feat
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
        assert back.state.day[:feat.WINDOW_SLOTS] == acct.state.day[:feat.WINDOW_SLOTS], aid


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


# A snapshot written by the detector before its window became float32 (commit c46ae09, float64 window; the format,
# version 1, was unchanged by it): made by hand with every field set, the window holding 0.1, 0.2, ... 4.8.
OLD_SNAPSHOT = bytes.fromhex(
    "01010302643cd3019c0100009638d8ab9c010000f622d9ab9c0100009638d8ab9c01000003000000000000009638d8ab"
    "9c010000020000000000000029000000000000009a9999999999b93f3333333333330740333333333333d33f85eb51b8"
    "1e85e33f9a9999999999e13f050000000001000003000000000000000000000000000080800000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000100000b00000000000000ffffffffffffffff9a9999999999b93f9a999999"
    "9999c93f343333333333d33f9a9999999999d93f000000000000e03f343333333333e33f676666666666e63f9a999999"
    "9999e93fcdccccccccccec3f000000000000f03f9a9999999999f13f343333333333f33fcdccccccccccf43f67666666"
    "6666f63f000000000000f83f9a9999999999f93f343333333333fb3fcdccccccccccfc3f676666666666fe3f00000000"
    "00000040cdcccccccccc00409a99999999990140676666666666024034333333333303400000000000000440cdcccccc"
    "cccc04409a99999999990540676666666666064034333333333307400000000000000840cdcccccccccc08409a999999"
    "999909406766666666660a403433333333330b400000000000000c40cdcccccccccc0c409a99999999990d4067666666"
    "66660e403433333333330f4000000000000010406766666666661040cdcccccccccc104033333333333311409a999999"
    "9999114000000000000012406766666666661240cdcccccccccc12403433333333331340"
)


def test_a_snapshot_from_the_float64_window_still_loads() -> None:
    """Version 1: a float64 window without the ECHO slot. It loads rounded to float32 with an empty echo count,
    and is written again as version 2."""
    from array import array

    from detector import features as feat

    acct, allowlisted = load_account(OLD_SNAPSHOT)
    st = acct.state
    assert allowlisted and acct.action == "watch" and (acct.score, acct.emitted_score) == (0.61, 0.55)
    assert (st.created_ts, st.first_ts, st.last_ts, st.t0, st.events) == (
        1769557146724, 1772409600150, 1772409660150, 1772409600150, 3)
    assert (acct.learned_ts, acct.shard, acct.seq, list(acct.recent)) == (1772409600150, 2, 41, [11, 2**64 - 1])
    assert (st.ip_bits, st.asn_bits, st.ua_bits, acct.bits) == (1 << 40 | 5, 3, 1 << 63, (1 << 1000) | (1 << 7))
    # the window, rounded to the float32 it is now kept in
    v1 = [0.1 * (i + 1) for i in range(feat.N_SLOTS - 1)]
    old = v1[:feat.ECHO] + [0.0] + v1[feat.ECHO:] + [0.1, 2.9, 0.3]
    assert st.day[:feat.WINDOW_SLOTS] == array("f", old) and feat.WINDOW_SLOTS == len(old)
    # written again, it is version 2 with the window's float32 values (exactly, as float64)
    again = dump_account(acct, allowlisted=True)
    assert again[0] == 2 and len(again) == len(OLD_SNAPSHOT) + 8
    assert again[-8 * feat.N_SLOTS:] == array("d", array("f", old[:feat.N_SLOTS])).tobytes()
    assert load_account(again)[0].state.day[:feat.WINDOW_SLOTS] == st.day[:feat.WINDOW_SLOTS]
