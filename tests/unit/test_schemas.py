"""The fast path of ``decode_event`` (``detector.schemas._plainly_valid_event``) against the schema file.

The fuzz suite (test_fuzz_ingest.py) checks every event ``decode_event`` accepts against the compiled schema;
here, the fast path's key sets, bounds and enums are read back from ``schemas/api_call_event.v1.json``, so a
change to the contract that the fast path does not follow fails here first.
"""

import orjson

from detector import schemas as s
from detector.schemas import EVENT_SCHEMA, InvalidEvent, load_schema
from tests.factory import event


def test_fast_path_follows_the_schema_file():
    schema = load_schema(EVENT_SCHEMA)
    props = schema["properties"]

    def keys(obj):
        return frozenset(obj["properties"])

    assert s._EVENT_KEYS == keys(schema) == frozenset(schema["required"])
    assert s._CLIENT_KEYS == keys(props["client"]) and s._BILLING_KEYS == keys(props["billing"])
    assert s._PROMPT_KEYS == keys(props["prompt"])
    assert (props["ts"]["minimum"], props["ts"]["maximum"]) == (s._TS_MIN, s._TS_MAX)
    assert props["input_tokens"]["maximum"] == props["output_tokens"]["maximum"] == s._TOKENS_MAX
    assert props["latency_ms"]["maximum"] == s._LATENCY_MAX
    assert props["client"]["properties"]["asn"]["anyOf"][0]["maximum"] == s._ASN_MAX
    prompt = props["prompt"]["properties"]
    assert frozenset(prompt["capability"]["enum"]) == s._CAPABILITIES
    assert frozenset(prompt["script"]["enum"]) == s._SCRIPTS
    stop = props["response"]["properties"]["stop_reason"]["anyOf"]
    assert frozenset(stop[0]["enum"]) | {None} == s._STOP_REASONS
    assert schema["definitions"]["hex16"]["pattern"] == "^[0-9a-f]{16}$"
    assert schema["definitions"]["id"]["pattern"] == "^[A-Za-z0-9_.:@-]+$"


def test_the_sdks_events_take_the_fast_path_and_anything_odd_the_compiled_schema():
    ev = event()
    assert s._plainly_valid_event(ev)
    odd = [{**ev, "ts": float(ev["ts"])},  # valid ("integer" admits 1.0): the compiled schema says so
           {**ev, "event_id": ev["event_id"] + "\n"},  # invalid
           {**ev, "client": [1]}, {**ev, "response": {"stop_reason": ["x"]}}, {**ev, "extra": 1}]
    band = ev["prompt"]["bands"][0]
    odd += [{**ev, "prompt": {**ev["prompt"], "bands": bands}}  # the bands, checked joined (_hex16_list)
            for bands in ([band + "," + band], [band, 7], [band.upper()], [band[:15]], [band + ","], [band] * 17)]
    assert not any(s._plainly_valid_event(o) for o in odd)
    assert s.decode_event(orjson.dumps(odd[0]))["ts"] == ev["ts"]
    for o in odd[1:]:
        try:
            s.decode_event(orjson.dumps(o))
        except InvalidEvent as exc:
            assert exc.reason == "schema"
        else:
            raise AssertionError(o)
