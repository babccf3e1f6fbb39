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
import uuid
from typing import Any

import orjson

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
    pass ``prompt_text`` (and optionally ``system_text``) instead. ``event_id`` is generated when absent,
    ``org_id`` defaults to None, and unknown sub-fields of ``client`` and ``billing`` default to None.
    ``fingerprint_key`` defaults to ``$DETECTOR_FINGERPRINT_KEY``; every gateway of a deployment must
    use the same key. Raises :class:`detector.schemas.InvalidEvent` naming the bad field.
    """
    if "prompt" in fields:
        raise InvalidEvent("schema", "pass prompt_text=..., not prompt=...: the SDK computes the fingerprints")
    missing = sorted(f for f in _REQUIRED if f not in fields) + ([] if prompt_text is not None else ["prompt_text"])
    if missing:
        raise InvalidEvent("schema", "missing fields: " + ", ".join(sorted(missing)))
    if not isinstance(prompt_text, str) or (system_text is not None and not isinstance(system_text, str)):
        raise InvalidEvent("schema", "prompt_text and system_text must be str")
    client = fields.pop("client", None) or {}
    billing = fields.pop("billing", None) or {}
    if not isinstance(client, dict) or not isinstance(billing, dict):
        raise InvalidEvent("schema", "client and billing must be dicts")
    event: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": fields.pop("event_id", None) or uuid.uuid4().hex,
        "org_id": None,
        **fields,
        "client": {k: client.get(k) for k in _CLIENT_FIELDS} | client,
        "billing": {k: billing.get(k) for k in _BILLING_FIELDS} | billing,
        "prompt": fingerprint(prompt_text, _key(fingerprint_key), system_text),
    }
    for name in ("ts", "status", "input_tokens", "output_tokens", "latency_ms"):
        if isinstance(event.get(name), bool):  # bool is an int to Python and to the validator
            raise InvalidEvent("schema", f"data.{name} must be integer, not bool")
    return validate_event(event)


def encode(event: dict[str, Any]) -> bytes:
    """The wire form of an event or score: compact UTF-8 JSON."""
    return orjson.dumps(event)


class EventPublisher:
    """Publishes events to the ``api-calls`` topic with kafka-python (key = account_id, acks=all).

    Batches in the client (``linger_ms``); ``publish`` validates the event first, so a bad event raises
    here, in the gateway, instead of reaching the detector. Use as a context manager, or call
    :meth:`close`, so buffered events are flushed.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "api-calls",
        *,
        linger_ms: int = 20,
        batch_size: int = 256 * 1024,
        validate: bool = True,
        **kafka_config: Any,
    ) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._validate = validate
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=linger_ms,
            batch_size=batch_size,
            compression_type=kafka_config.pop("compression_type", None),
            key_serializer=str.encode,
            value_serializer=_serialize,
            retries=kafka_config.pop("retries", 5),
            **kafka_config,
        )

    def publish(self, event: dict[str, Any]) -> Any:
        """Send one event; returns kafka-python's future. Raises InvalidEvent for a bad event."""
        if self._validate:
            validate_event(event)
        return self._producer.send(self.topic, key=event["account_id"], value=event)

    def publish_raw(self, key: str | None, value: bytes) -> Any:
        """Send bytes as they are, unvalidated (tests and fault injection use this)."""
        return self._producer.send(self.topic, key=key, value=value)

    def flush(self, timeout: float | None = 30) -> None:
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.flush(30)
        self._producer.close(30)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serialize(value: dict[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else orjson.dumps(value)
