"""The event contract: JSON Schemas in ``schemas/`` compiled once into fast validators.

The schema files are the source of truth; this module only loads them (:func:`schema_dir` says from
where). Decoding is the single gate for everything that enters the detector: bytes in, a valid event dict
out, or :class:`InvalidEvent` with a machine-readable ``reason`` (used as the dead-letter reason and
metric label) and a human ``detail``.

>>> decode_event(b'{"ts": NaN}')
Traceback (most recent call last):
...
detector.schemas.InvalidEvent: not_json: unexpected character, expected a JSON value: line 1 column 8 (char 7)
>>> decode_event(b"[1, 2]")
Traceback (most recent call last):
...
detector.schemas.InvalidEvent: not_object: expected a JSON object, got list
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

#: Where an installed wheel carries the schema files, inside the package (pyproject.toml maps the
#: repository's top-level ``schemas/`` there at build time; git holds one copy, at the top level).
PACKAGED_SCHEMAS = "schema_files"
EVENT_SCHEMA = "api_call_event.v1.json"
ENVELOPE_SCHEMA = "api_call_envelope.v1.json"
SCORE_SCHEMA = "risk_score.v1.json"
DEAD_LETTER_SCHEMA = "dead_letter.v1.json"
LABEL_SCHEMA = "analyst_label.v1.json"
KEY_BLOCK_SCHEMA = "key_block.v1.json"

#: Reasons an input is rejected; also the values of the ``reason`` metric label (a closed set).
#: ``wrong_partition`` is given only to an event of an envelope (:mod:`detector.envelope`).
REASONS = ("not_json", "not_object", "schema", "too_large", "duplicate_field", "wrong_partition")


class InvalidEvent(ValueError):
    """An input that is not a valid event. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:500]


@functools.cache
def schema_dir() -> Traversable:
    """The directory holding the schema files.

    In an installed wheel, ``detector/schema_files`` inside the package (read through
    :mod:`importlib.resources`, so a zipped install works too); in a source checkout (an editable
    install, or ``detector`` on ``PYTHONPATH``), the repository's own ``schemas/`` beside the package.
    The packaged copy is looked for first: an installed ``detector`` never reads a stray ``schemas/``
    that happens to sit next to it in site-packages.

    >>> sorted(p.name for p in schema_dir().iterdir() if p.name.endswith(".json"))[:3]
    ['analyst_label.v1.json', 'api_call_envelope.v1.json', 'api_call_event.v1.json']
    """
    packaged = resources.files("detector") / PACKAGED_SCHEMAS
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "schemas"


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema file ``schemas/<name>``."""
    schema: dict[str, Any] = orjson.loads((schema_dir() / name).read_bytes())
    return schema


@functools.cache
def validator(name: str) -> Callable[[Any], Any]:
    """A compiled validator for ``schemas/<name>``; raises ``fastjsonschema.JsonSchemaException``."""
    return fastjsonschema.compile(load_schema(name))  # type: ignore[no-any-return]


def validate(name: str, obj: Any) -> dict[str, Any]:
    """Validate ``obj`` against schema ``name``; return it or raise :class:`InvalidEvent`."""
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        validator(name)(obj)
    except fastjsonschema.JsonSchemaException as exc:
        raise InvalidEvent("schema", str(getattr(exc, "message", exc))) from None
    return obj


def validate_event(obj: Any) -> dict[str, Any]:
    """Validate an API-call event dict; return it unchanged or raise :class:`InvalidEvent`. Events like the
    gateway SDK's take a hand-written fast path (:func:`_plainly_valid_event`); the rest the compiled schema."""
    if type(obj) is dict and _plainly_valid_event(obj):
        return obj
    return validate(EVENT_SCHEMA, obj)


def decode(name: str, raw: bytes, max_bytes: int = 64 * 1024, *, unique_keys: bool = False) -> dict[str, Any]:
    """Bytes from the wire to a record valid against schema ``name``, or :class:`InvalidEvent`.

    NaN, Infinity, invalid UTF-8 and nesting deeper than orjson's limit are all rejected as ``not_json``.
    With ``unique_keys``, a record that is valid but names a key twice in one object is rejected as
    ``duplicate_field`` (see :func:`check_unique_keys`); without, the last value of the key counts. Off by
    default because callers count reasons in closed sets of their own (``detector.ratelimit`` for
    risk-score records has none for it); :func:`decode_event` turns it on.
    """
    if len(raw) > max_bytes:
        raise InvalidEvent("too_large", f"{len(raw)} bytes > limit of {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", str(exc)) from None
    record = validate_event(obj) if name == EVENT_SCHEMA else validate(name, obj)
    if unique_keys:  # after the schema check, so invalid input (most of a flood of garbage) does not pay
        check_unique_keys(raw, record)
    return record


def check_unique_keys(raw: bytes, parsed: Any) -> None:
    """Raise :class:`InvalidEvent` (``duplicate_field``) if an object in the JSON text ``raw`` repeats a key.

    ``parsed`` is orjson's parse of ``raw``. orjson keeps the last value of a repeated key without a word,
    while other parsers keep the first or refuse: one message would mean two things (two account ids, two
    timestamps) to the detector and to anyone else reading the topic, so it is refused instead.

    Cost. Bytes that orjson writes back exactly as they came cannot repeat a key (the parse would have
    dropped one, so the re-encoding would be shorter): everything the gateway SDK publishes, and compact
    JSON from any orjson producer, costs one ``orjson.dumps`` and a comparison, about 0.7 µs for a
    typical event. Other bytes (white space, escapes, another key order or float format) are parsed once
    more by the standard library, with a hook that sees every key: about 10 µs, a quarter of a decode.
    Cheap enough to do rather than to drop the ``duplicate_field`` reason from the closed set: nothing
    this repository produces ever takes the slow path (the simulator's and the SDK's bytes round-trip).

    >>> check_unique_keys(b'{"a": 1, "b": {"a": 2}}', {"a": 1, "b": {"a": 2}})
    >>> check_unique_keys(b'{"a": 1, "b": {"c": 2, "c": 3}}', {"a": 1, "b": {"c": 3}})
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: duplicate_field: key 'c' appears more than once in one object
    """
    try:
        if orjson.dumps(parsed) == raw:
            return
    except TypeError:  # nested deeper than orjson writes (it reads deeper): the slow path decides
        pass
    try:
        json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as exc:  # orjson accepted what json refuses: refuse it too
        raise InvalidEvent("not_json", f"json: {exc}") from None


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> None:
    """``object_pairs_hook`` for :func:`json.loads`: raises on a repeated key; builds nothing."""
    if len({key for key, _ in pairs}) != len(pairs):
        raise InvalidEvent("duplicate_field", f"key {repeated_key(pairs)!r} appears more than once in one object")


def repeated_key(pairs: list[tuple[str, Any]]) -> str | None:
    """The first key that an object's ``pairs`` (as :func:`json.loads` hands them to ``object_pairs_hook``)
    name a second time, or None.

    >>> repeated_key([("a", 1), ("b", 2), ("a", 3)]), repeated_key([("a", 1)])
    ('a', None)
    """
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


# ---- the fast path of decode_event ----------------------------------------------------------------------
# A hand-written check that says "valid" only for events the compiled schema accepts too (stricter where that
# is simpler: an int must be an int, not an integral float; a pattern must match the whole string), and
# "don't know" for everything else, which then goes to the compiled schema for the verdict and its message.
# The schema file stays the contract: tests/unit/test_fuzz_ingest.py checks every event decode_event
# accepts against the compiled schema, and tests/unit/test_schemas.py the bounds below against the file.
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{8,64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX16_LIST = re.compile(r"(?:[0-9a-f]{16}(?:,[0-9a-f]{16})*)?")
_IP = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_TS_MIN, _TS_MAX = 946684800000, 4102444800000
_TOKENS_MAX, _LATENCY_MAX, _ASN_MAX = 100_000_000, 86_400_000, 4_294_967_295
_EVENT_KEYS = frozenset({"schema_version", "event_id", "ts", "account_id", "org_id", "api_key_id", "model", "endpoint",
                         "status", "input_tokens", "output_tokens", "latency_ms", "client", "billing", "prompt",
                         "response"})
_CLIENT_KEYS = frozenset({"ip", "asn", "country", "user_agent", "tls_fp"})
_BILLING_KEYS = frozenset({"payment_fp", "tier", "account_created_ts"})
_PROMPT_KEYS = frozenset({"fp_version", "exact", "simhash", "bands", "system_fp", "chars", "cot", "capability",
                          "script"})
_CAPABILITIES = frozenset({"coding", "math", "reasoning", "agentic", "writing", "qa", "roleplay", "other"})
_SCRIPTS = frozenset({"latin", "cjk", "cyrillic", "arabic", "other"})
_STOP_REASONS = frozenset({"end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal", "error", None})


def _str(v: Any, lo: int, hi: int) -> bool:
    return type(v) is str and lo <= len(v) <= hi


def _int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _hex16_list(items: list[Any]) -> bool:
    """Every item a string of 16 lowercase hex digits: one regex over the joined list instead of one per item
    (about 2 µs less per event). The length check rules out commas inside the items.

    >>> h = "0123456789abcdef"
    >>> _hex16_list([]), _hex16_list([h, h]), _hex16_list([h + "," + h]), _hex16_list([h, 7]), _hex16_list([h.upper()])
    (True, True, False, False, False)
    """
    try:
        joined = ",".join(items)
    except TypeError:  # an item that is not a string
        return False
    return len(joined) == max(17 * len(items) - 1, 0) and _HEX16_LIST.fullmatch(joined) is not None


def _plainly_valid_event(ev: dict[str, Any]) -> bool:
    """True only if ``ev`` is a valid ``api_call_event.v1`` (see above); about 6 µs against 45 µs.

    >>> from detector.gateway import make_event
    >>> ev = make_event(account_id="acct_1", ts=1775000000000, api_key_id="k", model="m", endpoint="/v1/x",
    ...                 status=200, input_tokens=1, output_tokens=1, latency_ms=1, response={"stop_reason": None},
    ...                 prompt_text="hi", fingerprint_key=b"k")
    >>> _plainly_valid_event(ev), _plainly_valid_event({**ev, "ts": 1775000000000.0})
    (True, False)
    """
    if ev.keys() != _EVENT_KEYS:
        return False
    client, billing, prompt, response = ev["client"], ev["billing"], ev["prompt"], ev["response"]
    if not (type(client) is dict and type(billing) is dict and type(prompt) is dict and type(response) is dict):
        return False
    org, bands, system_fp = ev["org_id"], prompt.get("bands"), prompt.get("system_fp")
    ip, country = client.get("ip"), client.get("country")
    return (
        ev["schema_version"] == 1 and type(ev["schema_version"]) is int
        and type(ev["event_id"]) is str and _EVENT_ID.fullmatch(ev["event_id"]) is not None
        and _int(ev["ts"], _TS_MIN, _TS_MAX)
        and type(ev["account_id"]) is str and _ID.fullmatch(ev["account_id"]) is not None
        and (org is None or type(org) is str and _ID.fullmatch(org) is not None)
        and type(ev["api_key_id"]) is str and _ID.fullmatch(ev["api_key_id"]) is not None
        and _str(ev["model"], 1, 128) and _str(ev["endpoint"], 1, 256)
        and _int(ev["status"], 100, 599)
        and _int(ev["input_tokens"], 0, _TOKENS_MAX) and _int(ev["output_tokens"], 0, _TOKENS_MAX)
        and _int(ev["latency_ms"], 0, _LATENCY_MAX)
        and client.keys() == _CLIENT_KEYS
        and (ip is None or type(ip) is str and _IP.fullmatch(ip) is not None)
        and (client["asn"] is None or _int(client["asn"], 0, _ASN_MAX))
        and (country is None or type(country) is str and _COUNTRY.fullmatch(country) is not None)
        and (client["user_agent"] is None or _str(client["user_agent"], 0, 512))
        and (client["tls_fp"] is None or _str(client["tls_fp"], 0, 128))
        and billing.keys() == _BILLING_KEYS
        and (billing["payment_fp"] is None or _str(billing["payment_fp"], 1, 128))
        and (billing["tier"] is None or _str(billing["tier"], 0, 64))
        and (billing["account_created_ts"] is None or _int(billing["account_created_ts"], _TS_MIN, _TS_MAX))
        and prompt.keys() == _PROMPT_KEYS
        and prompt["fp_version"] == 1 and type(prompt["fp_version"]) is int
        and type(prompt["exact"]) is str and _HEX16.fullmatch(prompt["exact"]) is not None
        and type(prompt["simhash"]) is str and _HEX16.fullmatch(prompt["simhash"]) is not None
        and type(bands) is list and len(bands) <= 16 and _hex16_list(bands)
        and (system_fp is None or type(system_fp) is str and _HEX16.fullmatch(system_fp) is not None)
        and _int(prompt["chars"], 0, _TOKENS_MAX)
        and type(prompt["cot"]) is bool
        and type(prompt["capability"]) is str and prompt["capability"] in _CAPABILITIES
        and type(prompt["script"]) is str and prompt["script"] in _SCRIPTS
        and (response.keys() == {"stop_reason"} or response.keys() == {"stop_reason", "refused"}
             and type(response["refused"]) is bool)
        and (response["stop_reason"] is None or type(response["stop_reason"]) is str)
        and response["stop_reason"] in _STOP_REASONS
    )


def decode_event(raw: bytes, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """Bytes from the wire to a valid event, or :class:`InvalidEvent`.

    An event repeating a key in one object is refused: as ``schema`` if the last value of each key (what
    orjson keeps) makes it invalid, else as ``duplicate_field``.

    Costs one orjson parse and a schema check: about 13 µs for the SDK's events, which the hand-written
    fast path (:func:`_plainly_valid_event`) accepts, against about 40 µs through the compiled schema (on
    the 2-core reference machine, 15,644 bench events); the duplicate-key check adds about 0.7 µs for the
    SDK's compact bytes, about 10 µs for other producers' bytes.

    >>> from detector.gateway import make_event
    >>> ev = make_event(account_id="acct_1", ts=1775000000000, api_key_id="k", model="m-1", endpoint="/v1/messages",
    ...                 status=200, input_tokens=1, output_tokens=1, latency_ms=1, response={"stop_reason": None},
    ...                 prompt_text="hi", fingerprint_key=b"k")
    >>> raw = orjson.dumps(ev)
    >>> decode_event(raw) == ev
    True
    >>> decode_event(raw.replace(b'"account_id":', b'"account_id":"acct_2","account_id":'))
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: duplicate_field: key 'account_id' appears more than once in one object
    """
    return decode(EVENT_SCHEMA, raw, max_bytes, unique_keys=True)
