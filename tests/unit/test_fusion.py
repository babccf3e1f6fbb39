"""Fusion: the priors are the model's weights, verdicts move them, actions keep their hysteresis, and the
README's evidence table says what the code weighs."""

import math
import re
from pathlib import Path

import pytest

from detector.fusion import DETAILS, PRIOR_INTERCEPT, PRIOR_WEIGHTS, Fusion, decide, detail
from detector.settings import DetectionSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.mark.parametrize("term", sorted(PRIOR_WEIGHTS))
def test_each_prior_is_the_weight_the_model_starts_from(term):
    # Fusion writes the priors into River's private _weights; if River renamed it, every term would weigh 0.
    assert Fusion().score({term: 1.0}) == pytest.approx(sigmoid(PRIOR_INTERCEPT + PRIOR_WEIGHTS[term]))


def test_no_evidence_scores_the_intercept_and_unknown_terms_weigh_nothing():
    fz = Fusion()
    assert fz.score({}) == pytest.approx(sigmoid(PRIOR_INTERCEPT))
    assert fz.score({"not_a_term": 1.0}) == pytest.approx(sigmoid(PRIOR_INTERCEPT))


def test_verdicts_move_the_score_of_the_evidence_they_were_given():
    evidence = {"cluster_templates": 1.0, "cot_requests": 0.5}
    attack, benign = Fusion(), Fusion()
    before = attack.score(evidence)
    for _ in range(20):
        attack.learn_one(evidence, True)
        benign.learn_one(evidence, False)
    assert attack.score(evidence) > before > benign.score(evidence)
    assert attack.labels_learned == benign.labels_learned == 20


def test_reasons_are_the_positive_contributions_largest_first_as_shares():
    reasons = Fusion().reasons({"linked_to_blocked": 1.0, "cot_requests": 1.0, "harvest": 0.0})
    assert [code for code, _ in reasons] == ["linked_to_blocked", "cot_requests"]
    assert sum(share for _, share in reasons) == pytest.approx(1.0)
    assert reasons[0][1] == pytest.approx(12.0 / 13.0)


def test_actions_go_up_at_their_threshold_and_down_only_past_the_hysteresis():
    s = DetectionSettings()
    assert decide(s.throttle_at, "allow", s) == "throttle"
    assert decide(s.throttle_at - s.hysteresis / 2, "throttle", s) == "throttle"
    assert decide(s.throttle_at - 2 * s.hysteresis, "throttle", s) == "watch"
    assert decide(0.0, "block", s) == "allow"


def test_every_term_has_a_sentence_for_the_soc():
    missing = sorted(set(PRIOR_WEIGHTS) - set(DETAILS))
    assert not missing
    for term in PRIOR_WEIGHTS:
        assert "{" not in detail(term, 0.5, n=3)


def test_readme_lists_every_evidence_term_with_its_prior_weight():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Detection"):text.index("### Operations")]
    table = dict(re.findall(r"^\| `(\w+)` \| ([\d.]+) \|", section, flags=re.M))
    assert {term: float(w) for term, w in table.items()} == PRIOR_WEIGHTS
    assert f"the intercept is −{-PRIOR_INTERCEPT}" in " ".join(section.split())
