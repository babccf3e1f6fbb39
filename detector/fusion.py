"""Fusion: evidence in [0, 1] -> a risk score, an action with hysteresis, and readable reasons.

The score is an online logistic regression (``river.linear_model.LogisticRegression``) over the
evidence. It starts from expert prior weights (:data:`PRIOR_WEIGHTS`) so it works before any label
exists, and it learns from analyst verdicts (``analyst-labels``) with a small learning rate. Reasons are
the evidence terms with the largest positive contributions ``weight * evidence``, normalised to sum to 1.

>>> fz = Fusion()
>>> evidence = {"shared_template": 1.0, "cluster_templates": 1.0, "cluster_new_accounts": 1.0, "cluster_size": 1.0,
...             "cot_requests": 1.0}
>>> round(fz.score(evidence), 2), fz.reasons(evidence)[0][0]
(0.86, 'shared_template')
>>> decide(0.9, "allow", DetectionSettings()), decide(0.8, "block", DetectionSettings())
('block', 'block')
>>> decide(0.6, "block", DetectionSettings())
'throttle'
"""

from __future__ import annotations

import math

from river import linear_model, optim

from detector.settings import DetectionSettings

ACTIONS = ("allow", "watch", "throttle", "block")

# Prior weight of each evidence term (logit units per unit of evidence). Account-level content and
# behaviour terms are individually weak on purpose: every one of them is also shown by some legitimate
# heavy user. Cluster terms carry the weight, because coordination is what distillation looks like.
PRIOR_WEIGHTS: dict[str, float] = {
    "shared_template": 2.0,  # prompts fill templates shared with other accounts, content unique
    "cot_requests": 1.0,  # asks for chain-of-thought
    "max_length_outputs": 0.8,  # answers run to the output limit
    "capability_focus": 0.5,  # traffic concentrated on one capability (coding, agentic, ...)
    "machine_schedule": 1.5,  # active around the clock at a steady rate
    "new_model_jump": 1.0,  # moved to a model within a day of its release
    "new_model_replay": 2.5,  # re-sends its own private prompts to a newly released model
    "young_account": 0.8,
    "anomaly": 1.0,  # the anomaly model ranks the account in the population's far tail
    "cluster_size": 0.8,  # many linked accounts active
    "cluster_load_balanced": 3.0,  # many linked accounts, each modest, together high volume, 24/7
    "cluster_templates": 2.0,  # linked accounts share prompt templates
    "cluster_new_accounts": 1.5,  # linked accounts are freshly created
    "cluster_cot": 1.0,
    "cluster_new_model": 1.5,
    "across_orgs": 1.0,  # an organisation's card or IP range is another organisation's too
    "harvest": 1.0,  # pulls long answers at a high rate, kept up for hours (a content pipeline can too)
    "cluster_harvest": 7.0,  # the same from an account linked to others (scaled by the cluster's size)
    "harvest_new_model": 3.0,  # the harvest moved to a model released within the last day
    # The harvest fills private templates another organisation fills too: coordination seen in content, as
    # strong as cluster_harvest's link at its fullest (EVALUATION.md: the paraphrasing reseller, caught after
    # 12.5 h at 3.0, is caught after 3.9 h at 7.0; no ordinary account of any scenario moved).
    "harvest_cross_org": 7.0,
    "shared_payment": 2.0,  # one payment method on many accounts outside any organisation
    # ... and the account freshly created: accounts opened in bulk on one card, as the campaigns' fraudulent ones
    # were. It sees a paraphrasing hydra's payment groups that no shared template links to the rest (EVALUATION.md:
    # hydra served 2.13% -> 0.92% on paraphrase). Ordinary accounts reach 0.27 of it at most (a coding team on one
    # card with a few new members).
    "fresh_card": 3.0,
    # ... and many of the card's recent new accounts already dropped: a campaign rotating throwaway accounts daily
    # on one card, one or two at work at a time (docs/DETECTION-LOG.md, *Over 44 days*).
    "card_cycling": 3.0,
    # ... or one of them caught for itself: the account opened to go on where a caught one was stopped. With
    # young_account, a throttle from the first call (docs/DETECTION-LOG.md, *`caught_card`*).
    "caught_card": 6.0,
    "network_rotation": 1.5,  # calls from many networks (ASNs) within a day or two: rotating proxies
    "linked_to_blocked": 12.0,  # linked to a cluster that is already blocked
    "near_blocked": 5.0,  # shares keys or templates with a blocked cluster, below the linking threshold
    "echoes_caught": 4.0,  # many of its prompts re-send (reworded or not) what caught accounts sent
}
PRIOR_INTERCEPT = -5.5

DETAILS: dict[str, str] = {
    "shared_template": "{pct} of prompts fill templates shared with other accounts",
    "cot_requests": "{pct} of prompts ask for step-by-step reasoning",
    "max_length_outputs": "{pct} of answers hit the output limit",
    "capability_focus": "traffic concentrated on one capability ({pct})",
    "machine_schedule": "active around the clock at a steady rate ({pct})",
    "new_model_jump": "{pct} of last-hour traffic on a model released within the last day",
    "new_model_replay": "{pct} of traffic re-sends its earlier prompts to a model released within the last day",
    "young_account": "account created {days:.1f} days ago",
    "anomaly": "unusual against the population of accounts ({pct})",
    "cluster_size": "cluster of {n} linked accounts",
    "cluster_load_balanced": "load spread over {n} linked accounts running around the clock",
    "cluster_templates": "{pct} of the cluster's prompts fill shared templates",
    "cluster_new_accounts": "{pct} of the cluster's traffic from newly created accounts",
    "cluster_cot": "{pct} of the cluster's prompts ask for step-by-step reasoning",
    "cluster_new_model": "{pct} of the cluster's last-hour traffic on a model released within the last day",
    "across_orgs": "shares its card or IP range with another organisation's accounts ({v:.0f} orgs in its cluster)",
    "harvest": "pulls long answers (~{v:.0f} output tokens each) at a high rate, kept up for hours",
    "cluster_harvest": "one of {n} linked accounts pulling long answers (~{v:.0f} output tokens each) at a high rate",
    "harvest_new_model": "pulls long answers at a high rate from a model released within the last day "
                         "({pct} of last-hour traffic)",
    "harvest_cross_org": "pulls long answers (~{v:.0f} output tokens each) on private templates that another "
                         "organisation's accounts fill too, and a caught or throwaway account",
    "shared_payment": "payment method shared by {v:.0f} accounts outside any organisation",
    "fresh_card": "newly created, on a payment method that {v:.0f} accounts outside any organisation share or were "
                  "opened on within two weeks",
    "card_cycling": "newly created, on a payment method whose {v:.0f} other new accounts of the last two weeks "
                    "went quiet",
    "caught_card": "newly created, on a payment method of an account already throttled or blocked",
    "network_rotation": "calls from {v:.0f} networks (ASNs) in the last one to two days",
    "linked_to_blocked": "linked to a blocked cluster",
    "near_blocked": "shares templates or infrastructure with a blocked cluster",
    "echoes_caught": "{pct} of prompts re-send (reworded or not) prompts that caught accounts sent",
    "allowlisted": "account or org is on the allowlist",
    "analyst_label": "analyst verdict",
}


class Fusion:
    """Evidence to score with an online logistic regression that starts from the priors."""

    def __init__(self, learning_rate: float = 0.02) -> None:
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate),
                                                     intercept_init=PRIOR_INTERCEPT, intercept_lr=learning_rate)
        # River has no public setter for initial weights; _weights is its VectorDict of coefficients.
        # tests/unit/test_fusion.py (test_each_prior_is_the_weight_the_model_starts_from) fails if that changes.
        for name, w in PRIOR_WEIGHTS.items():
            self.model._weights[name] = w
        self.labels_learned = 0
        self._weights = self.model.weights  # a copy; refreshed after learning

    def score(self, evidence: dict[str, float]) -> float:
        """Score in [0, 1]."""
        weights = self._weights
        # A list, not a generator: the same sum in the same order, cheaper (runs on every scored event).
        z = self.model.intercept + sum([weights.get(k, 0.0) * v for k, v in evidence.items() if v])
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def reasons(self, evidence: dict[str, float]) -> list[tuple[str, float]]:
        """The contributing terms, largest first, as (code, share of the push). Asked for only when a
        record is published, so it costs nothing on most events."""
        weights = self._weights
        contrib = sorted(((k, weights.get(k, 0.0) * v) for k, v in evidence.items() if v), key=lambda kv: -kv[1])
        positive = [(k, c) for k, c in contrib if c > 0.05]
        total = sum(c for _, c in positive) or 1.0
        return [(k, c / total) for k, c in positive]

    def learn_one(self, evidence: dict[str, float], attack: bool) -> None:
        self.model.learn_one(evidence, attack)
        self._weights = self.model.weights
        self.labels_learned += 1


def decide(score: float, previous: str, settings: DetectionSettings) -> str:
    """Action for ``score`` given the previous action: levels go up at their threshold and come down
    only when the score falls ``hysteresis`` below it, so an account near a line does not flap."""
    thresholds = (0.0, settings.watch_at, settings.throttle_at, settings.block_at)
    up = max(i for i, t in enumerate(thresholds) if score >= t)
    prev = ACTIONS.index(previous)
    if up >= prev:
        return ACTIONS[up]
    # Going down: stay at the highest level whose threshold minus hysteresis the score still clears.
    level = prev
    while level > up and score < thresholds[level] - settings.hysteresis:
        level -= 1
    return ACTIONS[level]


def detail(code: str, value: float, n: int = 0) -> str:
    """The human sentence for a reason code."""
    return DETAILS.get(code, code).format(pct=f"{value:.0%}", n=n, days=value, v=value)
