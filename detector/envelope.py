"""The envelope: many API-call events in one Kafka message (``schemas/api_call_envelope.v1.json``).

Faust spends about 130 µs on every Kafka message before the detector sees it; with one event per
message that caps a worker at a few thousand events/s (BENCHMARKS.md). An envelope carries up to
:data:`MAX_EVENTS` events in one message, so the cost is paid once per envelope::

    {"schema_version":1,"kind":"envelope","events":[{<api_call_event.v1>},{...},...]}

* at most :data:`MAX_EVENTS` events and :data:`MAX_BYTES` bytes (kafka-python's default largest request
  is 1 MiB; the broker's default largest message about as much);
* every event on the partition of its own account, the partition Kafka's default partitioner gives the
  key ``account_id`` (:func:`account_partition`): the worker's per-account state is co-partitioned with
  ``api-calls``, so an event elsewhere would be counted by a worker that does not hold its account.
  The gateway SDK (:class:`detector.gateway.EventPublisher` with ``envelope_max_events``) groups events
  that way; the worker dead-letters an event on another partition as ``wrong_partition``;
* single-event messages stay valid on the same topic: a consumer parses a message once and looks at the
  top-level ``kind`` (:func:`decode_message`).

Dedup positions. The worker remembers, per account, the position of the last event it folded in and
skips a redelivered event at or before it (:meth:`detector.detection.Detector.process`). Event ``i`` of
the message at ``offset`` has the position ``offset * MAX_EVENTS + i`` (:func:`position`); a single
event has ``offset * MAX_EVENTS``. Positions grow with offsets whatever mix of envelopes and single
events a partition holds, and fit the snapshot's int64 up to offset 2**51.

>>> from detector.gateway import make_event
>>> ev = make_event(account_id="acct_1", ts=1775000000000, api_key_id="k", model="m-1", endpoint="/v1/messages",
...                 status=200, input_tokens=1, output_tokens=1, latency_ms=1, response={"stop_reason": None},
...                 prompt_text="hi", fingerprint_key=b"k")
>>> raw = encode([orjson.dumps(ev), b'{"ts": 1}'])
>>> raw[:50]
b'{"schema_version":1,"kind":"envelope","events":[{"'
>>> env = decode_message(raw)
>>> env.events[0] == ev, sorted(env.invalid), env.invalid[1].reason
(True, [1], 'schema')
>>> decode_message(orjson.dumps(ev)) == ev   # a single event
True
>>> account_partition("acct_1", 4), position(3, 10, 2)
(3, (3, 40962))
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from detector.schemas import ENVELOPE_SCHEMA, InvalidEvent, check_unique_keys, repeated_key, validate, validate_event

KIND = "envelope"
#: Most events in one envelope; also the stride of dedup positions (:func:`position`).
MAX_EVENTS = 4096
#: Most bytes of one envelope (its UTF-8 JSON).
MAX_BYTES = 1_000_000
#: The bytes around the events, as the SDK writes them (compact, keys in schema order).
PREFIX = b'{"schema_version":1,"kind":"envelope","events":['
SUFFIX = b"]}"


class InvalidEnvelope(InvalidEvent):
    """A message that is an envelope (its ``kind`` says so) but not a well-formed one: refused whole."""


@dataclass(frozen=True)
class Envelope:
    """A well-formed envelope: its items as parsed, and why each invalid one is not a valid event.

    ``events[i]`` is a valid event unless ``i`` is in ``invalid``."""

    events: list[Any]
    invalid: dict[int, InvalidEvent]


def account_partition(account_id: str, partitions: int) -> int:
    """The partition of ``account_id``'s events among ``partitions``: what kafka-python's and the Java
    client's default partitioner choose for the key ``account_id`` (UTF-8), and aiokafka's (Faust's).

    Remembered for the last :data:`PARTITION_CACHE` ids: 0.1-0.2 µs for an id seen lately, against
    about 5 µs to compute (kafka-python's pure-Python murmur2), which the SDK pays per call and the worker
    per event of an envelope (87,991 bench events from 1,171 accounts: 4.6-5.7 µs an event uncached).

    >>> [account_partition(a, 4) for a in ("acct_1", "acct_2", "acct_3")], account_partition("acct_1", 1)
    ([3, 0, 0], 0)
    """
    if partitions <= 1:
        return 0
    return _partition(account_id, partitions)


#: Account ids whose partition is remembered (about 4 MB when full, the ids included).
PARTITION_CACHE = 1 << 14


@functools.lru_cache(maxsize=PARTITION_CACHE)
def _partition(account_id: str, partitions: int) -> int:
    from kafka.partitioner.default import murmur2  # kafka-python: imported once, by the first call

    return (murmur2(account_id.encode()) & 0x7FFFFFFF) % partitions  # type: ignore[no-any-return]


def position(partition: int, offset: int, index: int = 0) -> tuple[int, int]:
    """The dedup position ``(shard, seq)`` of event ``index`` of the message at ``offset`` (0 for a single event)."""
    return partition, offset * MAX_EVENTS + index


def encode(wires: Sequence[bytes]) -> bytes:
    """The envelope of events already encoded as compact JSON objects (``orjson.dumps``), as the SDK sends it.

    Checks nothing: the caller keeps to :data:`MAX_EVENTS` and :data:`MAX_BYTES` (see :func:`size`).
    """
    return PREFIX + b",".join(wires) + SUFFIX


def size(n_events: int, event_bytes: int) -> int:
    """Bytes of :func:`encode` over ``n_events`` events of ``event_bytes`` bytes in all.

    >>> size(2, 20) == len(encode([b"x" * 10, b"y" * 10]))
    True
    """
    return len(PREFIX) + len(SUFFIX) + event_bytes + max(0, n_events - 1)


def decode_message(raw: bytes, max_event_bytes: int = 64 * 1024) -> dict[str, Any] | Envelope:
    """One message of ``api-calls`` as a valid event or an :class:`Envelope`; else :class:`InvalidEvent`.

    Parses once with orjson. A JSON object whose ``kind`` is ``"envelope"`` is an envelope: it is refused
    whole with :class:`InvalidEnvelope` (``schema`` for the wrong shape, ``too_large`` for more than
    :data:`MAX_EVENTS` events or :data:`MAX_BYTES` bytes, ``duplicate_field`` for a repeated key of its own);
    otherwise each item is checked on its own, like a single event, and reported in place. Anything
    else is a single event, with exactly the reasons of :func:`detector.schemas.decode_event`.

    Cost: one parse (about 1 ms per MB), the schema check of each event (about 6 µs for the SDK's events,
    40 µs for others) and, for bytes that orjson does not write back exactly as they came (another
    producer's white space or key order), a second parse by the standard library to look for repeated keys.
    """
    too_large = len(raw) > max_event_bytes
    if len(raw) > max(MAX_BYTES, max_event_bytes):
        raise InvalidEvent("too_large", f"{len(raw)} bytes > limit of {max_event_bytes} (an envelope: {MAX_BYTES})")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if too_large:
            raise InvalidEvent("too_large", f"{len(raw)} bytes > limit of {max_event_bytes}") from None
        raise InvalidEvent("not_json", str(exc)) from None
    if isinstance(obj, dict) and obj.get("kind") == KIND:
        return _open(raw, obj)
    if too_large:
        raise InvalidEvent("too_large", f"{len(raw)} bytes > limit of {max_event_bytes}")
    event = validate_event(obj)
    check_unique_keys(raw, event)
    return event


def _open(raw: bytes, obj: dict[str, Any]) -> Envelope:
    if len(raw) > MAX_BYTES:
        raise InvalidEnvelope("too_large", f"envelope of {len(raw)} bytes > limit of {MAX_BYTES}")
    items = obj.get("events")
    if isinstance(items, list) and len(items) > MAX_EVENTS:
        raise InvalidEnvelope("too_large", f"envelope of {len(items)} events > limit of {MAX_EVENTS}")
    try:
        validate(ENVELOPE_SCHEMA, obj)
    except InvalidEvent as exc:
        raise InvalidEnvelope(exc.reason, f"envelope: {exc.detail}") from None
    repeated = _repeated_keys(raw, obj)
    invalid: dict[int, InvalidEvent] = {}
    for i, item in enumerate(obj["events"]):
        try:
            validate_event(item)
        except InvalidEvent as exc:
            invalid[i] = exc
            continue
        if i in repeated:
            invalid[i] = InvalidEvent("duplicate_field", f"key {repeated[i]!r} appears more than once in one object")
    return Envelope(obj["events"], invalid)


def _repeated_keys(raw: bytes, parsed: dict[str, Any]) -> dict[int, str]:
    """{index: a key repeated in that event}; raises :class:`InvalidEnvelope` if the envelope's own keys repeat.

    As :func:`detector.schemas.check_unique_keys`: bytes that orjson writes back exactly (the SDK's) cannot
    repeat a key, so they cost one ``orjson.dumps``; other bytes are parsed once more by the standard
    library, which sees every key.
    """
    try:
        if orjson.dumps(parsed) == raw:
            return {}
    except TypeError:  # nested deeper than orjson writes: the slow path decides
        pass
    try:
        tree = json.loads(raw, object_pairs_hook=_Object.of)
    except (ValueError, RecursionError) as exc:  # orjson accepted what json refuses: refuse it too
        raise InvalidEnvelope("not_json", f"envelope: json: {exc}") from None
    if tree.repeated is not None:
        raise InvalidEnvelope("duplicate_field", f"envelope: key {tree.repeated!r} appears more than once")
    found = {}
    for i, item in enumerate(tree["events"]):
        key = _first_repeat(item)
        if key is not None:
            found[i] = key
    return found


class _Object(dict[str, Any]):
    """A JSON object parsed by :func:`json.loads` that remembers the first key it had twice."""

    repeated: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _Object:
        obj = cls(pairs)
        if len(obj) != len(pairs):
            obj.repeated = repeated_key(pairs)
        return obj


def _first_repeat(value: Any) -> str | None:
    if isinstance(value, _Object):
        if value.repeated is not None:
            return value.repeated
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            if (key := _first_repeat(item)) is not None:
                return key
    return None

