"""Key blocks: the cards, networks and devices of blocked clusters, checked by the gateway *before* a call.

The detector blocks a new account linked to a blocked cluster on first sight, but it first sees an account
in the event of its first call, which the gateway publishes once the call has been answered. A campaign
that keeps opening accounts on the same cards and networks is therefore served one exchange per new
account, and in a rotating hydra that first exchange is most of what it is served. So when a cluster is
blocked the detector also publishes its *link keys* (:func:`detector.clusters.link_keys`: payment
fingerprint, org, IP /24, ASN, TLS fingerprint, user agent, sign-up cohort), each with the weight the
linker gives it, to the compacted topic ``blocked-keys`` (``schemas/key_block.v1.json``, Kafka key = the
record's ``key_id``)::

    detector ── cluster blocked ──▶ blocked-keys (compacted)  ──▶ rate limiter: KeyBook
    gateway  ── request's key ids (request_key_ids) ──────────▶ GET /v1/decision?account_id=…&key=k_…&key=k_…

The limiter refuses a request whose keys would link its account to a blocked cluster by the linker's own
rule (:meth:`KeyBook.match`: per cluster, the strongest key of each kind, summed over kinds, reaches
:data:`~detector.clusters.LINK_THRESHOLD`), unless the account holds a decision of its own that is
``allow`` (an analyst's verdict, the allowlist, a de-escalation). The template key is not published:
content is not known before a call in a form the limiter could compare.

Key ids are ``k_`` and 24 hex digits of a keyed BLAKE2b over the key's kind and value, keyed with the
deployment's fingerprint key (the one the gateway already uses for prompt fingerprints), so neither the
topic nor the limiter ever holds a card fingerprint or an IP range, and an id cannot be brute-forced from
the small space of IPv4 /24s without the key.

A key block expires (``expires_at``: ``emitted_at`` plus ``key_block_ttl_s``, on the clock the limiter
reads, so replayed traffic with old event times gets live blocks too): cards and address ranges are
reassigned. The detector publishes a key again when its weight moves by :data:`REPUBLISH_WEIGHT_CHANGE` or
half its time to live has passed; meanwhile a key that became common (its weight fell) keeps its old weight
in the limiter, which errs toward refusing new accounts on a network a blocked campaign used.

>>> secret = b"k"
>>> ev = {"client": {"ip": "203.0.113.9", "asn": 64500, "user_agent": "x", "tls_fp": "t"},
...       "billing": {"payment_fp": "pm_1", "account_created_ts": 1_775_000_000_000}, "org_id": None}
>>> ids = request_key_ids(ev, secret)
>>> len(ids), ids[0] == key_id(("pay", "pm_1"), secret), ids[0][:2]
(6, True, 'k_')
>>> book = KeyBook()
>>> t = 1_775_000_000_000
>>> rec = key_block_record(("pay", "pm_1"), secret, weight=1.0, cluster_id="c_0123456789ab", event_ts=t,
...                        ttl_ms=10_000, emitted_at=t, model_version="m")
>>> book.apply(rec["key_id"].encode(), orjson.dumps(rec))
'applied'
>>> book.match(ids, now_ms=t + 5_000), book.match(ids, now_ms=t + 20_000)  # expired after ttl_ms
(('c_0123456789ab', 1.0), None)
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable
from typing import Any

import orjson

from detector.clusters import LINK_THRESHOLD, Key, link_keys
from detector.schemas import KEY_BLOCK_SCHEMA, InvalidEvent, decode

KEY_BLOCK_KINDS = ("pay", "org", "ip24", "asn", "tls", "ua", "cohort")  # every link key kind but "tmpl"
REPUBLISH_WEIGHT_CHANGE = 0.05
MAX_REQUEST_KEYS = 16  # a request has at most 7; more is a client error
KEY_ID = re.compile(r"k_[0-9a-f]{24}")
OUTCOMES = ("applied", "stale", "deleted", "invalid")
SWEEP_FROM = 4096


def key_id(key: Key, secret: bytes) -> str:
    """The id of one link key: ``k_`` and 24 hex digits of BLAKE2b keyed with ``secret``.

    >>> key_id(("asn", 64500), b"k") == key_id(("asn", 64500), b"k") != key_id(("asn", 64500), b"other")
    True
    """
    kind, value = key
    digest = hashlib.blake2b(orjson.dumps([kind, value]), key=secret[:64], digest_size=12, person=b"keyblock")
    return "k_" + digest.hexdigest()


def request_key_ids(call: dict[str, Any], secret: bytes) -> list[str]:
    """The ids of a request's link keys, from the fields the gateway puts in its event (``client``,
    ``billing``, ``org_id``), for ``GET /v1/decision?…&key=…``. Cost: about 1 µs per key."""
    return [key_id(k, secret) for k in link_keys(call) if k[0] in KEY_BLOCK_KINDS]


def key_block_record(key: Key, secret: bytes, *, weight: float, cluster_id: str, event_ts: int, ttl_ms: int,
                     emitted_at: int, model_version: str) -> dict[str, Any]:
    """A ``key_block.v1`` record for one key of a blocked cluster (weight in [0, 1], rounded to 4 places)."""
    return {
        "schema_version": 1,
        "key_id": key_id(key, secret),
        "kind": key[0],
        "weight": round(min(max(weight, 0.0), 1.0), 4),
        "cluster_id": cluster_id,
        "event_ts": event_ts,
        "expires_at": emitted_at + ttl_ms,
        "emitted_at": emitted_at,
        "model_version": model_version,
    }


class KeyBook:
    """The live key blocks, built from ``blocked-keys`` records (the :class:`~detector.ratelimit.DecisionBook`
    interface, so :class:`~detector.ratelimit.ScoreFollower` can rebuild and follow it). Thread-safe.

    :meth:`apply` returns ``applied``, ``stale`` (older ``emitted_at`` than the one held), ``deleted`` (a
    tombstone) or ``invalid`` (not ``key_block.v1``, or a Kafka key that is not its ``key_id``; counted
    by reason in :attr:`invalid`, never applied). Expired blocks are ignored by :meth:`match` and swept out
    (against the newest ``emitted_at`` applied) whenever the book has doubled since the last sweep, so it
    holds the keys of live blocks, not every key ever blocked. Memory: about 300 bytes per key held.

    >>> book = KeyBook()
    >>> book.apply(b"k_000000000000000000000000", b'{"kind": "pay"}'), book.invalid
    ('invalid', {'schema': 1})
    """

    def __init__(self, *, max_record_bytes: int = 4096) -> None:
        self.max_record_bytes = max_record_bytes
        self.invalid: dict[str, int] = {}
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._blocks: dict[str, tuple[str, float, str, int, int]] = {}  # id -> kind, weight, cluster, expires, emitted
        self._lock = threading.Lock()
        self._newest = 0  # the newest emitted_at applied: expired blocks are swept against it
        self._sweep_at = SWEEP_FROM

    def apply(self, key: bytes | str | None, value: bytes | None, *, rebuilding: bool = False) -> str:
        """Apply one record as read from Kafka; return its outcome. Never raises for bad input."""
        kid = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key
        if kid is None or not KEY_ID.fullmatch(kid):
            return self._invalid("no_key" if kid is None else "bad_key")
        if value is None:
            with self._lock:
                self._blocks.pop(kid, None)
                return self._count("deleted")
        try:
            rec = decode(KEY_BLOCK_SCHEMA, value, self.max_record_bytes)
        except InvalidEvent as exc:
            return self._invalid(exc.reason)
        if rec["key_id"] != kid:
            return self._invalid("key_mismatch")
        with self._lock:
            held = self._blocks.get(kid)
            if held is not None and rec["emitted_at"] < held[4]:
                return self._count("stale")
            self._blocks[kid] = (rec["kind"], float(rec["weight"]), rec["cluster_id"], rec["expires_at"],
                                 rec["emitted_at"])
            self._newest = max(self._newest, rec["emitted_at"])
            if len(self._blocks) >= self._sweep_at:  # amortised O(1): the next sweep waits for twice the survivors
                self._blocks = {k: b for k, b in self._blocks.items() if b[3] > self._newest}
                self._sweep_at = max(SWEEP_FROM, 2 * len(self._blocks))
            return self._count("applied")

    def match(self, key_ids: Iterable[str], now_ms: int) -> tuple[str, float] | None:
        """The blocked cluster these keys link to, and the summed weight (strongest key per kind), if it
        reaches the linking threshold; else None. Unknown and expired ids count nothing.

        >>> book = KeyBook()
        >>> for kind, w in (("ip24", 0.5), ("tls", 0.2), ("ua", 0.2)):
        ...     rec = key_block_record((kind, "v"), b"k", weight=w, cluster_id="c_0123456789ab",
        ...                            event_ts=1_775_000_000_000, ttl_ms=60_000, emitted_at=1_775_000_000_000,
        ...                            model_version="m")
        ...     _ = book.apply(rec["key_id"], orjson.dumps(rec))
        >>> ids = [key_id((kind, "v"), b"k") for kind in ("ip24", "tls", "ua")]
        >>> book.match(ids[:2], now_ms=1_775_000_000_001), book.match(ids, now_ms=1_775_000_000_001)  # 0.7, 0.9
        (None, None)
        >>> rec = key_block_record(("cohort", "v"), b"k", weight=0.3, cluster_id="c_0123456789ab",
        ...                        event_ts=1_775_000_000_000, ttl_ms=60_000, emitted_at=1_775_000_000_000,
        ...                        model_version="m")
        >>> _ = book.apply(rec["key_id"], orjson.dumps(rec))
        >>> book.match(ids + [rec["key_id"]], now_ms=1_775_000_000_001)  # 1.2: links
        ('c_0123456789ab', 1.2)
        """
        best: dict[tuple[str, str], float] = {}
        blocks = self._blocks
        for kid in key_ids:
            held = blocks.get(kid)
            if held is None or held[3] <= now_ms:
                continue
            kind, weight, cluster, _, _ = held
            if weight > best.get((cluster, kind), 0.0):
                best[(cluster, kind)] = weight
        by_cluster: dict[str, float] = {}
        for (cluster, _), w in best.items():
            by_cluster[cluster] = by_cluster.get(cluster, 0.0) + w
        hits = [(w, c) for c, w in by_cluster.items() if w >= LINK_THRESHOLD - 1e-9]
        if not hits:
            return None
        w, c = max(hits)
        return c, round(w, 4)

    def counts(self) -> dict[str, int]:
        """Keys held per kind (expired ones included until rewritten)."""
        with self._lock:
            out: dict[str, int] = {}
            for kind, *_ in self._blocks.values():
                out[kind] = out.get(kind, 0) + 1
            return out

    def invalid_total(self) -> int:
        with self._lock:
            return sum(self.invalid.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def _invalid(self, reason: str) -> str:
        with self._lock:
            self.invalid[reason] = self.invalid.get(reason, 0) + 1
            return self._count("invalid")

    def _count(self, outcome: str) -> str:
        self.outcomes[outcome] += 1
        return outcome
