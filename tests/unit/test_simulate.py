"""Unit tests of the traffic simulator (detector.simulate) and the prompt loader (detector.prompts).

Fast: "smoke" and "default" at a small scale; every property is checked on generated events.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import random
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector import prompts, simulate
from detector.gateway import make_event
from detector.schemas import validate_event

CAMPAIGNS = {"hydra", "model_hopper", "cot_coercion", "reseller"}
NOWHERE = Path("/nonexistent/prompts")


@pytest.fixture(scope="module")
def smoke() -> tuple[simulate.Simulation, list[dict[str, Any]]]:
    sim = simulate.build("smoke", seed=11)
    return sim, list(sim.events())


@pytest.fixture(scope="module")
def default_small() -> tuple[simulate.Simulation, collections.Counter[tuple[str, int]], collections.Counter[str]]:
    """``default`` at 4% of the accounts (per-account behaviour is unchanged by ``scale``).

    Counts (account, UTC day) and per-account calls from ``Simulation._calls``, the stream ``events()``
    turns one for one into events (see test_direct_event_build_matches_make_event), without paying for
    fingerprints: one enterprise account alone sends tens of thousands of calls.
    """
    sim = simulate.build("default", seed=5, scale=0.04)
    per_day: collections.Counter[tuple[str, int]] = collections.Counter()
    per_account: collections.Counter[str] = collections.Counter()
    for _, call in sim._calls():
        ts, account_id = call[0], call[3].account_id
        assert sim.start_ts <= ts <= sim.end_ts
        per_day[account_id, (ts - sim.start_ts) // simulate.DAY] += 1
        per_account[account_id] += 1
    return sim, per_day, per_account


def test_scenario_names() -> None:
    assert set(simulate.scenario_names()) >= {
        "default", "demo", "smoke", "paraphrase", "fast_rotation", "slow_ramp", "many_asns", "holdout", "vendor_tool"
    }
    with pytest.raises(ValueError):
        simulate.build("nope")


def test_same_seed_same_events_and_other_seed_differs(smoke: Any) -> None:
    sim, events = smoke
    again = list(simulate.build("smoke", seed=11).events())
    assert again == events
    other = itertools.islice(simulate.build("smoke", seed=12).events(), 100)
    assert [(e["ts"], e["account_id"]) for e in other] != [(e["ts"], e["account_id"]) for e in events[:100]]


def test_two_passes_can_interleave(smoke: Any) -> None:
    sim, events = smoke
    a, b = sim.events(), sim.events()
    pairs = [(next(a), next(b)) for _ in range(300)]
    assert all(x == y for x, y in pairs)
    assert [x for x, _ in pairs] == events[:300]


def test_events_ordered_valid_and_in_window(smoke: Any) -> None:
    sim, events = smoke
    assert 2000 <= len(events) <= 6000
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)
    assert sim.start_ts <= ts[0] and ts[-1] <= sim.end_ts
    for e in events:
        validate_event(e)
    assert len({e["event_id"] for e in events}) == len(events)
    assert 0.5 < len(events) / sim.count_hint() < 1.5


def test_labels_cover_accounts_and_ids_carry_no_label(smoke: Any) -> None:
    sim, events = smoke
    seen = {e["account_id"] for e in events}
    assert seen <= set(sim.labels)
    for account_id, label in sim.labels.items():
        assert label.account_id == account_id
        assert re.fullmatch(r"acct_[0-9a-f]{16}", account_id)
        assert label.attack == (label.campaign is not None)
    for e in events:
        assert e["org_id"] is None or re.fullmatch(r"org_[0-9a-f]{12}", e["org_id"])
        assert re.fullmatch(r"pm_[0-9a-f]{16}", e["billing"]["payment_fp"])


def test_every_campaign_and_ordinary_kind_present_in_smoke(smoke: Any) -> None:
    sim, events = smoke
    kinds = {sim.labels[e["account_id"]].kind for e in events}
    assert CAMPAIGNS <= kinds
    assert {"chat", "enterprise_batch", "eval_harness", "researcher", "agentic_coding", "corporate_nat",
            "early_adopter"} <= kinds


def test_default_sizes_and_campaigns(default_small: Any) -> None:
    sim, _, per_account = default_small
    assert CAMPAIGNS <= {sim.labels[a].campaign for a in per_account}
    full = simulate.build("default")  # building is cheap: events are lazy
    kinds = collections.Counter(label.kind for label in full.labels.values())
    assert sum(1 for label in full.labels.values() if not label.attack) >= 2000
    assert kinds["hydra"] >= 500
    assert 300_000 <= full.count_hint() <= 500_000
    assert "scale" in full.description.lower() and "1:" in full.description


def test_hydra_accounts_average_about_26_calls_a_day(default_small: Any) -> None:
    sim, per_day, _ = default_small
    # Middle day of accounts active on all three days: a full day of activity.
    hydra = [a for a, label in sim.labels.items() if label.campaign == "hydra"]
    full = [per_day[a, 1] for a in hydra if per_day[a, 0] and per_day[a, 2]]
    assert len(full) >= 10
    assert 20 <= sum(full) / len(full) <= 32


def test_enterprise_batch_outvolumes_every_attacker(default_small: Any) -> None:
    sim, _, per_account = default_small
    enterprise = [n for a, n in per_account.items() if sim.labels[a].kind == "enterprise_batch"]
    attackers = [n for a, n in per_account.items() if sim.labels[a].attack]
    assert enterprise and attackers
    assert min(enterprise) > max(attackers)


def test_no_raw_prompt_text_in_events(smoke: Any) -> None:
    _, events = smoke
    blob = b"\n".join(orjson.dumps(e) for e in events).lower()
    probes = [p for kind in prompts.KINDS for p in prompts.load_prompts(kind, None, random.Random(1))[:40]]
    probes += [simulate._AGENT_SYSTEM, simulate._HYDRA_TEMPLATES["main"][0][1], simulate._FOLLOW_UPS[0]]
    snippets = {m[:30] for p in probes for m in re.findall(r"[a-z][a-z ,]{29,}", p.lower())}
    assert len(snippets) > 50
    leaked = [w for w in snippets if w.encode() in blob]
    assert not leaked, leaked[:10]


def test_direct_event_build_matches_make_event(smoke: Any) -> None:
    """The simulator builds events itself (with cached fingerprints) for speed: same result as the SDK."""
    sim, events = smoke
    key = simulate.DEFAULT_KEY
    for (event_id, call), event in zip(sim._calls(), events[:200], strict=False):
        ts, _i, _seq, acct, api_key, model, req, status, out_tok, latency, stop, refused, in_tok = call
        expected = make_event(
            event_id=event_id, account_id=acct.account_id, org_id=acct.org_id, ts=ts, api_key_id=api_key,
            model=model, endpoint=simulate.ENDPOINT, status=status, input_tokens=in_tok, output_tokens=out_tok,
            latency_ms=latency, client=req[2], billing=acct.billing, prompt_text=req[0], system_text=req[1],
            response={"stop_reason": stop, "refused": refused}, fingerprint_key=key,
        )
        assert event == expected


def test_campaign_signals(smoke: Any) -> None:
    sim, events = smoke
    by_campaign: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        by_campaign[sim.labels[e["account_id"]].campaign or "-"].append(e)
    cot = by_campaign["cot_coercion"]
    assert sum(e["prompt"]["cot"] for e in cot) / len(cot) > 0.9
    assert sum(e["prompt"]["script"] in ("cjk", "cyrillic") for e in cot) / len(cot) > 0.25
    hydra = [e for e in by_campaign["hydra"] if e["status"] == 200]
    assert sum(e["response"]["stop_reason"] == "max_tokens" for e in hydra) / len(hydra) > 0.15
    assert sum(e["prompt"]["cot"] for e in hydra) / len(hydra) > 0.9
    release = sim.start_ts + 8 * simulate.HOUR  # smoke releases frontier-5 at 08:00; hoppers move within 10.5 h
    late = [e for e in by_campaign["model_hopper"] if e["ts"] > release + 11 * simulate.HOUR]
    assert late and sum(e["model"] == simulate.MODEL_NEW for e in late) / len(late) > 0.8
    early = [e for e in by_campaign["model_hopper"] if e["ts"] < release]
    assert early and all(e["model"] != simulate.MODEL_NEW for e in early)
    ordinary = [e for e in by_campaign["-"] if e["status"] == 200]
    assert sum(e["response"]["stop_reason"] == "max_tokens" for e in ordinary) / len(ordinary) < 0.1
    assert {e["status"] for e in events} >= {200, 429}


def test_app_backends_look_like_a_harvest_but_send_their_users_prompts() -> None:
    """The apps built on the API (app_backend): one to three accounts of one org on one card, long answers at a
    harvester's pace, on the new model within hours of its release; but their users' prompts (a coding
    app's users paste their own code, a writing app's their notes)."""
    sim = simulate.build("default", seed=5)
    apps = [a for a in sim._actors if sim.labels[a.account.account_id].kind == "app_backend"]
    by_org = collections.defaultdict(list)
    for actor in apps:
        by_org[actor.account.org_id].append(actor)
    assert sorted(len(accts) for accts in by_org.values()) == [1, 2, 2, 3, 3]  # and a small app on one account
    assert all(len({a.account.billing["payment_fp"] for a in accts}) == 1 for accts in by_org.values())
    release = sim.start_ts + 41 * simulate.HOUR
    for actor in [a for accts in by_org.values() for a in accts[:2]]:
        calls = list(actor.stream(0, sim.start_ts, sim.end_ts))
        ok = [c for c in calls if c[7] == 200]
        assert len(calls) / 3 >= 250 and sorted(c[8] for c in ok)[len(ok) // 2] >= 400
        late = [c for c in calls if c[0] >= release + 8 * simulate.HOUR]
        assert sum(c[5] == simulate.MODEL_NEW for c in late) / len(late) > 0.9
        assert not any(c[5] == simulate.MODEL_NEW for c in calls if c[0] < release)
        sent = [c[6][0] for c in calls]
        if actor.app == "coding":  # most carry the user's own code, and those do not repeat (but in retries)
            own = [p for p in sent if "Here is my code:" in p]
            assert len(own) / len(sent) > 0.6 and len(set(own)) / len(own) > 0.95
        elif actor.app == "writing":  # the app's own few requests, over the user's texts
            assert {p.split("\n\n", 1)[0] for p in sent} <= set(actor.asks)


def test_vendor_tool_customers_fill_their_vendors_frame_at_a_harvests_pace_each_from_its_own_card_and_network(
) -> None:
    """The vendor_tool scenario: 24 companies run three vendors' tools (eight each) with their own keys. Every call
    is its vendor's frame and user agent around the company's own change or record (no two alike), or a textbook
    exercise (the tutor's); long answers at a harvester's pace; each company its own org, card and /24; no
    new-model jump. Only that scenario has them."""
    sim = simulate.build("vendor_tool", seed=5)
    assert not any(label.kind == "vendor_tool" for label in simulate.build("default", seed=5).labels.values())
    actors = [a for a in sim._actors if sim.labels[a.account.account_id].kind == "vendor_tool"]
    by_org = collections.defaultdict(list)
    for actor in actors:
        by_org[actor.account.org_id].append(actor)
    assert len(by_org) == 24 and len(actors) == 36
    cards = [{a.account.billing["payment_fp"] for a in accts} for accts in by_org.values()]
    assert all(len(c) == 1 for c in cards) and len(set().union(*cards)) == 24
    assert len({c["ip"].rsplit(".", 1)[0] for a in actors for c in a.clients}) == 24
    for system, frame, ua, fill in simulate._VENDORS:
        customers = [accts for accts in by_org.values() if accts[0].fill == fill]
        assert len(customers) == 8
        assert {c["user_agent"] for accts in customers for a in accts for c in a.clients} == {ua}
        for accts in customers[:3]:
            calls = list(accts[0].stream(0, sim.start_ts, sim.end_ts))
            ok = [c for c in calls if c[7] == 200]
            assert len(calls) / 3 >= 150 and sorted(c[8] for c in ok)[len(ok) // 2] >= 1000
            sent = [c[6][0] for c in calls]
            assert all(p.startswith(frame.split("{text}")[0]) for p in sent) and {c[6][1] for c in calls} == {system}
            assert not any(c[5] == simulate.MODEL_NEW for c in calls)
            if fill == "public_exercise":  # the exercises are the public dataset's, as they are
                assert {p.split("Exercise: ", 1)[1] for p in sent} <= set(accts[0].inputs)
            else:
                assert len(set(sent)) / len(sent) > 0.95


def test_adversarial_and_holdout_scenarios_build() -> None:
    for name in ("paraphrase", "fast_rotation", "slow_ramp", "many_asns", "holdout"):
        sim = simulate.build(name, scale=0.02)
        assert sim.labels and sim.count_hint() > 0 and name in sim.description
    rot = simulate.build("fast_rotation", scale=0.1)
    plain = simulate.build("default", scale=0.1)
    n_rot = sum(label.campaign == "hydra" for label in rot.labels.values())
    assert n_rot > 2.5 * sum(label.campaign == "hydra" for label in plain.labels.values())


def test_bundled_sample_when_prompts_dir_missing() -> None:
    sample = prompts.load_prompts("attack", NOWHERE, random.Random(0))
    raw = gzip.decompress(prompts.SAMPLE_PATH.read_bytes())
    bundled = {orjson.loads(line)["text"] for line in raw.split(b"\n") if line}
    assert sample and set(sample) <= bundled
    sim = simulate.build("smoke", scale=0.2, prompts_dir=NOWHERE)
    events = list(sim.events())
    assert len(events) > 300
    assert CAMPAIGNS <= {sim.labels[e["account_id"]].campaign for e in events}


def test_the_sample_takes_a_quarter_of_each_file_without_personal_data_and_the_same_bytes_each_time(
        tmp_path: Path) -> None:
    people = [{"prompt": f"How do I fold a paper crane, step {i}?"} for i in range(12)]
    people[3]["prompt"] = "Write to jane.doe@example.com about the crane"
    people[5]["prompt"] = "Summarise https://example.com/cranes"
    people[7]["prompt"] = "x" * (prompts.SAMPLE_MAX_CHARS + 1)
    bench = [{"prompt": f"Benchmark question {i}"} for i in range(8)]
    for name, rows in (("B_awesome_chatgpt_prompts_1529.jsonl", people), ("B_arena_hard_v0.1_questions.jsonl", bench)):
        (tmp_path / name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    files = ("B_awesome_chatgpt_prompts_1529.jsonl", "B_arena_hard_v0.1_questions.jsonl")
    data, rows = prompts.build_sample(tmp_path, files=files)
    assert data == prompts.build_sample(tmp_path, files=files)[0]
    sample = [orjson.loads(line) for line in gzip.decompress(data).split(b"\n") if line]
    assert [(kind, total, n) for kind, _, total, n in rows] == [("ordinary", 12, 3), ("benchmark", 8, 2)]
    texts = [s["text"] for s in sample if s["kind"] == "ordinary"]
    assert len(texts) == 3 and all(t.startswith("How do I fold") for t in texts)
    assert [s["text"] for s in sample if s["kind"] == "benchmark"] == ["Benchmark question 0", "Benchmark question 1"]
    with pytest.raises(FileNotFoundError, match="full prompt sets"):
        prompts.build_sample(tmp_path, files=("B_nq_open_dev_3610.jsonl",))


def test_rebuilding_the_sample_from_a_missing_directory_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert prompts.main([str(NOWHERE)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not found" in err
    assert prompts.main([]) == 2


def test_write_jsonl(tmp_path: Path) -> None:
    sim = simulate.build("smoke", scale=0.1)
    seen: list[int] = []
    n = simulate.write_jsonl(sim, tmp_path / "ev.jsonl", tmp_path / "labels.jsonl", progress=seen.append)
    lines = (tmp_path / "ev.jsonl").read_bytes().splitlines()
    assert n == len(lines) == seen[-1] > 0
    assert orjson.loads(lines[0]) == next(iter(sim.events()))
    labels = [orjson.loads(x) for x in (tmp_path / "labels.jsonl").read_bytes().splitlines()]
    assert {x["account_id"] for x in labels} == set(sim.labels)
    assert set(labels[0]) == {"account_id", "attack", "campaign", "kind"}
