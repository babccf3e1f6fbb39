"""The detection core on hand-made traffic: a small coordinated campaign against ordinary accounts."""

import random

import pytest

from detector import features as feat
from detector.clusters import ClusterState
from detector.detection import CROSS_ORG_PACE_EVENTS, ONE_ORG_DISCOUNT, SETTLED_RESCORE_MS, Detector
from detector.fingerprints import fingerprint
from detector.schemas import SCORE_SCHEMA, validate
from detector.settings import DetectionSettings
from tests.factory import BASE_TS, event

HOUR = 3_600_000
TEMPLATE = ("You are a senior software engineer. Think step by step and show your full reasoning before the "
            "final answer. Then write production-quality code. Task: {}")
TASKS = ["reverse a linked list", "parse ISO dates", "merge k sorted lists", "LRU cache", "trie insert",
         "binary search bounds", "topological sort", "rate limiter", "json diff", "matrix rotate"]
WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar", "papa"]
ORDINARY = ["What's the capital of Peru?", "Write a poem about rain", "How do I bake sourdough bread?",
            "Summarize the plot of Hamlet", "Give me three gift ideas for my dad", "Why is the sky blue?",
            "Translate 'good morning' to German", "Plan a 3-day trip to Rome", "What is a Roth IRA?"]


def campaign_event(i, ts, text):
    """An event of the campaign's account ``i``: fresh accounts, ten to a card, on one scripted network."""
    return event(f"acct_x{i:03d}", ts, text,
                 billing={"payment_fp": f"pm_shared_{i // 10}", "tier": "build", "account_created_ts": BASE_TS - HOUR},
                 client={"ip": f"203.0.113.{i % 8}", "asn": 64999, "country": "SG", "user_agent": "python-httpx/0.27",
                         "tls_fp": "t13d_bot"},
                 output_tokens=4096, response={"stop_reason": "max_tokens"})


def proxy_events(rng, aid, per_hour, net, text, out_tokens):
    """A proxy account of an org of its own (old, on its own card and network ``net``) from hour 12 to 36 at
    ``per_hour`` calls an hour, each prompt from ``text()``."""
    return [event(aid, BASE_TS + h * HOUR + rng.randrange(HOUR), text(), org_id=f"org_{aid}",
                  output_tokens=rng.randrange(*out_tokens),
                  billing={"payment_fp": f"pm_{aid}", "tier": "scale",
                           "account_created_ts": BASE_TS - 300 * 86_400_000},
                  client={"ip": f"198.51.{net}.7", "asn": 16509 + net, "country": "US", "user_agent": f"{aid}/1.0",
                          "tls_fp": None})
            for h in range(12, 36) for _ in range(per_hour)]


def campaign_and_ordinary(n_attack=40, n_ordinary=60, hours=24, seed=1):
    rng = random.Random(seed)
    events = []
    for i in range(n_attack):
        for h in range(0, hours, 2):
            ts = BASE_TS + h * HOUR + rng.randrange(HOUR)
            task = rng.choice(TASKS) + " for " + " ".join(rng.sample(WORDS, 4))
            events.append(campaign_event(i, ts, TEMPLATE.format(task)))
    for j in range(n_ordinary):
        aid = f"acct_o{j:03d}"
        for _ in range(rng.randrange(3, 15)):
            ts = BASE_TS + rng.randrange(8, 18) * HOUR + rng.randrange(HOUR)
            events.append(event(aid, ts, rng.choice(ORDINARY) + " " + " ".join(rng.sample(WORDS, 3)),
                                client={"ip": f"192.0.2.{j}", "asn": 64500 + j, "country": "US",
                                        "user_agent": "Mozilla/5.0", "tls_fp": "t13d_browser"}))
    events.sort(key=lambda e: e["ts"])
    return events


def run(events, **kw):
    det = Detector(DetectionSettings(**kw))
    records = [r for ev in events if (r := det.process(ev, emitted_at=ev["ts"])) is not None]
    return det, records


def test_campaign_is_blocked_and_ordinary_accounts_are_allowed():
    det, records = run(campaign_and_ordinary())
    actions = {aid: a.action for aid, a in det.accounts.items()}
    attack = [a for a in actions if a.startswith("acct_x")]
    blocked = [a for a in attack if actions[a] in ("throttle", "block")]
    flagged_ordinary = [a for a, act in actions.items() if a.startswith("acct_o") and act in ("throttle", "block")]
    assert len(blocked) / len(attack) >= 0.9
    assert flagged_ordinary == []
    for rec in records:
        validate(SCORE_SCHEMA, rec)


def test_records_carry_reasons_and_cluster():
    _, records = run(campaign_and_ordinary())
    blocks = [r for r in records if r["action"] == "block"]
    assert blocks
    codes = {reason["code"] for r in blocks for reason in r["reasons"]}
    assert codes & {"cluster_templates", "shared_template", "cluster_new_accounts", "linked_to_blocked"}
    assert all(r["cluster_id"] for r in blocks)
    assert all(0 < reason["weight"] <= 1 for r in blocks for reason in r["reasons"])


def test_new_account_linked_to_blocked_cluster_is_blocked_on_first_sight():
    events = campaign_and_ordinary()
    det, _ = run(events)
    last = events[-1]["ts"]
    newcomer = event("acct_newcomer", last + 1000, "Tell me a joke",
                     billing={"payment_fp": "pm_shared_1", "tier": "build", "account_created_ts": last},
                     client={"ip": "203.0.113.3", "asn": 64999, "country": "SG", "user_agent": "curl/8",
                             "tls_fp": "t13d_bot"})
    rec = det.process(newcomer)
    assert rec is not None and rec["action"] == "block"
    assert any(r["code"] == "linked_to_blocked" for r in rec["reasons"])


def test_allowlist_overrides():
    det, _ = run(campaign_and_ordinary(), allowlist=("acct_x001",))
    assert det.accounts["acct_x001"].action == "allow"
    assert det.accounts["acct_x002"].action in ("throttle", "block")


def test_analyst_labels_block_and_allow():
    det, _ = run(campaign_and_ordinary(n_attack=0))
    rec = det.apply_label({"account_id": "acct_o001", "label": "attack", "ts": BASE_TS + 30 * HOUR})
    assert rec["action"] == "block" and rec["reasons"][0]["code"] == "analyst_label"
    assert det.fusion.labels_learned == 1
    rec = det.apply_label({"account_id": "acct_o001", "label": "benign", "ts": BASE_TS + 31 * HOUR})
    assert rec["action"] == "allow"
    assert det.process(event("acct_o001", BASE_TS + 32 * HOUR)) is None


def test_same_input_same_output():
    events = campaign_and_ordinary(n_attack=15, n_ordinary=15)
    assert run(events)[1] == run(events)[1]


def test_account_flood_keeps_state_bounded():
    det = Detector(DetectionSettings(max_accounts=500))
    for i in range(3000):
        det.process(event(f"acct_flood{i}", BASE_TS + i))
    assert len(det.accounts) == 500
    assert det.stats["evicted"] == 2500


def test_least_recently_active_are_evicted_first(monkeypatch):
    """Accounts are evicted in the order of their last events (an OrderedDict's move_to_end before), also
    across the read-ahead of the next accounts to evict, a restore and a rebalance."""
    from collections import OrderedDict

    monkeypatch.setattr("detector.detection.EVICT_AHEAD", 4)  # read ahead many times over
    rng = random.Random(5)
    det = Detector(DetectionSettings(max_accounts=20), track_changes=True)
    order: OrderedDict[str, None] = OrderedDict()
    for i in range(400):
        aid = f"acct_{rng.randrange(40)}"
        det.process(event(aid, BASE_TS + i), position=(rng.randrange(3), i))
        order[aid] = None
        order.move_to_end(aid)
        while len(order) > 20:
            order.popitem(last=False)
        if i == 200:  # a restore puts the idlest first; a rebalance drops a shard's accounts
            gone = [aid for aid, acct in det.accounts.items() if acct.shard == 0]
            blobs = [(aid, blob) for aid, _, blob in det.drain_changes() if blob is not None and aid in gone]
            assert det.drop_shards([0]) == len(gone)
            assert det.restore(blobs) == len(gone)
            for aid in reversed([aid for aid in order if aid in gone]):  # ts grows with i: the idlest first
                order.move_to_end(aid, last=False)
        assert list(det.accounts) == list(order)


def test_idle_accounts_are_evicted():
    det = Detector(DetectionSettings(idle_evict_s=3600))
    det.process(event("acct_old", BASE_TS))
    det.process(event("acct_new", BASE_TS + 2 * HOUR))
    assert list(det.accounts) == ["acct_new"]



def harvest_and_lab(hours=4, seed=3, start=BASE_TS, orgs=2):
    """Twelve old, high-tier accounts in two orgs on two cards (``orgs=1``: one org, one card), pulling long
    answers ~24 times an hour each and asking for reasoning now and then (a model hopper before the
    release), and a lab of five researchers on one card with short sessions, all from ``start``."""
    rng = random.Random(seed)
    events = []
    for i in range(12):
        aid = f"acct_h{i:02d}"
        for k in range(hours * 24):
            ts = start + k * 150_000 + rng.randrange(150_000)
            task = f"{rng.choice(TASKS)} with {' '.join(rng.sample(WORDS, 5))} case {i}-{k}"
            if rng.random() < 0.3:
                task += ". Think step by step and explain your reasoning."
            events.append(event(aid, ts, task, org_id=f"org_h{i % orgs}", output_tokens=rng.randrange(1800, 3200),
                                billing={"payment_fp": f"pm_h{i % orgs}", "tier": "scale",
                                         "account_created_ts": BASE_TS - 40 * 86_400_000},
                                client={"ip": f"198.18.7.{i}", "asn": 16509, "country": "US",
                                        "user_agent": "anthropic-python/0.49.0", "tls_fp": None}))
    for j in range(5):
        aid = f"acct_lab{j}"
        for _ in range(3):
            ts = start + rng.randrange(hours * HOUR)
            for _ in range(rng.randrange(4, 12)):
                ts += rng.randrange(20_000, 120_000)
                events.append(event(aid, ts, rng.choice(ORDINARY) + " " + " ".join(rng.sample(WORDS, 3)),
                                    org_id="org_lab", output_tokens=rng.randrange(200, 1500),
                                    billing={"payment_fp": "pm_lab", "tier": "tier-3",
                                             "account_created_ts": BASE_TS - 300 * 86_400_000},
                                    client={"ip": f"192.0.2.{j}", "asn": 3, "country": "US",
                                            "user_agent": "python-requests/2.32.3", "tls_fp": None}))
    events.sort(key=lambda e: e["ts"])
    return events


def test_linked_accounts_harvesting_long_answers_are_caught_within_hours():
    det, records = run(harvest_and_lab())
    harvesters = [a for a in det.accounts if a.startswith("acct_h")]
    assert all(det.accounts[a].action in ("throttle", "block") for a in harvesters)
    assert all(det.accounts[a].action == "allow" for a in det.accounts if a.startswith("acct_lab"))
    first = min(r["event_ts"] for r in records if r["action"] in ("throttle", "block"))
    assert first - BASE_TS < 3 * HOUR
    codes = {c["code"] for r in records if r["account_id"].startswith("acct_h") for c in r["reasons"]}
    assert "cluster_harvest" in codes


def test_one_org_harvesting_long_answers_on_its_own_card_is_its_own_pipeline():
    """The same traffic from one organisation paying for all twelve accounts: a company's content pipeline
    (the simulator's content_pipeline look-alikes) is not throttled for coordination within itself. Two
    orgs running it together are (the test above)."""
    det, records = run(harvest_and_lab(orgs=1))
    harvesters = [a for a in det.accounts if a.startswith("acct_h")]
    assert len(harvesters) == 12 and det.linker.size(det.linker.root(harvesters[0])) == 12
    assert all(det.accounts[a].action in ("allow", "watch") for a in harvesters)


def test_a_one_org_harvest_from_rotating_residential_networks_is_caught():
    """The same one-org harvest, each call from another of twelve residential and mobile networks (the
    many_asns variant: proxies rotated so that no network links the accounts): a company's pipeline runs
    from its own servers, so rotation ends the one-org presumption and is evidence of its own."""
    nets = [7922, 701, 20115, 22773, 7018, 2856, 3320, 3215, 55836, 21928, 22394, 26615]
    rng = random.Random(5)

    def rotated(e):
        asn = rng.choice(nets)
        return {**e, "client": {**e["client"], "asn": asn, "ip": f"203.{asn % 256}.{rng.randrange(256)}.9"}}

    events = [rotated(e) if e["account_id"].startswith("acct_h") else e for e in harvest_and_lab(orgs=1)]
    det, records = run(events)
    harvesters = [a for a in det.accounts if a.startswith("acct_h")]
    assert len(harvesters) == 12 and all(det.accounts[a].action in ("throttle", "block") for a in harvesters)
    assert "network_rotation" in {c["code"] for r in records if r["action"] != "allow" for c in r["reasons"]}
    assert all(det.accounts[a].action == "allow" for a in det.accounts if a.startswith("acct_lab"))


def test_a_one_org_harvest_that_moves_to_a_new_model_at_once_is_caught():
    """One org's harvest moved to a model released within the hour (first seen after the stream's first
    hour): harvest_new_model is not discounted for one org, as a company's pipeline is not moved at once."""
    events = harvest_and_lab(hours=6, orgs=1)
    release = BASE_TS + 3 * HOUR
    moved = [{**e, "model": "frontier-next"} if e["account_id"].startswith("acct_h") and e["ts"] >= release else e
             for e in events]
    det, records = run(moved)
    caught = [a for a in det.accounts if a.startswith("acct_h") and det.accounts[a].action in ("throttle", "block")]
    assert len(caught) == 12
    assert "harvest_new_model" in {c["code"] for r in records if r["action"] != "allow" for c in r["reasons"]}
    assert all(det.accounts[a].action == "allow" for a in det.accounts if a.startswith("acct_lab"))


def test_a_harvest_that_starts_on_the_hour_is_caught_before_two_clock_hours_are_up():
    """A pace kept up from 00:00 has been kept up 1.7 hours at 01:42, not one (kept_up_hours), and its
    rate is read over the time it has been seen (hourly_count), not from a count still filling up. Here
    the campaign starts with the detector, on a clock hour: whole clock hours alone held it until 02:00."""
    start = BASE_TS - BASE_TS % HOUR + HOUR
    det, records = run(harvest_and_lab(hours=3, start=start))
    first = min(r["event_ts"] for r in records if r["action"] in ("throttle", "block"))
    assert first - start < 2 * HOUR
    assert all(det.accounts[a].action == "allow" for a in det.accounts if a.startswith("acct_lab"))


def test_two_throttled_members_block_their_cluster():
    """Two members of a cluster of three over the throttle line block the cluster: the third is blocked on
    its next event. One throttled member does not."""
    card = {"payment_fp": "pm_trio", "tier": "build"}
    young, old = BASE_TS - HOUR, BASE_TS - 400 * 86_400_000

    def trio(n_young):
        det = Detector(DetectionSettings(rescore_ms=0))
        # Young accounts score 0.73 (throttle, short of block) on this weight alone; old ones nothing. (Without
        # caught_card, which would block the second for the first on their card: the rule here is the cluster's.)
        det.fusion._weights = {**det.fusion._weights, "young_account": 6.5, "caught_card": 0.0}
        det.process(event("acct_old", BASE_TS, billing={**card, "account_created_ts": old}))
        for i in range(2):
            aid, created = (f"acct_young{i}", young) if i < n_young else (f"acct_old{i}", old)
            det.process(event(aid, BASE_TS + 1000 * (i + 1), billing={**card, "account_created_ts": created}))
        rec = det.process(event("acct_old", BASE_TS + 10_000, billing={**card, "account_created_ts": old}))
        return det, rec

    det, rec = trio(2)
    assert [det.accounts[f"acct_young{i}"].action for i in range(2)] == ["throttle", "throttle"]
    assert rec is not None and rec["action"] == "block"
    assert any(r["code"] == "linked_to_blocked" for r in rec["reasons"])
    one, rec = trio(1)
    assert one.accounts["acct_young0"].action == "throttle"
    assert rec is None and one.accounts["acct_old"].action == "allow"


def test_a_card_opening_an_account_a_day_counts_them_after_they_are_evicted():
    """A campaign rotating daily keeps one account at work on its card, and the linker forgets the idle ones:
    fresh_card counts the new accounts the card brought in within two weeks, not the two or three live on it,
    and card_cycling those of them already dropped."""
    det = Detector(DetectionSettings(idle_evict_s=2 * 86_400, rescore_ms=0))
    card = {"payment_fp": "pm_chain", "tier": "free"}
    day = 86_400_000
    for i in range(20):
        aid, start = f"acct_chain{i:02d}", BASE_TS + i * day
        for k in range(20):
            det.process(event(aid, start + k * HOUR, billing={**card, "account_created_ts": start - HOUR},
                              client={"ip": f"203.0.113.{i}", "asn": 64999, "country": "SG",
                                      "user_agent": "python-httpx/0.27", "tls_fp": "t13d_bot"}))
    last, ts = "acct_chain19", BASE_TS + 19 * day + 19 * HOUR
    assert det.linker.card_sharers(last) <= 3
    acct = det.accounts[last]
    f = feat.features(acct.state, ts)
    root = det.linker.root(last)
    evidence, values, _ = det._evidence(f, 0.0, det.clusters.get(root) or ClusterState(), root, ts, last)
    assert values["fresh_card"] == 14  # first seen within the 14 days before: days 6 to 19, itself included
    assert evidence["fresh_card"] > 0.3
    # ... of which all but those still held (idle for under two days) went quiet: card cycling, in full.
    assert values["card_cycling"] == 14 - det.linker.card_sharers(last) >= 11
    assert evidence["card_cycling"] == 1.0


def test_a_new_account_on_an_ip_range_that_caught_accounts_fill_is_near_them():
    """A campaign opening accounts day after day on its hosting ranges makes each range common to the linker (it
    weighs a range by how few hold it), so a new card's first account there is barely tied to the blocked
    campaign. Where the range's recent holders are mostly caught, a new personal account on it counts the range in
    full toward near_blocked; an old account there, and a new one on a range of ordinary accounts, do not."""
    from detector.clusters import KEY_KINDS, key_weight

    det, _ = run(campaign_and_ordinary())
    assert det.clusters[det.linker.root("acct_x001")].blocked
    ts = BASE_TS + 26 * HOUR
    young, old = ts - 5 * HOUR, ts - 400 * 86_400_000
    # Each on its own card, network and client (so none links to another), sending the same template of theirs
    # (no band of the campaign's).
    newcomers = {"acct_new": ("203.0.113.77", young, 64991), "acct_old": ("203.0.113.8", old, 64992),
                 "acct_elsewhere": ("192.0.2.200", young, 64993)}
    own = ("You maintain the release notes of a large open-source project. Rewrite the note below for the changelog,"
           " in the imperative mood, under forty words, with the issue number last. Note: {}")
    for k in range(4):
        for aid, (ip, created, asn) in newcomers.items():
            det.process(event(aid, ts + k * 60_000, own.format(TASKS[k] + " for golf"),
                              billing={"payment_fp": f"pm_{aid}", "tier": "free", "account_created_ts": created},
                              client={"ip": ip, "asn": asn, "country": "SG", "user_agent": f"{aid}/1", "tls_fp": None}))
    end = ts + 4 * 60_000
    evidence, values = _evidence_at(det, "acct_new", end)
    weight = key_weight("ip24", det.linker.degree(("ip24", "203.0.113")))
    assert weight < values["near_blocked"] == KEY_KINDS["ip24"][0]
    assert evidence["near_blocked"] > 0.5
    _, old = _evidence_at(det, "acct_old", end)  # created 400 days ago: the range at its weight
    assert old["near_blocked"] == pytest.approx(weight)
    _, elsewhere = _evidence_at(det, "acct_elsewhere", end)  # a range ordinary accounts fill
    assert "near_blocked" not in elsewhere


def test_a_new_account_with_the_campaigns_range_and_client_counts_its_templates_from_the_first():
    """On a range that caught accounts fill, a new personal account that also calls with their client (user agent
    and TLS fingerprint) counts its templated share toward near_blocked from its first templated prompt, not from a
    fifth of its traffic: the campaign's own set-up on a fresh card, mixing in prompts of its own. So does one that
    is already half-way to the campaign on other keys (its network and sign-up hour). A newcomer on the range with a
    client of its own (a VPN exit's or a host's other customer) counts it from a fifth, as before."""
    det, _ = run(campaign_and_ordinary())
    assert det.clusters[det.linker.root("acct_x001")].blocked
    rng = random.Random(4)
    ts = BASE_TS + 26 * HOUR
    bot = {"user_agent": "python-httpx/0.27", "tls_fp": "t13d_bot"}  # the campaign's client (campaign_event)
    own = ("You maintain the release notes of a large open-source project. Rewrite the note below for the changelog,"
           " in the imperative mood, under forty words, with the issue number last. Note: {}")
    # Each on a card and an ASN of its own; the third, elsewhere, makes their template a shared one.
    newcomers = {"acct_kit": ("203.0.113.77", bot), "acct_vpn": ("203.0.113.78", {"user_agent": "Mozilla/5.0",
                                                                                 "tls_fp": "t13d_browser"}),
                 "acct_peer": ("192.0.2.201", {"user_agent": "acct_peer/1", "tls_fp": None}),
                 "acct_kin": ("203.0.113.79", {**bot, "tls_fp": None})}
    # acct_kin signed up in the campaign's hour on its network (campaign_event): the range and that cohort put it
    # half-way to the blocked cluster (toward 0.5) before the range counts in full. (With the campaign's TLS
    # fingerprint too it would link into the cluster.)
    joined = {"acct_kin": (BASE_TS - HOUR, 64999)}
    for k in range(10):
        for n, (aid, (ip, client)) in enumerate(newcomers.items()):
            topic = "chess" if aid == "acct_kin" else "golf"  # its own fill: a fourth sender would make it exact
            text = (own.format(f"{TASKS[k]} for {topic}") if k % 3 == 0
                    else " ".join(rng.choice(WORDS) for _ in range(40)))
            created, asn = joined.get(aid, (ts - 5 * HOUR, 64980 + n))
            det.process(event(aid, ts + k * 60_000, text,
                              billing={"payment_fp": f"pm_{aid}", "tier": "free", "account_created_ts": created},
                              client={"ip": ip, "asn": asn, "country": "SG", **client}))
    end = ts + 10 * 60_000
    kit, kit_values = _evidence_at(det, "acct_kit", end)
    vpn, vpn_values = _evidence_at(det, "acct_vpn", end)
    kin, _ = _evidence_at(det, "acct_kin", end)
    assert kit_values["near_blocked"] == vpn_values["near_blocked"]  # the range, in full, for both
    assert min(kit["near_blocked"], kin["near_blocked"]) >= 0.6 > 0.4 > vpn["near_blocked"]


def test_members_throttled_on_echoes_alone_do_not_block_their_cluster():
    """Two of a lab's three accounts on one card re-send what a caught account sent (public prompts a campaign
    sends too) and are throttled on that: the echo is about their own prompts, so the lab's third account is not
    blocked with them, as two members throttled on other evidence would block it
    (test_two_throttled_members_block_their_cluster)."""
    rng = random.Random(3)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(80)]
    bot = {"ip": "203.0.113.9", "asn": 64999, "country": "SG", "user_agent": "python-httpx/0.27", "tls_fp": "t13d_bot"}
    card = {"payment_fp": "pm_lab", "tier": "build", "account_created_ts": BASE_TS - 400 * 86_400_000}
    det = Detector(DetectionSettings(rescore_ms=0))
    det.process(event("acct_caught", BASE_TS, client=bot))
    det.apply_label({"account_id": "acct_caught", "label": "attack", "ts": BASE_TS})
    for i, text in enumerate(prompts):  # a caught account's prompts
        det.process(event("acct_caught", BASE_TS + 1000 + i, text, client=bot))
    # On this weight the lab's two busy accounts reach throttle (0.72) on their echoes alone.
    det.fusion._weights = {**det.fusion._weights, "echoes_caught": 6.8}
    det.process(event("acct_lab2", BASE_TS + 100_000, billing=card))
    for i, text in enumerate(prompts):
        for j in range(2):
            det.process(event(f"acct_lab{j}", BASE_TS + HOUR + i * 40_000 + j, text, billing=card,
                              client={"ip": f"198.51.100.{j}", "asn": 64500, "country": "US",
                                      "user_agent": "Mozilla/5.0", "tls_fp": "t13d_browser"}))
    assert [det.accounts[f"acct_lab{j}"].action for j in range(2)] == ["throttle", "throttle"]
    assert det.linker.root("acct_lab0") == det.linker.root("acct_lab2") != det.linker.root("acct_caught")
    rec = det.process(event("acct_lab2", BASE_TS + 5 * HOUR, billing=card))
    assert rec is None and det.accounts["acct_lab2"].action == "allow"
    assert not det.clusters[det.linker.root("acct_lab2")].blocked


def test_an_analyst_attack_verdict_holds_on_the_accounts_next_calls():
    """An attack verdict on an account alone (no cluster to block) is not undone by its next, ordinary-looking
    call; a benign verdict lifts it."""
    det = Detector()
    det.process(event("acct_1", BASE_TS))
    det.apply_label({"account_id": "acct_1", "label": "attack", "ts": BASE_TS + HOUR})
    assert det.linker.size(det.linker.root("acct_1")) == 1
    assert det.process(event("acct_1", BASE_TS + 2 * HOUR)) is None
    assert det.accounts["acct_1"].action == "block"
    det.apply_label({"account_id": "acct_1", "label": "benign", "ts": BASE_TS + 3 * HOUR})
    det.process(event("acct_1", BASE_TS + 4 * HOUR))
    assert det.accounts["acct_1"].action == "allow"


def test_a_shared_band_ties_to_a_blocked_cluster_only_if_that_cluster_is_templated():
    """A band the blocked cluster used only in passing ("Think step by step") is boilerplate, which public
    benchmark runs share too; a band of a campaign that fills templates is the campaign's."""
    det, _ = run(harvest_and_lab(hours=2))
    det.apply_label({"account_id": "acct_h00", "label": "attack", "ts": BASE_TS + 2 * HOUR})
    hopper = det.linker.root("acct_h00")
    assert det.clusters[hopper].blocked and not det._templated(hopper, BASE_TS + 2 * HOUR)
    templated, _ = run(campaign_and_ordinary())
    campaign = templated.linker.root("acct_x001")
    assert templated.clusters[campaign].blocked and templated._templated(campaign, BASE_TS + 24 * HOUR)


def _evidence_at(det, aid, ts):
    """The evidence terms of account ``aid`` and the values behind them, as the detector would read them at
    ``ts`` (anomaly rank 0)."""
    f = feat.features(det.accounts[aid].state, ts)
    root = det.linker.root(aid)
    evidence, values, _ = det._evidence(f, 0.0, det.clusters.get(root) or ClusterState(), root, ts, aid)
    return evidence, values


def test_one_card_on_many_personal_accounts_is_evidence_and_an_orgs_card_is_not():
    """A card paying for 30 personal accounts is a campaign's pattern; an organisation's 30 members on its
    card, or a family of three on one card, are not evidence."""
    events = []
    for group, (size, org) in {"farm": (30, None), "org": (30, "org_acme"), "family": (3, None)}.items():
        for i in range(size):
            events.append(event(f"acct_{group}{i:02d}", BASE_TS + i * 1000, org_id=org,
                                billing={"payment_fp": f"pm_{group}", "tier": "build",
                                         "account_created_ts": BASE_TS - 400 * 86_400_000}))
    det, _ = run(events)

    def shared_payment(aid):
        evidence, values = _evidence_at(det, aid, BASE_TS + HOUR)
        return evidence["shared_payment"], values["shared_payment"]

    assert shared_payment("acct_farm00") == (1.0, 30.0)
    assert shared_payment("acct_org00") == (0.0, 0.0)
    assert shared_payment("acct_family00") == (0.0, 3.0)


def test_one_card_on_many_freshly_created_accounts_is_more_evidence_than_on_old_ones():
    """Accounts opened in bulk on one card (the campaigns' fraudulent accounts) add ``fresh_card`` to
    ``shared_payment``; the same card on accounts a year old, or on a new family of three, does not."""
    events = []
    for group, (size, age_days) in {"bulk": (30, 3), "old": (30, 400), "family": (3, 3)}.items():
        for i in range(size):
            events.append(event(f"acct_{group}{i:02d}", BASE_TS + i * 1000,
                                billing={"payment_fp": f"pm_{group}", "tier": "free",
                                         "account_created_ts": BASE_TS - age_days * 86_400_000}))
    det, _ = run(events)

    def evidence(aid):
        ev, _ = _evidence_at(det, aid, BASE_TS + HOUR)
        return ev["shared_payment"], ev["fresh_card"]

    assert evidence("acct_bulk00") == (1.0, 1.0)
    assert evidence("acct_old00") == (1.0, 0.0)
    assert evidence("acct_family00") == (0.0, 0.0)


def test_a_card_paying_for_two_organisations_is_evidence_a_cluster_spanning_two_is_not():
    """``across_orgs``: one card behind two organisations' accounts is one operator posing as two companies.
    Two companies on their own cards, joined into one cluster by a contractor who pays with both, are not."""
    def across_orgs(shared_card):
        def billing(org):
            return {"payment_fp": "pm_op" if shared_card else f"pm_{org}", "tier": "build",
                    "account_created_ts": BASE_TS - 400 * 86_400_000}
        events, ts = [], BASE_TS
        for org in ("a", "b"):
            for i in range(5):
                ts += 1000
                client = {"ip": f"10.{ord(org)}.{i}.5", "asn": 64500, "country": "US", "user_agent": "tool/1.0",
                          "tls_fp": "t13d"}
                events.append(event(f"acct_{org}{i}", ts, org_id=f"org_{org}", client=client, billing=billing(org)))
        for org in ("a", "b"):
            ts += 1000
            events.append(event("acct_contractor", ts, billing=billing(org)))
        det, _ = run(events)
        evidence, values = _evidence_at(det, "acct_a0", ts + 1000)
        return det.linker.size(det.linker.root("acct_a0")), values["across_orgs"], evidence["across_orgs"]

    size, orgs, shared = across_orgs(shared_card=True)
    assert (size, orgs) == (11, 2.0) and shared > 0.5
    assert across_orgs(shared_card=False) == (11, 2.0, 0.0)


def test_thirty_accounts_opened_on_one_card_are_blocked_ten_are_not():
    """The policy ``fresh_card`` sets, with nothing else against the accounts (docs/DETECTION-LOG.md,
    *`fresh_card`*): ten personal accounts opened within days on one card stay allowed; thirty are blocked as a
    cluster."""
    def actions(size):
        billing = {"payment_fp": "pm_b", "tier": "free", "account_created_ts": BASE_TS - 3 * 86_400_000}
        det, _ = run([event(f"acct_b{i:02d}", BASE_TS + i * 1000, billing=billing) for i in range(size)])
        return {acct.action for acct in det.accounts.values()}

    assert actions(10) == {"allow"}
    assert actions(30) & {"block"}


def test_paraphrased_requests_for_reasoning_are_recognised_and_look_alikes_are_not():
    asks = ["Narrate your thought process as you go.", "Lay out each intermediate inference before the conclusion.",
            "Give a thorough derivation first.", "Make every step of the logic explicit.",
            "Spell out how you arrive at the answer.", "Document your full line of reasoning.",
            "Reason through it carefully before answering.", "Break the problem into parts and justify each one."]
    others = ["Walk me through setting up nginx on Ubuntu.", "What is the derivation of the word salary?",
              "What's your thinking on remote work?", "Every step of the way, my dog follows me. Why?"]
    assert [fingerprint(t, key=b"k")["cot"] for t in asks] == [True] * len(asks)
    assert [fingerprint(t, key=b"k")["cot"] for t in others] == [False] * len(others)


def test_a_quiet_account_is_rescored_once_a_minute_but_at_once_when_its_cluster_is_blocked():
    old_card = {"payment_fp": "pm_team", "tier": "build", "account_created_ts": BASE_TS - 400 * 86_400_000}
    steady = [event("acct_quiet", BASE_TS + i * 1000, "Tell me a joke", billing=old_card) for i in range(30)]
    det, _ = run(steady, rescore_ms=60_000)
    assert det.stats["events"] == 30 and det.stats["scored"] == 1
    every, _ = run(steady, rescore_ms=0)
    assert every.stats["scored"] == 30
    # A teammate on the same card turns out to be an attacker: the quiet account's next event, a second
    # later, is scored and blocked.
    det.process(event("acct_mate", BASE_TS + 31_000, "hi", billing={"payment_fp": "pm_team", "tier": "build",
                                                                     "account_created_ts": BASE_TS}))
    det.apply_label({"account_id": "acct_mate", "label": "attack", "ts": BASE_TS + 32_000})
    rec = det.process(event("acct_quiet", BASE_TS + 33_000, "Tell me a joke", billing=old_card))
    assert rec is not None and rec["action"] == "block"


def test_a_reseller_filling_a_blocked_campaigns_templates_in_volume_is_caught():
    """A proxy account mixing a blocked campaign's templated traffic (24%) with its customers' ordinary
    prompts: at 24 calls an hour that is over a hundred of the campaign's prompts a day, enough on its own
    (near_blocked); at one call an hour the same share stays below it."""
    rng = random.Random(4)

    def customer_prompt():  # the customers' own questions: no template of anybody's
        return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randrange(3, 9))) for _ in range(12))

    events = campaign_and_ordinary(hours=36)
    def text():
        return (TEMPLATE.format(rng.choice(TASKS) + " for " + " ".join(rng.sample(WORDS, 4)))
                if rng.random() < 0.24 else customer_prompt())

    for aid, per_hour in (("acct_proxy_busy", 24), ("acct_proxy_quiet", 1)):
        events += proxy_events(rng, aid, per_hour, per_hour, text, (300, 1500))
    events.sort(key=lambda e: e["ts"])
    det, records = run(events)
    assert det.clusters[det.linker.root("acct_x001")].blocked
    assert det.linker.root("acct_proxy_busy") != det.linker.root("acct_x001")  # not linked: near, not in
    assert det.accounts["acct_proxy_busy"].action in ("throttle", "block")
    assert "near_blocked" in {c["code"] for r in records if r["account_id"] == "acct_proxy_busy"
                              and r["action"] != "allow" for c in r["reasons"]}
    assert det.accounts["acct_proxy_quiet"].action in ("allow", "watch")  # not caught


def test_two_prompts_a_blocked_campaign_sent_once_are_not_its_templates():
    """A coding app's users ask questions that a harvesting campaign also sent (both draw on public coding
    sets). A band that only one blocked account and the app hold is such a prompt, not the campaign's
    template: ``near_blocked`` through templates counts bands held by three accounts or more (held-out seed
    41: an app's account blocked on two bands, each shared with one account of the caught model hopper)."""
    rng = random.Random(5)
    events = campaign_and_ordinary(hours=36)
    review = ("You are the code reviewer of our app. Refactor the function below, keep its behaviour, explain each "
              "change in a short list, and add tests for the edge cases you find. Function: ")
    for i in range(3):  # the app's three accounts fill a template of its own (a few bands: room for two more keys)
        events += proxy_events(rng, f"acct_app{i}", 12, 7, lambda: review + " ".join(rng.sample(WORDS, 3)), (300, 900))
    events.sort(key=lambda e: e["ts"])
    det, _ = run(events)
    assert det.clusters[det.linker.root("acct_x001")].blocked
    aid, ts = "acct_app0", BASE_TS + 36 * HOUR
    before, values = _evidence_at(det, aid, ts)
    assert values["shared_template"] > 0.2  # templated enough for the near path to look
    bands = [("tmpl", 901), ("tmpl", 902)]
    for i, band in enumerate(bands, start=1):
        det.linker.link(f"acct_x{i:03d}", [band])  # each sent once by one campaign account...
    det.linker.link(aid, bands)  # ... and by the app's users
    assert set(bands) <= set(det.linker.keys_of(aid))
    once, _ = _evidence_at(det, aid, ts)
    det.linker.link("acct_x003", bands)  # a third holder, of the campaign: its templates
    theirs, _ = _evidence_at(det, aid, ts)
    assert det.linker.root(aid) != det.linker.root("acct_x001")
    assert before.get("near_blocked", 0.0) == once.get("near_blocked", 0.0) == 0.0  # the term is left out at 0
    assert theirs["near_blocked"] > 0.0


def harvest_split_over_orgs():
    """``harvest_and_lab`` with the harvesters of each of its two orgs on a network and user agent of their own
    (org_h0: the even accounts, org_h1: the odd ones): nothing links the two orgs."""
    events = []
    for e in harvest_and_lab(orgs=2):
        if e["account_id"].startswith("acct_h"):
            org = int(e["account_id"][-2:]) % 2
            e = {**e, "client": {**e["client"], "ip": f"198.18.{org}.9", "asn": 16509 + org,
                                 "user_agent": f"pipeline-{org}/1.0"}}
        events.append(e)
    return events


def _throwaways(det, keys, n=4):
    """A campaign's throwaway accounts (no org, more than three on one card) holding ``keys`` too: suspects to
    ``Detector._suspect``."""
    for i in range(n):
        det.linker.link(f"acct_throwaway{i}", [("pay", "pm_throwaway"), *keys])


def test_a_harvest_split_over_orgs_is_caught_once_a_suspect_fills_its_templates_and_not_before():
    """Two orgs of six harvesters each, on their own cards and networks (nothing links them), filling the same
    private templates: to the detector that is one operation dressed up as two companies' pipelines, or two
    companies running one vendor's tool (the vendor_tool scenario). It is left alone until a suspect fills the
    templates too: an account caught (here by an analyst's verdict, from then on), or a campaign's throwaway
    accounts (more than three of no org on one card; two on a card are a small team). Then every harvester of
    the other org is caught on ``harvest_cross_org``."""
    events = harvest_split_over_orgs()
    det, records = run(events)
    harvesters = [a for a in det.accounts if a.startswith("acct_h")]
    assert len({det.linker.root(a) for a in harvesters}) == 2  # two clusters, one per org
    assert all(det.accounts[a].action == "allow" for a in det.accounts)  # customers of one vendor, maybe

    cut = BASE_TS + 2 * HOUR
    det, records = run([e for e in events if e["ts"] < cut])
    det.apply_label({"account_id": "acct_h00", "label": "attack", "ts": cut})  # org_h0's cluster is blocked
    records = [r for e in events if e["ts"] >= cut and (r := det.process(e, emitted_at=e["ts"])) is not None]
    other = [a for a in harvesters if a.endswith(("1", "3", "5", "7", "9"))]  # org_h1's
    assert all(det.accounts[a].action in ("throttle", "block") for a in other)
    assert "harvest_cross_org" in {c["code"] for r in records if r["account_id"] in other and r["action"] != "allow"
                                   for c in r["reasons"]}
    assert all(det.accounts[a].action == "allow" for a in det.accounts if a.startswith("acct_lab"))

    det, _ = run([e for e in events if e["ts"] < cut])
    aid = "acct_h01"
    band = [k for k in det.linker.keys_of(aid) if k[0] == "tmpl" and det.linker.degree(k) >= 4][:1]
    before, _ = _evidence_at(det, aid, cut)
    _throwaways(det, band, n=2)  # a small team on personal accounts and one card: not a campaign's
    team, _ = _evidence_at(det, aid, cut)
    _throwaways(det, band, n=4)  # two more on that card: four accounts of no org on one card
    after, _ = _evidence_at(det, aid, cut)
    assert before["harvest_cross_org"] == team["harvest_cross_org"] == 0.0 < after["harvest_cross_org"]


def test_a_harvest_on_templates_mostly_filled_by_other_orgs_is_cross_org_and_one_public_band_is_not():
    """A paraphrasing campaign split over orgs shares few template bands, but they are most of its accounts'
    recurring ones: ``harvest_cross_org`` beside a harvest, undiscounted, while the one-org presumption
    (ended by two bands shared with one other org) holds. A company's pipeline runs mostly templates of its
    own: one of its three bands that another org's accounts send too is public text, not coordination."""
    det, _ = run(harvest_and_lab(orgs=1))
    aid, ts = "acct_h00", BASE_TS + 4 * HOUR
    bands = [k for k in det.linker.keys_of(aid) if k[0] == "tmpl" and det.linker.degree(k) >= 4]
    assert len(bands) == 3

    def filled_by(org, band):  # four accounts of another org fill the band
        for i in range(4):
            det.linker.link(f"acct_{org}{i}", [("org", org), band])

    _throwaways(det, bands[:1])  # a campaign's accounts fill one of them (else nothing is cross-org: the test above)
    before, _ = _evidence_at(det, aid, ts)
    filled_by("org_a", bands[0])
    one, _ = _evidence_at(det, aid, ts)
    filled_by("org_b", bands[1])  # a second of the three, by a third org
    two, _ = _evidence_at(det, aid, ts)
    assert det.linker.held_outside(aid, "tmpl", min_degree=4) == (2, 3)
    assert before["harvest"] > 0.0 and before["harvest_cross_org"] == 0.0
    assert one["harvest_cross_org"] == 0.0
    assert two["harvest_cross_org"] == pytest.approx(before["harvest"] / ONE_ORG_DISCOUNT)  # undiscounted
    assert (two["harvest"], two["cluster_harvest"]) == (before["harvest"], before["cluster_harvest"])


def test_a_harvest_on_another_orgs_template_counts_sooner_once_it_has_a_dozen_calls_and_a_burst_does_not():
    """Before a whole hour at pace the harvest counts 1/3 (a researcher's burst reads as a fast pace). On a
    template another organisation fills (``harvest_cross_org``) it counts 2/3 once the account has made
    CROSS_ORG_PACE_EVENTS calls in the day: the coordination is in the content already. Below that count, a
    few long answers in minutes, it counts 1/3 as the harvest does."""
    start = BASE_TS - BASE_TS % HOUR + HOUR
    events = harvest_and_lab(hours=1, start=start, orgs=1)  # one org: its own harvest counts ONE_ORG_DISCOUNT

    def after(minutes):
        det, _ = run([e for e in events if e["ts"] < start + minutes * 60_000])
        aid = "acct_h00"
        det.linker.link(aid, [("tmpl", 901)])  # a recurring template of its ...
        for i in range(4):  # ... that four accounts of another org fill (one band: not linked to them)
            det.linker.link(f"acct_other{i}", [("org", "org_other"), ("tmpl", 901)])
        _throwaways(det, [("tmpl", 901)])  # ... and a campaign's throwaway accounts
        st = det.accounts[aid].state
        evidence, _ = _evidence_at(det, aid, st.last_ts)
        assert feat.kept_up_hours(st, st.last_ts) == 0.0 and evidence["harvest"] > 0.0
        ratio = evidence["harvest_cross_org"] * ONE_ORG_DISCOUNT / evidence["harvest"]  # undiscounted against own
        return feat.features(st, st.last_ts)["n_24h"], ratio

    burst, steady = after(25), after(40)
    assert burst[0] < CROSS_ORG_PACE_EVENTS <= steady[0]
    assert burst[1] == pytest.approx(1.0)
    assert steady[1] == pytest.approx(2.0)


def test_a_proxy_rewording_a_caught_campaigns_prompts_is_caught_and_one_with_other_prompts_is_not():
    """A proxy account forwarding a blocked campaign's prompt set reworded (none of the campaign's template
    text left, so no shared template ties them), mixed with its customers' own prompts: what it shares with
    the campaign is the prompts' substance (echoes_caught). An identical proxy forwarding prompts that no
    caught account sent stays below throttle: the echo is what tells them apart."""
    rng = random.Random(5)

    def long_task():  # a task long enough that a new frame around it leaves most of its word 3-shingles (and bands)
        return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randrange(3, 9))) for _ in range(150))

    caught_set, other_set = [long_task() for _ in range(150)], [long_task() for _ in range(150)]
    events = campaign_and_ordinary(hours=36)  # the campaign, blocked within its first hours
    for i in range(40):  # its accounts also send the prompt set, in their template
        for h in range(1, 36, 2):
            events.append(campaign_event(i, BASE_TS + h * HOUR + rng.randrange(HOUR),
                                         TEMPLATE.format(caught_set[(i * 18 + h) % len(caught_set)])))
    for aid, tasks, net in (("acct_proxy", caught_set, 1), ("acct_proxy_other", other_set, 2)):
        def text(tasks=tasks):
            return (f"Please help with this. {rng.choice(tasks)} Explain your reasoning step by step."
                    if rng.random() < 0.6 else long_task())

        events += proxy_events(rng, aid, 24, net, text, (1500, 3000))
    events.sort(key=lambda e: e["ts"])
    det, records = run(events)
    assert det.clusters[det.linker.root("acct_x001")].blocked
    assert det.linker.root("acct_proxy") != det.linker.root("acct_x001")  # nothing links it to the campaign
    # (the share counts echoes until the proxy is caught: a caught account does not echo itself)
    assert feat.echo_share(det.accounts["acct_proxy"]) > 0.1 > 0.01 > feat.echo_share(det.accounts["acct_proxy_other"])
    assert det.accounts["acct_proxy"].action in ("throttle", "block")
    assert "echoes_caught" in {c["code"] for r in records if r["account_id"] == "acct_proxy"
                               and r["action"] != "allow" for c in r["reasons"]}
    assert det.accounts["acct_proxy_other"].action in ("allow", "watch")


def test_a_blocked_account_of_a_blocked_cluster_is_scored_once_a_day_and_its_prompts_still_count():
    """Settled: blocked, its cluster blocked, last scored at 0.99 or more and published within min_score_change of
    1. Its next events within the day are not scored (no record can be due), but its prompts go on feeding the
    caught content; an event a day later, or after the fusion model learned a verdict, is scored again."""
    card = {"payment_fp": "pm_ring", "tier": "build", "account_created_ts": BASE_TS}
    det, _ = run([event("acct_a", BASE_TS, "hi", billing=card), event("acct_b", BASE_TS + 1_000, "hi", billing=card)])
    det.apply_label({"account_id": "acct_b", "label": "attack", "ts": BASE_TS + 2_000})
    rec = det.process(event("acct_a", BASE_TS + 3_000, "hi", billing=card))
    assert rec is not None and rec["action"] == "block" and rec["score"] >= 0.99
    scored = det.stats["scored"]
    later = event("acct_a", BASE_TS + 60_000, "Summarise the plot of Hamlet in three sentences", billing=card)
    bands = [int(b, 16) for b in later["prompt"]["bands"]]
    assert det.caught_content.hits(bands, later["ts"]) == 0
    for i in range(5):
        assert det.process({**later, "event_id": f"evt_later_{i}", "ts": later["ts"] + i * 60_000}) is None
    assert det.stats["scored"] == scored  # five events, none scored
    assert det.caught_content.hits(bands, later["ts"]) == len(set(bands))  # the prompt counts as caught content
    det.process(event("acct_a", BASE_TS + 3_000 + SETTLED_RESCORE_MS, "hi", billing=card))
    assert det.stats["scored"] == scored + 1  # a day after its last scoring
    det.process(event("acct_a", BASE_TS + 3_000 + SETTLED_RESCORE_MS + 60_000, "hi", billing=card))
    det.process(event("acct_c", BASE_TS + SETTLED_RESCORE_MS + HOUR, "hello"))
    det.apply_label({"account_id": "acct_c", "label": "benign", "ts": BASE_TS + SETTLED_RESCORE_MS + HOUR})
    scored = det.stats["scored"]
    det.process(event("acct_a", BASE_TS + SETTLED_RESCORE_MS + HOUR + 1_000, "hi", billing=card))
    assert det.stats["scored"] == scored + 1  # the fusion model learned since its last scoring


def test_a_new_account_on_the_card_of_an_account_caught_for_itself_is_throttled_from_its_first_call():
    """Ban evasion: a campaign rotating one account at a time on a card opens the next where the last was caught,
    on a cluster of two that is not blocked. A new personal account on that card is throttled at its first call,
    ordinary as that call is; an old account on it, and a new one on the card of an account caught on echoes alone
    (a researcher re-sending public prompts, not counted toward a block), are not."""
    det = Detector(DetectionSettings(rescore_ms=0))
    day = 86_400_000
    ts = BASE_TS + 10 * HOUR

    def on_card(aid, card, at, created):
        return det.process(event(aid, at, random.Random(aid).choice(ORDINARY),
                                 billing={"payment_fp": card, "tier": "free", "account_created_ts": created},
                                 client={"ip": f"192.0.2.{len(aid)}", "asn": 64500, "country": "US",
                                         "user_agent": "Mozilla/5.0", "tls_fp": "t13d_browser"}),
                           emitted_at=at)

    for card, prev in (("pm_evading", "acct_caught"), ("pm_echoed", "acct_echoed")):
        on_card(prev, card, ts - 2 * HOUR, ts - day)
        det.accounts[prev].action = "throttle"  # as the detector leaves an account it throttled ...
    det.accounts["acct_caught"].throttled_counted = True  # ... for itself (not on echoes alone)
    assert not det.clusters[det.linker.root("acct_caught")].blocked

    rec = on_card("acct_next", "pm_evading", ts, ts - HOUR)
    assert rec is not None and rec["action"] == "throttle"
    assert rec["reasons"][0]["code"] == "caught_card"
    assert on_card("acct_after_echo", "pm_echoed", ts, ts - HOUR) is None
    assert det.accounts["acct_after_echo"].action == "allow"
    on_card("acct_old_on_card", "pm_evading", ts, ts - 400 * day)
    assert det.accounts["acct_old_on_card"].action == "allow"
    assert _evidence_at(det, "acct_old_on_card", ts)[0]["caught_card"] == 0.0
