"""The demo's closing summary: what a first-time user reads to judge the detector, false positives included."""

from detector.demo import _print_summary
from detector.simulate import AccountLabel


def record(aid, action, score, *codes):
    return {"account_id": aid, "action": action, "score": score, "cluster_id": "c_1",
            "reasons": [{"code": c, "detail": c, "weight": 0.5} for c in codes]}


def test_the_summary_names_the_ordinary_accounts_it_throttled_or_blocked(capsys):
    labels = {"acct_x": AccountLabel("acct_x", True, "hydra", "hydra"),
              "acct_app": AccountLabel("acct_app", False, None, "app_backend"),
              "acct_chat": AccountLabel("acct_chat", False, None, "chat")}
    latest = {"acct_x": record("acct_x", "block", 1.0, "linked_to_blocked"),
              "acct_app": record("acct_app", "throttle", 0.77, "echoes_caught", "cot_requests"),
              "acct_chat": record("acct_chat", "watch", 0.55, "anomaly")}
    _print_summary(60.0, 3, 3, 3, latest, labels)
    out = capsys.readouterr().out
    assert "throttled or blocked: 2 accounts, 1 of them attackers" in out
    assert "ordinary accounts throttled or blocked (false positives): 1" in out
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("ordinary accounts throttled or blocked"))
    listed = [x for x in lines[start + 1:start + 4] if x.startswith("  ")]
    assert len(listed) == 1  # the watched chat account is not one
    assert listed[0].split()[:3] == ["acct_app", "throttle", "0.77"]
    assert "[app_backend]" in listed[0] and "echoes_caught, cot_requests" in listed[0]


def test_the_summary_has_no_false_positive_line_when_there_are_none(capsys):
    labels = {"acct_x": AccountLabel("acct_x", True, "hydra", "hydra")}
    _print_summary(60.0, 1, 1, 1, {"acct_x": record("acct_x", "block", 1.0, "fresh_card")}, labels)
    assert "false positives" not in capsys.readouterr().out
