"""Event-id deduplication: Kafka delivers at least once, and a redelivered event must not count twice."""

from __future__ import annotations

import hashlib
import tracemalloc
from typing import Any

import orjson

from detector.content import ContentIndex
from detector.detection import Detector, RecentIds
from detector.settings import Settings
from detector.streaming.routing import Router, Source
from tests.factory import event
from tests.unit.test_detection import campaign_and_ordinary


def detector(**kw: Any) -> Detector:
    return Detector(content=ContentIndex(width=1 << 14, depth=2), **kw)


def snapshot(det: Detector) -> bytes:
    """Everything the detector learned, as bytes to compare (all but the dedup memory and its counter)."""
    content = hashlib.sha256(bytes(det.content._new) + bytes(det.content._old)).hexdigest()
    return orjson.dumps({
        "accounts": {aid: [a.action, a.score, a.emitted_score, a.learned_ts, a.root, a.blocked_counted,
                           str(a.seen.bits), a.state.to_list()] for aid, a in det.accounts.items()},
        "clusters": {root: [list(c.day), c.t0, c.last_ts, c.blocked_members, c.blocked, c.org_bits, c.n_1h,
                            c.new_model_1h] for root, c in det.clusters.items()},
        "linker": [det.linker._parent, det.linker._size, [[*k, v] for k, v in det.linker._key_degree.items()]],
        "content": content,
        "model": [det.model.learned, det.model._sorted],
        "fusion": [det.fusion.labels_learned, det.fusion._weights],
        "first_seen": det.model_first_seen,
        "stats": {k: v for k, v in det.stats.items() if k != "duplicates"},
        "blocked_roots": sorted(det._blocked_roots),
        "allowlist": sorted(det.allowlist),
    }, option=orjson.OPT_NON_STR_KEYS)


def run(det: Detector, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for ev in events if (r := det.process(ev, emitted_at=ev["ts"])) is not None]


def redelivered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stream as an at-least-once consumer may see it: every 7th event twice in a row (a producer's
    retry), and after every 150 events the last 60 again (a crash or rebalance before the commit)."""
    out: list[dict[str, Any]] = []
    for i, ev in enumerate(events, 1):
        out.append(ev)
        if i % 7 == 0:
            out.append(dict(ev))  # an equal copy, as decoded again from the wire
        if i % 150 == 0:
            out.extend(dict(e) for e in events[i - 60:i])
    return out


def test_redelivered_events_change_nothing() -> None:
    events = campaign_and_ordinary(n_attack=12, n_ordinary=20, hours=24)
    once, twice = detector(), detector()
    records = run(once, events)
    stream = redelivered(events)
    assert len(stream) > len(events) + 100
    assert run(twice, stream) == records
    assert any(r["action"] != "allow" for r in records)  # the campaign was flagged: the test has teeth
    assert snapshot(twice) == snapshot(once)
    assert twice.stats["duplicates"] == len(stream) - len(events)
    assert twice.stats["events"] == once.stats["events"] == len(events)
    assert once.stats["duplicates"] == 0


def test_a_duplicate_of_an_event_that_changed_the_decision_returns_nothing() -> None:
    det = detector()
    for ev in campaign_and_ordinary(n_attack=12, n_ordinary=5, hours=12):
        if det.process(ev, emitted_at=ev["ts"]) is not None:
            before = snapshot(det)
            assert det.process(ev, emitted_at=ev["ts"]) is None
            assert snapshot(det) == before
            return
    raise AssertionError("no event changed a decision")


def test_the_router_does_not_dead_letter_a_duplicate() -> None:
    router = Router(detector(), Settings(), clock=lambda: 1_775_000_000.0)
    raw = orjson.dumps(event("acct_dup"))
    assert router.on_message(raw, b"acct_dup", Source("api-calls", 0, 1)) == []
    assert router.on_message(raw, b"acct_dup", Source("api-calls", 0, 1)) == []  # redelivered
    assert router.stats["dead_letters"] == 0 and router.stats["events_processed"] == 2
    assert router.detector.stats["duplicates"] == 1  # type: ignore[attr-defined]


def test_the_last_capacity_ids_are_remembered_and_older_ones_forgotten() -> None:
    ids = RecentIds(capacity=100)
    for n in range(1000):
        assert not ids.seen(f"evt_{n:08d}")
        # every one of the last `capacity` ids is still known
        assert all(ids.seen(f"evt_{m:08d}") for m in range(max(0, n - 99), n + 1))
    assert not ids.seen("evt_00000000")  # 1,000 ids ago: forgotten, so counted again (bounded memory)


def test_memory_is_bounded_by_capacity() -> None:
    ids = RecentIds(capacity=10_000)
    tracemalloc.start()
    try:
        for n in range(20_000):  # two generations full
            ids.seen(f"evt_{n:012d}")
        full, _ = tracemalloc.get_traced_memory()
        for n in range(20_000, 200_000):
            ids.seen(f"evt_{n:012d}")
        later, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) <= 2 * ids.capacity
    assert later < full * 1.3  # nine times as many ids later: no growth beyond the two generations
    assert full < 2 * ids.capacity * 160  # the documented bound: at most 160 bytes per remembered id


def test_detector_dedup_memory_is_bounded() -> None:
    det = detector(dedup_ids=300)
    for n in range(3_000):
        det.process(event(f"acct_{n % 50}", ts=1_775_000_000_000 + n * 1000, event_id=f"evt_bound_{n:06d}"))
    assert len(det.recent_ids) <= 600
    assert det.stats["duplicates"] == 0 and det.stats["events"] == 3_000


def test_ids_hash_the_same_in_every_process() -> None:
    # BLAKE2b, not hash(): the worker and `detector replay` must agree on which events are duplicates.
    a, b = RecentIds(4), RecentIds(4)
    for n in range(10):
        assert a.seen(f"e{n}") == b.seen(f"e{n}")
    assert a._new == b._new and a._old == b._old


def test_duplicates_and_restored_accounts_reach_the_metrics() -> None:
    det = detector(track_changes=True)
    router = Router(det, Settings())
    ev = event("acct_m1", ts=1_775_000_000_000, event_id="evt_metric_0001")
    raw = orjson.dumps(ev)
    router.on_message(raw, b"acct_m1", Source("api-calls", 0, 5))
    router.on_message(raw, b"acct_m1", Source("api-calls", 0, 5))  # redelivered
    router.on_message(raw, b"acct_m1", Source("api-calls", 0, 6))  # sent twice by the gateway
    other = detector()
    other.restore((aid, blob) for aid, _, blob in det.drain_changes())
    router.refresh_gauges()
    Router(other, Settings(), metrics=router.metrics).refresh_gauges()
    sample = router.metrics.registry.get_sample_value
    assert sample("detector_events_duplicate_total") == 2
    assert sample("detector_accounts_restored_total") == 1
    router.refresh_gauges()  # counts only what is new since the last refresh
    assert sample("detector_events_duplicate_total") == 2


def test_model_tail_share_reaches_its_gauge() -> None:
    det = detector()
    router = Router(det, Settings())
    det.model.learned = det.model.warm_up  # warm, so the gauges read the model
    det.model.tail_share = 0.2
    router.refresh_gauges()
    assert router.metrics.registry.get_sample_value("detector_model_tail_share") == 0.2
