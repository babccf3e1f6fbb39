"""Envelopes in the worker, without a broker: ``decode_message`` and ``Router.on_message`` on envelopes of
valid, invalid and misplaced events, malformed envelopes, dedup positions across envelopes and single
events, and the worker's batch and buffer bounds that keep a batch of envelopes about as big as a batch
of single events."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from mode.utils.queues import FlowControlEvent

from detector import envelope
from detector.detection import Detector
from detector.envelope import MAX_BYTES, MAX_EVENTS, Envelope, InvalidEnvelope, decode_message, encode
from detector.schemas import DEAD_LETTER_SCHEMA, InvalidEvent, validate
from detector.settings import Settings, TopicSettings
from detector.streaming.routing import Router, Source
from tests.factory import BASE_TS, event

PARTITIONS = 4
SETTINGS = Settings(topics=TopicSettings(partitions=PARTITIONS))


def on(partition: int, account: str = "acct") -> list[str]:
    """Account ids whose partition (of 4) is ``partition``."""
    return [a for a in (f"{account}_{i}" for i in range(200))
            if envelope.account_partition(a, PARTITIONS) == partition]


class Recorder:
    """A detector double that records what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[int, int] | None]] = []

    def process(self, event: dict[str, Any], emitted_at: int | None = None,
                position: tuple[int, int] | None = None) -> dict[str, Any] | None:
        self.seen.append((event["event_id"], position))
        return None

    def apply_label(self, label: dict[str, Any], emitted_at: int | None = None) -> dict[str, Any] | None:
        return None


def router(detector: Any = None) -> Router:
    return Router(detector if detector is not None else Recorder(), SETTINGS, clock=lambda: 1_775_000_000.0)


def dead(outs: list[Any]) -> list[dict[str, Any]]:
    letters = [orjson.loads(o.value) for o in outs if o.topic == SETTINGS.topics.dead_letters]
    for d in letters:
        validate(DEAD_LETTER_SCHEMA, d)
    return letters


# ---------------------------------------------------------------------------------------------- decoding
def test_a_single_event_decodes_as_before() -> None:
    ev = event()
    assert decode_message(orjson.dumps(ev)) == ev
    with pytest.raises(InvalidEvent) as err:
        decode_message(b'{"pad": "' + b"x" * 70_000 + b'"}')
    assert err.value.reason == "too_large" and not isinstance(err.value, InvalidEnvelope)
    with pytest.raises(InvalidEvent) as err:
        decode_message(b"x" * 70_000)  # neither JSON nor small: too large, as before
    assert err.value.reason == "too_large"


def test_an_envelope_larger_than_an_event_is_accepted_up_to_max_bytes() -> None:
    evs = [event(f"acct_{i}", event_id=f"evt_big_{i:05d}") for i in range(300)]
    raw = encode([orjson.dumps(e) for e in evs])
    assert 64 * 1024 < len(raw) < MAX_BYTES
    decoded = decode_message(raw)
    assert isinstance(decoded, Envelope) and decoded.events == evs and decoded.invalid == {}


@pytest.mark.parametrize("raw, reason, fragment", [
    (b'{"schema_version":1,"kind":"envelope","events":{}}', "schema", "envelope: "),
    (b'{"schema_version":1,"kind":"envelope","events":[]}', "schema", "envelope: "),
    (b'{"schema_version":2,"kind":"envelope","events":[{}]}', "schema", "envelope: "),
    (b'{"schema_version":1,"kind":"envelope","events":[{}],"extra":1}', "schema", "envelope: "),
    (b'{"schema_version":1,"kind":"envelope","events":[' + b",".join([b"{}"] * (MAX_EVENTS + 1)) + b"]}",
     "too_large", "4097 events"),
    (b'{"schema_version":1, "kind":"envelope", "events":[{}], "events":[{}]}', "duplicate_field", "'events'"),
])
def test_a_malformed_envelope_is_refused_whole(raw: bytes, reason: str, fragment: str) -> None:
    with pytest.raises(InvalidEnvelope) as err:
        decode_message(raw)
    assert err.value.reason == reason and fragment in err.value.detail


def test_a_message_over_max_bytes_is_too_large_unread() -> None:
    raw = b'{"schema_version":1,"kind":"envelope","events":[{"p":"' + b"x" * MAX_BYTES + b'"}]}'
    with pytest.raises(InvalidEvent) as err:  # not parsed, so not known to be an envelope
        decode_message(raw)
    assert err.value.reason == "too_large" and f"{len(raw)} bytes" in err.value.detail


def test_a_repeated_key_inside_one_event_of_an_envelope_is_that_events_fault() -> None:
    a, b = event("acct_1"), event("acct_2")
    raw = encode([orjson.dumps(a), orjson.dumps(b)]).replace(b'"acct_2"', b'"acct_2", "account_id":"acct_2"', 1)
    decoded = decode_message(raw)
    assert isinstance(decoded, Envelope)
    assert decoded.events[0] == a and list(decoded.invalid) == [1]
    assert decoded.invalid[1].reason == "duplicate_field" and "account_id" in decoded.invalid[1].detail


def test_white_space_and_key_order_of_another_producer_are_fine() -> None:
    evs = [event("acct_1"), event("acct_2")]
    raw = orjson.dumps({"events": evs, "kind": "envelope", "schema_version": 1}, option=orjson.OPT_INDENT_2)
    decoded = decode_message(raw)
    assert isinstance(decoded, Envelope) and decoded.events == evs and decoded.invalid == {}


# ---------------------------------------------------------------------------------------------- routing
def test_valid_events_are_processed_and_invalid_ones_dead_lettered_with_their_index() -> None:
    accounts = on(2)
    good = [event(accounts[i % 3], event_id=f"evt_mixed_{i:03d}") for i in range(5)]
    items = [orjson.dumps(good[0]), b"[1, 2]", orjson.dumps(good[1]), orjson.dumps({**good[2], "status": 42}),
             orjson.dumps(good[3]), orjson.dumps(good[4])]
    r = router()
    outs = r.on_message(encode(items), None, Source("api-calls", 2, 11))
    letters = dead(outs)
    assert [(d["reason"], d["envelope_index"]) for d in letters] == [("not_object", 1), ("schema", 3)]
    assert all((d["source_partition"], d["source_offset"]) == (2, 11) for d in letters)
    assert base64.b64decode(letters[0]["payload_b64"]) == b"[1,2]"  # that item alone, not the envelope
    assert orjson.loads(base64.b64decode(letters[1]["payload_b64"]))["event_id"] == good[2]["event_id"]
    assert "status" in letters[1]["detail"]
    assert [eid for eid, _ in r.detector.seen] == [good[i]["event_id"] for i in (0, 1, 3, 4)]  # type: ignore[attr-defined]
    s = r.stats
    assert (s["messages"], s["envelopes"], s["envelopes_invalid"]) == (1, 1, 0)
    assert (s["events"], s["events_processed"], s["events_invalid"], s["dead_letters"]) == (6, 4, 2, 2)
    sample = r.metrics.registry.get_sample_value
    assert sample("detector_events_total", {"result": "valid"}) == 4
    assert sample("detector_events_total", {"result": "invalid"}) == 2
    assert sample("detector_events_scored_total") == 4
    assert sample("detector_envelopes_total", {"result": "valid"}) == 1
    assert sample("detector_dead_letters_total", {"reason": "schema"}) == 1


def test_a_malformed_envelope_is_one_dead_letter_without_an_index() -> None:
    r = router()
    raw = b'{"schema_version":1,"kind":"envelope","events":"lots"}'
    [out] = r.on_message(raw, b"k", Source("api-calls", 1, 5))
    [d] = dead([out])
    assert d["reason"] == "schema" and "envelope_index" not in d and out.key == b"k"
    assert base64.b64decode(d["payload_b64"]) == raw
    assert (r.stats["envelopes_invalid"], r.stats["events_invalid"], r.stats["events"]) == (1, 1, 1)
    assert r.metrics.registry.get_sample_value("detector_envelopes_total", {"result": "invalid"}) == 1
    assert r.detector.seen == []  # type: ignore[attr-defined]


def test_positions_are_offset_times_4096_plus_the_index() -> None:
    p, accounts = 3, on(3)
    r = router()
    r.on_message(orjson.dumps(event(accounts[0], event_id="evt_pos_single")), b"x", Source("api-calls", p, 9))
    evs = [event(accounts[i % 2], event_id=f"evt_pos_{i}") for i in range(3)]
    r.on_message(encode([orjson.dumps(e) for e in evs]), None, Source("api-calls", p, 10))
    assert r.detector.seen == [  # type: ignore[attr-defined]
        ("evt_pos_single", (p, 9 * 4096)), ("evt_pos_0", (p, 10 * 4096)), ("evt_pos_1", (p, 10 * 4096 + 1)),
        ("evt_pos_2", (p, 10 * 4096 + 2))]


def test_a_redelivered_envelope_is_skipped_exactly_also_after_a_restore() -> None:
    p, accounts = 1, on(1)
    det = Detector(track_changes=True)
    r = router(det)

    def env(offset_events: list[dict[str, Any]]) -> bytes:
        return encode([orjson.dumps(e) for e in offset_events])

    batch1 = [event(accounts[i % 4], ts=BASE_TS + i * 1000, event_id=f"evt_re1_{i:03d}") for i in range(40)]
    batch2 = [event(accounts[i % 4], ts=BASE_TS + 60_000 + i * 1000, event_id=f"evt_re2_{i:03d}") for i in range(40)]
    single = event(accounts[0], ts=BASE_TS + 200_000, event_id="evt_re_single")
    r.on_message(env(batch1), None, Source("api-calls", p, 0))
    r.on_message(orjson.dumps(single), accounts[0].encode(), Source("api-calls", p, 1))
    r.on_message(env(batch2), None, Source("api-calls", p, 2))
    assert det.stats["events"] == 81 and det.stats["duplicates"] == 0
    # a restart: a fresh detector from the changelog snapshots, then everything from offset 0 again
    restored = Detector()
    restored.restore((aid, blob) for aid, _, blob in det.drain_changes())
    again = router(restored)
    again.on_message(env(batch1), None, Source("api-calls", p, 0))
    again.on_message(orjson.dumps(single), accounts[0].encode(), Source("api-calls", p, 1))
    again.on_message(env(batch2), None, Source("api-calls", p, 2))
    assert restored.stats["events"] == 0 and restored.stats["duplicates"] == 81
    counts = {a: restored.accounts[a].state.events for a in accounts[:4]}
    assert sum(counts.values()) == 81


def test_a_restored_account_counts_an_envelopes_unapplied_tail() -> None:
    """A crash after the first half of an envelope's events was applied but before its changelog write:
    the restored state has none of them, and the redelivered envelope applies all (none twice)."""
    p, accounts = 0, on(0)
    evs = [event(accounts[0], ts=BASE_TS + i * 1000, event_id=f"evt_tail_{i:03d}") for i in range(10)]
    det = Detector(track_changes=True)
    r = router(det)
    r.on_message(encode([orjson.dumps(e) for e in evs[:4]]), None, Source("api-calls", p, 0))
    restored = Detector()
    restored.restore((aid, blob) for aid, _, blob in det.drain_changes())
    again = router(restored)
    again.on_message(encode([orjson.dumps(e) for e in evs]), None, Source("api-calls", p, 0))  # redelivered whole
    assert restored.accounts[accounts[0]].state.events == 10 and restored.stats["duplicates"] == 4


def test_an_event_on_the_wrong_partition_is_dead_lettered_and_the_others_processed() -> None:
    here, there = on(2)[0], on(0)[0]
    evs = [event(here, event_id="evt_here_1"), event(there, event_id="evt_there"), event(here, event_id="evt_here_2")]
    r = router()
    outs = r.on_message(encode([orjson.dumps(e) for e in evs]), None, Source("api-calls", 2, 4))
    [d] = dead(outs)
    assert (d["reason"], d["envelope_index"]) == ("wrong_partition", 1)
    assert "belongs to partition 0 of 4" in d["detail"] and "on 2" in d["detail"]
    assert [eid for eid, _ in r.detector.seen] == ["evt_here_1", "evt_here_2"]  # type: ignore[attr-defined]
    assert r.invalid_by_reason == {"wrong_partition": 1}
    # single events are not checked: any partitioner keeps an account's single events together
    r.on_message(orjson.dumps(event(there, event_id="evt_there_single")), there.encode(), Source("api-calls", 2, 5))
    assert r.detector.seen[-1][0] == "evt_there_single"  # type: ignore[attr-defined]


def test_a_detector_failure_on_one_event_of_an_envelope_costs_that_event() -> None:
    class Flaky(Recorder):
        def process(self, event: dict[str, Any], emitted_at: int | None = None,
                    position: tuple[int, int] | None = None) -> dict[str, Any] | None:
            if event["event_id"] == "evt_boom":
                raise KeyError("billing")
            return super().process(event, emitted_at, position)

    acct = on(1)[0]
    evs = [event(acct, event_id="evt_ok_1"), event(acct, event_id="evt_boom"), event(acct, event_id="evt_ok_2")]
    r = router(Flaky())
    [d] = dead(r.on_message(encode([orjson.dumps(e) for e in evs]), None, Source("api-calls", 1, 0)))
    assert (d["reason"], d["envelope_index"]) == ("internal", 1)
    assert orjson.loads(base64.b64decode(d["payload_b64"])) == evs[1]
    assert [eid for eid, _ in r.detector.seen] == ["evt_ok_1", "evt_ok_2"]  # type: ignore[attr-defined]


def test_each_events_record_is_published_keyed_by_its_account_with_the_envelopes_latency() -> None:
    class Scoring(Recorder):
        def process(self, event: dict[str, Any], emitted_at: int | None = None,
                    position: tuple[int, int] | None = None) -> dict[str, Any] | None:
            super().process(event, emitted_at, position)
            return {"schema_version": 1, "account_id": event["account_id"], "cluster_id": None, "score": 0.9,
                    "action": "block", "reasons": [], "event_ts": event["ts"], "emitted_at": BASE_TS,
                    "model_version": "test"}

    a, b = on(3)[:2]
    evs = [event(a, event_id="evt_rec_a"), event(b, event_id="evt_rec_b")]
    r = router(Scoring())
    published = 1_775_000_000.0 - 0.3  # the envelope's timestamp: its first event was buffered 0.3 s ago
    outs = r.on_message(encode([orjson.dumps(e) for e in evs]), None, Source("api-calls", 3, 0, published))
    assert [(o.topic, o.key) for o in outs] == [(SETTINGS.topics.risk_scores, a.encode()),
                                               (SETTINGS.topics.risk_scores, b.encode())]
    assert r.stats["records"] == 2
    sample = r.metrics.registry.get_sample_value
    assert sample("detector_event_to_score_latency_seconds_count") == 2
    assert sample("detector_event_to_score_latency_seconds_sum") == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------- worker bounds
class _Message:
    def __init__(self, value: bytes) -> None:
        self.value = value


class _Event:
    def __init__(self, value: bytes) -> None:
        self.message = _Message(value)


def test_the_stream_buffer_weighs_a_message_by_its_bytes() -> None:
    from detector.streaming.app import SLOT_BYTES, _WeightedQueue

    q = _WeightedQueue(maxsize=100, flow_control=FlowControlEvent())
    q.put_nowait(_Event(b"x" * 900))  # a single event: one slot, as in Faust
    assert q.qsize() == 1
    q.put_nowait(_Event(b"x" * (50 * SLOT_BYTES)))  # an envelope of 50 KiB: 50 slots
    assert q.qsize() == 51 and not q.full()
    q.put_nowait(_Event(b"x" * (49 * SLOT_BYTES + 1)))
    assert q.qsize() == 101 and q.full()
    q.get_nowait()
    assert q.qsize() == 100 and q.full()
    q.get_nowait()
    assert q.qsize() == 50 and not q.full()
    q.clear()
    assert q.qsize() == 0 and q.empty()


def test_a_take_ends_at_batch_max_bytes_or_batch_size_messages() -> None:
    from detector.streaming.app import _TakeBound

    def taken(sizes: list[int], bound: _TakeBound) -> list[int]:
        """The sizes of the takes Faust would make of messages of these sizes (its check: len(buffer) >= max_)."""
        takes, buffer = [], 0
        for size in sizes:
            bound.count(b"x" * size)
            buffer += 1
            if buffer >= bound:
                takes.append(buffer)
                buffer = 0
        return takes + ([buffer] if buffer else [])

    assert taken([1000] * 10, _TakeBound(4, 10_000_000)) == [4, 4, 2]  # single events: by count, as before
    assert taken([400_000] * 10, _TakeBound(2000, 1_000_000)) == [3, 3, 3, 1]  # envelopes: by bytes
    assert taken([1000, 1000, 900_000, 1000], _TakeBound(2000, 1_000_000)) == [4]
