"""The SOC's two commands: see what the detector decided (``detector review``), give a verdict (``detector label``).

Grafana shows counts, never account ids (no account id is a metric label). An analyst who gets the
``NewClusterBlocked`` alert needs the accounts behind it, and the detector's reasons, to decide::

    detector review                               # accounts at throttle or block, by cluster, worst first
    detector review --action watch --since 6h     # or another action, recent records only
    detector review --cluster c_4f1a09 --json     # one cluster, as JSON for other tools
    detector review --account acct_1              # why is this account limited (or not)?
    detector label attack acct_1 acct_2 --analyst alice --note "ticket SOC-1234"
    detector label benign --cluster c_4f1a09 --analyst alice --yes

``review`` reads ``risk-scores`` from its start (no consumer group, nothing committed) and keeps each
account's latest valid record exactly as the rate limiter does (:class:`~detector.ratelimit.DecisionBook`: by
``emitted_at``, invalid records counted and skipped, tombstones honoured), so what it lists is what the
limiter enforces. Reading costs about what the limiter's start-up does: the topic is compacted to one record
per account.

``label`` publishes one ``analyst_label.v1`` record per account to ``analyst-labels``, key = account id (the
topic is co-partitioned with ``api-calls``, so the worker that holds the account applies it), validated against
the schema before anything is sent, and waits for the broker's acknowledgement (``acks=all``). ``attack``
blocks the account and its cluster, ``benign`` allowlists it and publishes an ``allow`` at once; the fusion
model learns from both (README, *Detection*). ``--cluster`` labels every account whose latest record names the
cluster; as that can be hundreds of accounts, it publishes only with ``--yes``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from detector.ratelimit import Decision, DecisionBook
from detector.schemas import LABEL_SCHEMA, validate
from detector.settings import Settings

#: Actions from the mildest; ``review`` lists ``throttle`` and ``block`` unless told otherwise.
ACTIONS = ("allow", "watch", "throttle", "block")
DEFAULT_ACTIONS = ("throttle", "block")
VERDICTS = ("attack", "benign")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``6h``, ``2d``, ``90s``.

    >>> parse_duration("6h"), parse_duration("1.5d"), parse_duration("90s")
    (21600.0, 129600.0, 90.0)
    >>> parse_duration("6 hours")
    Traceback (most recent call last):
    ...
    ValueError: '6 hours' is not a duration: use a number and s, m, h or d (30m, 6h, 2d)
    """
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration: use a number and s, m, h or d (30m, 6h, 2d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass
class ClusterView:
    """The accounts of one cluster (or one account with no cluster) at the actions asked for."""

    cluster_id: str | None
    accounts: list[Decision] = field(default_factory=list)

    @property
    def worst(self) -> tuple[int, float]:
        """Sort key: the strongest action, then the highest score."""
        return max((ACTIONS.index(d.action), d.score or 0.0) for d in self.accounts)

    def actions(self) -> Counter[str]:
        return Counter(d.action for d in self.accounts)

    def reasons(self, top: int = 3) -> list[tuple[str, int]]:
        """Reason codes by how many of the accounts have them among their ``top`` strongest."""
        counts: Counter[str] = Counter()
        for d in self.accounts:
            counts.update(r["code"] for r in sorted(d.reasons, key=lambda r: -r["weight"])[:top])
        return counts.most_common()

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "accounts": len(self.accounts),
            "actions": dict(self.actions()),
            "max_score": max((d.score or 0.0) for d in self.accounts),
            "last_event_ts": max(d.event_ts for d in self.accounts),
            "reasons": dict(self.reasons()),
            "members": [{"account_id": d.account_id, "action": d.action, "score": d.score,
                         "event_ts": d.event_ts, "emitted_at": d.emitted_at, "model_version": d.model_version,
                         "reasons": list(d.reasons)} for d in self.accounts],
        }


def select(decisions: Iterable[Decision], *, actions: Sequence[str] = DEFAULT_ACTIONS, cluster: str | None = None,
           since_ms: int | None = None, accounts: Sequence[str] = ()) -> list[ClusterView]:
    """The decisions at ``actions`` (of ``cluster`` only, emitted at or after ``since_ms`` only), grouped by cluster,
    the worst cluster first; in a cluster, the worst account first. ``accounts``: only these, at any action (an
    analyst asking why an account is, or is not, limited).

    >>> from detector.ratelimit import _example_record, parse_record
    >>> ds = [parse_record(a.encode(), _example_record(a, act, score=s), now_ms=1_775_000_100_000)
    ...       for a, act, s in [("a1", "block", 0.9), ("a2", "throttle", 0.7), ("a3", "allow", 0.1)]]
    >>> [(v.cluster_id, [d.account_id for d in v.accounts]) for v in select(ds)]
    [('c_0123456789ab', ['a1', 'a2'])]
    >>> select(ds, actions=("allow",))[0].accounts[0].account_id
    'a3'
    """
    groups: dict[str | None, ClusterView] = {}
    lone: list[ClusterView] = []
    wanted = set(accounts)
    for d in decisions:
        if wanted:
            if d.account_id not in wanted:
                continue
        elif d.action not in actions:
            continue
        if cluster is not None and d.cluster_id != cluster:
            continue
        if since_ms is not None and d.emitted_at < since_ms:
            continue
        if d.cluster_id is None:
            lone.append(ClusterView(None, [d]))
        else:
            groups.setdefault(d.cluster_id, ClusterView(d.cluster_id)).accounts.append(d)
    views = list(groups.values()) + lone
    for v in views:
        v.accounts.sort(key=lambda d: (-ACTIONS.index(d.action), -(d.score or 0.0), d.account_id))
    views.sort(key=lambda v: (v.worst, len(v.accounts)), reverse=True)
    return views


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


def render(views: Sequence[ClusterView], *, per_cluster: int = 5) -> list[str]:
    """Text lines for a terminal: a header per cluster, its reasons, its first ``per_cluster`` accounts."""
    lines: list[str] = []
    for v in views:
        acts = ", ".join(f"{n} {a}" for a, n in sorted(v.actions().items(), key=lambda x: -ACTIONS.index(x[0])))
        name = f"cluster {v.cluster_id}" if v.cluster_id else "no cluster"
        lines.append(f"{name}: {len(v.accounts)} account{'s' * (len(v.accounts) != 1)} ({acts}), "
                     f"max score {v.worst[1]:.2f}, last event {_utc(max(d.event_ts for d in v.accounts))}")
        lines.append("  reasons: " + ", ".join(f"{code} ({n})" for code, n in v.reasons()[:6]))
        for d in v.accounts[:per_cluster]:
            top = max(d.reasons, key=lambda r: r["weight"], default=None)
            why = f"  {top['detail']}" if top else ""
            score = f"{d.score:.2f}" if d.score is not None else "-"
            lines.append(f"  {d.account_id}  {d.action:<8} {score}  {_utc(d.event_ts)}{why}")
        if len(v.accounts) > per_cluster:
            lines.append(f"  ... and {len(v.accounts) - per_cluster} more (--per-cluster N, or --json)")
    return lines


# ------------------------------------------------------------------------------------------------ Kafka
def read_decisions(settings: Settings, *, timeout_s: float = 60.0,
                   progress: Callable[[int, int], None] | None = None) -> DecisionBook:
    """Every record of ``risk-scores`` up to its end offsets at the call, into a :class:`DecisionBook` configured
    as the rate limiter's. ``progress(read, total)`` is called as records arrive. Raises :class:`TimeoutError` if
    the end is not reached within ``timeout_s``, and
    :class:`~detector.streaming.topics.KafkaConnectError` if no broker answers."""
    from kafka import KafkaConsumer, TopicPartition

    from detector.streaming.topics import describe_connection, explain_connect_errors, kafka_client_config

    topic = settings.topics.risk_scores
    book = DecisionBook.from_settings(settings.ratelimit)
    with explain_connect_errors(describe_connection(settings.kafka)):
        consumer = KafkaConsumer(**kafka_client_config(settings.kafka), enable_auto_commit=False, check_crcs=False,
                                 request_timeout_ms=max(11_000, int(timeout_s * 1000)))
    try:
        parts = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + min(timeout_s, 15.0)
        while not parts:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} does not exist (or its partitions are not known) on "
                                   f"{settings.kafka.bootstrap}")
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        total = sum(end[tp] - begin[tp] for tp in tps)
        read = 0
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {read:,} of about {total:,} records of {topic} in {timeout_s:.0f} s; "
                                   "give more time with --timeout")
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for r in batch:
                    if r.offset < end[tp]:
                        book.apply(r.key, r.value, rebuilding=True)
                        read += 1
            if progress is not None:
                progress(read, total)
        return book
    finally:
        consumer.close()


def build_labels(accounts: Sequence[str], verdict: str, analyst: str, note: str | None = None,
                 now_ms: int | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) of one ``analyst_label.v1`` record per account, each validated. Raises
    :class:`~detector.schemas.InvalidEvent` naming the first invalid one (nothing is sent then).

    >>> labels = build_labels(["acct_1", "acct_1"], "benign", "alice", now_ms=1_775_000_000_000)
    >>> [(k, orjson.loads(v)["label"]) for k, v in labels]
    [(b'acct_1', 'benign')]
    >>> build_labels(["acct 1"], "attack", "alice", now_ms=1_775_000_000_000)
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: data.account_id must match pattern ^[A-Za-z0-9_.:@-]+$
    """
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    out = []
    for account in dict.fromkeys(accounts):  # once each, in the order given
        label: dict[str, Any] = {"schema_version": 1, "account_id": account, "label": verdict, "analyst": analyst,
                                 "ts": ts}
        if note:
            label["note"] = note
        validate(LABEL_SCHEMA, label)
        out.append((account.encode(), orjson.dumps(label)))
    return out


def publish_labels(settings: Settings, labels: Sequence[tuple[bytes, bytes]], timeout_s: float = 30.0) -> int:
    """Send the labels to ``analyst-labels`` (acks=all) and wait until the broker has them all; how many."""
    from kafka import KafkaProducer

    from detector.streaming.topics import describe_connection, explain_connect_errors, kafka_client_config

    with explain_connect_errors(describe_connection(settings.kafka)):
        producer = KafkaProducer(**kafka_client_config(settings.kafka), acks="all", linger_ms=5)
    try:
        futures = [producer.send(settings.topics.analyst_labels, key=k, value=v) for k, v in labels]
        producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=timeout_s)  # raises the broker's error for a record it refused
        return len(futures)
    finally:
        producer.close(timeout=5)
