"""Key blocks: a blocked cluster's cards and networks refuse new accounts at the rate limiter, before a call."""

import orjson
import pytest

from detector.detection import Detector
from detector.keyblocks import SWEEP_FROM, KeyBook, key_block_record, key_id, request_key_ids
from detector.ratelimit import DecisionBook, Policy, RateLimiter, _example_record
from detector.schemas import KEY_BLOCK_SCHEMA, validate
from detector.settings import DetectionSettings, RateLimitSettings
from tests.factory import event
from tests.unit.test_detection import campaign_and_ordinary

SECRET = b"test-fingerprint-key"
NOW = 1_775_000_000_000


@pytest.fixture(scope="module")
def blocked():
    """The hand-made campaign of test_detection run through a detector, its key blocks read into a KeyBook."""
    events = campaign_and_ordinary()
    det = Detector(key_secret=SECRET)
    book = KeyBook()
    made = []
    for ev in events:
        det.process(ev, emitted_at=ev["ts"])
        for rec in det.drain_key_blocks():
            made.append(rec)
            assert book.apply(rec["key_id"].encode(), orjson.dumps(rec)) == "applied"
    return det, book, made, events


def newcomer(last_ts, **client):
    return event("acct_newcomer", last_ts + 1000, "Tell me a joke",
                 billing={"payment_fp": "pm_shared_1", "tier": "build", "account_created_ts": last_ts},
                 client={"ip": "203.0.113.3", "asn": 64999, "country": "SG", "user_agent": "curl/8",
                         "tls_fp": "t13d_bot", **client})


def test_a_blocked_cluster_publishes_its_keys_as_valid_records_without_the_values(blocked):
    det, _, made, _ = blocked
    assert made, "no cluster was blocked"
    for rec in made:
        validate(KEY_BLOCK_SCHEMA, rec)
    kinds = {rec["kind"] for rec in made}
    assert {"pay", "ip24"} <= kinds and "tmpl" not in kinds
    wire = b"".join(orjson.dumps(rec) for rec in made)
    for value in (b"pm_shared", b"203.0.113", b"python-httpx", b"t13d_bot"):
        assert value not in wire
    assert det.stats["key_blocks"] == len(made)
    # each key once while its weight, cluster id and freshness hold: no record per event of a blocked member
    assert len({rec["key_id"] for rec in made}) >= 0.5 * len(made)


def test_a_new_account_on_the_card_is_refused_before_its_first_call_as_the_detector_then_decides(blocked):
    det, book, _, events = blocked
    ev = newcomer(events[-1]["ts"])
    hit = book.match(request_key_ids(ev, SECRET), ev["ts"])
    assert hit is not None and hit[1] >= 1.0
    rec = det.process(ev)  # the detector, seeing the call, blocks the account on first sight: same verdict
    assert rec is not None and rec["action"] == "block"


def test_keys_an_ordinary_account_shares_only_weakly_do_not_refuse_it(blocked):
    _, book, _, events = blocked
    ordinary = next(ev for ev in events if ev["account_id"].startswith("acct_o"))
    assert book.match(request_key_ids(ordinary, SECRET), ordinary["ts"]) is None
    # the campaign's ASN and user agent alone (a cloud network, a common client) are below the linking threshold
    weak = event("acct_weak", events[-1]["ts"], "hi", client={"ip": "198.51.100.7", "asn": 64999, "country": "SG",
                                                                "user_agent": "python-httpx/0.27", "tls_fp": "other"})
    assert book.match(request_key_ids(weak, SECRET), weak["ts"]) is None


def test_ids_depend_on_the_deployment_key():
    ev = newcomer(NOW)
    assert request_key_ids(ev, SECRET) != request_key_ids(ev, b"another deployment")
    assert request_key_ids(ev, SECRET) == request_key_ids(ev, SECRET)


def test_no_key_blocks_with_a_ttl_of_zero():
    det = Detector(DetectionSettings(key_block_ttl_s=0), key_secret=SECRET)
    for ev in campaign_and_ordinary():
        det.process(ev)
    assert det.drain_key_blocks() == [] and det.stats["key_blocks"] == 0
    assert any(a.action == "block" for a in det.accounts.values())


def record(kind="pay", value="pm_1", *, weight=1.0, emitted_at=NOW, ttl_ms=60_000, cluster="c_0123456789ab"):
    return key_block_record((kind, value), SECRET, weight=weight, cluster_id=cluster, event_ts=emitted_at,
                            ttl_ms=ttl_ms, emitted_at=emitted_at, model_version="test")


def test_the_book_refuses_bad_records_and_keeps_the_newest():
    book = KeyBook()
    rec = record()
    kid = rec["key_id"]
    assert book.apply(None, orjson.dumps(rec)) == "invalid"
    assert book.apply(b"pm_1", orjson.dumps(rec)) == "invalid"  # not a key id
    assert book.apply(key_id(("pay", "other"), SECRET), orjson.dumps(rec)) == "invalid"  # not this record's
    assert book.apply(kid, orjson.dumps({**rec, "weight": 3})) == "invalid"
    assert book.apply(kid, b"{not json") == "invalid"
    assert book.invalid == {"no_key": 1, "bad_key": 1, "key_mismatch": 1, "schema": 1, "not_json": 1}
    assert len(book) == 0
    assert book.apply(kid, orjson.dumps(record(emitted_at=NOW + 10))) == "applied"
    assert book.apply(kid, orjson.dumps(record(weight=0.2, emitted_at=NOW))) == "stale"
    assert book.match([kid], NOW + 20) == ("c_0123456789ab", 1.0)
    assert book.apply(kid, None) == "deleted" and book.match([kid], NOW + 20) is None


def test_keys_of_two_clusters_do_not_add_up():
    book = KeyBook()
    a = record("ip24", "10.0.0", weight=0.5, cluster="c_aaaaaaaaaaaa")
    b = record("cohort", "x", weight=0.5, cluster="c_bbbbbbbbbbbb")
    for rec in (a, b):
        book.apply(rec["key_id"], orjson.dumps(rec))
    assert book.match([a["key_id"], b["key_id"]], NOW + 1) is None
    c = record("pay", "pm_9", weight=0.6, cluster="c_aaaaaaaaaaaa")
    book.apply(c["key_id"], orjson.dumps(c))
    assert book.match([a["key_id"], b["key_id"], c["key_id"]], NOW + 1) == ("c_aaaaaaaaaaaa", 1.1)


def test_expired_blocks_are_swept_so_the_book_stays_bounded():
    book = KeyBook()
    for i in range(3 * SWEEP_FROM):
        rec = record("ip24", f"10.{i // 256}.{i % 256}", emitted_at=NOW + i * 1000, ttl_ms=10_000)
        book.apply(rec["key_id"], orjson.dumps(rec))
    assert len(book) < SWEEP_FROM + 20  # only the blocks not yet expired, and those written since the last sweep


def limiter_with(book_records, keys_records):
    book = DecisionBook(wall_clock=lambda: NOW / 1000 + 1)
    for account, action in book_records:
        book.apply(account.encode(), _example_record(account, action, emitted_at=NOW, event_ts=NOW - 10))
    limiter = RateLimiter(book, Policy.from_settings(RateLimitSettings()), clock=lambda: 0.0,
                          wall_clock=lambda: NOW / 1000 + 1)
    for rec in keys_records:
        limiter.keys.apply(rec["key_id"], orjson.dumps(rec))
    return limiter


def test_the_limiter_applies_key_blocks_unless_the_account_holds_its_own_allow():
    rec = record()
    limiter = limiter_with([("acct_allowed", "allow"), ("acct_watched", "watch"), ("acct_blocked", "block")], [rec])
    keys = [rec["key_id"]]
    assert limiter.decide("acct_new", keys=keys)["reasons"][0]["code"] == "key_block"
    assert limiter.decide("acct_watched", keys=keys)["action"] == "block"
    allowed = limiter.decide("acct_allowed", keys=keys)
    assert (allowed["action"], allowed["allowed"]) == ("allow", True)
    blocked = limiter.decide("acct_blocked", keys=keys)  # its own record, with its own reasons
    assert blocked["action"] == "block" and blocked["reasons"][0]["code"] == "shared_template"
    assert limiter.decide("acct_new")["allowed"] is True  # no keys given: no key check


def test_a_merge_into_a_blocked_cluster_stamps_its_records_in_the_events_time():
    """Replay and the evaluation stamp records with the event's time (``emitted_at``); the key blocks a merge
    makes must be too, or the limiter's book takes them as newer than every later record of their keys."""
    det = Detector(key_secret=SECRET)
    events = campaign_and_ordinary()
    for ev in events:
        det.process(ev, emitted_at=ev["ts"])
    det.drain_key_blocks()
    t = events[-1]["ts"]
    pair = [event(f"acct_pair{i}", t + 1000 * (i + 1), "Tell me a joke",
                  billing={"payment_fp": "pm_pair", "tier": "build", "account_created_ts": t - 86_400_000},
                  client={"ip": f"198.51.100.{i + 1}", "asn": 64512, "country": "FR", "user_agent": "ua/1",
                          "tls_fp": "t13d_pair"})
            for i in range(2)]
    # An account of the pair that then pays with the blocked cluster's card: the pair's cluster merges into it.
    bridge = newcomer(t + 10_000, ip="198.51.100.9")
    bridge["account_id"] = "acct_pair0"
    made = []
    for ev in [*pair, bridge]:
        det.process(ev, emitted_at=ev["ts"])
        made += [(rec, ev["ts"]) for rec in det.drain_key_blocks()]
    assert made, "the bridge merged nothing into the blocked cluster"
    assert all(rec["emitted_at"] == ts for rec, ts in made)
