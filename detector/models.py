"""Online anomaly models over account and cluster feature vectors, and the choice between them.

Every model follows River's protocol: ``learn_one(x)`` and ``score_one(x)``, high score = anomalous.
Raw scores of different models live on different scales (HalfSpaceTrees: mass in [0, 1]; LODA: negative
log-density), so :class:`RankScorer` turns any of them into the rank of the score among recently learned
scores, in [0, 1]: 0.99 means "more anomalous than 99% of recent ordinary traffic".

Candidates (chosen by ``detector evaluate``, not by taste):

- ``hst``: ``river.anomaly.HalfSpaceTrees`` on features squashed to [0, 1];
- ``loda``: ``river.anomaly.LODA`` (sparse random projections with histograms);
- ``population``: :class:`PopulationBaseline`, an account against its peers: mean absolute z-score of each
  feature against exponentially weighted population statistics.

>>> m = make_model("population")
>>> for i in range(200):
...     m.learn_one({"a": 0.1 + (i % 7) / 100, "b": 0.5})
>>> m.score_one({"a": 0.12, "b": 0.5}) < m.score_one({"a": 0.9, "b": 0.5})
True
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Protocol

from river import anomaly, stats
from river.base import AnomalyDetector

MODEL_NAMES = ("population", "hst", "loda")


class Scorer(Protocol):
    def learn_one(self, x: dict[str, float]) -> None: ...

    def score_one(self, x: dict[str, float]) -> float: ...


class PopulationBaseline(AnomalyDetector):
    """Peers as the baseline: for each feature an exponentially weighted mean and variance of the
    population; the score is the mean absolute z-score over features, capped at ``z_cap`` per feature.

    ``fading`` is the weight of the newest observation (0.001: the baseline spans ~1,000 learned points).
    Features may appear or vanish between calls.
    """

    def __init__(self, fading: float = 0.001, z_cap: float = 6.0) -> None:
        self.fading = fading
        self.z_cap = z_cap
        self._mean: dict[str, stats.EWMean] = {}
        self._var: dict[str, stats.EWVar] = {}
        # (mean, sd) per feature as of the last learn_one: scoring runs on every event, learning far less
        # often (the Sampler), so the square roots are taken when learning.
        self._params: dict[str, tuple[float, float]] = {}

    def learn_one(self, x: dict[str, float]) -> None:  # type: ignore[override]  # River types x loosely
        for k, v in x.items():
            mean = self._mean.get(k)
            if mean is None:
                mean = self._mean[k] = stats.EWMean(fading_factor=self.fading)
                var = self._var[k] = stats.EWVar(fading_factor=self.fading)
            else:
                var = self._var[k]
            mean.update(v)
            var.update(v)
            sd = math.sqrt(max(var.get(), 0.0)) + 1e-3  # EWVar can round below 0
            self._params[k] = (mean.get(), sd)

    def score_one(self, x: dict[str, float]) -> float:  # type: ignore[override]
        total, n = 0.0, 0
        params, cap = self._params, self.z_cap
        for k, v in x.items():
            p = params.get(k)
            if p is not None:
                z = abs(v - p[0]) / p[1]
                total += cap if z > cap else z  # min(z, cap) without a call (runs per feature, per event)
                n += 1
        return total / n if n else 0.0


class RankScorer:
    """Wraps a model; ``score_one`` returns the rank of its raw score among the last ``window`` raw
    scores of learned points (0 until ``warm_up`` points were learned).

    Keeps a sorted list and a queue of the recent raw scores: O(window) memory, O(log window + window
    shifts) per learn. ``tail_share`` is the share of scored points ranked above 0.95, exponentially
    weighted over about the last 1,000 (about 0.05 while the baseline fits the traffic; drift, or a flood
    of odd traffic, moves it).

    >>> from detector.models import PopulationBaseline
    >>> rs = RankScorer(PopulationBaseline(), window=100, warm_up=10)
    >>> for i in range(300):
    ...     rs.learn_one({"x": i % 5 / 5})
    >>> rs.score_one({"x": 0.4}), rs.score_one({"x": 9.0}), round(rs.tail_share, 4)  # one of two in the tail
    (0.4, 1.0, 0.001)
    """

    TAIL = 0.95
    TAIL_FADING = 0.001

    def __init__(self, model: Scorer, window: int = 2000, warm_up: int = 200) -> None:
        self.model = model
        self.window = window
        self.warm_up = warm_up
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self.learned = 0
        self.tail_share = 0.0

    @property
    def warm(self) -> bool:
        return self.learned >= self.warm_up

    def score_one(self, x: dict[str, float]) -> float:
        if not self.warm:
            return 0.0
        raw = self.model.score_one(x)
        rank = bisect.bisect_left(self._sorted, raw) / len(self._sorted)
        self.tail_share += self.TAIL_FADING * ((rank > self.TAIL) - self.tail_share)
        return rank

    def learn_one(self, x: dict[str, float]) -> None:
        raw = self.model.score_one(x)
        self.model.learn_one(x)
        self.learned += 1
        self._recent.append(raw)
        bisect.insort(self._sorted, raw)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]


def make_model(name: str, seed: int = 42) -> Scorer:
    """A fresh anomaly model by name (one of :data:`MODEL_NAMES`); seeded, so runs reproduce."""
    if name == "population":
        return PopulationBaseline()
    if name == "hst":
        return anomaly.HalfSpaceTrees(n_trees=25, height=8, window_size=250, seed=seed)
    if name == "loda":
        return anomaly.LODA(n_bins=10, n_random_cuts=100, seed=seed)
    raise ValueError(f"unknown anomaly model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def squash(f: dict[str, float]) -> dict[str, float]:
    """Account features mapped to [0, 1] (HalfSpaceTrees needs bounded inputs; the others don't mind).

    >>> squash({"n_24h": 0.0, "cot_share": 0.5, "distinct_ips": 64.0})
    {'n_24h': 0.0, 'cot_share': 0.5, 'distinct_ips': 1.0}
    """
    # Runs on every scored event (24 features): shares, most of the features, are tested first, and the bounds
    # are conditional expressions rather than min() and max() calls, with the same results (NaN included:
    # ``1.0 if y > 1.0 else y`` is ``min(y, 1.0)``, ``0.0 if v < 0.0 else v`` is ``max(v, 0.0)``). Half the cost.
    out: dict[str, float] = {}
    kinds = _SQUASH_KIND
    for k, v in f.items():
        kind = kinds.get(k)
        if kind is None:
            kind = kinds[k] = _squash_kind(k)
        if kind == _SHARE:
            out[k] = 0.0 if v < 0.0 else 1.0 if v > 1.0 else v
            continue
        if kind == _COUNT:
            y = math.log1p(0.0 if v < 0.0 else v) / _LOG_100K
        elif kind == _RATIO:
            y = math.log1p(v) / _LOG_100
        elif kind == _GAP:
            y = v / 4.0
        elif kind == _DISTINCT:
            y = v / 64.0
        else:  # _AGE
            y = math.log1p(v) / _LOG_10Y
        out[k] = 1.0 if y > 1.0 else y
    return out


_COUNT, _RATIO, _GAP, _DISTINCT, _AGE, _SHARE = range(6)
_LOG_100K, _LOG_100, _LOG_10Y = math.log1p(100_000), math.log1p(100), math.log1p(3650)
_SQUASH_KIND: dict[str, int] = {}  # feature name -> how squash maps it, decided once per name


def _squash_kind(k: str) -> int:
    if k.startswith(("n_", "volume")) or k in ("in_tokens", "out_tokens", "size", "active_accounts",
                                               "per_account_24h"):
        return _COUNT
    if k == "out_in_ratio":
        return _RATIO
    if k == "gap_log_std":
        return _GAP
    if k.startswith("distinct_"):
        return _DISTINCT
    if k == "account_age_days":
        return _AGE
    return _SHARE


class Sampler:
    """Decides which points a model learns from: at most one snapshot per account per ``every_ms`` of
    event time (so a heavy account does not become the whole baseline) and never a flagged one
    (the poisoning guard: do not learn from what you flagged)."""

    def __init__(self, every_ms: int = 30 * 60_000) -> None:
        self.every_ms = every_ms

    def should_learn(self, last_learned_ts: int, ts: int, flagged: bool) -> bool:
        return not flagged and (last_learned_ts == 0 or ts - last_learned_ts >= self.every_ms)
