"""Cluster signals between workers (detector/signals.py): a campaign split over two detectors, as over two workers.

The campaign of ``test_detection.campaign_and_ordinary`` (40 accounts on 4 shared cards, templated
chain-of-thought prompts) is split by account over two detectors. Without signals each sees half of every
cluster; with them (delivered after every event, or in batches as a worker publishes them) each scores its
own accounts against the whole cluster, and a new account on one worker is blocked on first sight by a
cluster another worker blocked.
"""

from __future__ import annotations

import orjson
import pytest

from detector.detection import Detector
from detector.envelope import account_partition
from detector.schemas import InvalidEvent
from detector.settings import DetectionSettings, Settings
from detector.signals import ARRIVAL, MAX_PER_MESSAGE, decode_batch, encode_batches
from detector.streaming.routing import Router, Source
from tests.factory import BASE_TS, event
from tests.unit.test_detection import HOUR, campaign_and_ordinary, harvest_split_over_orgs

CAUGHT = ("throttle", "block")


def split_run(events, *, share: bool, batch: int = 1, settings: DetectionSettings | None = None):
    """Run ``events`` over two detectors holding the accounts by partition (2 partitions); with ``share``, each
    detector's signals reach the other after every ``batch`` events of its own."""
    dets = [Detector(settings or DetectionSettings(), share_clusters=share) for _ in range(2)]
    pending: list[list] = [[], []]
    for n, ev in enumerate(events):
        shard = account_partition(ev["account_id"], 2)
        dets[shard].process(ev, emitted_at=ev["ts"])
        if share:
            pending[shard] += dets[shard].drain_signals()
            if n % batch == 0:
                for i in (0, 1):
                    dets[1 - i].apply_signals(pending[i])
                    pending[i] = []
    return dets


def caught(dets, prefix: str) -> set[str]:
    return {aid for d in dets for aid, a in d.accounts.items() if aid.startswith(prefix) and a.action in CAUGHT}


def test_campaign_accounts_are_on_both_detectors():
    homes = {account_partition(f"acct_x{i:03d}", 2) for i in range(40)}
    assert homes == {0, 1}


@pytest.mark.parametrize("batch", [1, 50])
def test_with_signals_each_detector_sees_whole_clusters(batch):
    events = campaign_and_ordinary()
    shared = split_run(events, share=True, batch=batch)
    alone = split_run(events, share=False)
    one = Detector()
    for ev in events:
        one.process(ev)
    for i in (0, 1):
        x = next(a for a in shared[i].accounts if a.startswith("acct_x"))
        # Every detector's linker holds the whole campaign, as one detector's does.
        assert shared[i].linker.size(shared[i].linker.root(x)) == one.linker.size(one.linker.root(x))
        assert alone[i].linker.size(alone[i].linker.root(x)) < one.linker.size(one.linker.root(x))
    assert caught(shared, "acct_x") == caught([one], "acct_x")
    assert caught(shared, "acct_o") == set()


def test_a_new_account_is_blocked_on_first_sight_by_a_cluster_the_other_worker_blocked():
    events = campaign_and_ordinary()
    last = events[-1]["ts"]
    # A newcomer on the shared card of acct_x010..019, whose partition differs from where the cluster was blocked.
    newcomer = next(f"acct_new{i}" for i in range(100) if account_partition(f"acct_new{i}", 2) == 1)
    ev = event(newcomer, last + 1000, "Tell me a joke",
               billing={"payment_fp": "pm_shared_1", "tier": "build", "account_created_ts": last},
               client={"ip": "198.51.100.200", "asn": 64512, "country": "DE", "user_agent": "curl/8",
                       "tls_fp": "t13d_other"})
    # Worker 0 holds the cluster's blocked members; worker 1 holds only the newcomer and ordinary accounts.
    own = [e for e in events if account_partition(e["account_id"], 2) == 0]
    for share in (True, False):
        w0, w1 = Detector(share_clusters=share), Detector(share_clusters=share)
        for e in own:
            w0.process(e)
        assert caught([w0], "acct_x")
        w1.apply_signals(w0.drain_signals())
        rec = w1.process(ev)
        if share:
            assert rec is not None and rec["action"] == "block"
            assert any(r["code"] == "linked_to_blocked" for r in rec["reasons"])
        else:
            assert rec is None or rec["action"] not in CAUGHT


def test_an_account_another_worker_caught_makes_a_harvest_on_its_templates_cross_org():
    """The harvest split over two orgs (test_detection), one org per worker. An analyst's verdict on worker 0
    blocks org_h0's accounts; worker 1 learns they are caught from the signals, so they are suspects there and
    org_h1's harvesters are caught on ``harvest_cross_org``. Without sharing worker 1 sees no suspect."""
    events = harvest_split_over_orgs()
    cut = BASE_TS + 2 * HOUR
    for share in (True, False):
        w0, w1 = Detector(share_clusters=share), Detector(share_clusters=share)
        records, labelled = [], False
        for e in events:
            if e["ts"] >= cut and not labelled:
                w0.apply_label({"account_id": "acct_h00", "label": "attack", "ts": cut})
                labelled = True
            home = w1 if e["account_id"][-1] in "13579" else w0  # org_h1's harvesters (and a lab's accounts)
            rec = home.process(e, emitted_at=e["ts"])
            if home is w1 and rec is not None:
                records.append(rec)
            w1.apply_signals(w0.drain_signals())
            w0.apply_signals(w1.drain_signals())
        harvesters = [a for a in w1.accounts if a.startswith("acct_h")]
        assert len(harvesters) == 6
        if share:
            assert all(w1.accounts[a].action in CAUGHT for a in harvesters)
            assert "harvest_cross_org" in {c["code"] for r in records if r["action"] != "allow" for c in r["reasons"]}
        else:
            assert all(w1.accounts[a].action == "allow" for a in harvesters)


def test_signals_of_an_account_the_detector_holds_are_ignored():
    det = Detector(share_clusters=True)
    det.process(event("acct_a", BASE_TS))
    before = det.linker._keys["acct_a"]
    det.apply_signals([("e", "acct_a", BASE_TS + 1, [("pay", "pm_other")], [], ARRIVAL, None)])
    assert det.linker._keys["acct_a"] == before


def test_other_workers_accounts_are_evicted_like_own_ones():
    det = Detector(DetectionSettings(max_accounts=50), share_clusters=True)
    for i in range(500):
        det.apply_signals([("e", f"far{i}", BASE_TS + i, [("pay", f"pm_{i // 5}")], [], ARRIVAL, None)])
    assert len(det._foreign) <= 50
    assert det.linker.members() <= 50
    idle = Detector(DetectionSettings(idle_evict_s=3600), share_clusters=True)
    idle.apply_signals([("e", "old", BASE_TS, [("pay", "pm_1")], [], ARRIVAL, None)])
    idle.apply_signals([("e", "new", BASE_TS + 2 * HOUR, [("pay", "pm_2")], [], ARRIVAL, None)])
    assert not idle.linker.knows("old") and idle.linker.knows("new")


def test_a_detector_without_sharing_makes_no_signals():
    det = Detector()
    det.process(event("acct_a", BASE_TS))
    assert det.drain_signals() == []


def test_batches_round_trip_and_split_at_the_message_limit():
    signals = [("e", f"a{i}", BASE_TS, [("pay", "pm"), ("asn", 64500), ("cohort", (7, None)), ("tmpl", 2**63 + i)],
                [2**64 - 1], 127, "org_1") for i in range(MAX_PER_MESSAGE + 1)]
    messages = encode_batches("w1", signals)
    assert len(messages) == 2
    back = [s for m in messages for s in decode_batch(m)[1]]
    assert back == [(s[0], s[1], s[2], list(s[3]), s[4], s[5], s[6]) for s in signals]


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not_json"),
    (b"[]", "not_object"),
    (orjson.dumps({"schema_version": 1, "worker": "w", "signals": [["x", "a", 1, 1]]}), "schema"),
    (orjson.dumps({"schema_version": 1, "worker": "w", "signals": [["c", "a", 1, 8]]}), "schema"),
    (orjson.dumps({"schema_version": 1, "worker": "w", "signals": [["e", "a", 1, [["zz", "v"]], [], 0, None]]}),
     "schema"),
    (orjson.dumps({"schema_version": 1, "worker": "w", "signals": [["e", "a", 1, [["cohort", [1]]], [], 0, None]]}),
     "schema"),
    (orjson.dumps({"schema_version": 1, "worker": "w", "signals": [["e", "a", 1, [], [-1], 0, None]]}), "schema"),
])
def test_bad_batches_are_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidEvent) as info:
        decode_batch(raw)
    assert info.value.reason == reason


def test_router_skips_its_own_batches_and_dead_letters_bad_ones():
    router = Router(Detector(share_clusters=True), Settings(), worker_id="w1", clock=lambda: 1775000000.0)
    signals = [("e", f"x{i}", BASE_TS, [("pay", "pm_9")], [], ARRIVAL, None) for i in range(3)]
    [own] = encode_batches("w1", signals)
    [other] = encode_batches("w2", signals)
    src = Source("cluster-signals", 0, 5)
    assert router.on_signals(own, b"w1", src) is None and router.stats["signals_applied"] == 0
    assert router.on_signals(own, None, src) is None and router.stats["signals_applied"] == 0  # by its payload
    assert router.on_signals(other, b"w2", src) is None and router.stats["signals_applied"] == 3
    dead = router.on_signals(b'{"schema_version": 1}', b"w2", src)
    assert dead is not None and dead.topic == "api-calls.dlq"
    letter = orjson.loads(dead.value)
    assert (letter["reason"], letter["source_topic"], letter["source_offset"]) == ("schema", "cluster-signals", 5)
    assert router.stats["signal_batches_invalid"] == 1


def test_router_publishes_the_detectors_signals_keyed_by_worker():
    router = Router(Detector(share_clusters=True), Settings(), worker_id="w1")
    router.on_message(orjson.dumps(event("acct_a", BASE_TS)), b"acct_a", Source("api-calls", 0, 0))
    [out] = router.take_signals()
    assert (out.topic, out.key) == ("cluster-signals", b"w1")
    worker, signals = decode_batch(out.value)
    assert worker == "w1" and [s[1] for s in signals] == ["acct_a"]
    assert router.take_signals() == []


def _leaves(obj, path=()):
    """Every position in a nested list/dict, with its path."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _replaced(obj, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: _replaced(obj[head], rest, value)}
    return [*obj[:head], _replaced(obj[head], rest, value), *obj[head + 1:]]


def test_the_fast_path_accepts_nothing_the_schema_refuses():
    """Every position of a valid batch replaced by each of a set of awkward values: whatever the hand-written
    check accepts, the compiled schema accepts too (and the two decodes agree)."""
    import fastjsonschema

    from detector.schemas import validator
    from detector.signals import SIGNALS_SCHEMA, _plainly_valid

    valid = orjson.loads(encode_batches("w1", [
        ("e", "acct_a", BASE_TS, [("pay", "pm"), ("asn", 64500), ("cohort", (7, None)), ("tmpl", 2**63)],
         [2**64 - 1, 5], 127, "org_1"),
        ("c", "acct_a", BASE_TS, 7),
        ("l", "acct_a", BASE_TS, 1, {"shared_template": 0.5, "cot_requests": 1})])[0])
    awkward = [None, -1, 0, 1, 8, 128, -2**63, 1.5, True, "", "e", "c", "x" * 300, [], [1], ["pay"], {}, "pay"]
    checked = accepted = 0
    for path in _leaves(valid):
        for value in awkward:
            candidate = _replaced(valid, path, value)
            fast = _plainly_valid(orjson.loads(orjson.dumps(candidate)))
            checked += 1
            if fast is None:
                continue
            accepted += 1
            try:
                validator(SIGNALS_SCHEMA)(candidate)
            except fastjsonschema.JsonSchemaException as exc:
                raise AssertionError(f"fast path accepted what the schema refuses at {path}={value!r}: {exc}") from None
    assert checked > 500 and 0 < accepted < checked


def test_link_keys_travel_when_new_and_every_ten_minutes_so_a_late_worker_learns_them():
    from detector.detection import KEYS_EVERY_MS

    det = Detector(share_clusters=True)
    card = {"payment_fp": "pm_team", "tier": "build", "account_created_ts": BASE_TS - HOUR}
    times = [BASE_TS, BASE_TS + 60_000, BASE_TS + 120_000, BASE_TS + KEYS_EVERY_MS + 120_000]
    for ts in times:
        det.process(event("acct_a", ts, billing=card))
    sent = [bool(s[3]) for s in det.drain_signals()]
    assert sent[0] and not sent[1] and not sent[2] and sent[3]
    # A worker that starts after acct_a's first event links it at its next periodic send.
    late = Detector(share_clusters=True)
    late.apply_signals([("e", "acct_b", BASE_TS, [("pay", "pm_team")], [], ARRIVAL, None)])
    det.process(event("acct_a", times[-1] + 1000, billing=card))
    late.apply_signals(det.drain_signals())  # within the period: no keys, not linked yet
    assert late.linker.root("acct_a") != late.linker.root("acct_b")
    det.process(event("acct_a", times[-1] + KEYS_EVERY_MS, billing=card))
    late.apply_signals(det.drain_signals())
    assert late.linker.root("acct_a") == late.linker.root("acct_b")


def test_every_worker_learns_every_analyst_verdict():
    events = campaign_and_ordinary(n_attack=0, n_ordinary=20)
    a, b = Detector(share_clusters=True), Detector(share_clusters=True)
    for ev in events:
        (a if account_partition(ev["account_id"], 2) == 0 else b).process(ev)
    b.apply_signals(a.drain_signals())
    labelled = next(aid for aid in a.accounts)
    a.apply_label({"account_id": labelled, "label": "attack", "ts": BASE_TS + 30 * HOUR})
    assert b.fusion.labels_learned == 0
    b.apply_signals(a.drain_signals())
    assert b.fusion.labels_learned == a.fusion.labels_learned == 1
    assert dict(b.fusion.model.weights) == dict(a.fusion.model.weights)
    assert b.fusion.model.intercept == a.fusion.model.intercept


def test_sketch_keys_of_a_batch_land_in_the_window_of_their_event():
    """Signals folded in together count their sketch keys as if one by one, across a window boundary too."""
    from detector.content import ContentIndex

    day = 86_400_000
    signals = [("e", f"far{i}", BASE_TS + i * (day // 100), (("pay", f"pm_{i}"),), tuple(range(i, i + 70)), 0, None)
               for i in range(300)]  # three days: two rotations, 70 keys a signal (numpy's path)
    together = Detector(share_clusters=True, content=ContentIndex(width=1 << 12))
    together.apply_signals(signals)
    one_by_one = Detector(share_clusters=True, content=ContentIndex(width=1 << 12))
    for s in signals:
        one_by_one.apply_signals([s])
    assert together.content._new == one_by_one.content._new and together.content._old == one_by_one.content._old
    assert sum(together.content._new) > 0


def test_prompts_of_the_other_workers_caught_accounts_count_as_echoes_here():
    """The campaign's accounts live on both detectors; once caught, the prompts each sends reach the other
    detector's filter of caught accounts' prompts (detector.content.CaughtContent), so an account on either
    detector re-sending one of them, reworded, echoes a caught account. Without sharing, only its own half's."""
    import random

    from detector.fingerprints import fingerprint
    from tests.factory import KEY
    from tests.unit.test_detection import TEMPLATE, campaign_event

    rng = random.Random(8)
    events, tasks = campaign_and_ordinary(hours=24), [[], []]
    for i in range(40):  # after 12 h (caught by then), each campaign account sends long tasks of its own
        aid = f"acct_x{i:03d}"
        for h in range(13, 24, 3):
            task = " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randrange(3, 9)))
                            for _ in range(150))
            tasks[account_partition(aid, 2)].append(task)
            events.append(campaign_event(i, BASE_TS + h * HOUR, TEMPLATE.format(task)))
    events.sort(key=lambda e: e["ts"])
    shared, alone = split_run(events, share=True), split_run(events, share=False)
    assert caught(shared, "acct_x") and caught(alone, "acct_x")

    def echoed(det, texts):
        return sum(det.caught_content.hits([int(b, 16) for b in fingerprint(t, KEY)["bands"]], BASE_TS + 24 * HOUR)
                   >= 2 for t in texts)

    for here in (0, 1):
        reworded = [f"Please help with this. {t} Explain briefly." for t in tasks[1 - here]]  # sent over there
        assert len(reworded) > 20
        assert echoed(shared[here], reworded) > len(reworded) // 2
        assert echoed(alone[here], reworded) < len(reworded) // 10


def _restarted(events, *, warm: bool):
    """A worker that held every account of ``events`` restarts: its accounts come back from their snapshots (the
    changelog) and, with ``warm``, its cross-account state from its own signals (the warm start, which folds
    them in before the accounts are restored)."""
    old = Detector(track_changes=True, share_clusters=True)
    for e in events:
        old.process(e)
    snapshots = [(aid, blob) for aid, _, blob in old.drain_changes() if blob is not None]
    new = Detector(share_clusters=True)
    if warm:
        new.apply_signals(old.drain_signals())
    assert new.restore(snapshots) == len(old.accounts)
    return old, new


def test_a_warm_start_keeps_a_blocked_cluster_blocking_newcomers_a_cold_one_does_not():
    events = campaign_and_ordinary()
    last = events[-1]["ts"]
    ev = event("acct_new", last + 1000, "Tell me a joke",
               billing={"payment_fp": "pm_shared_1", "tier": "build", "account_created_ts": last},
               client={"ip": "198.51.100.200", "asn": 64512, "country": "DE", "user_agent": "curl/8",
                       "tls_fp": "t13d_other"})
    for warm in (True, False):
        old, new = _restarted(events, warm=warm)
        assert caught([new], "acct_x") == caught([old], "acct_x") != set()  # the accounts' own state: both
        rec = new.process(ev)
        if warm:
            assert rec is not None and rec["action"] == "block"
            assert any(r["code"] == "linked_to_blocked" for r in rec["reasons"])
        else:
            assert rec is None or rec["action"] not in CAUGHT


def test_after_a_warm_start_a_caught_account_is_not_counted_twice_in_its_cluster():
    events = campaign_and_ordinary()
    old, new = _restarted(events, warm=True)
    x = next(a for a in sorted(old.accounts) if a.startswith("acct_x") and old.accounts[a].action == "block")

    def tallies(det):
        cluster = det.clusters[det.linker.root(x)]
        return cluster.throttled_members, cluster.blocked_members

    assert tallies(new) == tallies(old)
    last = next(e for e in reversed(events) if e["account_id"] == x)
    again = {**last, "event_id": "again", "ts": events[-1]["ts"] + 5}
    old.process(dict(again))
    new.process(dict(again))
    assert tallies(new) == tallies(old)
