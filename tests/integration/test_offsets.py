"""Offset continuity against a real broker: messages that never reached the agent are read back and routed.

Faust can lose a fetched message before the agent gets it and then commit past it (``detector chaos
--envelope`` lost one event that way; see :mod:`detector.streaming.offsets`). Faust cannot be made to do that
on demand, so this test plays Faust's part: it hands the worker's :class:`~detector.streaming.app.Intake`
the messages of a real topic with some left out, one delivered twice, in the order a consumer would::

    topic (1 partition):   0 1 2 3 4 5 6 7 8 9         (single events and one envelope)
    handed to the intake:  0 1 2 3 . . 6 7 7 . 9
                                    ▲       ▲   ▲
                                    │       │   └ 8 read back before 9
                                    │       └ skipped (delivered twice)
                                    └ 4 and 5 read back from the broker before 6

Checks: the detector applied every event exactly once, in offset order (its positions), and the metrics
count two holes refilled and one redelivery.

A second test hands over a record fetched before a rebalance ahead of the ones from the committed offset
(``detector chaos --envelope`` lost 9 events that way): the offsets before it are read back first.
"""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import orjson

from detector import envelope
from detector.detection import Detector
from detector.gateway import make_event
from detector.settings import Settings, TopicSettings
from detector.streaming.app import Intake
from detector.streaming.routing import Router
from detector.streaming.topics import read_to_end

T0 = 1775000000000


def _event(account: str, i: int) -> dict[str, Any]:
    return make_event(account_id=account, ts=T0 + i * 1000, api_key_id="k", model="m", endpoint="/v1/messages",
                      status=200, input_tokens=10, output_tokens=20, latency_ms=5, prompt_text=f"question {i}",
                      response={"stop_reason": "end_turn"}, fingerprint_key=b"k")


def _topic(kafka_bootstrap: str, create_topic: Any) -> tuple[str, list[dict[str, Any]], list[Any]]:
    """A topic of 10 messages (12 events: single events, and 3 in an envelope at offset 8) and its records."""
    from kafka import KafkaProducer

    topic = create_topic(kafka_bootstrap, f"offsets-{uuid.uuid4().hex[:8]}")
    events = [_event(f"acct_{i % 3}", i) for i in range(12)]
    messages = [orjson.dumps(ev) for ev in events[:8]] + [envelope.encode([orjson.dumps(ev) for ev in events[8:11]])]
    messages.append(orjson.dumps(events[11]))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for value in messages:
        producer.send(topic, value=value, partition=0)
    producer.flush()
    producer.close()
    records = read_to_end(kafka_bootstrap, topic, 30)
    assert [r.offset for r in records] == list(range(10))
    return topic, events, records


def _faust_message(topic: str, records: list[Any], offset: int, generation: int = 3) -> SimpleNamespace:
    from kafka import TopicPartition

    r = records[offset]
    return SimpleNamespace(tp=TopicPartition(topic, 0), topic=topic, partition=0, offset=r.offset, key=r.key,
                           value=r.value, timestamp=r.timestamp / 1000, generation_id=generation)


def test_holes_are_read_back_and_redeliveries_skipped(kafka_bootstrap: str, create_topic: Any) -> None:
    from kafka import TopicPartition

    topic, events, records = _topic(kafka_bootstrap, create_topic)

    def faust_message(offset: int) -> SimpleNamespace:
        return _faust_message(topic, records, offset)

    settings = Settings(topics=TopicSettings(partitions=1))
    detector = Detector(track_changes=True)
    refilled: list[tuple[Any, range]] = []

    async def on_refilled(tp: Any, offsets: range) -> None:
        refilled.append((tp, offsets))

    intake = Intake(Router(detector, settings), {"bootstrap_servers": [kafka_bootstrap]}, f"g-{uuid.uuid4().hex[:8]}",
                    on_refilled=on_refilled)
    routed: list[int] = []
    for batch in ([0, 1, 2, 3], [6, 7, 7], [9]):
        outs, last = asyncio.run(intake.route([faust_message(o) for o in batch]))
        routed.append(last[TopicPartition(topic, 0)])
        dead = [orjson.loads(out.value) for out in outs if out.topic == settings.topics.dead_letters]
        assert not dead, dead

    assert routed == [3, 7, 9]
    assert detector.stats["events"] == len(events)  # 12 events in 10 messages, each applied once
    assert detector.stats["duplicates"] == 0  # the repeated 7 never reached the detector
    # Applied in offset order: each account's last position is its last event's (envelope events: offset 8).
    seqs = {aid: divmod(acct.seq, envelope.MAX_EVENTS) for aid, acct in detector.accounts.items()}
    assert seqs == {"acct_0": (8, 1), "acct_1": (8, 2), "acct_2": (9, 0)}
    metrics = intake.metrics
    assert metrics.offset_holes.labels(result="refilled")._value.get() == 2
    assert metrics.offset_holes.labels(result="empty")._value.get() == 0
    assert metrics.redeliveries._value.get() == 1
    tp = TopicPartition(topic, 0)
    assert refilled == [(tp, range(4, 6)), (tp, range(8, 9))]  # told to Faust's consumer, so it commits past them


def test_a_record_fetched_before_a_rebalance_does_not_go_before_the_committed_ones(kafka_bootstrap: str,
                                                                                   create_topic: Any) -> None:
    """The group committed offset 4; in the new generation Faust hands over 7 (fetched before the rebalance), then
    its seek brings 4, 5, 6, 7, 8, 9. Counted from 7, the guard would skip 4-6 as redeliveries and the detector
    would never see them (their positions are before 7's)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    topic, events, records = _topic(kafka_bootstrap, create_topic)
    tp = TopicPartition(topic, 0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    committer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    committer.commit({tp: OffsetAndMetadata(4, "", -1)})
    committer.close()

    detector = Detector(track_changes=True)
    seen = [r.offset for r in records[:4]]  # offsets 0-3: applied and committed by the previous generation
    for offset in seen:
        detector.process(orjson.loads(records[offset].value), position=(0, offset * envelope.MAX_EVENTS))
    refilled: list[tuple[Any, range]] = []

    async def on_refilled(tp: Any, offsets: range) -> None:
        refilled.append((tp, offsets))

    intake = Intake(Router(detector, Settings(topics=TopicSettings(partitions=1))),
                    {"bootstrap_servers": [kafka_bootstrap]}, group, on_refilled=on_refilled)
    for batch in ([7], [4, 5, 6, 7, 8], [9]):
        asyncio.run(intake.route([_faust_message(topic, records, o, generation=4) for o in batch]))

    assert detector.stats["events"] == len(events)  # every event once: 4-6 read back before 7
    assert detector.stats["duplicates"] == 0
    seqs = {aid: divmod(acct.seq, envelope.MAX_EVENTS) for aid, acct in detector.accounts.items()}
    assert seqs == {"acct_0": (8, 1), "acct_1": (8, 2), "acct_2": (9, 0)}
    assert intake.metrics.offset_holes.labels(result="refilled")._value.get() == 1
    assert intake.metrics.redeliveries._value.get() == 4  # 4, 5, 6, 7 after the seek
    assert refilled == [(tp, range(4, 7))]
