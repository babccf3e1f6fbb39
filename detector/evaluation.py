"""``detector evaluate``: scenarios through the replay path, measured against ground truth.

For every scenario the simulated events are generated once and fed, in event-time order, to one
:class:`~detector.detection.Detector` per candidate anomaly model. An account counts as *caught* once its
action reaches ``throttle`` or ``block``; an ordinary account caught is a false positive. "Served" exchanges
are those processed while the account's action (before the event) was still ``allow`` or ``watch`` and the
rate limiter's key blocks (:mod:`detector.keyblocks`) did not refuse the call: the gateway had no reason to
stop them. The limiter is modelled with the real :class:`~detector.keyblocks.KeyBook`, fed every key-block
record as soon as the detector makes it (as account decisions take effect from the next event); an account
a key block refused counts as caught from that call, so a key block that hits an ordinary account is a
false positive.

Reported per scenario and model: account-level precision, recall and false-positive rate (of ordinary
accounts); per campaign the time to first detection and the share of its exchanges served before it was
first detected; and the share of all attack exchanges served before their own account was caught.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detector.detection import CAUGHT, Detector
from detector.keyblocks import KeyBook, request_key_ids
from detector.progress import Progress
from detector.settings import Settings

#: ``name@seed`` runs a scenario with a seed of its own: the held-out scenario draws its whole population and
#: campaigns from its seed, so each seed is another held-out configuration.
DEFAULT_SUITE = ("default", "holdout", "paraphrase", "fast_rotation", "slow_ramp", "many_asns",
                 "holdout@11", "holdout@23", "holdout@31", "holdout@41", "vendor_tool", "vendor_tool@11")
#: How long another worker's events take to reach a worker's copy of the clusters (detector.signals), in event
#: time: a batch (up to 0.2 s), its publish, and the next fetch of cluster-signals; 2 s is several times that.
SIGNAL_LAG_MS = 2000
TARGETS = {"recall": 0.95, "fpr": 0.001, "first_detect_share": 0.005, "served_share": 0.02}


@dataclass
class AccountOutcome:
    events: int = 0
    served: int = 0
    first_ts: int | None = None
    caught_ts: int | None = None
    caught_by: str | None = None  # what caught it: "a key block", or the catching record's reasons (caught_on)
    max_score: float = 0.0


@dataclass
class Outcome:
    """What one detector did on one scenario, with the ground truth beside it."""

    model: str
    accounts: dict[str, AccountOutcome] = field(default_factory=lambda: defaultdict(AccountOutcome))
    campaign_first: dict[str, int] = field(default_factory=dict)  # campaign -> first event ts
    campaign_detect: dict[str, tuple[int, int]] = field(default_factory=dict)  # campaign -> (ts, events before)
    campaign_events: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    timeline: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    def observe(self, ev: dict[str, Any], det: Detector, before: str, campaign: str | None,
                refused: bool = False, record: dict[str, Any] | None = None) -> None:
        """Count one event: ``before`` is the account's action before it, ``refused`` whether a key block
        refused the call (then it was not served, and the account counts as caught), ``record`` the risk-score
        record the detector emitted on it (None: none was due)."""
        aid, ts = ev["account_id"], ev["ts"]
        acct = det.accounts[aid]
        out = self.accounts[aid]
        if out.first_ts is None:
            out.first_ts = ts
        out.events += 1
        out.max_score = max(out.max_score, acct.score)
        if before not in CAUGHT and not refused:
            out.served += 1
        if out.caught_ts is None and (refused or acct.action in CAUGHT):
            out.caught_ts = ts
            out.caught_by = "a key block" if refused else caught_on(record)
            if campaign:
                self.timeline[campaign].append((ts, 1))
        if campaign:
            self.campaign_first.setdefault(campaign, ts)
            self.campaign_events[campaign] += 1
            if campaign not in self.campaign_detect and (refused or acct.action in CAUGHT):
                self.campaign_detect[campaign] = (ts, self.campaign_events[campaign])


def caught_on(record: dict[str, Any] | None) -> str:
    """The reasons of the record that caught an account, for the report: each code and its share of the push.

    >>> caught_on({"reasons": [{"code": "echoes_caught", "weight": 0.61}, {"code": "harvest", "weight": 0.2}]})
    'echoes_caught 0.61, harvest 0.20'
    >>> caught_on(None)
    'an earlier decision'
    """
    if record is None:  # the call that found it caught emitted none: the decision came before (a restored account's)
        return "an earlier decision"
    return ", ".join(f"{r['code']} {r['weight']:.2f}" for r in record["reasons"][:3]) or "no reason given"


class Limiter:
    """The rate limiter as the evaluation models it: an account's own decision, then the key blocks.

    Mirrors :meth:`detector.ratelimit.RateLimiter.decide`: a call is refused by key blocks when the
    account holds no ``allow`` decision of its own and its keys link to a blocked cluster
    (:meth:`KeyBook.match`)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.book = KeyBook()
        self.allowed: set[str] = set()  # accounts whose latest record is "allow"
        self._applied: list[tuple[str, bytes]] = []  # the key-block records, in order (for clone)

    def clone(self) -> Limiter:
        """A limiter with this one's decisions and key blocks (a restarted worker's limiter keeps them)."""
        other = Limiter(self.secret)
        other.allowed = set(self.allowed)
        for key_id, value in self._applied:
            other._keep(key_id, value)
        return other

    def _keep(self, key_id: str, value: bytes) -> None:
        self._applied.append((key_id, value))
        self.book.apply(key_id, value)

    def refuses(self, ev: dict[str, Any], before: str) -> bool:
        if before in CAUGHT or ev["account_id"] in self.allowed:
            return False
        return self.book.match(request_key_ids(ev, self.secret), ev["ts"]) is not None

    def take(self, det: Detector, record: dict[str, Any] | None) -> None:
        if record is not None:
            if record["action"] == "allow":
                self.allowed.add(record["account_id"])
            else:
                self.allowed.discard(record["account_id"])
        for kb in det.drain_key_blocks():
            self._keep(kb["key_id"], orjson.dumps(kb))


def metrics(outcome: Outcome, labels: dict[str, Any]) -> dict[str, Any]:
    """Account-level and campaign-level numbers for one outcome."""
    attack = {a for a, lab in labels.items() if lab.attack and a in outcome.accounts}
    ordinary = {a for a, lab in labels.items() if not lab.attack and a in outcome.accounts}
    caught = {a for a, o in outcome.accounts.items() if o.caught_ts is not None}
    tp, fp = len(caught & attack), len(caught & ordinary)
    start = min((o.first_ts for o in outcome.accounts.values() if o.first_ts is not None), default=0)
    attack_events = sum(outcome.accounts[a].events for a in attack)
    attack_served = sum(outcome.accounts[a].served for a in attack)
    campaigns = {}
    for name, total in sorted(outcome.campaign_events.items()):
        first = outcome.campaign_first[name]
        members = {a for a in attack if labels[a].campaign == name}
        det = outcome.campaign_detect.get(name)
        campaigns[name] = {
            "accounts": len(members),
            "events": total,
            "recall": len(members & caught) / len(members) if members else 0.0,
            "hours_to_first_detection": (det[0] - first) / 3.6e6 if det else None,
            "first_detect_share": det[1] / total if det else 1.0,
            "served_share": sum(outcome.accounts[a].served for a in members) / max(total, 1),
        }
    return {
        "model": outcome.model,
        "attack_accounts": len(attack),
        "ordinary_accounts": len(ordinary),
        "tp": tp,
        "fp": fp,
        "recall": tp / len(attack) if attack else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "fpr": fp / len(ordinary) if ordinary else 0.0,
        "served_share": attack_served / attack_events if attack_events else 0.0,
        "first_detect_share": max((c["first_detect_share"] or 0.0 for c in campaigns.values()), default=0.0),
        "campaigns": campaigns,
        "seconds": outcome.seconds,
        # Each false positive: its kind, when it was caught (days into the run, hours after its first call) and on
        # what; and each campaign's missed accounts' highest scores.
        "false_positives": [
            {"account": a, "kind": labels[a].kind, "day": (o.caught_ts - start) / 8.64e7,
             "hours_in": (o.caught_ts - (o.first_ts or o.caught_ts)) / 3.6e6, "caught_by": o.caught_by}
            for a, o in sorted(((a, outcome.accounts[a]) for a in caught & ordinary), key=lambda x: x[1].caught_ts or 0)
            if o.caught_ts is not None],
        "missed": {name: sorted(outcome.accounts[a].max_score for a in attack - caught if labels[a].campaign == name)
                   for name in sorted(outcome.campaign_events)},
    }


def evaluate_scenario(scenario: str, models: list[str], settings: Settings, *, scale: float = 1.0,
                      seed: int = 7, workers: int = 1, share: bool = True,
                      signal_lag_ms: int = SIGNAL_LAG_MS, days: int | None = None) -> tuple[Any, list[Outcome]]:
    """Generate ``scenario`` once (over ``days``, if given: :func:`detector.simulate.build`) and run one detector
    per model over it.

    ``workers`` > 1: the accounts are split over that many detectors per model by their partition
    (:func:`detector.envelope.account_partition` over ``workers`` partitions), as that many workers would
    hold them. With ``share`` each detector's cluster signals (:mod:`detector.signals`) reach the others
    ``signal_lag_ms`` of event time after the event that made them, as ``cluster-signals`` carries them
    between workers; without, each links only its own accounts."""
    from detector import simulate
    from detector.envelope import account_partition

    sim = simulate.build(scenario, seed=seed, scale=scale, fingerprint_key=settings.fingerprint_key.reveal().encode(),
                         days=days)
    labels = sim.labels
    secret = settings.fingerprint_key.reveal().encode()
    sharing = share and workers > 1
    shards = [[Detector(settings.detection, anomaly_model=m, key_secret=secret, share_clusters=sharing)
               for _ in range(workers)] for m in models]
    in_flight: list[deque[tuple[int, int, list[Any]]]] = [deque() for _ in models]  # (due ts, from shard, signals)
    limiters = [Limiter(secret) for _ in models]  # one limiter reads every worker's key blocks
    outcomes = [Outcome(model=m) for m in models]
    for ev in _events(sim, f"evaluate {scenario}" + (f" over {workers} workers" if workers > 1 else "")):
        lab = labels.get(ev["account_id"])
        campaign = lab.campaign if lab is not None and lab.attack else None
        shard = account_partition(ev["account_id"], workers) if workers > 1 else 0
        for dets, out, limiter, flight in zip(shards, outcomes, limiters, in_flight, strict=True):
            while flight and flight[0][0] <= ev["ts"]:
                _, origin, signals = flight.popleft()
                for i, other in enumerate(dets):
                    if i != origin:
                        other.apply_signals(signals)
            signals = _step(dets[shard], limiter, out, ev, campaign, drain=sharing)
            if signals:
                flight.append((ev["ts"] + signal_lag_ms, shard, signals))
    return sim, outcomes


def _step(det: Detector, limiter: Limiter, out: Outcome, ev: dict[str, Any], campaign: str | None, *,
          drain: bool) -> list[Any]:
    """One event through ``det`` as the gateway and the worker see it: refused by the limiter or served,
    scored, its records taken by the limiter, counted in ``out`` (CPU time included). Returns the detector's
    cluster signals when ``drain`` (none otherwise)."""
    acct = det.accounts.get(ev["account_id"])
    before = acct.action if acct is not None else "allow"
    refused = limiter.refuses(ev, before)
    t = time.perf_counter()
    record = det.process(ev, emitted_at=ev["ts"])
    signals = det.drain_signals() if drain else []
    out.seconds += time.perf_counter() - t
    limiter.take(det, record)
    out.observe(ev, det, before, campaign, refused, record)
    return signals


def _events(sim: Any, label: str) -> Iterator[dict[str, Any]]:
    """The scenario's events, with a progress line every 5,000."""
    prog = Progress(label, total=sim.count_hint())
    n = 0
    for ev in sim.events():
        yield ev
        n += 1
        if n % 5000 == 0:
            prog.update(n)
    prog.update(n)
    prog.close()


def evaluate_restart(scenario: str, model: str, settings: Settings, *, at_h: float, scale: float = 1.0,
                     seed: int = 7, lookback_h: float = 24.0, days: int | None = None
                     ) -> tuple[Any, dict[str, Outcome]]:
    """One worker holding every account restarts ``at_h`` hours into ``scenario``; three runs in one pass.

    ``running``: no restart. At the restart the others take the accounts back from their snapshots
    (:func:`~detector.detection.dump_account`, as the changelog holds them) into a new detector, with a new
    anomaly model and fusion at its priors; the rate limiter keeps its decisions and key blocks (compacted
    topics). ``cold``: nothing else, the cross-account state is rebuilt from the stream (the worker before
    the warm start). ``warm``: the new detector first folds in the old one's cluster signals of the last
    ``lookback_h`` hours, as :func:`detector.streaming.app.warm_up` reads them from ``cluster-signals``."""
    import copy

    from detector import simulate
    from detector.detection import dump_account

    sim = simulate.build(scenario, seed=seed, scale=scale, fingerprint_key=settings.fingerprint_key.reveal().encode(),
                         days=days)
    secret = settings.fingerprint_key.reveal().encode()

    def fresh() -> Detector:
        return Detector(settings.detection, anomaly_model=model, key_secret=secret, share_clusters=True)

    dets, limiters, outcomes = {"running": fresh()}, {"running": Limiter(secret)}, {"running": Outcome(model=model)}
    sent: deque[tuple[int, list[Any]]] = deque()  # (ts, signals) of the last lookback_h, as cluster-signals keeps
    restart_ts: int | None = None
    lookback_ms = int(lookback_h * 3_600_000)
    for ev in _events(sim, f"evaluate {scenario}, a restart at {at_h:g} h"):
        ts = ev["ts"]
        if restart_ts is None:
            restart_ts = ts + int(at_h * 3_600_000)
        if len(dets) == 1 and ts >= restart_ts:
            old = dets["running"]
            snapshots = [(aid, dump_account(acct, aid in old.allowlist)) for aid, acct in old.accounts.items()]
            for name in ("cold", "warm"):
                det = dets[name] = fresh()
                if name == "warm":
                    for _, signals in sent:
                        det.apply_signals(signals)
                det.restore(snapshots)
                limiters[name] = limiters["running"].clone()
                outcomes[name] = copy.deepcopy(outcomes["running"])
            sent.clear()
        lab = sim.labels.get(ev["account_id"])
        campaign = lab.campaign if lab is not None and lab.attack else None
        for name, det in dets.items():
            signals = _step(det, limiters[name], outcomes[name], ev, campaign, drain=True)
            if name == "running" and len(dets) == 1 and signals:
                sent.append((ts, signals))
                while sent and sent[0][0] < ts - lookback_ms:
                    sent.popleft()
    return sim, outcomes


#: Differences smaller than these are noise between models (one account in 200; half a point of share).
RECALL_TIE, SHARE_TIE = 0.005, 0.005


def choose(results: list[dict[str, Any]]) -> str:
    """The model to ship: within the false-positive budget first; then the highest recall and the least
    served share, each up to a tie margin; among the models still tied, the earliest first detection,
    then the cheapest (CPU seconds). A model that costs three times as much per event is not chosen for a
    served share 0.05 points lower.

    >>> r = lambda m, served, first, s: {"model": m, "fpr": 0.0, "recall": 1.0, "served_share": served,
    ...                                  "first_detect_share": first, "seconds": s}
    >>> choose([r("population", 0.0329, 0.0129, 60.0), r("hst", 0.0324, 0.0245, 180.0)])
    'population'
    >>> choose([r("population", 0.0329, 0.0129, 60.0), r("hst", 0.0200, 0.0245, 180.0)])
    'hst'
    """
    pool = [r for r in results if r["fpr"] <= TARGETS["fpr"]] or list(results)
    best_recall = max(r["recall"] for r in pool)
    pool = [r for r in pool if r["recall"] >= best_recall - RECALL_TIE]
    least_served = min(r["served_share"] for r in pool)
    pool = [r for r in pool if r["served_share"] <= least_served + SHARE_TIE]
    return min(pool, key=lambda r: (r["first_detect_share"], r["seconds"]))["model"]


# ------------------------------------------------------------------------------------------------------
def _plots(out_dir: Path, scenario: str, sim: Any, outcomes: list[Outcome], chosen: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sim.labels
    files = []
    best = next(o for o in outcomes if o.model == chosen)
    # 1. score distributions
    fig, ax = plt.subplots(figsize=(7, 3.6))
    atk = [o.max_score for a, o in best.accounts.items() if labels[a].attack]
    ords = [o.max_score for a, o in best.accounts.items() if not labels[a].attack]
    bins = [i / 40 for i in range(41)]
    ax.hist(ords, bins=bins, alpha=0.6, label=f"ordinary ({len(ords)})", color="tab:blue")
    ax.hist(atk, bins=bins, alpha=0.6, label=f"attack ({len(atk)})", color="tab:red")
    ax.set_yscale("log")
    files.append(_save(plt, fig, ax, out_dir, f"{scenario}-scores.png", f"{scenario}: score distributions ({chosen})",
                       "highest risk score reached by the account", "accounts"))
    # 2. precision-recall over the score threshold, per model
    fig, ax = plt.subplots(figsize=(5, 4))
    for o in outcomes:
        pts = sorted(((acc.max_score, labels[a].attack) for a, acc in o.accounts.items()), reverse=True)
        n_pos = sum(1 for _, y in pts if y) or 1
        tp = fp = 0
        prec, rec = [], []
        for _, y in pts:
            tp += y
            fp += not y
            prec.append(tp / (tp + fp))
            rec.append(tp / n_pos)
        ax.plot(rec, prec, label=o.model)
    ax.set_ylim(0, 1.02)
    files.append(_save(plt, fig, ax, out_dir, f"{scenario}-pr.png", f"{scenario}: precision-recall",
                       "recall (attack accounts)", "precision"))
    # 3. detection timeline: campaign accounts caught over time
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for campaign, points in sorted(best.timeline.items()):
        members = sum(1 for lab in labels.values() if lab.attack and lab.campaign == campaign)
        start = best.campaign_first[campaign]
        xs = [(ts - start) / 3.6e6 for ts, _ in points]
        ys = [(i + 1) / members for i in range(len(points))]
        ax.step(xs, ys, where="post", label=campaign)
    files.append(_save(plt, fig, ax, out_dir, f"{scenario}-timeline.png", f"{scenario}: detection timeline ({chosen})",
                       "hours since the campaign's first exchange", "share of its accounts caught"))
    return files


def _save(plt: Any, fig: Any, ax: Any, out_dir: Path, name: str, title: str, xlabel: str, ylabel: str) -> str:
    """Label, lay out, write and close one figure; return its file name."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def _fmt_hours(h: float | None) -> str:
    return "never" if h is None else f"{h:.2f} h"


def run_evaluation(settings: Settings, *, scenarios: list[str] | None, models: str, scale: float,
                   out_dir: Path, seed: int = 7, compare_all: bool = False, workers: tuple[int, ...] = (),
                   restart_at_h: float = 0.0, days: int | None = None) -> int:
    """Run the suite, print a table per scenario, write ``EVALUATION.md`` and plots under ``docs/eval``.

    The candidate models are compared on the first scenario; the chosen one alone runs the rest (each
    model costs a full pass), unless ``compare_all``. ``workers``: worker counts for which the chosen model
    also runs the first scenario with the accounts split over that many detectors (one pass each).
    ``restart_at_h`` (0: not): the chosen model also runs the first scenario with the worker restarted that many
    hours in, cold and warm (:func:`evaluate_restart`). ``days``: every scenario runs that many days instead of
    its own.
    """
    from detector import simulate

    names = list(scenarios or DEFAULT_SUITE)
    days_opt = f" --days {days}" if days is not None else ""
    runs = [suite_entry(name, seed, simulate.scenario_names()) for name in names]
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    plot_dir = out_dir / "docs" / "eval"
    plot_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Evaluation", "",
             f"Reproduce: `detector evaluate --scale {scale:g} --seed {seed}{days_opt}` "
             f"(models compared on {names[0]}: {', '.join(model_list)}; the chosen one runs the other "
             f"scenarios). Generated {time.strftime('%Y-%m-%d')} on "
             f"{_machine()}.", "",
             "An account is *caught* when its action reaches throttle or block; a caught ordinary account is a "
             "false positive. FPR is over ordinary accounts. *first-detect share*: share of the campaign's "
             "exchanges served before any of its accounts was caught (worst campaign). *served share*: share "
             "of all attack exchanges served before their own account was caught. A call the rate limiter refuses "
             "on a key block (a new account on a blocked cluster's card or network, detector/keyblocks.py) is "
             "not served, and its account counts as caught from then on (an ordinary one as a false "
             "positive).", "",
             f"Targets: recall ≥ {TARGETS['recall']}, FPR ≤ {TARGETS['fpr']:.1%}, first-detect share ≤ "
             f"{TARGETS['first_detect_share']:.1%}, served share ≤ {TARGETS['served_share']:.0%}.", ""]
    summary = []
    for entry, (scenario, run_seed) in zip(names, runs, strict=True):
        sim, outcomes = evaluate_scenario(scenario, model_list, settings, scale=scale, seed=run_seed, days=days)
        results = [metrics(o, sim.labels) for o in outcomes]
        chosen = choose(results)
        lines += [f"## {entry}", "", sim.description, "",
                  "| model | recall | precision | FPR | FP / ordinary | first-detect share | served share | µs/event |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results:
            mark = " (chosen)" if r["model"] == chosen else ""
            lines.append(f"| {r['model']}{mark} | {r['recall']:.3f} | {r['precision']:.3f} | {r['fpr']:.4%} | "
                         f"{r['fp']} / {r['ordinary_accounts']} | {r['first_detect_share']:.3%} | "
                         f"{r['served_share']:.2%} | {1e6 * r['seconds'] / max(_n_events(outcomes[0]), 1):.0f} |")
            print(f"{entry:<14} {r['model']:<10}{mark:<9} recall={r['recall']:.3f} precision={r['precision']:.3f} "
                  f"fpr={r['fpr']:.4%} ({r['fp']}/{r['ordinary_accounts']}) first_detect={r['first_detect_share']:.3%} "
                  f"served={r['served_share']:.2%}")
        best = next(r for r in results if r["model"] == chosen)
        summary.append((entry, best))
        if not compare_all:
            model_list = [chosen]
        lines += ["", f"Per campaign ({chosen}):", "",
                  "| campaign | accounts | exchanges | recall | time to first detection | first-detect share "
                  "| served share |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in best["campaigns"].items():
            lines.append(f"| {name} | {c['accounts']} | {c['events']:,} | {c['recall']:.3f} | "
                         f"{_fmt_hours(c['hours_to_first_detection'])} | {c['first_detect_share']:.3%} | "
                         f"{c['served_share']:.2%} |")
        lines += ["", *_misses(best)]
        try:
            # Named for the run's length too: a --days run does not overwrite the suite's plots.
            stem = entry.replace("@", "-seed") + (f"-{days}d" if days is not None else "")
            files = _plots(plot_dir, stem, sim, outcomes, chosen)
            lines += [""] + [f"![{f}](docs/eval/{f})" for f in files]
        except ImportError:
            lines += ["", "(plots skipped: matplotlib is not installed; `pip install -e '.[plots]'`)"]
        lines.append("")
    first, first_seed = runs[0]
    if workers and summary:
        lines += _scale_out(first, summary[0][1], workers, settings, scale, first_seed, days)
    if restart_at_h and summary:
        lines += _restart_section(first, summary[0][1]["model"], restart_at_h, settings, scale, first_seed, days)
    lines[8:8] = _summary_table(summary)
    (out_dir / "EVALUATION.md").write_text("\n".join(lines) + "\n")
    print(f"evaluate: wrote {out_dir / 'EVALUATION.md'} and plots in {plot_dir}", file=sys.stderr)
    return 0


def suite_entry(name: str, seed: int, known: list[str]) -> tuple[str, int]:
    """A suite entry: ``scenario`` (run with ``seed``) or ``scenario@seed``. Raises ValueError, in one line, for
    a scenario not in ``known`` or a seed that is not an integer.

    >>> suite_entry("holdout@11", 7, ["default", "holdout"]), suite_entry("default", 7, ["default"])
    (('holdout', 11), ('default', 7))
    >>> suite_entry("holdout@x", 7, ["holdout"])
    Traceback (most recent call last):
    ...
    ValueError: scenario 'holdout@x': the seed after @ must be an integer
    """
    scenario, at, own = name.partition("@")
    if scenario not in known:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(known)} (optionally @SEED)")
    if not at:
        return scenario, seed
    try:
        return scenario, int(own)
    except ValueError:
        raise ValueError(f"scenario {name!r}: the seed after @ must be an integer") from None


def _scale_out(scenario: str, one: dict[str, Any], workers: tuple[int, ...], settings: Settings, scale: float,
               seed: int, days: int | None = None) -> list[str]:
    """The section on detection with the accounts split over several workers, with and without cluster signals."""
    model = one["model"]
    lines = [f"## {scenario}, accounts split over several workers", "",
             "Each worker holds the accounts of its partitions (split by the murmur2 partition of their id), so a "
             "campaign's accounts are spread over all workers. *Shared*: each worker keeps a copy of the clusters "
             "and folds in the other workers' events from `cluster-signals` (detector/signals.py), here "
             f"{SIGNAL_LAG_MS / 1000:g} s of event time after each event. *Not shared*: each worker links only its "
             f"own accounts. Same traffic, model {model} (`detector evaluate --workers N`).", "",
             "| workers | clusters | recall | FPR | FP / ordinary | first-detect share | served share "
             "| per campaign: served share |",
             "|---|---|---|---|---|---|---|---|"]
    runs = [(1, True)] + [(n, share) for n in workers for share in (True, False)]
    for n, share in runs:
        if n == 1:
            r = one
        else:
            sim, [outcome] = evaluate_scenario(scenario, [model], settings, scale=scale, seed=seed, workers=n,
                                               share=share, days=days)
            r = metrics(outcome, sim.labels)
            print(f"{scenario:<14} {model:<10} {n} workers {'shared' if share else 'not shared'}: "
                  f"recall={r['recall']:.3f} fpr={r['fpr']:.4%} first_detect={r['first_detect_share']:.3%} "
                  f"served={r['served_share']:.2%}")
        per = ", ".join(f"{name} {c['served_share']:.1%}" for name, c in r["campaigns"].items())
        how = "one worker" if n == 1 else "shared" if share else "not shared"
        lines.append(f"| {n} | {how} | {r['recall']:.3f} | {r['fpr']:.4%} | {r['fp']} / {r['ordinary_accounts']} | "
                     f"{r['first_detect_share']:.3%} | {r['served_share']:.2%} | {per} |")
    return lines + [""]


def _restart_section(scenario: str, model: str, at_h: float, settings: Settings, scale: float,
                     seed: int, days: int | None = None) -> list[str]:
    """The section on a worker restart: running on, cold, and warm from the cluster signals."""
    lookback_h = settings.worker.signals_lookback_s / 3600
    lines = [f"## {scenario}, the worker restarted at {at_h:g} h", "",
             f"One worker holds every account and restarts {at_h:g} hours into the scenario. Both restarts take the "
             "accounts back from their snapshots (the changelog: windows, decisions) into a new detector with a new "
             "anomaly model; the rate limiter keeps its decisions and key blocks. *Cold*: the cross-account state "
             "(content index, cluster links and windows, blocked clusters, caught prompts) is rebuilt from the "
             f"stream. *Warm*: the new detector first folds in the last {lookback_h:g} h of the old one's "
             "`cluster-signals` (the warm start, `detector.streaming.app.warm_up`). Same traffic, model "
             f"{model} (`detector evaluate --restart-at {at_h:g}`).", "",
             "| run | recall | FPR | FP / ordinary | first-detect share | served share | per campaign: served share |",
             "|---|---|---|---|---|---|---|"]
    sim, outcomes = evaluate_restart(scenario, model, settings, at_h=at_h, scale=scale, seed=seed,
                                     lookback_h=lookback_h, days=days)
    for name, outcome in outcomes.items():
        r = metrics(outcome, sim.labels)
        per = ", ".join(f"{c_name} {c['served_share']:.2%}" for c_name, c in r["campaigns"].items())
        how = {"running": "no restart", "cold": "restarted cold", "warm": "restarted warm"}[name]
        lines.append(f"| {how} | {r['recall']:.3f} | {r['fpr']:.4%} | {r['fp']} / {r['ordinary_accounts']} | "
                     f"{r['first_detect_share']:.3%} | {r['served_share']:.2%} | {per} |")
        print(f"{scenario:<14} {model:<10} {how}: recall={r['recall']:.3f} fpr={r['fpr']:.4%} "
              f"first_detect={r['first_detect_share']:.3%} served={r['served_share']:.2%}")
    return lines + [""]


def _misses(result: dict[str, Any]) -> list[str]:
    """The report's lines on what went wrong: every false positive and on what it was caught, and the highest
    scores the missed attack accounts reached."""
    fps = result["false_positives"]
    lines = ["False positives: none." if not fps else f"False positives ({len(fps)}), as the record that caught each "
             "read them (its top reasons and their shares of the push):"]
    if fps:
        lines += ["", "| account | kind | caught on day | hours after its first call | caught on |",
                  "|---|---|---|---|---|"]
        lines += [f"| {f['account']} | {f['kind']} | {f['day']:.1f} | {f['hours_in']:.1f} | {f['caught_by']} |"
                  for f in fps]
    missed = {name: scores for name, scores in result["missed"].items() if scores}
    if not missed:
        return [*lines, "", "Missed attack accounts: none."]
    every = sorted(s for scores in missed.values() for s in scores)
    counts = ", ".join(f"{name} {len(scores):,}" for name, scores in missed.items())
    at = lambda q: every[round(q * (len(every) - 1))]  # noqa: E731 - a quantile of the sorted scores
    return [*lines, "", f"Missed attack accounts: {len(every):,} ({counts}). Their highest scores: median "
            f"{at(0.5):.2f}, 90th percentile {at(0.9):.2f}, highest {every[-1]:.2f}."]


def _n_events(outcome: Outcome) -> int:
    return sum(a.events for a in outcome.accounts.values())


def _summary_table(summary: list[tuple[str, dict[str, Any]]]) -> list[str]:
    def ok(v: float, target: float, higher: bool = False) -> str:
        return "✅" if (v >= target if higher else v <= target) else "❌"

    rows = ["## Summary (chosen model per scenario)", "",
            "| scenario | model | recall | FPR | first-detect share | served share |", "|---|---|---|---|---|---|"]
    for scenario, r in summary:
        rows.append(f"| {scenario} | {r['model']} | {r['recall']:.3f} {ok(r['recall'], TARGETS['recall'], True)} | "
                    f"{r['fpr']:.3%} {ok(r['fpr'], TARGETS['fpr'])} | "
                    f"{r['first_detect_share']:.3%} {ok(r['first_detect_share'], TARGETS['first_detect_share'])} | "
                    f"{r['served_share']:.2%} {ok(r['served_share'], TARGETS['served_share'])} |")
    return rows + [""]


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"

