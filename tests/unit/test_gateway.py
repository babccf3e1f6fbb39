import json

import orjson
import pytest

from detector.fingerprints import fingerprint, hamming
from detector.gateway import make_event
from detector.schemas import DEAD_LETTER_SCHEMA, REASONS, InvalidEvent, decode_event, load_schema
from detector.streaming.routing import INTERNAL
from tests.factory import event


def test_event_has_no_raw_text_and_validates():
    secret = "my very private prompt about project zebra-tango"
    ev = event(prompt_text=secret, system_text="You are the zebra-tango assistant.")
    wire = orjson.dumps(ev)
    assert b"zebra" not in wire and b"private" not in wire
    assert decode_event(wire)["prompt"]["system_fp"] is not None


def test_event_id_generated_and_unique():
    a = event(event_id=None)
    b = event(event_id=None)
    assert a["event_id"] != b["event_id"] and len(a["event_id"]) >= 8


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"status": 42}, "status"),
        ({"ts": True}, "ts"),
        ({"client": {"ip": "not an ip!"}}, "ip"),
        ({"billing": {"payment_fp": 7}}, "payment_fp"),
        ({"model": ""}, "model"),
        ({"response": {"stop_reason": "exploded"}}, "stop_reason"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_fields_raise_a_clear_error(override, fragment):
    with pytest.raises(InvalidEvent) as err:
        event(**override)
    assert err.value.reason == "schema"
    assert fragment in str(err.value)


def test_missing_fields_are_named():
    with pytest.raises(InvalidEvent, match="missing fields: .*model"):
        make_event(account_id="a", ts=1775000000000, prompt_text="x")


def test_prompt_must_not_be_passed_directly():
    with pytest.raises(InvalidEvent, match="prompt_text"):
        event(prompt={"exact": "0" * 16})


def test_fingerprints_depend_on_the_key():
    a = fingerprint("Write a haiku about autumn leaves", key=b"k1")
    b = fingerprint("Write a haiku about autumn leaves", key=b"k2")
    assert a["exact"] != b["exact"] and a["bands"] != b["bands"]


def test_template_fills_share_bands_unrelated_prompts_do_not():
    template = ("You are an expert Python engineer. Solve the task below. Think step by step, show all your "
                "reasoning, then give the final code in one block. Task: {}")
    a = fingerprint(template.format("reverse a linked list"), key=b"k")
    b = fingerprint(template.format("parse an ISO date string"), key=b"k")
    c = fingerprint("What's a good name for a golden retriever puppy?", key=b"k")
    assert set(a["bands"]) & set(b["bands"])
    assert not set(a["bands"]) & set(c["bands"])
    assert hamming(a["simhash"], b["simhash"]) < hamming(a["simhash"], c["simhash"])


@pytest.mark.parametrize("text", [
    "Let's think step by step.", "请一步一步地推理", "Решите задачу шаг за шагом", "Explica paso a paso",
    "Show your reasoning before answering",
])
def test_chain_of_thought_requests_in_several_languages(text):
    assert fingerprint(text, key=b"k")["cot"] is True


def test_ordinary_prompt_is_not_chain_of_thought():
    assert fingerprint("Write a limerick about a cat who loves lasagna", key=b"k")["cot"] is False


def test_scripts():
    assert fingerprint("这是一个测试问题，请回答", key=b"k")["script"] == "cjk"
    assert fingerprint("Привет, как дела?", key=b"k")["script"] == "cyrillic"


def _spaced(ev):
    """The event as another producer might write it: white space, escaped non-ASCII, keys sorted."""
    return json.dumps(ev, indent=1, sort_keys=True).encode()


@pytest.mark.parametrize("dup", [
    lambda raw: raw.replace(b'"account_id":', b'"account_id":"acct_evil","account_id":'),  # top level
    lambda raw: raw.replace(b'"ip":', b'"ip":"203.0.113.9",\n  "ip":'),  # nested, with white space
    lambda raw: raw.replace(b'"ts":', b'"\\u0074s":1775000000001,"ts":'),  # the same key, escaped
])
@pytest.mark.parametrize("writer", [orjson.dumps, _spaced])
def test_a_repeated_key_is_refused(dup, writer):
    ev = event(prompt_text="naïve café")
    raw = writer(ev)
    assert decode_event(raw) == ev  # either writer's bytes decode
    twice = dup(raw)
    assert twice != raw
    with pytest.raises(InvalidEvent) as err:
        decode_event(twice)
    assert err.value.reason == "duplicate_field"


def test_a_repeated_key_with_an_invalid_last_value_is_a_schema_error():
    raw = orjson.dumps(event(status=200)).replace(b'"status":200', b'"status":200,"status":"ok"')
    with pytest.raises(InvalidEvent) as err:
        decode_event(raw)
    assert err.value.reason == "schema"


def test_every_dead_letter_reason_is_produced_by_someone():
    """The dead-letter schema's reasons are exactly the decode reasons and the router's ``internal``."""
    enum = load_schema(DEAD_LETTER_SCHEMA)["properties"]["reason"]["enum"]
    assert sorted(enum) == sorted((*REASONS, INTERNAL))
