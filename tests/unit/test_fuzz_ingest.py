"""Property-based fuzzing of the ingest path: hostile bytes in, never a crash, never a valid event lost.

Properties, for every input:

* ``decode_event`` returns an event the JSON Schema accepts, or raises :class:`InvalidEvent` with a reason
  in :data:`detector.schemas.REASONS`;
* an accepted event is handled by ``Detector.process`` without raising, and the record it returns (if
  any) is a valid risk score;
* ``Router.on_message`` never raises; every invalid input becomes a dead letter that validates against
  ``schemas/dead_letter.v1.json`` and carries the decode reason, the byte count and the (truncated)
  bytes; no valid input is ever dead-lettered;
* ``make_event`` returns a valid event that keeps the value it was given, or raises :class:`InvalidEvent`
  naming the bad field.

Inputs: arbitrary bytes, broken JSON assembled from JSON tokens, arbitrary JSON values, real valid events
(from ``make_event``) with one or many paths mutated (deleted, replaced by a hostile value, a raw literal
such as ``NaN`` spliced in, invalid UTF-8, nesting beyond orjson's limit, extra fields), byte-level
damage, categories with a known reason (negative token counts, bools for ints, ancient and far-future
timestamps, oversized messages...), sequences of valid events with extreme but valid fields, and
``make_event`` keyword arguments.

Cost. Hypothesis spends about 0.5 ms of its own per example on a slow machine, far more than checking an
invalid input (about 40 µs), so most tests check a fixed-size batch of inputs per example (``INPUTS``):
about 113,000 inputs in 12,700 examples, of which about 102,000 are rejected at the door, 1,500 are
bad ``make_event`` calls and 9,000 are valid (mutations that kept the event valid, and sequences of
valid events with extreme fields); about 25 s of CPU. All drawn deterministically (``derandomize=True``)
so CI reproduces. Regressions found by fuzzing are kept as ``@example``s (``test_valid_sequences``,
``test_mutated_valid_events``).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from detector.content import ContentIndex
from detector.detection import Detector
from detector.gateway import make_event
from detector.schemas import (
    DEAD_LETTER_SCHEMA,
    EVENT_SCHEMA,
    REASONS,
    SCORE_SCHEMA,
    InvalidEvent,
    decode_event,
    validator,
)
from detector.settings import Settings
from detector.streaming.routing import MAX_PAYLOAD_B64, Router, Source

MIN_TS, MAX_TS = 946_684_800_000, 4_102_444_800_000  # the schema's bounds on event time
BASE_TS = 1_775_000_000_000
DAY = 86_400_000
KEY = b"fuzz-key"
SETTINGS = Settings()
MAX_BYTES = SETTINGS.worker.max_event_bytes
DEPTH_LIMIT = 1024  # orjson rejects deeper nesting
SOURCE = Source("api-calls", 3, 17)
EVENT_OK = validator(EVENT_SCHEMA)
DEAD_LETTER_OK = validator(DEAD_LETTER_SCHEMA)
SCORE_OK = validator(SCORE_SCHEMA)

#: test -> (examples, inputs per example): the budget, in one place.
INPUTS = {
    "arbitrary_bytes": (2_000, 12),
    "broken_json": (2_500, 12),
    "arbitrary_json_values": (500, 4),
    "mutated_valid_events": (1_000, 4),
    "many_mutations": (1_500, 12),
    "damaged_bytes": (2_000, 14),
    "hostile_categories": (1_000, 3),
    "make_event": (1_500, 1),
    "valid_sequences": (400, 4),  # valid events with extreme fields: not counted as hostile
    "prompt_text": (300, 1),  # valid
}
HOSTILE_INPUTS = sum(n * k for name, (n, k) in INPUTS.items() if name not in ("valid_sequences", "prompt_text"))


def fuzz(name: str) -> Any:
    """Deterministic settings for test ``name`` of :data:`INPUTS`: no deadline (the machine may be busy),
    no example database."""
    return settings(max_examples=INPUTS[name][0], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def batch(strategy: st.SearchStrategy[Any], name: str) -> st.SearchStrategy[list[Any]]:
    k = INPUTS[name][1]
    return st.lists(strategy, min_size=k, max_size=k)


def test_input_budget() -> None:
    assert HOSTILE_INPUTS >= 100_000


def small_detector() -> Detector:
    """A detector with a tiny content sketch (the default one allocates 64 MiB) and the population model:
    building HalfSpaceTrees' 25 trees for each of the 9,000 valid inputs would double the suite's time, and
    no model scores before 200 learned points (``RankScorer``), which no input here reaches."""
    return Detector(content=ContentIndex(width=1 << 8, depth=2), dedup_ids=256, anomaly_model="population")


class Recording:
    """A detector that remembers what it raised (the router catches it and dead-letters the event)."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.error: Exception | None = None

    def process(self, event: dict[str, Any], emitted_at: int | None = None,
                position: tuple[int, int] | None = None) -> dict[str, Any] | None:
        try:
            return self.detector.process(event, emitted_at, position)
        except Exception as exc:
            self.error = exc
            raise

    def apply_label(self, label: dict[str, Any], emitted_at: int | None = None) -> dict[str, Any] | None:
        return self.detector.apply_label(label, emitted_at)


# One router for every input (a router holds a metrics registry, which is slow to build); each valid input
# gets a detector of its own, so inputs cannot affect each other and a failure reproduces on its own.
ROUTER = Router(Recording(small_detector()), SETTINGS, clock=lambda: 1_775_000_000.0)
ROUTER.invalid_ratio_limit = 1.0  # nearly every input is invalid here: no warning per 1,000


def route(raw: bytes, detector: Callable[[], Detector] = small_detector, key: bytes | None = b"acct",
          source: Source = SOURCE) -> str | None:
    """Check every property for one input; return its decode reason, or None if it is a valid event.

    ``detector`` makes the detector a valid event goes to; it is called for valid events only (it costs
    more than everything else here)."""
    try:
        event = decode_event(raw, MAX_BYTES)
    except InvalidEvent as exc:
        assert exc.reason in REASONS, exc
        reason: str | None = exc.reason
    else:
        EVENT_OK(event)
        reason = None
        ROUTER.detector = Recording(detector())
    outs = ROUTER.on_message(raw, key, source)  # must never raise
    assert len(outs) <= 1, outs  # a single event (no input here is an envelope) has at most one output
    out = outs[0] if outs else None
    if reason is None:
        error = ROUTER.detector.error  # type: ignore[attr-defined]
        if error is not None:
            raise error  # the detector failed on a valid event (and the router dead-lettered it)
        assert out is None or out.topic == SETTINGS.topics.risk_scores, f"a valid event was dead-lettered: {raw!r}"
        if out is not None:
            SCORE_OK(orjson.loads(out.value))
        return None
    assert out is not None and out.topic == SETTINGS.topics.dead_letters and out.key == key
    dead = orjson.loads(out.value)
    DEAD_LETTER_OK(dead)
    assert dead["reason"] == reason
    assert dead["payload_bytes"] == len(raw)
    assert base64.b64decode(dead["payload_b64"]) == raw[:MAX_PAYLOAD_B64 // 4 * 3]
    assert (dead["source_topic"], dead["source_partition"], dead["source_offset"]) == ("api-calls", 3, 17)
    return reason


# --------------------------------------------------------------------------------------------------
# Real valid events, and the paths inside them

PROMPTS = ["What is the capital of France?", "Think step by step and write a Python function to sort a list.",
           "Translate to German: good morning", "逐步解释为什么天空是蓝色的", "Объясни теорему Пифагора", "", "x"]


def _pool() -> list[dict[str, Any]]:
    rng = random.Random(7)
    events = []
    for i in range(24):
        events.append(make_event(
            event_id=f"evt_pool_{i:04d}", account_id=f"acct_{i % 6}", ts=BASE_TS + rng.randrange(DAY),
            org_id=None if i % 3 else f"org_{i % 2}", api_key_id=f"key_{i}", model=rng.choice(["m-1", "m-2"]),
            endpoint="/v1/messages", status=rng.choice([200, 200, 429, 500]), input_tokens=rng.randrange(10_000),
            output_tokens=rng.randrange(10_000), latency_ms=rng.randrange(60_000),
            client={"ip": rng.choice(["198.51.100.7", "2001:db8::1", "::ffff:10.0.0.1", None]),
                    "asn": rng.choice([64500, None]), "country": rng.choice(["US", None]),
                    "user_agent": rng.choice(["python-httpx/0.27", None]), "tls_fp": rng.choice(["t13d", None])},
            billing={"payment_fp": rng.choice([f"pm_{i % 4}", None]), "tier": rng.choice(["build", None]),
                     "account_created_ts": rng.choice([BASE_TS - 30 * DAY, None])},
            response={"stop_reason": rng.choice(["end_turn", "max_tokens", None]), "refused": i % 5 == 0},
            prompt_text=PROMPTS[i % len(PROMPTS)], system_text="Be brief." if i % 4 == 0 else None,
            fingerprint_key=KEY))
    return events


POOL = _pool()
POOL_BYTES = [orjson.dumps(ev) for ev in POOL]


def _copy(i: int) -> dict[str, Any]:
    """A fresh copy of ``POOL[i]`` (orjson is ten times faster than ``copy.deepcopy``)."""
    return orjson.loads(POOL_BYTES[i])  # type: ignore[no-any-return]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


PATHS = sorted({p for ev in POOL for p in _paths(ev)}, key=lambda p: tuple(map(str, p)))  # parents first
#: Every property name of the event schema (an "extra" field with one of these names may be valid).
KNOWN_NAMES = {p[-1] for p in PATHS if isinstance(p[-1], str)} | {"refused"}


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _parent(obj: Any, path: tuple[Any, ...]) -> Any | None:
    """The container holding ``path`` in ``obj``, or None if the path does not exist there."""
    for p in path[:-1]:
        if isinstance(obj, dict) and p in obj or isinstance(obj, list) and isinstance(p, int) and p < len(obj):
            obj = obj[p]
        else:
            return None
    last = path[-1]
    if isinstance(obj, dict) and last in obj or isinstance(obj, list) and isinstance(last, int) and last < len(obj):
        return obj
    return None


# --------------------------------------------------------------------------------------------------
# Hostile values

RAW = "\u0001raw:"  # a string value starting with this is spliced into the JSON text as raw bytes
RAW_LITERALS = [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1E400", b"01", b"1.", b".5",
                b"+1", b"0x10", b"1_000", b"True", b"None", b"undefined", b"'x'", b'"\xff\xfe"', b'"\xc0\xaf"',
                b'"\xed\xa0\x80"', b'"\\ud800"', b'"\\udc00x"', b'"\\x41"', b'"\\u00"', b'"\x00"', b'"\n"',
                b"1775000000000.0", b"1.775e12", b"17750000000000000e-4", b"64500.0", b"200.0", b"1e2",
                b"-0", b"-0.0", b"123456789012345678901234567890", b"-123456789012345678901234567890",
                b"[" * 1100 + b"]" * 1100, b'{"a":' * 1030 + b"1" + b"}" * 1030, b"[" * 1000 + b"]" * 1000,
                b"", b",", b"}", b"]", b'"', b"\\", b"/*c*/1", b"1 2", b"[,]", b'{"a" 1}', b"[1,]", b'{"a":1,}']
HOSTILE_CONSTANTS: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 1.0, -0.0, 0.5, 1e308,
    -1e308, 5e-324, "", " ", "0", "1", "true", "null", "NaN", "\x00", "\u202e", "é", "\U0001f4a5", "a" * 600,
    "a" * 70_000, [], {}, [None], {"": None}, {"ts": 1}, [[[]]], MIN_TS - 1, MAX_TS + 1, MIN_TS, MAX_TS,
    1_775_000_000_000.0, -BASE_TS, 10**8, 10**8 + 1, 86_400_001, 4_294_967_295, 4_294_967_296, 99, 100,
    599, 600, "198.51.100.7", "::", "..", "0" * 16, "f" * 16, "F" * 16, "g" * 16, "0" * 15, "US", "us", "USA",
    "end_turn", "coding", "latin", ["0" * 16] * 17, ["zz"], "acct 1", "a" * 129, "a/b", "evt_0000",
]
#: Constants and raw literals together, for mutations that pick a hostile value by index.
HOSTILE_FLAT = HOSTILE_CONSTANTS + [RAW + b.decode("latin-1") for b in RAW_LITERALS]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=24))
HOSTILE = st.one_of(
    st.sampled_from(HOSTILE_FLAT),
    JSON_SCALARS,
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=3),
)


def dumps(obj: Any) -> bytes:
    """orjson's encoding, with raw literals (``RAW`` strings) spliced in as they are."""
    text = orjson.dumps(obj)
    if b"\\u0001raw:" not in text:
        return text
    raws: list[bytes] = []

    def swap(x: Any) -> Any:
        if isinstance(x, str) and x.startswith(RAW):
            raws.append(x[len(RAW):].encode("latin-1"))
            return f"\u0002{len(raws) - 1}\u0002"
        if isinstance(x, dict):
            return {k: swap(v) for k, v in x.items()}
        if isinstance(x, list):
            return [swap(v) for v in x]
        return x

    text = orjson.dumps(swap(obj))
    for i, raw in enumerate(raws):
        text = text.replace(b'"\\u0002%d\\u0002"' % i, raw, 1)
    return text


# --------------------------------------------------------------------------------------------------
# Arbitrary bytes and broken JSON

@fuzz("arbitrary_bytes")
@given(batch(st.binary(max_size=200), "arbitrary_bytes"))
@example([b"", b"\xef\xbb\xbf{}", b"null", b"\xff", b"{}" * 40_000])
def test_arbitrary_bytes(raws: list[bytes]) -> None:
    for raw in raws:
        route(raw)


JSON_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"ts"', b'"event_id"', b'"client"', b'"x"', b"1", b"-1",
               b"0.5", b"1775000000000", b"null", b"true", b"false", b"NaN", b"Infinity", b"-Infinity", b"1e999",
               b'"', b"\\", b"\\u0000", b'"\\ud800"', b"\xff", b"\xc3", b"\x00", b" ", b"\n", b"\t", b"/", b"'"]


def _tokens(choice: bytes) -> bytes:
    """Broken JSON: each byte of ``choice`` picks a token (one draw per input, so it is cheap)."""
    return b"".join(JSON_TOKENS[c % len(JSON_TOKENS)] for c in choice)


@fuzz("broken_json")
@given(batch(st.binary(max_size=40).map(_tokens), "broken_json"))
def test_broken_json(raws: list[bytes]) -> None:
    for raw in raws:
        route(raw)


JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=10)


@fuzz("arbitrary_json_values")
@given(batch(JSON_VALUES, "arbitrary_json_values"))
def test_arbitrary_json_values(values: list[Any]) -> None:
    for value in values:
        assert route(orjson.dumps(value)) == ("schema" if isinstance(value, dict) else "not_object")


# --------------------------------------------------------------------------------------------------
# Real valid events with one path mutated: deleted, replaced, wrapped in a list, or given an extra key

class Mutation(NamedTuple):
    event: int  # index into POOL
    path: tuple[Any, ...]
    kind: str  # delete, replace, wrap or extra_key
    value: Any
    name: str  # of the extra key


def _mutate(m: Mutation) -> tuple[bytes, bool]:
    """The mutated event's bytes, and whether it must be invalid."""
    event = _copy(m.event)
    parent = _parent(event, m.path)
    if parent is None:
        return dumps(event), False
    last = m.path[-1]
    if m.kind == "delete":
        del parent[last]
        return dumps(event), last != "refused" and not isinstance(last, int)  # optional, or a list item
    if m.kind == "wrap":
        parent[last] = [parent[last]]
        return dumps(event), True
    if m.kind == "extra_key" and isinstance(parent[last], dict) and m.name not in parent[last]:
        parent[last][m.name] = m.value
        return dumps(event), m.name not in KNOWN_NAMES
    parent[last] = m.value
    return dumps(event), False


def _primed(i: int) -> Callable[[], Detector]:
    """A detector that already holds another event of the event's own account (a day earlier) and an
    event of another account, so late, early and linked events all go through the stateful paths."""
    def make() -> Detector:
        det = small_detector()
        det.process(POOL[(i + 6) % len(POOL)], emitted_at=BASE_TS)
        det.process({**POOL[i], "event_id": "evt_prior_0001", "ts": BASE_TS - DAY}, emitted_at=BASE_TS)
        return det
    return make


MUTATIONS = st.builds(Mutation, st.integers(0, len(POOL) - 1), st.sampled_from(PATHS),
                      st.sampled_from(["delete", "replace", "replace", "replace", "wrap", "extra_key"]), HOSTILE,
                      st.text(max_size=12))


@fuzz("mutated_valid_events")
@given(batch(MUTATIONS, "mutated_valid_events"))
# Found by fuzzing: an integral float passes the schema ("integer" in JSON Schema) and indexed an array.
@example([Mutation(0, ("ts",), "replace", RAW + "1775000000000.0", ""),
          Mutation(0, ("client", "asn"), "replace", 64500.0, ""),
          Mutation(1, ("billing", "account_created_ts"), "replace", RAW + "1.7e12", ""),
          # Found by fuzzing: the same account a century later or earlier overflowed 2 ** x in features().
          Mutation(0, ("ts",), "replace", MAX_TS, ""), Mutation(0, ("ts",), "replace", MIN_TS, "")])
def test_mutated_valid_events(mutations: list[Mutation]) -> None:
    for m in mutations:
        raw, must_fail = _mutate(m)
        reason = route(raw, _primed(m.event))
        assert reason is not None or not must_fail, m


def _many(choice: bytes) -> tuple[bytes, bool]:
    """Many paths of one valid event mutated at once; each byte of ``choice`` (shrinks to all zeros: the
    valid event) says what happens to one path: kept, the same path of another pool event (still valid),
    a hostile value, deleted, or an extra key beside it."""
    event = _copy(choice[0] % len(POOL))
    keep_below = 256 - choice[1] % 64  # how many paths change
    must_fail = False
    for j, (path, c) in enumerate(zip(PATHS, choice[2:], strict=False)):
        parent = _parent(event, path)
        if parent is None or c < keep_below:
            continue
        last = path[-1]
        other = _parent(POOL[c % len(POOL)], path)
        if c % 4 == 0 and other is not None:
            parent[last] = orjson.loads(orjson.dumps(other[last]))
        elif c % 4 == 1 and last != "refused" and not isinstance(last, int):
            del parent[last]
            must_fail = True
        elif c % 4 == 2 and isinstance(parent[last], dict):
            parent[last][f"extra_{c}"] = j
            must_fail = True
        else:
            parent[last] = HOSTILE_FLAT[(c * 31 + j) % len(HOSTILE_FLAT)]
    return dumps(event), must_fail


@fuzz("many_mutations")
@given(batch(st.binary(min_size=len(PATHS) + 2, max_size=len(PATHS) + 2).map(_many), "many_mutations"))
def test_many_mutations(inputs: list[tuple[bytes, bool]]) -> None:
    for raw, must_fail in inputs:
        assert route(raw) is not None or not must_fail


# --------------------------------------------------------------------------------------------------
# Byte-level damage to valid events

DAMAGE = ["truncate", "flip", "insert", "delete", "duplicate_key", "bom", "trailing", "utf8"]


def _damage(choice: bytes) -> tuple[str, bytes]:
    """A damaged valid event: ``choice`` picks the event, the damage, where, and the junk bytes (one draw
    per input, so it is cheap)."""
    damage = DAMAGE[choice[1] % len(DAMAGE)]
    return damage, _damaged(POOL_BYTES[choice[0] % len(POOL)], damage, int.from_bytes(choice[2:4], "little"),
                            choice[4:])


def _damaged(raw: bytes, damage: str, at: int, junk: bytes) -> bytes:
    pos = at % len(raw)
    if damage == "truncate":
        return raw[:pos]
    if damage == "flip":
        return raw[:pos] + bytes([raw[pos] ^ junk[0]]) + raw[pos + 1:]
    if damage == "insert":
        return raw[:pos] + junk + raw[pos:]
    if damage == "delete":
        return raw[:pos] + raw[pos + len(junk):]
    if damage == "duplicate_key":  # a second, valid ts: orjson keeps the last, decode_event refuses both
        return raw[:-1] + b',"ts":' + str(MIN_TS + at).encode() + b"}"
    if damage == "bom":
        return b"\xef\xbb\xbf" + raw
    if damage == "trailing":
        return raw + junk
    q = raw.find(b'"', pos)  # utf8: invalid UTF-8 in the string after pos
    return raw[:q + 1] + b"\xff" + junk + raw[q + 1:]


@fuzz("damaged_bytes")
@given(batch(st.binary(min_size=5, max_size=8).map(_damage), "damaged_bytes"))
def test_damaged_bytes(damages: list[tuple[str, bytes]]) -> None:
    for damage, raw in damages:
        reason = route(raw)
        if damage in ("bom", "utf8"):
            assert reason == "not_json"
        elif damage == "duplicate_key":
            assert reason == "duplicate_field"


# --------------------------------------------------------------------------------------------------
# Categories of hostile input, each with the reason it must be rejected for

def _with(path: tuple[str, ...], value: Any, i: int = 0) -> bytes:
    event = _copy(i)
    _parent(event, path)[path[-1]] = value  # type: ignore[index]
    return dumps(event)


INT_PATHS = [("ts",), ("status",), ("input_tokens",), ("output_tokens",), ("latency_ms",), ("client", "asn"),
             ("billing", "account_created_ts"), ("prompt", "chars"), ("schema_version",), ("prompt", "fp_version")]
STR_PATHS = [("event_id",), ("account_id",), ("api_key_id",), ("model",), ("endpoint",), ("client", "ip"),
             ("client", "user_agent"), ("prompt", "exact"), ("prompt", "capability")]
REQUIRED = [p for p in PATHS if len(p) <= 2 and not isinstance(p[-1], int) and p != ("response", "refused")]
CATEGORIES = ["negative_tokens", "bool_for_int", "string_for_int", "ancient_ts", "future_ts", "missing", "extra",
              "nan", "huge_string", "deep", "oversized", "padded_valid", "not_object"]


def _category(data: st.DataObject, kind: str) -> tuple[bytes, str | None]:
    i = data.draw(st.integers(0, len(POOL) - 1))
    if kind == "negative_tokens":
        path = data.draw(st.sampled_from([("input_tokens",), ("output_tokens",), ("latency_ms",), ("prompt", "chars")]))
        return _with(path, data.draw(st.integers(-(2**63), -1)), i), "schema"
    if kind == "bool_for_int":
        return _with(data.draw(st.sampled_from(INT_PATHS)), data.draw(st.booleans()), i), "schema"
    if kind == "string_for_int":
        return _with(data.draw(st.sampled_from(INT_PATHS)), str(data.draw(st.integers(0, 10**9))), i), "schema"
    if kind in ("ancient_ts", "future_ts"):
        path = data.draw(st.sampled_from([("ts",), ("billing", "account_created_ts")]))
        ts = st.integers(-(2**63), MIN_TS - 1) if kind == "ancient_ts" else st.integers(MAX_TS + 1, 2**64 - 1)
        return _with(path, data.draw(ts), i), "schema"
    if kind == "missing":
        event = _copy(i)
        path = data.draw(st.sampled_from(REQUIRED))
        del _parent(event, path)[path[-1]]  # type: ignore[union-attr]
        return dumps(event), "schema"
    if kind == "extra":
        event = _copy(i)
        target = _get(event, data.draw(st.sampled_from([(), ("client",), ("billing",), ("prompt",), ("response",)])))
        name = data.draw(st.text(max_size=12).filter(lambda s: s not in target and s not in KNOWN_NAMES))
        target[name] = data.draw(JSON_SCALARS)
        return dumps(event), "schema"
    if kind == "nan":
        literal = data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
        return _with(data.draw(st.sampled_from(INT_PATHS)), RAW + literal, i), "not_json"
    if kind == "huge_string":
        size = data.draw(st.integers(600, 60_000))
        return _with(data.draw(st.sampled_from(STR_PATHS)), "a" * size, i), "schema"
    if kind == "deep":
        depth = data.draw(st.integers(DEPTH_LIMIT + 1, 5000))
        if data.draw(st.booleans()):
            raw = b"[" * depth + b"]" * depth
        else:
            raw = b'{"a":' * depth + b"1" + b"}" * depth
        if data.draw(st.booleans()):  # nested inside a field of a valid event
            raw = _with(data.draw(st.sampled_from(STR_PATHS)), RAW + raw.decode(), i)
        return raw, "not_json"
    if kind == "oversized":
        size = data.draw(st.integers(MAX_BYTES + 1, 4 * MAX_BYTES))
        raw = POOL_BYTES[i]
        return raw[:-1] + b" " * (size - len(raw)) + b"}", "too_large"
    if kind == "padded_valid":  # white space is legal JSON: a valid event up to the limit is kept
        raw = POOL_BYTES[i]
        raw += b" " * max(data.draw(st.integers(0, MAX_BYTES + 100)) - len(raw), 0)
        return raw, "too_large" if len(raw) > MAX_BYTES else None
    return orjson.dumps(data.draw(st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3)))), "not_object"


@fuzz("hostile_categories")
@given(st.data())
def test_hostile_categories(data: st.DataObject) -> None:
    for _ in range(INPUTS["hostile_categories"][1]):
        raw, want = _category(data, data.draw(st.sampled_from(CATEGORIES)))
        assert route(raw) == want


# --------------------------------------------------------------------------------------------------
# Valid events with extreme but valid fields, in short sequences: never dead-lettered, never a crash

class Call(NamedTuple):
    """One valid event of a sequence; accounts, payment methods and prompts come from small sets so
    events of one sequence share state (account windows, clusters, the content index)."""

    account: int
    ts: int
    pay: int | None
    floats: bool  # integer fields written as integral floats (1775000000000.0): valid JSON Schema integers
    ip: str | None
    created: int | None
    tokens: int
    prompt: int


def _call_event(call: Call, n: int) -> bytes:
    ev = make_event(
        event_id=f"evt_seq_{n:04d}", account_id=f"acct_{call.account}", ts=call.ts, api_key_id=f"k{call.account}",
        model=f"m-{call.prompt % 2}", endpoint="/v1/messages", status=200 if call.tokens % 3 else 500,
        input_tokens=call.tokens, output_tokens=10**8 - call.tokens, latency_ms=call.tokens % 86_400_000,
        client={"ip": call.ip, "asn": 64500 + call.account, "user_agent": f"ua-{call.account}",
                "tls_fp": f"tls-{call.account}", "country": "US"},
        billing={"payment_fp": None if call.pay is None else f"pm_{call.pay}", "tier": None,
                 "account_created_ts": call.created},
        response={"stop_reason": "max_tokens" if call.tokens % 2 else "end_turn"},
        prompt_text=PROMPTS[call.prompt % len(PROMPTS)] + " task", fingerprint_key=KEY)
    if call.floats:
        ev = {**ev, **{k: float(ev[k]) for k in ("ts", "status", "input_tokens", "output_tokens", "latency_ms")}}
        ev["client"] = {**ev["client"], "asn": float(ev["client"]["asn"])}
        if call.created is not None:
            ev["billing"] = {**ev["billing"], "account_created_ts": float(call.created)}
    return orjson.dumps(ev)


TS = st.one_of(st.sampled_from([MIN_TS, MIN_TS + 1, BASE_TS, MAX_TS - 1, MAX_TS]), st.integers(MIN_TS, MAX_TS),
               st.integers(BASE_TS - 3 * DAY, BASE_TS + 3 * DAY))
CALLS = st.builds(
    Call, account=st.integers(0, 3), ts=TS, pay=st.one_of(st.none(), st.integers(0, 1)), floats=st.booleans(),
    ip=st.one_of(st.none(), st.sampled_from(["198.51.100.7", "::", "..", "::ffff:10.0.0.1", "2001:db8::1", "1.2.3"]),
                 st.from_regex(r"\A[0-9A-Fa-f:.]{2,45}\Z")),
    created=st.one_of(st.none(), TS), tokens=st.one_of(st.sampled_from([0, 10**8]), st.integers(0, 10**8)),
    prompt=st.integers(0, 3))


def _c(account: int, ts: int, pay: int | None = None, floats: bool = False) -> Call:
    return Call(account, ts, pay, floats, f"10.{account}.0.1", None, 10, account)


@fuzz("valid_sequences")
@given(batch(CALLS, "valid_sequences"))
# Found by this test; each crashed the detector on a valid event (dead-lettered as "internal"):
@example([_c(0, BASE_TS, floats=True)])  # ts 1775000000000.0 indexed an array: TypeError
@example([_c(0, MAX_TS), _c(0, MIN_TS)])  # one account, a century back: 2 ** 36500 in features()
@example([_c(0, MAX_TS, pay=0), _c(1, MIN_TS, pay=0)])  # the same in ClusterState.features()
# ... and in ClusterState.merge(), when a cluster with an old window absorbs one with a new window:
@example([_c(1, MIN_TS, pay=0), _c(2, MIN_TS, pay=0), _c(0, MAX_TS), _c(0, MAX_TS, pay=0)])
def test_valid_sequences(calls: list[Call]) -> None:
    det = small_detector()
    for n, call in enumerate(calls):
        # each at its own offset, as in a partition (an offset read twice is a redelivery, not a new event)
        assert route(_call_event(call, n), lambda: det, key=f"acct_{call.account}".encode(),
                     source=Source("api-calls", 3, n)) is None
    assert det.stats["events"] == len(calls)


# --------------------------------------------------------------------------------------------------
# make_event: a valid event keeping the value it was given, or InvalidEvent naming the field

BASE_KWARGS: dict[str, Any] = dict(
    event_id="evt_make_0001", account_id="acct_1", ts=BASE_TS, org_id=None, api_key_id="key_1", model="m-1",
    endpoint="/v1/messages", status=200, input_tokens=10, output_tokens=20, latency_ms=30,
    client={"ip": "198.51.100.7", "asn": 64500, "country": "US", "user_agent": "ua", "tls_fp": "t13d"},
    billing={"payment_fp": "pm_1", "tier": "build", "account_created_ts": BASE_TS - DAY},
    response={"stop_reason": "end_turn", "refused": False}, prompt_text="hello there", system_text=None,
)
KWARG_PATHS = sorted({(k,) for k in BASE_KWARGS} | {(k, s) for k, v in BASE_KWARGS.items() if isinstance(v, dict)
                                                      for s in v} | {("schema_version",)}, key=repr)
# Documented defaults: a missing or None event_id is generated, missing or None client and billing (and
# their sub-fields) are filled with None, org_id and system_text are optional. Only None: a falsy value
# (0, "", [], False) is checked as given (test_make_event_rejects_falsy_values).
DEFAULTED = {("event_id",), ("client",), ("billing",), ("org_id",), ("system_text",), ("response", "refused"),
             ("schema_version",)}
DEFAULTED |= {p for p in KWARG_PATHS if p[0] in ("client", "billing") and len(p) == 2}
MAKE_HOSTILE = st.one_of(st.sampled_from([v for v in HOSTILE_CONSTANTS if not (isinstance(v, str) and len(v) > 600)]),
                         JSON_SCALARS, st.lists(JSON_SCALARS, max_size=2),
                         st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=2))


@fuzz("make_event")
@given(st.sampled_from(KWARG_PATHS), st.sampled_from(["replace", "replace", "replace", "delete", "extra"]),
       MAKE_HOSTILE, st.text(min_size=1, max_size=10))
def test_make_event_names_the_bad_field(path: tuple[str, ...], action: str, value: Any, extra: str) -> None:
    kwargs = orjson.loads(orjson.dumps(BASE_KWARGS))
    if action == "extra":
        target = kwargs if len(path) == 1 else kwargs[path[0]]
        assume(extra not in target and extra not in KNOWN_NAMES | {"prompt_text", "system_text", "fingerprint_key"})
        path = (extra,) if len(path) == 1 else (path[0], extra)
        target[extra] = value
    elif action == "delete":
        (kwargs if len(path) == 1 else kwargs[path[0]]).pop(path[-1], None)
    else:
        (kwargs if len(path) == 1 else kwargs[path[0]])[path[-1]] = value
    try:
        event = make_event(fingerprint_key=KEY, **kwargs)
    except InvalidEvent as exc:
        assert exc.reason == "schema"
        assert path[-1] in str(exc) or repr(path[-1]) in str(exc), (path, str(exc))
        return
    EVENT_OK(event)
    if action == "delete":
        assert path in DEFAULTED, f"{path} is required, yet make_event accepted an event without it"
    elif action == "extra":
        pytest.fail(f"make_event accepted the unknown field {path}")
    elif path not in (("prompt_text",), ("system_text",)) and not (path in DEFAULTED and value is None):
        got = _get(event, path)
        if path in (("client",), ("billing",)):  # given sub-fields are kept, the others default to None
            got = {k: got[k] for k in value}
        assert orjson.dumps(got) == orjson.dumps(value), f"make_event changed {path}: {value!r} -> {got!r}"


@fuzz("prompt_text")
@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=50)))
def test_make_event_any_prompt_text(prompt: str, system: str | None) -> None:
    event = make_event(fingerprint_key=KEY, **{**BASE_KWARGS, "prompt_text": prompt, "system_text": system})
    assert route(orjson.dumps(event)) is None


# Once gaps of make_event (detector/gateway.py), found by the tests above and kept as regressions: a falsy
# event_id, client or billing used to be replaced by a default, and a lone surrogate used to raise
# UnicodeEncodeError (in the prompt) or make an event orjson cannot encode (in a free-text field).
@pytest.mark.parametrize("path, value", [(("event_id",), ""), (("event_id",), 0), (("event_id",), {}),
                                         (("client",), []), (("billing",), False), (("client",), ""),
                                         (("billing",), 0)])
def test_make_event_rejects_falsy_values(path: tuple[str, ...], value: Any) -> None:
    with pytest.raises(InvalidEvent, match=path[0]) as err:
        make_event(fingerprint_key=KEY, **{**BASE_KWARGS, path[0]: value})
    assert err.value.reason == "schema"


@pytest.mark.parametrize("field, value, named", [("prompt_text", "hi \ud800", "prompt_text"),
                                                 ("system_text", "\udfff", "system_text"),
                                                 ("model", "m\ud800", "model"),
                                                 ("client", {"user_agent": "\ud800"}, "client.user_agent"),
                                                 ("response", {"stop_reason": None, "\ud800": 1}, "response")])
def test_make_event_rejects_lone_surrogates(field: str, value: Any, named: str) -> None:
    with pytest.raises(InvalidEvent, match=named) as err:
        orjson.dumps(make_event(fingerprint_key=KEY, **{**BASE_KWARGS, field: value}))
    assert err.value.reason == "schema"
