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
from collections.abc import Iterable
from dataclasses import dataclass, field

from detector.features import DAY_MS, H_DAY, HOUR_MS

# kind -> (weight when rare, degree up to which the key counts as rare, degree at which it counts nothing)
KEY_KINDS: dict[str, tuple[float, int, int]] = {
    "pay": (1.0, 60, 400),
    "org": (1.0, 10_000, 10_000),
    "tmpl": (0.6, 1_000_000, 1_000_000),
    "ip24": (0.5, 16, 256),
    "tls": (0.3, 50, 2_000),
    "ua": (0.25, 50, 2_000),
    "cohort": (0.3, 20, 200),
    "asn": (0.15, 20, 200),
}
LINK_THRESHOLD = 1.0
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
        weight_by_root: dict[str, float] = {}
        for key in own:
            rep = self._key_rep[key]
            if rep == account:
                continue
            r = self.root(rep)
            if r != me:
                weight_by_root[r] = weight_by_root.get(r, 0.0) + key_weight(key[0], self._key_degree[key])
        for r, w in sorted(weight_by_root.items()):
            if w >= LINK_THRESHOLD:
                me = self._union(self.root(me), self.root(r))
        return self.root(account)

    def members(self) -> int:
        return len(self._parent)


@dataclass
class ClusterState:
    """Windowed aggregates of one cluster (day horizon, decayed like account features)."""

    t0: int = 0
    n: float = 0.0
    templated: float = 0.0
    cot: float = 0.0
    max_len: float = 0.0
    new_accounts: float = 0.0  # events from accounts younger than NEW_ACCOUNT_DAYS
    no_org: float = 0.0
    machine_timing: float = 0.0  # events from accounts active around the clock
    blocked_members: int = 0
    blocked: bool = False
    first_blocked_ts: int | None = None
    accounts_active: dict[str, int] = field(default_factory=dict)  # account -> last event ts (bounded)

    def add(self, ts: int, account: str, *, templated: bool, cot: bool, max_len: bool, new_account: bool,
            has_org: bool, machine_timing: bool) -> None:
        if self.n == 0.0:
            self.t0 = ts
        x = (ts - self.t0) / H_DAY
        if x > 24:
            f = 2.0 ** -x
            self.n *= f
            self.templated *= f
            self.cot *= f
            self.max_len *= f
            self.new_accounts *= f
            self.no_org *= f
            self.machine_timing *= f
            self.t0, x = ts, 0.0
        w = 2.0 ** x
        self.n += w
        self.templated += w * templated
        self.cot += w * cot
        self.max_len += w * max_len
        self.new_accounts += w * new_account
        self.no_org += w * (not has_org)
        self.machine_timing += w * machine_timing
        active = self.accounts_active
        active[account] = ts
        if len(active) > 4096:  # keep the most recent; enough to measure load balancing
            for stale in sorted(active, key=active.__getitem__)[:1024]:
                del active[stale]

    def features(self, now: int, size: int) -> dict[str, float]:
        n = self.n or 1.0
        active = sum(1 for t in self.accounts_active.values() if now - t < DAY_MS)
        volume = self.n * 2.0 ** (-(now - self.t0) / H_DAY)
        return {
            "size": float(size),
            "active_accounts": float(active),
            "volume_24h": volume,
            "per_account_24h": volume / max(active, 1),
            "template_share": self.templated / n,
            "cot_share": self.cot / n,
            "max_len_share": self.max_len / n,
            "new_account_share": self.new_accounts / n,
            "no_org_share": self.no_org / n,
            "machine_timing_share": self.machine_timing / n,
        }
