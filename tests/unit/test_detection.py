"""The detection core on hand-made traffic: a small coordinated campaign against ordinary accounts."""

import random

from detector.detection import Detector
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


def campaign_and_ordinary(n_attack=40, n_ordinary=60, hours=24, seed=1):
    rng = random.Random(seed)
    events = []
    for i in range(n_attack):
        aid = f"acct_x{i:03d}"
        for h in range(0, hours, 2):
            ts = BASE_TS + h * HOUR + rng.randrange(HOUR)
            events.append(event(aid, ts, TEMPLATE.format(rng.choice(TASKS) + " for " + " ".join(rng.sample(WORDS, 4))),
                                billing={"payment_fp": f"pm_shared_{i // 10}", "tier": "build",
                                         "account_created_ts": BASE_TS - HOUR},
                                client={"ip": f"203.0.113.{i % 8}", "asn": 64999, "country": "SG",
                                        "user_agent": "python-httpx/0.27", "tls_fp": "t13d_bot"},
                                output_tokens=4096, response={"stop_reason": "max_tokens"}))
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


def test_idle_accounts_are_evicted():
    det = Detector(DetectionSettings(idle_evict_s=3600))
    det.process(event("acct_old", BASE_TS))
    det.process(event("acct_new", BASE_TS + 2 * HOUR))
    assert list(det.accounts) == ["acct_new"]
