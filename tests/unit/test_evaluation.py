"""``detector evaluate`` on a small scale: the report's sections, and the restart runs against the plain run."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from detector.evaluation import Limiter, evaluate_restart, evaluate_scenario, metrics, run_evaluation
from detector.settings import Settings
from tests.factory import BASE_TS

SCALE = 0.02


@pytest.fixture(scope="module")
def restart():
    sim, outcomes = evaluate_restart("default", "population", Settings(), at_h=36, scale=SCALE)
    return sim, {name: metrics(o, sim.labels) for name, o in outcomes.items()}


def test_the_run_without_a_restart_is_the_plain_run(restart):
    sim, results = restart
    plain_sim, [plain] = evaluate_scenario("default", ["population"], Settings(), scale=SCALE)
    ours, theirs = results["running"], metrics(plain, plain_sim.labels)
    for key in ("recall", "fpr", "fp", "first_detect_share", "served_share"):
        assert ours[key] == theirs[key], key


def test_the_restarted_runs_share_everything_before_the_restart(restart):
    sim, results = restart
    assert set(results) == {"running", "cold", "warm"}
    for name in ("cold", "warm"):
        # Each counts every event of the scenario, the ones before the restart from the same history.
        assert results[name]["attack_accounts"] == results["running"]["attack_accounts"]
        for campaign, c in results[name]["campaigns"].items():
            assert c["events"] == results["running"]["campaigns"][campaign]["events"]


def test_a_cloned_limiter_keeps_the_key_blocks():
    limiter = Limiter(b"k")
    limiter._keep("pay:abc", b'{"key_id": "pay:abc", "kind": "pay", "expires_at": %d}' % (BASE_TS + 10**9))
    limiter.allowed.add("acct_a")
    other = limiter.clone()
    assert other.allowed == {"acct_a"} and other.allowed is not limiter.allowed
    assert other._applied == limiter._applied and other.book is not limiter.book


def test_the_report_has_the_restart_section(tmp_path):
    assert run_evaluation(Settings(), scenarios=["default"], models="population", scale=SCALE, out_dir=tmp_path,
                          restart_at_h=36) == 0
    text = (tmp_path / "EVALUATION.md").read_text()
    assert "## default, the worker restarted at 36 h" in text
    for row in ("no restart", "restarted cold", "restarted warm"):
        assert re.search(rf"^\| {row} \| \d\.\d{{3}} \|", text, re.M), row


def test_a_suite_entry_runs_with_its_own_seed(tmp_path):
    assert run_evaluation(Settings(), scenarios=["holdout@3"], models="population", scale=SCALE, out_dir=tmp_path,
                          seed=7, workers=(), restart_at_h=0) == 0
    text = (tmp_path / "EVALUATION.md").read_text()
    section = text.split("## holdout@3\n", 1)[1]
    assert "(seed 3," in section.split("| model", 1)[0]
    assert (tmp_path / "docs" / "eval" / "holdout-seed3-scores.png").exists() or "plots skipped" in section
    with pytest.raises(ValueError, match="unknown scenario 'nosuch'"):
        run_evaluation(Settings(), scenarios=["default", "nosuch@1"], models="population", scale=SCALE,
                       out_dir=tmp_path)


@pytest.mark.parametrize(("args", "says"), [
    (["--scenario", "nosuch@3"], "unknown scenario 'nosuch'"),
    (["--scenario", "holdout@x"], "the seed after @ must be an integer"),
    (["--scenario", "default", "--days", "1"], "releases its new model 1.7 days in; run at least 2 days"),
    (["--scenario", "default", "--days", "0"], "run at least 2 days"),
    (["--scenario", "default", "--restart-at", "72"], "within the first scenario's 72 hours"),
    (["--scenario", "default", "--days", "2", "--restart-at", "50"], "within the first scenario's 48 hours"),
    (["--scenario", "default", "--restart-at", "-1"], "must be 0 (no restart)"),
])
def test_the_cli_refuses_a_bad_suite_entry_or_days_in_one_line(args, says, tmp_path, capsys):
    """A bad entry, days that end before the scenario's new model is released, or a restart at or past the first
    scenario's end (it would restart nothing), before anything runs."""
    from detector.cli import main

    assert main(["evaluate", *args, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("detector: error: ") and says in err[0]
    assert not (tmp_path / "EVALUATION.md").exists()


def test_days_runs_the_same_population_for_that_long(tmp_path):
    """``--days``: the scenario's population over another span (here shorter, to keep the test short), the
    option in the report's reproduce line."""
    from detector import simulate

    assert run_evaluation(Settings(), scenarios=["default"], models="population", scale=SCALE, out_dir=tmp_path,
                          workers=(), restart_at_h=0, days=2) == 0
    text = (tmp_path / "EVALUATION.md").read_text()
    assert "`detector evaluate --scale 0.02 --seed 7 --days 2`" in text
    assert "Scenario 'default': 2 simulated days" in text
    # its plots beside the suite's, not over them
    assert (tmp_path / "docs" / "eval" / "default-2d-timeline.png").exists() or "plots skipped" in text
    assert not (tmp_path / "docs" / "eval" / "default-timeline.png").exists()
    other, own = simulate.build("default", scale=SCALE, days=44), simulate.build("default", scale=SCALE)
    assert other.end_ts - other.start_ts == 44 * simulate.DAY
    assert Counter(lab.kind for lab in other.labels.values()) == Counter(lab.kind for lab in own.labels.values())


def test_the_report_names_each_false_positive_and_what_caught_it():
    """Each caught ordinary account is listed with its kind, when it was caught and the catching record's reasons;
    the missed attack accounts are counted by campaign with the highest scores they reached."""
    from detector.evaluation import AccountOutcome, Outcome, _misses
    from detector.simulate import AccountLabel

    day, hour = 86_400_000, 3_600_000
    out = Outcome(model="population")
    out.accounts.update({
        "acct_app": AccountOutcome(events=40, first_ts=BASE_TS + day, caught_ts=BASE_TS + day + 6 * hour,
                                   caught_by="echoes_caught 0.61, harvest 0.20"),
        "acct_chat": AccountOutcome(events=5, first_ts=BASE_TS, max_score=0.3),
        "acct_h1": AccountOutcome(events=26, first_ts=BASE_TS, caught_ts=BASE_TS + hour, caught_by="a key block"),
        "acct_h2": AccountOutcome(events=26, served=26, first_ts=BASE_TS, max_score=0.42),
        "acct_h3": AccountOutcome(events=26, served=26, first_ts=BASE_TS, max_score=0.69),
    })
    out.campaign_events["hydra"], out.campaign_first["hydra"] = 78, BASE_TS
    labels = {"acct_app": AccountLabel("acct_app", False, None, "app_backend"),
              "acct_chat": AccountLabel("acct_chat", False, None, "chat"),
              **{a: AccountLabel(a, True, "hydra", "hydra") for a in ("acct_h1", "acct_h2", "acct_h3")}}
    result = metrics(out, labels)
    assert result["false_positives"] == [{"account": "acct_app", "kind": "app_backend", "day": 1.25, "hours_in": 6.0,
                                          "caught_by": "echoes_caught 0.61, harvest 0.20"}]
    assert result["missed"] == {"hydra": [0.42, 0.69]}
    text = "\n".join(_misses(result))
    assert "| acct_app | app_backend | 1.2 | 6.0 | echoes_caught 0.61, harvest 0.20 |" in text
    assert "Missed attack accounts: 2 (hydra 2). Their highest scores: median 0.42, 90th percentile 0.69, " \
           "highest 0.69." in text
    assert "\n".join(_misses({"false_positives": [], "missed": {"hydra": []}})) == (
        "False positives: none.\n\nMissed attack accounts: none.")
