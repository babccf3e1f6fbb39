"""Gateway SDK: turn an API call into a valid event and publish it to Kafka.

The raw prompt text stays in the gateway: :func:`make_event` replaces it with keyed fingerprints
(:mod:`detector.fingerprints`) before anything is validated, serialised or sent.

>>> ev = make_event(account_id="acct_1", ts=1775000000000, api_key_id="key_1", model="m-1",
...                 endpoint="/v1/messages", status=200, input_tokens=12, output_tokens=90, latency_ms=800,
...                 client={"ip": "203.0.113.7", "asn": 64500}, billing={"payment_fp": "pm_1"},
...                 prompt_text="Explain step by step why the sky is blue.", response={"stop_reason": "end_turn"},
...                 fingerprint_key=b"demo")
>>> ev["prompt"]["cot"], ev["client"]["country"], "sky" in str(ev)
(True, None, False)
>>> make_event(account_id="acct_1", ts=1775000000000, api_key_id="k", endpoint="/v1/messages", status=200,
...            input_tokens=1, output_tokens=1, latency_ms=1, response={}, prompt_text="hi")
Traceback (most recent call last):
...
detector.schemas.InvalidEvent: schema: missing fields: model
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from detector import envelope
from detector.fingerprints import fingerprint
from detector.schemas import InvalidEvent, validate_event

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_REQUIRED = ("account_id", "ts", "api_key_id", "model", "endpoint", "status", "input_tokens", "output_tokens",
             "latency_ms", "response")
_CLIENT_FIELDS = ("ip", "asn", "country", "user_agent", "tls_fp")
_BILLING_FIELDS = ("payment_fp", "tier", "account_created_ts")
_DEFAULT_KEY_ENV = "DETECTOR_FINGERPRINT_KEY"


def _key(fingerprint_key: bytes | str | None) -> bytes:
    if fingerprint_key is None:
        fingerprint_key = os.environ.get(_DEFAULT_KEY_ENV, "distill-detector-demo-key")
    return fingerprint_key.encode() if isinstance(fingerprint_key, str) else fingerprint_key


def make_event(
    *,
    prompt_text: str | None = None,
    system_text: str | None = None,
    fingerprint_key: bytes | str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Build and validate one API-call event from the call's fields.

    Takes every field of ``schemas/api_call_event.v1.json`` as a keyword argument, except ``prompt``:
    pass ``prompt_text`` (and optionally ``system_text``) instead. ``event_id`` is generated when absent
    or None, ``org_id`` defaults to None, ``client`` and ``billing`` default to ``{}`` when absent or None,
    and their missing sub-fields default to None. Only None means "absent": any other value, falsy or
    not (``event_id=""``, ``client=[]``), is checked as given. ``fingerprint_key`` defaults to
    ``$DETECTOR_FINGERPRINT_KEY``; every gateway of a deployment must use the same key.

    Raises :class:`detector.schemas.InvalidEvent` (reason ``schema``) naming the bad field, never another
    exception for a bad value; the event returned always encodes to JSON (:func:`encode`). Text that
    cannot be encoded as UTF-8 (a lone surrogate, which Python's ``json`` module makes of ``"\\ud800"``)
    is refused, in the prompt as anywhere else: a gateway that must not lose such a call cleans the
    text first, e.g. ``text.encode("utf-8", "replace").decode()``.

    >>> call = dict(account_id="acct_1", ts=1775000000000, api_key_id="k", model="m-1", endpoint="/v1/messages",
    ...             status=200, input_tokens=1, output_tokens=1, latency_ms=1, response={"stop_reason": None},
    ...             fingerprint_key=b"k")
    >>> make_event(**call, prompt_text="hi", event_id="")
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: data.event_id must be longer than or equal to 8 characters
    >>> make_event(**call, prompt_text="hi", client=[])
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: client must be a dict or None, not list
    >>> make_event(**call, prompt_text="hi \\ud800")
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: prompt_text is not valid Unicode: lone surrogate '\\ud800' at index 3
    >>> make_event(**call, prompt_text="hi", client={"user_agent": "\\udfff"})
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: client.user_agent is not valid Unicode: lone surrogate '\\udfff' at index 0

    Costs the fingerprints (:func:`detector.fingerprints.fingerprint`, about 0.2 ms for a 300-word
    prompt), one schema check and one trial encoding (about 1 µs).
    """
    if "prompt" in fields:
        raise InvalidEvent("schema", "pass prompt_text=..., not prompt=...: the SDK computes the fingerprints")
    missing = sorted(f for f in _REQUIRED if f not in fields) + ([] if prompt_text is not None else ["prompt_text"])
    if missing:
        raise InvalidEvent("schema", "missing fields: " + ", ".join(sorted(missing)))
    if not isinstance(prompt_text, str) or (system_text is not None and not isinstance(system_text, str)):
        raise InvalidEvent("schema", "prompt_text and system_text must be str")
    _check_utf8("prompt_text", prompt_text)  # before fingerprint(), which would raise UnicodeEncodeError
    if system_text is not None:
        _check_utf8("system_text", system_text)
    # None, and only None, means "not given": a falsy value (0, "", [], False) is checked, not replaced.
    event_id = fields.pop("event_id", None)
    client = fields.pop("client", None)
    billing = fields.pop("billing", None)
    for name, value in (("client", client), ("billing", billing)):
        if value is not None and not isinstance(value, dict):
            raise InvalidEvent("schema", f"{name} must be a dict or None, not {type(value).__name__}")
    event: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid.uuid4().hex if event_id is None else event_id,
        "org_id": None,
        **fields,
        "client": dict.fromkeys(_CLIENT_FIELDS) | (client or {}),
        "billing": dict.fromkeys(_BILLING_FIELDS) | (billing or {}),
        "prompt": fingerprint(prompt_text, _key(fingerprint_key), system_text),
    }
    for name in ("ts", "status", "input_tokens", "output_tokens", "latency_ms"):
        if isinstance(event.get(name), bool):  # bool is an int to Python and to the validator
            raise InvalidEvent("schema", f"data.{name} must be integer, not bool")
    validate_event(event)
    _wire(event)  # the schema accepts any str; the wire (UTF-8 JSON) does not
    return event


def _wire(event: dict[str, Any]) -> bytes:
    """``event`` as compact UTF-8 JSON, or :class:`InvalidEvent` naming the value that cannot be encoded."""
    try:
        return orjson.dumps(event)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        for path, value in _strings(event):
            _check_utf8(path, value)
        raise InvalidEvent("schema", f"not encodable as JSON: {exc}") from None


def _check_utf8(name: str, text: str) -> None:
    """Raise :class:`InvalidEvent` naming ``name`` if ``text`` cannot be encoded as UTF-8.

    Only a lone surrogate (U+D800..U+DFFF) cannot. The detail names its position, never the text.

    >>> _check_utf8("model", "m-1")
    >>> _check_utf8("model", "m\\ud800-1")
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: model is not valid Unicode: lone surrogate '\\ud800' at index 1
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent("schema", f"{name} is not valid Unicode: lone surrogate {text[exc.start]!r} at index "
                                     f"{exc.start}") from None


def _strings(obj: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string value in a JSON-like value, with its dotted path.

    >>> list(_strings({"client": {"ip": None, "tls_fp": "t"}, "prompt": {"bands": ["ab", "cd"]}}))
    [('client.tls_fp', 't'), ('prompt.bands.0', 'ab'), ('prompt.bands.1', 'cd')]
    """
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _strings(value, f"{path}.{i}")


def encode(event: dict[str, Any]) -> bytes:
    """The wire form of an event or score: compact UTF-8 JSON."""
    return orjson.dumps(event)


class EventPublisher:
    """Publishes events to the ``api-calls`` topic with kafka-python (key = account_id, acks=all).

    Batches in the client (``linger_ms``); ``publish`` validates the event first, so a bad event raises
    here, in the gateway, instead of reaching the detector. Use as a context manager, or call
    :meth:`close`, so buffered events are flushed.

    **Envelope mode** (``envelope_max_events`` > 0; off by default): events are sent in envelopes
    (:mod:`detector.envelope`, ``schemas/api_call_envelope.v1.json``) of up to ``envelope_max_events``
    events and ``envelope_max_bytes`` bytes, one buffer per partition of the topic, each event in the
    buffer of its account's partition (:func:`detector.envelope.account_partition` over the topic's
    partitions from the producer's metadata: what kafka-python would choose for the key). A buffer is sent,
    as one message to its partition with no key, when it is full, ``envelope_linger_ms`` after its first
    event (a background thread), and on :meth:`flush` and :meth:`close`. The message's timestamp is the
    time its first event was buffered, so the worker's event-to-score latency includes the linger. The
    worker then pays its per-message cost once per envelope (BENCHMARKS.md has the measured gain).
    ``publish_raw`` always sends one message, outside the envelopes.

    Thread safety: kafka-python's producer is thread-safe, and in envelope mode the buffers are guarded by
    one lock, so several gateway threads may share a publisher. Events of one account published from one
    thread keep their order; sending a full envelope happens under the lock, so a producer whose own
    buffer is full (``max_block_ms``) holds up every publishing thread, as it would in single-event mode.

    ``kafka_config`` goes to kafka-python's ``KafkaProducer``: for a secured broker, the security options of
    :func:`detector.streaming.topics.kafka_client_config` without its ``bootstrap_servers``. The constructor
    connects; when no broker answers within ``bootstrap_timeout_ms`` (kafka-python 3, 30 s by default) it raises
    :class:`detector.streaming.topics.KafkaConnectError` naming the cause (a refused password or client
    certificate, say).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "api-calls",
        *,
        linger_ms: int = 20,
        batch_size: int = 256 * 1024,
        validate: bool = True,
        envelope_max_events: int = 0,
        envelope_max_bytes: int = envelope.MAX_BYTES,
        envelope_linger_ms: int = 50,
        **kafka_config: Any,
    ) -> None:
        from kafka import KafkaProducer

        from detector.streaming.topics import explain_connect_errors  # kafka-python only; imports no Faust

        if not 0 <= envelope_max_events <= envelope.MAX_EVENTS:
            raise ValueError(f"envelope_max_events must be 0 (off) to {envelope.MAX_EVENTS}, not {envelope_max_events}")
        if envelope_max_events and not 4096 <= envelope_max_bytes <= envelope.MAX_BYTES:
            raise ValueError(f"envelope_max_bytes must be 4096 to {envelope.MAX_BYTES}, not {envelope_max_bytes}")
        if envelope_linger_ms < 0:
            raise ValueError(f"envelope_linger_ms must be >= 0, not {envelope_linger_ms}")
        self.topic = topic
        self._validate = validate
        self.envelope_max_events = envelope_max_events
        self.envelope_max_bytes = envelope_max_bytes
        self.envelope_linger_ms = envelope_linger_ms
        with explain_connect_errors(f"{bootstrap} over {kafka_config.get('security_protocol', 'PLAINTEXT')}"):
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap,
                acks="all",
                linger_ms=linger_ms,
                batch_size=batch_size,
                compression_type=kafka_config.pop("compression_type", None),
                key_serializer=_serialize_key,
                value_serializer=_serialize,
                retries=kafka_config.pop("retries", 5),
                **kafka_config,
            )
        self._cond = threading.Condition()  # guards the envelope buffers; wakes the linger thread
        self._buffers: dict[int, _Buffer] = {}
        self._closed = False
        self._linger: threading.Thread | None = None
        if envelope_max_events:
            self._linger = threading.Thread(target=self._send_when_due, name="detector-envelope-linger", daemon=True)
            self._linger.start()

    def publish(self, event: dict[str, Any]) -> Any:
        """Send one event; returns a kafka-python future. Raises InvalidEvent for a bad event.

        The event is encoded here, not in kafka-python's serializer, so a value JSON cannot carry (a lone
        surrogate in a string) raises InvalidEvent naming it even with ``validate=False``. In envelope mode
        the event is checked before it is buffered, and the future is its envelope's: it resolves to the
        envelope's record metadata when the broker has acknowledged the envelope (every event in it).
        """
        if self._validate:
            validate_event(event)
        wire = _wire(event)
        if not self.envelope_max_events:
            return self._producer.send(self.topic, key=event["account_id"], value=wire)
        if envelope.size(1, len(wire)) > self.envelope_max_bytes:
            raise InvalidEvent("too_large", f"event of {len(wire)} bytes does not fit an envelope of "
                                            f"{self.envelope_max_bytes} bytes")
        partition = self.partition_for(event["account_id"])
        with self._cond:
            if self._closed:
                raise RuntimeError("publish on a closed EventPublisher")
            buf = self._buffers.get(partition)
            grown = None if buf is None else envelope.size(len(buf.wires) + 1, buf.event_bytes + len(wire))
            if grown is not None and grown > self.envelope_max_bytes:
                self._send_locked(partition)
                buf = None
            if buf is None:
                buf = self._buffers[partition] = _Buffer(time.time(), time.monotonic() + self.envelope_linger_ms / 1000)
                self._cond.notify()  # the linger thread may be waiting for a later deadline, or for none
            buf.wires.append(wire)
            buf.event_bytes += len(wire)
            future = buf.future
            if len(buf.wires) >= self.envelope_max_events:
                self._send_locked(partition)
        return future

    def partition_for(self, account_id: str) -> int:
        """The partition of ``account_id``'s events: what kafka-python chooses for the key ``account_id``.

        Reads the topic's partition count from the producer's metadata (waits for it up to ``max_block_ms``
        the first time, like a send)."""
        partitions = self._producer.partitions_for(self.topic)
        return envelope.account_partition(account_id, len(partitions))

    def publish_raw(self, key: str | None, value: bytes) -> Any:
        """Send bytes as they are, unvalidated, as one message (tests and fault injection use this)."""
        return self._producer.send(self.topic, key=key, value=value)

    def flush(self, timeout: float | None = 30) -> None:
        """Send every envelope being filled, then wait until kafka-python has sent everything."""
        with self._cond:
            for partition in list(self._buffers):
                self._send_locked(partition)
        self._producer.flush(timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._linger is not None:
            self._linger.join(timeout=5)
        self.flush(30)
        self._producer.close(30)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send_locked(self, partition: int) -> None:
        """Send the envelope of ``partition`` (the caller holds the lock). A send kafka-python refuses at once
        (its buffer full past ``max_block_ms``, say) fails the envelope's future and is logged, like a
        send that fails later."""
        buf = self._buffers.pop(partition)
        try:
            sent = self._producer.send(self.topic, value=envelope.encode(buf.wires), partition=partition,
                                       timestamp_ms=int(buf.started * 1000))
        except Exception as exc:  # noqa: BLE001 - reported through the future, as kafka-python reports failures
            log.warning("could not send an envelope of %d events to %s[%d]: %s", len(buf.wires), self.topic,
                        partition, exc)
            buf.future.failure(exc)
            return
        sent.add_callback(buf.future.success).add_errback(buf.future.failure)

    def _send_when_due(self) -> None:
        """The linger thread: sends each envelope ``envelope_linger_ms`` after its first event."""
        with self._cond:
            while not self._closed:
                if not self._buffers:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = min(buf.due for buf in self._buffers.values())
                if due > now:
                    self._cond.wait(due - now)
                    continue
                for partition, buf in list(self._buffers.items()):
                    if buf.due <= now:
                        self._send_locked(partition)


class _Buffer:
    """The envelope being filled for one partition."""

    __slots__ = ("started", "due", "wires", "event_bytes", "future")

    def __init__(self, started: float, due: float) -> None:
        from kafka.future import Future

        self.started = started  # wall clock (the message timestamp)
        self.due = due  # monotonic: when the linger thread sends it
        self.wires: list[bytes] = []
        self.event_bytes = 0
        self.future = Future()


def _serialize_key(key: str | None) -> bytes | None:
    return None if key is None else key.encode()  # envelopes have no key


def _serialize(value: dict[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else orjson.dumps(value)
