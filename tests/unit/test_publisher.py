"""The gateway SDK's envelope mode (``EventPublisher(envelope_max_events=N)``), against a fake kafka-python
producer: which partition each event goes to, when an envelope is sent, what it carries, what its future
says, and that several threads may publish at once. The real broker is in tests/integration/test_envelopes.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import kafka
import orjson
import pytest
from kafka.future import Future
from kafka.partitioner.default import DefaultPartitioner

from detector import envelope
from detector.gateway import EventPublisher
from detector.schemas import InvalidEvent
from tests.factory import event

PARTITIONS = 4


class FakeProducer:
    """What EventPublisher uses of kafka-python's KafkaProducer; records every send."""

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.sent: list[dict[str, Any]] = []
        self.futures: list[Future] = []
        self.fail_sends = False
        self.flushed = self.closed = 0
        self._lock = threading.Lock()

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    def send(self, topic: str, value: bytes | None = None, key: str | None = None, partition: int | None = None,
             timestamp_ms: int | None = None) -> Future:
        if self.fail_sends:
            raise kafka.errors.KafkaTimeoutError("buffer full")
        with self._lock:
            self.sent.append({"topic": topic, "value": value, "key": key, "partition": partition,
                              "timestamp_ms": timestamp_ms})
            future = Future()
            self.futures.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.flushed += 1

    def close(self, timeout: float | None = None) -> None:
        self.closed += 1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    made: list[FakeProducer] = []

    def factory(**config: Any) -> FakeProducer:
        made.append(FakeProducer(**config))
        return made[-1]

    monkeypatch.setattr(kafka, "KafkaProducer", factory)
    return made


def publisher(**options: Any) -> EventPublisher:
    return EventPublisher("fake:9092", "api-calls", **options)


def events_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    body = orjson.loads(message["value"])
    assert (body["schema_version"], body["kind"]) == (1, "envelope")
    return body["events"]  # type: ignore[no-any-return]


class _Cluster:
    def topics(self) -> set[str]:
        return {"api-calls"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))


@pytest.mark.parametrize("partitions", [1, 3, 4, 12])
def test_account_partition_is_kafka_pythons_and_aiokafkas_for_the_key(partitions: int) -> None:
    from aiokafka.partitioner import DefaultPartitioner as AioPartitioner

    class Cluster(_Cluster):
        def partitions_for_topic(self, topic: str) -> set[int]:
            return set(range(partitions))

    kafka_python, aio = DefaultPartitioner(), AioPartitioner()
    ids = [f"acct_{i}" for i in range(2000)] + ["a", "org:x@y.z", "A" * 128, "acct_é"]
    spread = set()
    for aid in ids:
        mine = envelope.account_partition(aid, partitions)
        key = aid.encode()
        assert mine == kafka_python.partition("api-calls", aid, key, None, None, Cluster()), aid
        assert mine == aio(key, list(range(partitions)), list(range(partitions))), aid
        spread.add(mine)
    assert spread == set(range(partitions))


def test_single_event_mode_is_the_default_and_unchanged(fake: list[FakeProducer]) -> None:
    pub = publisher()
    ev = event("acct_7")
    pub.publish(ev)
    [sent] = fake[0].sent
    assert sent == {"topic": "api-calls", "value": orjson.dumps(ev), "key": "acct_7", "partition": None,
                    "timestamp_ms": None}
    pub.close()
    assert fake[0].closed == 1


def test_each_envelope_goes_to_the_partition_of_every_account_in_it(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=100)
    sent_events = [event(f"acct_{i % 37}", event_id=f"evt_part_{i:04d}") for i in range(300)]
    for ev in sent_events:
        pub.publish(ev)
    pub.flush()
    messages = fake[0].sent
    assert {m["partition"] for m in messages} == set(range(PARTITIONS))
    got = []
    for m in messages:
        assert m["key"] is None
        for ev in events_of(m):
            assert envelope.account_partition(ev["account_id"], PARTITIONS) == m["partition"]
            got.append(ev)
    assert sorted(e["event_id"] for e in got) == sorted(e["event_id"] for e in sent_events)
    for p in range(PARTITIONS):  # the gateway's order within each partition
        mine = [e["event_id"] for m in messages if m["partition"] == p for e in events_of(m)]
        assert mine == [e["event_id"] for e in sent_events
                        if envelope.account_partition(e["account_id"], PARTITIONS) == p]
    pub.close()


def test_an_envelope_is_sent_when_it_holds_envelope_max_events(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=3, envelope_linger_ms=60_000)
    evs = [event("acct_1", event_id=f"evt_size_{i:04d}") for i in range(7)]
    for ev in evs:
        pub.publish(ev)
    assert [len(events_of(m)) for m in fake[0].sent] == [3, 3]
    assert fake[0].sent[0]["value"] == envelope.encode([orjson.dumps(ev) for ev in evs[:3]])
    pub.close()  # the seventh goes out on close
    assert [len(events_of(m)) for m in fake[0].sent] == [3, 3, 1]
    assert fake[0].flushed >= 1 and fake[0].closed == 1


def test_an_envelope_is_sent_before_it_would_exceed_envelope_max_bytes(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=4096, envelope_max_bytes=8192, envelope_linger_ms=60_000)
    for i in range(40):
        pub.publish(event("acct_1", event_id=f"evt_bytes_{i:04d}"))
    pub.flush()
    sizes = [len(m["value"]) for m in fake[0].sent]
    assert len(sizes) > 3 and max(sizes) <= 8192
    assert sum(len(events_of(m)) for m in fake[0].sent) == 40
    assert all(size + 1200 > 8192 for size in sizes[:-1])  # full: the next event (~1 KB) did not fit
    pub.close()


def test_an_envelope_is_sent_after_the_linger_without_a_flush(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=1000, envelope_linger_ms=50)
    before = time.time()
    pub.publish(event("acct_1"))
    assert fake[0].sent == []
    deadline = time.monotonic() + 5
    while not fake[0].sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake[0].sent) == 1
    # the message is stamped with the time its first event was buffered: the worker's latency includes the linger
    assert before * 1000 - 1 <= fake[0].sent[0]["timestamp_ms"] <= time.time() * 1000
    pub.close()


def test_an_invalid_event_raises_before_it_is_buffered(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=10)
    bad = {**event("acct_1"), "input_tokens": -1}
    with pytest.raises(InvalidEvent, match="input_tokens"):
        pub.publish(bad)
    pub.publish(event("acct_1", event_id="evt_after_the_bad_one"))
    pub.close()
    [message] = fake[0].sent
    assert [e["event_id"] for e in events_of(message)] == ["evt_after_the_bad_one"]


def test_the_future_is_the_envelopes(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=2, envelope_linger_ms=60_000)
    acked: list[Any] = []
    failed: list[Exception] = []
    f1 = pub.publish(event("acct_1")).add_callback(acked.append)
    f2 = pub.publish(event("acct_1")).add_callback(acked.append)
    f3 = pub.publish(event("acct_1")).add_errback(failed.append)
    assert f1 is f2 and f3 is not f1
    assert acked == [] and not f1.is_done  # sent, not yet acknowledged
    fake[0].futures[0].success("metadata of the envelope")
    assert acked == ["metadata of the envelope"] * 2
    pub.flush()
    fake[0].futures[1].failure(kafka.errors.KafkaTimeoutError("no broker"))
    assert len(failed) == 1 and f3.failed()
    pub.close()


def test_a_send_refused_at_once_fails_the_envelopes_future(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=5, envelope_linger_ms=60_000)
    future = pub.publish(event("acct_1"))
    fake[0].fail_sends = True
    pub.flush()
    assert future.failed() and isinstance(future.exception, kafka.errors.KafkaTimeoutError)
    fake[0].fail_sends = False
    pub.close()


def test_publishing_from_many_threads_loses_and_repeats_nothing(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=50, envelope_linger_ms=5)
    per_thread = 300

    def gateway(t: int) -> None:
        for i in range(per_thread):
            pub.publish(event(f"acct_{t}_{i % 23}", event_id=f"evt_t{t}_{i:05d}"))

    threads = [threading.Thread(target=gateway, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pub.close()
    got = [e for m in fake[0].sent for e in events_of(m)]
    assert len(got) == 6 * per_thread == len({e["event_id"] for e in got})
    assert all(len(events_of(m)) <= 50 for m in fake[0].sent)
    for m in fake[0].sent:
        assert {envelope.account_partition(e["account_id"], PARTITIONS) for e in events_of(m)} == {m["partition"]}
    for t in range(6):  # each thread's order is kept within an account
        for a in range(23):
            ids = [e["event_id"] for e in got if e["account_id"] == f"acct_{t}_{a}"]
            assert ids == sorted(ids)


@pytest.mark.parametrize("options", [{"envelope_max_events": 4097}, {"envelope_max_events": -1},
                                     {"envelope_max_events": 10, "envelope_max_bytes": 2_000_000},
                                     {"envelope_max_events": 10, "envelope_linger_ms": -5}])
def test_bad_envelope_options_are_refused(fake: list[FakeProducer], options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="envelope_"):
        publisher(**options)


def test_publish_after_close_raises(fake: list[FakeProducer]) -> None:
    pub = publisher(envelope_max_events=10)
    pub.close()
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish(event("acct_1"))
