"""Clusters of accounts linked by shared rare attributes, found in the stream.

Each event yields *link keys* (payment fingerprint, IP /24, ASN, TLS fingerprint, user agent, org,
sign-up cohort, the account's recurring prompt template). A key links the accounts that carry it, with a
weight that falls as the key becomes common: a payment card shared by 20 accounts is strong evidence,
a cloud ASN or a popular user agent shared by thousands is none. An account joins a cluster when the
summed weight of its keys pointing into that cluster reaches 1, so one weak coincidence (a shared NAT,
one common template phrase) never glues unrelated accounts together; two independent ones can.

Clusters are kept with union-find (union by size, path halving); a cluster's id is derived from its
root account, so it is stable while the cluster grows and the larger side of a merge keeps its id.

>>> lk = Linker()
>>> roots = [lk.link(a, [("pay", "pm_1")]) for a in ("a1", "a2")]
>>> lk.size(lk.root("a2")), lk.cluster_id("a1") == lk.cluster_id("a2")
(2, True)
>>> lk.link("a3", [("asn", 16509)]) == lk.root("a1")  # a shared ASN alone is not enough
False
"""

from __future__ import annotations

import hashlib
import math
import zlib
from array import array
from collections.abc import Callable, Collection, Iterable

from detector.features import H_DAY, HOUR_MS

# kind -> (weight when rare, degree up to which the key counts as rare, degree at which it counts nothing)
KEY_KINDS: dict[str, tuple[float, int, int]] = {
    "pay": (1.0, 60, 400),
    "org": (1.0, 10_000, 10_000),
    "tmpl": (0.5, 1_000_000, 1_000_000),
    "ip24": (0.5, 16, 256),
    "tls": (0.2, 50, 2_000),
    "ua": (0.2, 50, 2_000),
    "cohort": (0.3, 20, 200),
    "asn": (0.15, 20, 200),
}
LINK_THRESHOLD = 1.0
_RENORM = 24.0  # rescale a cluster's scaled sums after this many half-lives (as detector.features does)
MAX_KEYS_PER_ACCOUNT = 16


def key_weight(kind: str, degree: int) -> float:
    """Weight of a link key held by ``degree`` accounts: full up to ``rare``, falling (log scale) to 0 at
    ``common``.

    >>> key_weight("pay", 2), key_weight("pay", 400), round(key_weight("asn", 63), 3)
    (1.0, 0.0, 0.075)
    """
    base, rare, common = KEY_KINDS[kind]
    if degree <= rare:
        return base
    if degree >= common:
        return 0.0
    return base * (1.0 - math.log(degree / rare) / math.log(common / rare))


def link_keys(ev: dict) -> list[tuple[str, object]]:
    """The link keys of one event (the template key is added by the detector when it recurs)."""
    client, billing = ev["client"], ev["billing"]
    keys: list[tuple[str, object]] = []
    if billing.get("payment_fp"):
        keys.append(("pay", billing["payment_fp"]))
    if ev.get("org_id"):
        keys.append(("org", ev["org_id"]))
    ip = client.get("ip")
    if ip:
        keys.append(("ip24", ip.rsplit(".", 1)[0] if "." in ip else ":".join(ip.split(":")[:3])))
    if client.get("asn") is not None:
        keys.append(("asn", client["asn"]))
    if client.get("tls_fp"):
        keys.append(("tls", client["tls_fp"]))
    if client.get("user_agent"):
        keys.append(("ua", client["user_agent"]))
    created = billing.get("account_created_ts")
    if created is not None:
        keys.append(("cohort", (created // HOUR_MS, client.get("asn"))))  # signed up in the same hour, same network
    return keys


class Linker:
    """Streaming union-find of accounts over weighted link keys. Not thread-safe; one per worker."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._size: dict[str, int] = {}
        self._key_rep: dict[tuple[str, object], str] = {}  # key -> an account that holds it
        self._key_degree: dict[tuple[str, object], int] = {}
        self._keys: dict[str, list[tuple[str, object]]] = {}  # account -> its keys (bounded)
        self.merges: list[tuple[str, str]] = []  # (absorbed root, surviving root), drained by the caller

    def root(self, account: str) -> str:
        parent = self._parent
        if account not in parent:
            parent[account] = account
            self._size[account] = 1
            return account
        while parent[account] != account:
            parent[account] = parent[parent[account]]
            account = parent[account]
        return account

    def size(self, root: str) -> int:
        return self._size.get(root, 1)

    def cluster_id(self, account: str) -> str:
        """A stable id for the account's cluster: ``c_`` and 12 hex digits."""
        return "c_" + hashlib.blake2b(self.root(account).encode(), digest_size=6).hexdigest()

    def _union(self, a: str, b: str) -> str:
        if self._size[a] < self._size[b]:
            a, b = b, a
        self._parent[b] = a
        self.merges.append((b, a))
        self._size[a] += self._size[b]
        return a

    def degree(self, key: tuple[str, object]) -> int:
        return self._key_degree.get(key, 0)

    def link(self, account: str, keys: Iterable[tuple[str, object]]) -> str:
        """Register the account's keys; merge it into every cluster its keys point to with weight >= 1.

        Returns the account's cluster root. Cost: O(keys of the account) once the keys are known, so a
        steady account costs a few dict look-ups per event.
        """
        own = self._keys.setdefault(account, [])
        new = [k for k in keys if k not in own]
        if not new:
            return self.root(account)
        for key in new:
            if len(own) >= MAX_KEYS_PER_ACCOUNT:
                break  # an account rotating through endless IPs stops adding keys; it is linked by then
            own.append(key)
            self._key_degree[key] = self._key_degree.get(key, 0) + 1
            self._key_rep.setdefault(key, account)
        me = self.root(account)
        # Per cluster, the strongest key of each kind, summed over kinds: two bands of one template or two
        # IPs of one range are one piece of evidence, not two.
        best: dict[tuple[str, str], float] = {}
        for key in own:
            rep = self._key_rep[key]
            if rep == account:
                continue
            r = self.root(rep)
            if r != me:
                w = key_weight(key[0], self._key_degree[key])
                if w > best.get((r, key[0]), 0.0):
                    best[(r, key[0])] = w
        weight_by_root: dict[str, float] = {}
        for (r, _kind), w in best.items():
            weight_by_root[r] = weight_by_root.get(r, 0.0) + w
        for r, w in sorted(weight_by_root.items()):
            if w >= LINK_THRESHOLD:
                me = self._union(self.root(me), self.root(r))
        return self.root(account)

    def link_weight_to(self, account: str, accept: Callable[[str], bool], kinds: Collection[str]) -> float:
        """Summed key weight (strongest key per kind) from ``account`` into clusters ``accept`` picks,
        whether or not it reached the linking threshold: "weakly linked to a blocked cluster"."""
        me = self.root(account)
        best: dict[str, float] = {}
        for key in self._keys.get(account, ()):
            if key[0] not in kinds:
                continue
            r = self.root(self._key_rep[key])
            if r != me and accept(r):
                best[key[0]] = max(best.get(key[0], 0.0), key_weight(key[0], self._key_degree[key]))
        return sum(best.values())

    def members(self) -> int:
        return len(self._parent)


class ClusterState:
    """Windowed aggregates of one cluster (day horizon, decayed like account features; O(1) per event).

    ``active`` counts account arrivals (an account's first event, or its first after a day of silence),
    decayed over a day: an estimate of the accounts active in the last day without a set of them.
    """

    __slots__ = ("t0", "last_ts", "day", "blocked_members", "blocked", "org_bits", "new_model_1h", "n_1h")

    def __init__(self) -> None:
        self.t0 = 0
        self.last_ts = 0
        self.day = array("d", bytes(8 * _C_SLOTS))
        self.blocked_members = 0
        self.blocked = False
        self.org_bits = 0  # linear-counting bitmap of the orgs seen in the cluster
        self.new_model_1h = 0.0  # hour-horizon share of traffic on a newly released model
        self.n_1h = 0.0

    def add(self, ts: int, *, arrival: bool, templated: bool, cot: bool, max_len: bool, new_account: bool,
            machine: bool = False, new_model: bool = False, org: str | None = None) -> None:
        day = self.day
        if day[_C_N] == 0.0:
            self.t0 = ts
        x = (ts - self.t0) / H_DAY
        if x > _RENORM:
            f = 2.0 ** -x
            for i in range(_C_SLOTS):
                day[i] *= f
            self.t0, x = ts, 0.0
        w = 2.0 ** x
        day[_C_N] += w
        day[_C_ACTIVE] += w * arrival
        day[_C_TEMPLATED] += w * templated
        day[_C_COT] += w * cot
        day[_C_MAX_LEN] += w * max_len
        day[_C_NEW] += w * new_account
        day[_C_MACHINE] += w * machine
        day[_C_NEW_MODEL] += w * new_model
        day[_C_HOUR0 + (ts // HOUR_MS) % 24] += w
        f = 2.0 ** (-max(ts - self.last_ts, 0) / HOUR_MS)
        self.n_1h = self.n_1h * f + 1.0
        self.new_model_1h = self.new_model_1h * f + new_model
        if org is not None:
            self.org_bits |= 1 << (zlib.crc32(org.encode()) & 63)
        self.last_ts = max(self.last_ts, ts)

    def merge(self, other: ClusterState) -> None:
        """Fold another cluster's aggregates in (when union-find merges two clusters)."""
        if other.day[_C_N] == 0.0:
            return
        if self.day[_C_N] == 0.0:
            self.t0 = other.t0
        x = (other.t0 - self.t0) / H_DAY
        if x > _RENORM:  # the other cluster's window is far newer: rebase onto it, as add() does, so the
            g = 2.0 ** -x  # factor stays below 2 ** 24 (two years apart, 2 ** x would overflow a float)
            for i in range(_C_SLOTS):
                self.day[i] *= g
            self.t0, x = other.t0, 0.0
        f = 2.0 ** x
        for i in range(_C_SLOTS):
            self.day[i] += other.day[i] * f
        self.blocked_members += other.blocked_members
        self.blocked = self.blocked or other.blocked
        self.org_bits |= other.org_bits
        self.n_1h += other.n_1h
        self.new_model_1h += other.new_model_1h
        self.last_ts = max(self.last_ts, other.last_ts)

    def features(self, now: int, size: int) -> dict[str, float]:
        day = self.day
        n = day[_C_N] or 1.0
        scale = 2.0 ** min(-(now - self.t0) / H_DAY, _RENORM)  # bounded as in detector.features.features
        active = min(day[_C_ACTIVE] * scale, float(size))
        volume = day[_C_N] * scale
        hours = list(day[_C_HOUR0:_C_SLOTS])
        total = sum(hours)
        spread = -sum(h / total * math.log(h / total) for h in hours if h > 0) / math.log(24) if total else 0.0
        return {
            "size": float(size),
            "active_accounts": active,
            "volume_24h": volume,
            "per_account_24h": volume / max(active, 1.0),
            "template_share": day[_C_TEMPLATED] / n,
            "cot_share": day[_C_COT] / n,
            "max_len_share": day[_C_MAX_LEN] / n,
            "new_account_share": day[_C_NEW] / n,
            "hour_spread": spread,
            "machine_share": day[_C_MACHINE] / n,
            "new_model_share": day[_C_NEW_MODEL] / n,
            "new_model_share_1h": self.new_model_1h / self.n_1h if self.n_1h else 0.0,
            "orgs": float(self.org_bits.bit_count()),
        }


_C_N, _C_ACTIVE, _C_TEMPLATED, _C_COT, _C_MAX_LEN, _C_NEW, _C_MACHINE, _C_NEW_MODEL = range(8)
_C_HOUR0 = 8
_C_SLOTS = _C_HOUR0 + 24
