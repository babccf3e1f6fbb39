"""The reference rate limiter: follows ``risk-scores`` and answers "may this account make a request now?".

For the gateway's rate-limiter team: one process reads the compacted ``risk-scores`` topic from the start
(rebuilding the latest decision per account), then follows it live, and answers over HTTP::

    risk-scores ──▶ ScoreFollower (thread, kafka-python, assign + seek_to_beginning, no consumer group)
                        │ DecisionBook.apply(key, value)   validate · order · tombstones
                        ▼
                    DecisionBook ──▶ RateLimiter (Policy: action → Limit; Buckets: a TokenBucket per account)
                                        ▼
                    HTTP  GET /v1/decision?account_id=…        consumes a token
                          GET /v1/decision/peek?account_id=…   does not
                          GET /healthz                         200 once caught up with the topic, 503 before
                          GET /metrics                         Prometheus

The pure parts (:func:`parse_record`, :class:`DecisionBook`, :class:`TokenBucket`, :class:`Policy`,
:class:`Buckets`, :class:`RateLimiter`) know nothing of Kafka or HTTP, so they are tested with an injected
clock and records fed by hand; :class:`ScoreFollower` and :class:`RateLimitServer` are thin shells around
them and :class:`RateLimiterService` wires everything from a :class:`~detector.settings.Settings`, so a test
can run the whole limiter in-process (``RateLimiterService(settings).start()`` … ``.stop()``).

A decision for an account::

    >>> book = DecisionBook(wall_clock=lambda: 1_775_000_100.0)
    >>> book.apply(b"acct_1", _example_record("acct_1", "throttle"))
    'applied'
    >>> limiter = RateLimiter(book, Policy.from_settings(RateLimitSettings(throttle_burst=2)), clock=lambda: 0.0)
    >>> [limiter.decide("acct_1")["allowed"] for _ in range(3)]
    [True, True, False]
    >>> limiter.decide("acct_1")["retry_after_s"], limiter.decide("someone_else")["action"]
    (6.0, 'allow')

Security: every record is validated against ``schemas/risk_score.v1.json`` and rejected records are counted,
never applied, so a malformed record (``"action": "allow"`` without ``model_version``, ``"score": 7``, a key
that is not the record's ``account_id``, a record dated in the future) cannot lift a decision the limiter
holds. Compaction can remove the valid record such a malformed record followed; an account whose *only*
record at start-up is invalid therefore gets ``rebuild_invalid_action`` (default ``throttle``) instead of
"no record, allowed". A *valid* record or a tombstone written by an attacker is indistinguishable from the
worker's: write access to ``risk-scores`` must be limited to the worker by ACL.

The metrics are declared here (:class:`RateLimitMetrics`) rather than in :mod:`detector.metrics`, which
imports the fusion model (River): the limiter runs beside the gateway and should not load the detection core.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from detector.keyblocks import KEY_ID, MAX_REQUEST_KEYS, KeyBook
from detector.schemas import SCORE_SCHEMA, InvalidEvent, decode
from detector.settings import RateLimitSettings, Settings

log = logging.getLogger(__name__)

#: The actions of ``risk_score.v1.json``, mildest first (a unit test checks they match the schema).
ACTIONS = ("allow", "watch", "throttle", "block")
#: Why a record is rejected: the schema module's reasons plus the limiter's own (a closed set).
INVALID_REASONS = ("not_json", "not_object", "schema", "too_large", "no_key", "key_mismatch", "future")
#: What :meth:`DecisionBook.apply` did with a record (a closed set, the ``outcome`` metric label).
OUTCOMES = ("applied", "deleted", "stale", "invalid", "fallback")

_ACCOUNT_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")  # the schema's account_id, for keys and queries
_FALLBACK_MODEL = "ratelimit-fallback"


# ------------------------------------------------------------------------------------------------ decisions
@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The detector's current decision for one account (a valid ``risk_score.v1`` record, trimmed).

    ``score`` is None only for the limiter's own fallback decision (see :class:`DecisionBook`).
    """

    account_id: str
    action: str
    score: float | None
    reasons: tuple[dict[str, Any], ...]
    cluster_id: str | None
    event_ts: int
    emitted_at: int
    model_version: str

    @property
    def order(self) -> tuple[int, int]:
        """Records compare by ``(emitted_at, event_ts)``; an older one never replaces a newer one."""
        return (self.emitted_at, self.event_ts)


def parse_record(key: bytes | str | None, value: bytes, *, now_ms: int, max_bytes: int = 64 * 1024,
                 max_skew_ms: int = 300_000) -> Decision:
    """A ``risk-scores`` record (not a tombstone) to a :class:`Decision`, or :class:`InvalidEvent`.

    The value must be valid JSON matching ``schemas/risk_score.v1.json``, the key must equal its
    ``account_id``, and ``emitted_at`` may be at most ``max_skew_ms`` after ``now_ms`` (a far-future record
    would otherwise pin a decision: every later, genuinely newer record would look older). Costs one orjson
    parse and one compiled-schema check.

    >>> rec = _example_record("acct_1", "block")
    >>> parse_record(b"acct_1", rec, now_ms=1_775_000_100_000).action
    'block'
    >>> parse_record(b"acct_2", rec, now_ms=1_775_000_100_000)
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: key_mismatch: key 'acct_2' is not the record's account_id
    >>> parse_record(b"acct_1", rec.replace(b'"score":0.9', b'"score":7'), now_ms=1_775_000_100_000)
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: data.score must be smaller than or equal to 1
    >>> parse_record(b"acct_1", rec, now_ms=1_700_000_000_000)
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: future: emitted_at is 75000000 s ahead of this clock
    """
    if key is None:
        raise InvalidEvent("no_key", "a risk-score record needs the account id as its key")
    rec = decode(SCORE_SCHEMA, value, max_bytes)
    account = _key_str(key)
    if account != rec["account_id"]:
        raise InvalidEvent("key_mismatch", f"key {account[:130]!r} is not the record's account_id")
    if rec["emitted_at"] - now_ms > max_skew_ms:
        raise InvalidEvent("future", f"emitted_at is {(rec['emitted_at'] - now_ms) // 1000} s ahead of this clock")
    return Decision(account_id=account, action=rec["action"], score=float(rec["score"]),
                    reasons=tuple(rec["reasons"]), cluster_id=rec["cluster_id"], event_ts=rec["event_ts"],
                    emitted_at=rec["emitted_at"], model_version=rec["model_version"])


def _key_str(key: bytes | str) -> str:
    return key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key


class DecisionBook:
    """The latest valid decision per account, built from ``risk-scores`` records. Thread-safe.

    :meth:`apply` takes a record's key and value as read from Kafka and returns what it did:

    * ``applied``: a valid record at least as new (``emitted_at``, then ``event_ts``) as the one held;
    * ``stale``: a valid record older than the one held (ignored);
    * ``deleted``: a tombstone (value None): the account is back to "no record, allowed";
    * ``invalid``: rejected (see :func:`parse_record`), counted by reason in :attr:`invalid`, never applied;
    * ``fallback``: an invalid record read while ``rebuilding`` for an account without a held decision.
      Compaction keeps only the latest record per key, so a malformed record can be all that is left of a
      ``block``; such an account gets ``rebuild_invalid_action`` until a valid record or a tombstone
      arrives. Live (not rebuilding), an invalid record for an unknown account changes nothing.

    Memory: one small :class:`Decision` per account with a record (including ``allow`` records, which
    are kept for ordering), a few hundred bytes each.

    >>> book = DecisionBook(wall_clock=lambda: 1_775_000_100.0)
    >>> book.apply(b"acct_1", _example_record("acct_1", "block", emitted_at=1_775_000_000_000))
    'applied'
    >>> book.apply(b"acct_1", _example_record("acct_1", "allow", emitted_at=1_774_000_000_000))
    'stale'
    >>> book.apply(b"acct_1", b'{"action": "allow"}')
    'invalid'
    >>> book.get("acct_1").action, book.invalid
    ('block', {'schema': 1})
    >>> book.apply(b"acct_1", None), book.get("acct_1")
    ('deleted', None)
    >>> book.apply(b"acct_9", b"garbage", rebuilding=True), book.get("acct_9").action
    ('fallback', 'throttle')
    """

    def __init__(self, *, max_record_bytes: int = 64 * 1024, max_clock_skew_s: float = 300.0,
                 rebuild_invalid_action: str = "throttle", wall_clock: Callable[[], float] = time.time) -> None:
        if rebuild_invalid_action not in ACTIONS:
            raise ValueError(f"rebuild_invalid_action must be one of {ACTIONS}")
        self.max_record_bytes = max_record_bytes
        self.max_clock_skew_s = max_clock_skew_s
        self.rebuild_invalid_action = rebuild_invalid_action
        self.wall_clock = wall_clock
        self.invalid: dict[str, int] = {}
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._decisions: dict[str, Decision] = {}
        self._by_action: dict[str, int] = dict.fromkeys(ACTIONS, 0)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, rl: RateLimitSettings, wall_clock: Callable[[], float] = time.time) -> DecisionBook:
        """A book configured by the ``ratelimit`` settings section."""
        return cls(max_clock_skew_s=rl.max_clock_skew_s, rebuild_invalid_action=rl.rebuild_invalid_action,
                   wall_clock=wall_clock)

    def apply(self, key: bytes | str | None, value: bytes | None, *, rebuilding: bool = False) -> str:
        """Apply one record; return its outcome (one of :data:`OUTCOMES`). Never raises for bad input.

        ``rebuilding`` is True for records read before the topic's end offset at start-up.
        """
        if value is None:
            with self._lock:
                if key is None:  # a tombstone for nobody
                    self.invalid["no_key"] = self.invalid.get("no_key", 0) + 1
                    return self._count("invalid")
                self._set(_key_str(key), None)
                return self._count("deleted")
        try:
            decision = parse_record(key, value, now_ms=int(self.wall_clock() * 1000),
                                    max_bytes=self.max_record_bytes, max_skew_ms=int(self.max_clock_skew_s * 1000))
        except InvalidEvent as exc:
            with self._lock:
                self.invalid[exc.reason] = self.invalid.get(exc.reason, 0) + 1
                if rebuilding and key is not None:
                    account = _key_str(key)
                    if _ACCOUNT_ID.fullmatch(account) and account not in self._decisions:
                        self._set(account, self._fallback(account, exc))
                        return self._count("fallback")
                return self._count("invalid")
        with self._lock:
            held = self._decisions.get(decision.account_id)
            if held is not None and decision.order < held.order:
                return self._count("stale")
            self._set(decision.account_id, decision)
            return self._count("applied")

    def get(self, account_id: str) -> Decision | None:
        """The account's current decision, or None (no record: allowed)."""
        return self._decisions.get(account_id)  # a single dict read is atomic under the GIL

    def decisions(self) -> list[Decision]:
        """Every decision held, a copy (accounts with no record are not in it)."""
        with self._lock:
            return list(self._decisions.values())

    def counts(self) -> dict[str, int]:
        """Accounts held per action (accounts with no record are not counted)."""
        with self._lock:
            return dict(self._by_action)

    def invalid_total(self) -> int:
        """Records rejected so far."""
        with self._lock:
            return sum(self.invalid.values())

    def __len__(self) -> int:
        return len(self._decisions)

    # -- internals (called with the lock held)
    def _set(self, account: str, decision: Decision | None) -> None:
        old = self._decisions.pop(account, None)
        if old is not None:
            self._by_action[old.action] -= 1
        if decision is not None:
            self._decisions[account] = decision
            self._by_action[decision.action] += 1

    def _count(self, outcome: str) -> str:
        self.outcomes[outcome] += 1
        return outcome

    def _fallback(self, account: str, exc: InvalidEvent) -> Decision:
        detail = f"the only record read at start-up was rejected ({exc.reason}); the limiter applies its fallback"
        return Decision(account_id=account, action=self.rebuild_invalid_action, score=None,
                        reasons=({"code": "invalid_record", "detail": detail, "weight": 1.0},), cluster_id=None,
                        event_ts=0, emitted_at=0, model_version=_FALLBACK_MODEL)


# ------------------------------------------------------------------------------------------------ buckets
class Limit(NamedTuple):
    """A token-bucket limit: ``per_minute`` tokens refilled per minute, at most ``burst`` held.

    ``Limit(0, 0)`` refuses everything (``block``).
    """

    per_minute: float
    burst: int


@dataclasses.dataclass(slots=True)
class TokenBucket:
    """A token bucket: starts full, refills continuously at ``limit.per_minute``, holds at most ``burst``.

    Times are seconds from any monotonic clock; the caller passes ``now`` (so tests inject time).

    >>> b = TokenBucket.full(Limit(per_minute=10, burst=2), now=0.0)
    >>> b.take(0.0), b.take(0.0), b.take(0.0)
    (None, None, 6.0)
    >>> b.take(6.0), b.take(6.0)
    (None, 6.0)
    >>> TokenBucket.full(Limit(0, 0), now=0.0).take(100.0) is None
    False
    """

    limit: Limit
    tokens: float
    updated: float

    @classmethod
    def full(cls, limit: Limit, now: float) -> TokenBucket:
        return cls(limit=limit, tokens=float(limit.burst), updated=now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(float(self.limit.burst), self.tokens + (now - self.updated) * self.limit.per_minute / 60)
            self.updated = now

    def peek(self, now: float) -> float | None:
        """None if a request now would be allowed, else the seconds until it would (``inf`` for a zero rate)."""
        self._refill(now)
        if self.tokens >= 1.0:
            return None
        if self.limit.per_minute <= 0:
            return float("inf")
        return round((1.0 - self.tokens) * 60 / self.limit.per_minute, 3)

    def take(self, now: float) -> float | None:
        """Like :meth:`peek`, and consume a token when allowed."""
        wait = self.peek(now)
        if wait is None:
            self.tokens -= 1.0
        return wait

    def idle(self, now: float) -> bool:
        """Whether the bucket would be full at ``now``: dropping it then changes nothing."""
        rate = self.limit.per_minute / 60
        return rate > 0 and self.tokens + (now - self.updated) * rate >= self.limit.burst


@dataclasses.dataclass(frozen=True)
class Policy:
    """The limit for each action; None means unlimited.

    >>> p = Policy.from_settings(RateLimitSettings())
    >>> p.limit("allow"), p.limit("throttle"), p.limit("block")
    (None, Limit(per_minute=10, burst=5), Limit(per_minute=0, burst=0))
    >>> Policy.from_settings(RateLimitSettings(watch_per_minute=600)).limit("watch")
    Limit(per_minute=600, burst=600)
    """

    limits: Mapping[str, Limit | None]

    @classmethod
    def from_settings(cls, rl: RateLimitSettings) -> Policy:
        """``allow``/``watch``: ``*_per_minute`` (0 = unlimited, else burst = a minute's worth);
        ``throttle``: ``throttle_per_minute`` with ``throttle_burst``; ``block``: nothing."""

        def per_minute(n: int) -> Limit | None:
            return Limit(n, n) if n > 0 else None

        return cls({"allow": per_minute(rl.allow_per_minute), "watch": per_minute(rl.watch_per_minute),
                    "throttle": Limit(rl.throttle_per_minute, rl.throttle_burst), "block": Limit(0, 0)})

    def limit(self, action: str) -> Limit | None:
        return self.limits[action]


class Buckets:
    """A :class:`TokenBucket` per account, bounded in memory. Thread-safe.

    Only accounts whose action has a finite, non-zero limit get a bucket (``throttle``, and ``allow`` or
    ``watch`` when configured with a limit); ``block`` needs none. A bucket is replaced by a full one when
    the account's limit changes. Buckets are kept in least-recently-used order: idle ones (full again, so
    dropping them changes nothing) are swept from the old end on every call, and beyond ``max_buckets``
    the least recently used is dropped even if not full (that account gets a fresh burst). O(1) amortised.

    >>> t = [0.0]
    >>> bk = Buckets(max_buckets=2, clock=lambda: t[0])
    >>> lim = Limit(per_minute=60, burst=1)
    >>> bk.check("a", lim), bk.check("a", lim), len(bk)
    (None, 1.0, 1)
    >>> t[0] = 5.0; bk.check("b", lim), len(bk)   # "a" is full again after 1 s: swept
    (None, 1)
    """

    def __init__(self, max_buckets: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_buckets = max_buckets
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, account_id: str, limit: Limit, *, consume: bool = True) -> float | None:
        """None if allowed (a token is taken when ``consume``), else seconds until a token (``inf``: never)."""
        if limit.per_minute <= 0 or limit.burst < 1:
            return float("inf")
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(account_id)
            if bucket is None or bucket.limit != limit:
                if not consume:  # a peek at a fresh bucket: it would be full
                    return None
                bucket = self._buckets[account_id] = TokenBucket.full(limit, now)
            self._buckets.move_to_end(account_id)
            wait = bucket.take(now) if consume else bucket.peek(now)
            self._sweep(now)
            return wait

    def _sweep(self, now: float, budget: int = 8) -> None:
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        for _ in range(budget):
            if not self._buckets:
                return
            account, oldest = next(iter(self._buckets.items()))
            if not oldest.idle(now):
                return
            del self._buckets[account]

    def __len__(self) -> int:
        return len(self._buckets)


# ------------------------------------------------------------------------------------------------ limiter
class RateLimiter:
    """Decisions plus buckets: the answer of ``GET /v1/decision``.

    ``retry_after_s`` is None when allowed and for ``block`` (retrying does not help); otherwise the seconds
    until the account's next token. ``score`` is None for an account with no record (allowed).

    >>> book = DecisionBook(wall_clock=lambda: 1_775_000_100.0)
    >>> _ = book.apply(b"acct_b", _example_record("acct_b", "block"))
    >>> limiter = RateLimiter(book, Policy.from_settings(RateLimitSettings()), clock=lambda: 0.0)
    >>> answer = limiter.decide("acct_b")
    >>> answer["allowed"], answer["retry_after_s"], answer["score"], answer["reasons"][0]["code"]
    (False, None, 0.9, 'shared_template')
    >>> limiter.decide("acct_new")
    {'account_id': 'acct_new', 'action': 'allow', 'allowed': True, 'retry_after_s': None, 'score': None, \
'reasons': [], 'cluster_id': None}
    """

    def __init__(self, book: DecisionBook, policy: Policy, *, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = 1_000_000, metrics: RateLimitMetrics | None = None,
                 keys: KeyBook | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        self.book = book
        self.policy = policy
        self.buckets = Buckets(max_buckets, clock)
        self.metrics = metrics
        self.keys = keys if keys is not None else KeyBook()
        self.wall_clock = wall_clock

    def decide(self, account_id: str, *, consume: bool = True, keys: Iterable[str] = ()) -> dict[str, Any]:
        """The account's decision and whether this request may pass; ``consume=False`` only peeks.

        ``keys``: the request's key ids (:func:`detector.keyblocks.request_key_ids`). If they link the account
        to a blocked cluster (:meth:`KeyBook.match`) and it holds no ``allow`` decision of its own, the request
        is refused as ``block`` with the reason ``key_block``: a new account the campaign opened on a blocked
        cluster's card or network is stopped before its first call, not after it.

        >>> from detector.keyblocks import key_block_record, key_id
        >>> rec = key_block_record(("pay", "pm_1"), b"k", weight=1.0, cluster_id="c_0123456789ab",
        ...                        event_ts=1_775_000_000_000, ttl_ms=86_400_000, emitted_at=1_775_000_000_000,
        ...                        model_version="m")
        >>> limiter = RateLimiter(DecisionBook(), Policy.from_settings(RateLimitSettings()), clock=lambda: 0.0,
        ...                       wall_clock=lambda: 1_775_000_100.0)
        >>> limiter.keys.apply(rec["key_id"], orjson.dumps(rec))
        'applied'
        >>> answer = limiter.decide("acct_new", keys=[key_id(("pay", "pm_1"), b"k")])
        >>> answer["action"], answer["allowed"], answer["cluster_id"], answer["reasons"][0]["code"]
        ('block', False, 'c_0123456789ab', 'key_block')
        >>> limiter.decide("acct_new", keys=[key_id(("pay", "pm_2"), b"k")])["allowed"]
        True
        """
        decision = self.book.get(account_id)
        action = decision.action if decision is not None else "allow"
        keyed = None
        if keys and (decision is None or decision.action in ("watch", "throttle")):
            keyed = self.keys.match(keys, int(self.wall_clock() * 1000))
            if keyed is not None:
                action = "block"
                if self.metrics is not None and consume:
                    self.metrics.key_refusals.inc()
        limit = self.policy.limit(action)
        wait = None if limit is None else self.buckets.check(account_id, limit, consume=consume)
        allowed = wait is None
        if self.metrics is not None and consume:
            self.metrics.decisions.labels(action=action).inc()
            self.metrics.requests.labels(verdict="allowed" if allowed else "limited").inc()
        if keyed is not None:
            cluster, weight = keyed
            return {
                "account_id": account_id, "action": action, "allowed": allowed, "retry_after_s": None,
                "score": decision.score if decision is not None else None,
                "reasons": [{"code": "key_block", "weight": 1.0,
                             "detail": f"the request's card, network or device keys (weight {weight:g}) link it "
                                       f"to blocked cluster {cluster}"}],
                "cluster_id": cluster,
            }
        return {
            "account_id": account_id,
            "action": action,
            "allowed": allowed,
            "retry_after_s": wait if wait is not None and wait != float("inf") else None,
            "score": decision.score if decision is not None else None,
            "reasons": list(decision.reasons) if decision is not None else [],
            "cluster_id": decision.cluster_id if decision is not None else None,
        }


# ------------------------------------------------------------------------------------------------ metrics
class RateLimitMetrics:
    """The limiter's Prometheus metrics, in their own registry (names ``detector_ratelimit_*``).

    Counters of requests are updated by :class:`RateLimiter`; what the book holds is read at scrape time.

    >>> m = RateLimitMetrics(DecisionBook())
    >>> text = m.render().decode()
    >>> 'detector_ratelimit_accounts{action="block"} 0.0' in text
    True
    >>> "detector_ratelimit_invalid_records_total 0.0" in text, "detector_ratelimit_ready 0.0" in text
    (True, True)
    """

    def __init__(self, book: DecisionBook, *, ready: Callable[[], bool] = lambda: False,
                 buckets: Callable[[], int] = lambda: 0, registry: CollectorRegistry | None = None,
                 keys: KeyBook | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.key_refusals = Counter("detector_ratelimit_key_refusals_total",
                                    "Requests refused because their keys link to a blocked cluster (key blocks)",
                                    registry=r)
        self.decisions = Counter("detector_ratelimit_decisions_total",
                                 "Decision requests answered (GET /v1/decision), by the account's action",
                                 ["action"], registry=r)
        self.requests = Counter("detector_ratelimit_requests_total",
                                "Decision requests by verdict: allowed, or limited (throttled or blocked)",
                                ["verdict"], registry=r)
        self.ready = Gauge("detector_ratelimit_ready", "1 once the limiter has caught up with risk-scores",
                           registry=r)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
        for action in ACTIONS:
            self.decisions.labels(action=action)
        for verdict in ("allowed", "limited"):
            self.requests.labels(verdict=verdict)
        r.register(_BookCollector(book, buckets, keys if keys is not None else KeyBook()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BookCollector(Collector):
    """What the :class:`DecisionBook` holds, read at scrape time (no double bookkeeping)."""

    def __init__(self, book: DecisionBook, buckets: Callable[[], int], keys: KeyBook) -> None:
        self.book = book
        self.buckets = buckets
        self.keys = keys

    def collect(self) -> Iterable[Any]:
        invalid = CounterMetricFamily("detector_ratelimit_invalid_records", "risk-scores records rejected (never "
                                      "applied): not JSON, not the schema, key mismatch, dated in the future")
        invalid.add_metric([], self.book.invalid_total())
        records = CounterMetricFamily("detector_ratelimit_records", "risk-scores records read, by what was done "
                                      "with them", labels=["outcome"])
        for outcome, n in dict(self.book.outcomes).items():
            records.add_metric([outcome], n)
        accounts = GaugeMetricFamily("detector_ratelimit_accounts", "Accounts with a decision held, by action",
                                     labels=["action"])
        for action, n in self.book.counts().items():
            accounts.add_metric([action], n)
        buckets = GaugeMetricFamily("detector_ratelimit_buckets", "Token buckets held in memory",
                                    value=self.buckets())
        key_blocks = GaugeMetricFamily("detector_ratelimit_key_blocks", "Key blocks held (keys of blocked "
                                       "clusters, expired ones until swept), by key kind", labels=["kind"])
        for kind, n in self.keys.counts().items():
            key_blocks.add_metric([kind], n)
        key_records = CounterMetricFamily("detector_ratelimit_key_block_records", "blocked-keys records read, by "
                                          "what was done with them", labels=["outcome"])
        for outcome, n in dict(self.keys.outcomes).items():
            key_records.add_metric([outcome], n)
        yield from (invalid, records, accounts, buckets, key_blocks, key_records)

    def describe(self) -> Iterable[Any]:
        return []  # collected lazily: the book changes under us


# ------------------------------------------------------------------------------------------------ Kafka
class ScoreFollower(threading.Thread):
    """A thread that rebuilds a :class:`DecisionBook` from a compacted topic, then follows it live.

    No consumer group and no commits: all partitions are assigned and read from the beginning, and
    :attr:`ready` is set once every partition's position reaches the end offset it had at start (empty
    partitions count as caught up at once). Partitions added later are picked up within
    ``partition_refresh_s`` and read from their beginning. If the topic does not exist yet, the follower
    waits for it (not ready). After a client error it reconnects and resumes from the offsets it reached.

    ``kafka_config`` is kafka-python client options (bootstrap and security, see
    :func:`detector.streaming.topics.kafka_client_config`). Costs: one fetch session; records are applied
    in this thread, a few microseconds each.
    """

    def __init__(self, book: DecisionBook | KeyBook, topic: str, kafka_config: Mapping[str, Any], *,
                 client_id: str = "distill-detector-ratelimit", poll_timeout_s: float = 0.2,
                 partition_refresh_s: float = 30.0) -> None:
        super().__init__(name=f"score-follower-{topic}", daemon=True)
        self.book = book
        self.topic = topic
        self.kafka_config = dict(kafka_config)
        self.client_id = client_id
        self.poll_timeout_s = poll_timeout_s
        self.partition_refresh_s = partition_refresh_s
        self.ready = threading.Event()
        self.topic_missing = False  # True while the topic does not exist (and the follower waits for it)
        self.caught_up_in_s: float | None = None
        self._stopping = threading.Event()
        self._positions: dict[Any, int] = {}  # TopicPartition -> next offset to read
        self._logged_invalid = 0

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to stop and wait for it, at most ``timeout_s`` (it is a daemon thread)."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        started = time.monotonic()
        backoff = 0.5
        while not self._stopping.is_set():
            consumer = None
            try:
                consumer = self._connect()
                self._follow(consumer, started)
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - keep serving the last decisions and retry
                log.warning("following %s failed (%s: %s); retrying in %.1f s", self.topic, type(exc).__name__,
                            exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                if consumer is not None:
                    try:
                        consumer.close(autocommit=False, timeout_ms=2000)
                    except Exception:  # noqa: BLE001
                        log.debug("closing the consumer failed", exc_info=True)

    def _connect(self) -> Any:
        from kafka import KafkaConsumer
        from kafka.consumer.group import KafkaNetClient

        # kafka-python 3.0 leaves its IO thread running when the constructor fails to bootstrap; the factory
        # keeps a handle on the client so a failed attempt can be closed (a broker outage would leak a thread
        # per retry otherwise). The short bootstrap timeout keeps stop() prompt while no broker answers.
        made: list[Any] = []

        def client(**config: Any) -> Any:
            made.append(KafkaNetClient(**config))
            return made[-1]

        try:
            return KafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id=self.client_id, bootstrap_timeout_ms=3000, kafka_client=client,
                                 **self.kafka_config)
        except Exception:
            for c in made:
                c.close()
            raise

    def _partitions(self, consumer: Any) -> list[Any]:
        from kafka import TopicPartition

        waited = False
        while not self._stopping.is_set():
            ids = consumer.partitions_for_topic(self.topic)
            if ids:
                self.topic_missing = False
                return [TopicPartition(self.topic, p) for p in sorted(ids)]
            if not waited:
                log.info("topic %s does not exist yet; waiting for it", self.topic)
                waited = self.topic_missing = True
            self._stopping.wait(1.0)
        return []

    def _follow(self, consumer: Any, started: float) -> None:
        tps = self._partitions(consumer)
        if not tps:
            return
        self._assign(consumer, tps)
        targets: dict[Any, int] = {}
        if not self.ready.is_set():
            targets = consumer.end_offsets(tps, timeout_ms=10_000)
            log.info("rebuilding from %s: %d partitions, %d records at most", self.topic, len(tps),
                     sum(targets.values()))
        pending = set(targets)
        refreshed = time.monotonic()
        while not self._stopping.is_set():
            batch = consumer.poll(timeout_ms=int(self.poll_timeout_s * 1000), max_records=2000)
            for tp, records in batch.items():
                end = targets.get(tp, 0)
                for rec in records:
                    outcome = self.book.apply(rec.key, rec.value, rebuilding=rec.offset < end)
                    if outcome in ("invalid", "fallback"):
                        self._log_invalid(tp.partition, rec.offset, outcome)
                if records:
                    self._positions[tp] = records[-1].offset + 1
            if pending:
                for tp in list(pending):
                    position = consumer.position(tp, timeout_ms=1000)
                    if position is not None:
                        self._positions[tp] = max(self._positions.get(tp, 0), position)
                        if position >= targets[tp]:
                            pending.discard(tp)
                if not pending:
                    self.caught_up_in_s = time.monotonic() - started
                    self.ready.set()
                    log.info("caught up with %s in %.2f s: %d held %s", self.topic,
                             self.caught_up_in_s, len(self.book), self.book.counts())
            if time.monotonic() - refreshed > self.partition_refresh_s:
                refreshed = time.monotonic()
                tps = self._new_partitions(consumer, tps)

    def _assign(self, consumer: Any, tps: list[Any]) -> None:
        consumer.assign(tps)
        for tp in tps:
            if tp in self._positions:
                consumer.seek(tp, self._positions[tp])
            else:
                consumer.seek_to_beginning(tp)

    def _new_partitions(self, consumer: Any, tps: list[Any]) -> list[Any]:
        from kafka import TopicPartition

        ids = consumer.partitions_for_topic(self.topic) or set()
        now = [TopicPartition(self.topic, p) for p in sorted(ids)]
        if set(now) - set(tps):
            log.info("%s now has %d partitions (was %d); reading the new ones from the start", self.topic,
                     len(now), len(tps))
            self._assign(consumer, now)
            return now
        return tps

    def _log_invalid(self, partition: int, offset: int, outcome: str) -> None:
        self._logged_invalid += 1
        n = self._logged_invalid
        if n <= 20 or n % 1000 == 0:
            log.warning("rejected record %s[%d]@%d (%s; %d rejected so far, by reason %s)", self.topic,
                        partition, offset, outcome, self.book.invalid_total(), self.book.invalid)


# ------------------------------------------------------------------------------------------------ HTTP
class _Server(ThreadingHTTPServer):
    """Tracks open connections so that stopping also ends keep-alive connections (their threads would
    otherwise go on answering from a stopped limiter)."""

    daemon_threads = True
    limiter: RateLimiter
    is_ready: Callable[[], bool]
    metrics: RateLimitMetrics | None

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log instead of printing to stderr; a client hanging up is routine."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.exception("error while answering %s", client_address)

    def close_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a gateway can hold a connection pool
    timeout = 60  # an idle keep-alive connection is closed after this
    disable_nagle_algorithm = True  # headers and body are two writes: without this a keep-alive client waits ~40 ms
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path in ("/v1/decision", "/v1/decision/peek"):
            if not self.server.is_ready():
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "not ready: still reading risk-scores"})
                return
            try:
                account, keys = _decision_params(url.query)
            except ValueError as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            self._json(HTTPStatus.OK, self.server.limiter.decide(account, consume=url.path == "/v1/decision",
                                                                 keys=keys))
        elif url.path == "/healthz":
            ready = self.server.is_ready()
            self._json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                       {"ready": ready, "accounts": len(self.server.limiter.book)})
        elif url.path == "/metrics" and self.server.metrics is not None:
            self._send(HTTPStatus.OK, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path[:100]}"})

    def _not_allowed(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {self.command} not allowed; use GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    def _json(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
        self._send(status, orjson.dumps(body), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.debug("%s " + format, self.address_string(), *args)


def _decision_params(query: str) -> tuple[str, list[str]]:
    """The one ``account_id`` and the ``key`` ids (0 to :data:`~detector.keyblocks.MAX_REQUEST_KEYS`, see
    :func:`detector.keyblocks.request_key_ids`) of a query string, or ValueError with a one-line message.

    >>> _decision_params("account_id=acct_1&x=1")
    ('acct_1', [])
    >>> _decision_params("account_id=acct_1&key=k_0123456789abcdef01234567")
    ('acct_1', ['k_0123456789abcdef01234567'])
    >>> _decision_params("account_id=a&account_id=b")
    Traceback (most recent call last):
    ...
    ValueError: give account_id once
    >>> _decision_params("account_id=a&key=pm_1")
    Traceback (most recent call last):
    ...
    ValueError: key must be a key id: k_ and 24 hex digits (detector.keyblocks.request_key_ids)
    """
    try:
        params = parse_qs(query, keep_blank_values=True, max_num_fields=4 + MAX_REQUEST_KEYS)
    except ValueError:
        raise ValueError("malformed query string") from None
    keys = params.get("key", [])
    if len(keys) > MAX_REQUEST_KEYS:
        raise ValueError(f"at most {MAX_REQUEST_KEYS} key parameters")
    if not all(KEY_ID.fullmatch(k) for k in keys):
        raise ValueError("key must be a key id: k_ and 24 hex digits (detector.keyblocks.request_key_ids)")
    return _account_param(params), keys


def _account_param(params: dict[str, list[str]]) -> str:
    """The one ``account_id`` of parsed query parameters, or ValueError with a one-line message."""
    values = params.get("account_id", [])
    if not values:
        raise ValueError("missing query parameter account_id")
    if len(values) > 1:
        raise ValueError("give account_id once")
    if not _ACCOUNT_ID.fullmatch(values[0]):
        raise ValueError("account_id must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
    return values[0]


class RateLimitServer:
    """The HTTP API over a :class:`RateLimiter`, on a ``ThreadingHTTPServer`` (a thread per connection).

    ``port=0`` takes a free port; :attr:`port` tells which. ``ready`` gates ``/v1/decision*`` and
    ``/healthz`` (503 until it returns True).
    """

    def __init__(self, limiter: RateLimiter, host: str = "127.0.0.1", port: int = 0, *,
                 ready: Callable[[], bool] = lambda: True, metrics: RateLimitMetrics | None = None) -> None:
        self._httpd = _Server((host, port), _Handler)
        self._httpd.limiter = limiter
        self._httpd.is_ready = ready
        self._httpd.metrics = metrics
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"

    def start(self) -> RateLimitServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"ratelimit-http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5.0)
            self._thread = None
        self._httpd.server_close()
        self._httpd.close_connections()


# ------------------------------------------------------------------------------------------------ service
class RateLimiterService:
    """The whole limiter from a :class:`~detector.settings.Settings`, startable in-process.

    ``settings.topics.risk_scores`` is followed with ``settings.kafka`` (bootstrap, SASL/SSL); the API
    listens on ``settings.ratelimit.host:port`` (0 = a free port) and, when ``metrics_port`` is not 0,
    ``/metrics`` also on that port::

        svc = RateLimiterService(settings).start()
        svc.wait_ready(30)            # True once the topic has been read to its end
        requests.get(svc.url + "/v1/decision?account_id=acct_1")
        svc.stop()                    # also: with RateLimiterService(settings) as svc: ...
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        from detector.streaming.topics import kafka_client_config  # kafka-python options; imports no Faust

        rl = settings.ratelimit
        self.settings = settings
        self.book = DecisionBook.from_settings(rl, wall_clock=wall_clock)
        self.keys = KeyBook()
        self.follower = ScoreFollower(self.book, settings.topics.risk_scores, kafka_client_config(settings.kafka),
                                      client_id=rl.client_id)
        self.key_follower = ScoreFollower(self.keys, settings.topics.blocked_keys,
                                          kafka_client_config(settings.kafka), client_id=rl.client_id)
        self.limiter = RateLimiter(self.book, Policy.from_settings(rl), clock=clock, max_buckets=rl.max_buckets,
                                   keys=self.keys, wall_clock=wall_clock)
        self.metrics = RateLimitMetrics(self.book, ready=self._both_ready, buckets=lambda: len(self.limiter.buckets),
                                        keys=self.keys)
        self.limiter.metrics = self.metrics
        self.server: RateLimitServer | None = None
        self._metrics_httpd: Any = None

    def start(self) -> RateLimiterService:
        """Start following the topic and serving HTTP; returns at once (see :meth:`wait_ready`)."""
        from prometheus_client import start_http_server

        rl = self.settings.ratelimit
        self.server = RateLimitServer(self.limiter, rl.host, rl.port, ready=self._both_ready,
                                      metrics=self.metrics).start()
        if rl.metrics_port:
            self._metrics_httpd, _ = start_http_server(rl.metrics_port, addr=rl.host, registry=self.metrics.registry)
        self.follower.start()
        self.key_follower.start()
        log.info("rate limiter serving on %s, following %s and %s at %s", self.url, self.settings.topics.risk_scores,
                 self.settings.topics.blocked_keys, self.settings.kafka.bootstrap)
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until risk-scores, and blocked-keys if it exists, have been read to the ends they had at start;
        False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not self._both_ready():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _both_ready(self) -> bool:
        # Key blocks add to the decisions; a deployment that has not created blocked-keys yet still serves them
        # (the key follower keeps waiting for the topic, and rebuilds it once it exists).
        return self.follower.ready.is_set() and (self.key_follower.ready.is_set() or self.key_follower.topic_missing)

    @property
    def ready(self) -> bool:
        return self._both_ready()

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("the service is not started")
        return self.server.url

    def stop(self) -> None:
        """Stop the follower and the servers (bounded: about a second). Idempotent."""
        self.follower.stop()
        self.key_follower.stop()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None

    def __enter__(self) -> RateLimiterService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_ratelimit(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the limiter until SIGTERM or SIGINT (or until ``stop`` is set, for callers in a thread)."""
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    service = RateLimiterService(settings).start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------ CLI
def cmd_ratelimit(args: argparse.Namespace, settings: Settings) -> int:
    """``detector ratelimit``: ``--port`` overrides ``DETECTOR_RATELIMIT__PORT``."""
    if args.port is not None:
        settings = dataclasses.replace(settings, ratelimit=dataclasses.replace(settings.ratelimit, port=args.port))
    run_ratelimit(settings)
    return 0


def add_ratelimit_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ratelimit [--port P]`` to the CLI's subparsers; its ``func`` takes ``(args, settings)``.

    >>> parser = argparse.ArgumentParser(prog="detector")
    >>> add_ratelimit_command(parser.add_subparsers(dest="command", required=True))
    >>> args = parser.parse_args(["ratelimit", "--port", "18088"])
    >>> args.port, args.func.__name__
    (18088, 'cmd_ratelimit')
    """
    p = subparsers.add_parser("ratelimit", help="reference rate limiter: follows risk-scores, serves decisions "
                              "over HTTP", description="Follow the compacted risk-scores topic and answer "
                              "GET /v1/decision?account_id=... (token buckets per action), /v1/decision/peek, "
                              "/healthz and /metrics. Settings from DETECTOR_RATELIMIT__* and DETECTOR_KAFKA__*.")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: DETECTOR_RATELIMIT__PORT, 8088)")
    p.set_defaults(func=cmd_ratelimit)


# ------------------------------------------------------------------------------------------------ examples
def _example_record(account_id: str, action: str, *, score: float = 0.9, emitted_at: int = 1_775_000_000_000,
                    event_ts: int = 1_774_999_990_000) -> bytes:
    """A valid ``risk_score.v1`` record as bytes, for the examples above and the tests."""
    return orjson.dumps({
        "schema_version": 1, "account_id": account_id, "cluster_id": "c_0123456789ab", "score": score,
        "action": action, "reasons": [{"code": "shared_template", "detail": "fills a shared template",
                                       "weight": 1.0}],
        "event_ts": event_ts, "emitted_at": emitted_at, "model_version": "fusion-1",
    })
