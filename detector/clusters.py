"""Clusters of accounts linked by shared rare attributes, found in the stream.

Each event yields *link keys* (payment fingerprint, IP /24, ASN, TLS fingerprint, user agent, org,
sign-up cohort, the account's recurring prompt template). A key links the accounts that carry it, with a
weight that falls as the key becomes common: a payment card shared by 20 accounts is strong evidence,
a cloud ASN or a popular user agent shared by thousands is none. An account joins a cluster when the
summed weight of its keys pointing into that cluster reaches 1, so one weak coincidence (a shared NAT,
one common template phrase) never glues unrelated accounts together; two independent ones can.

Clusters are kept with union-find (union by size, path halving); a cluster's id is derived from its
root account, so it is stable while the cluster grows and the larger side of a merge keeps its id (it
changes if the root account is forgotten: see :meth:`Linker.forget`).

Accounts the detector evicts are forgotten (:meth:`Linker.forget`): their keys go at once, and the
clusters they were in keep their live members together, so memory follows the live accounts and a flood
of random account ids cannot grow it without bound.

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
from collections.abc import Callable, Collection, Iterable, Iterator

from detector.features import DAY_MS, H_DAY, HOUR_MS, spread_over_hours

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
LINK_HOLDERS = 8  # newest holders of a key (besides its representative) a new holder is weighed against, one by one
Key = tuple[str, object]  # a link key: (kind, value)


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
    """Streaming union-find of accounts over weighted link keys. Not thread-safe; one per worker.

    Forgetting (:meth:`forget`) is eager for keys and lazy for the tree. A forgotten account's keys go
    at once (its key degrees drop; a key it represented passes to another holder). Its node may be a
    root or an inner node that live members' parent pointers pass through, and without child lists it
    cannot be unhooked, so in a cluster of two or more it stays as a *tombstone* (not counted in
    ``size``) until tombstones outnumber the cluster's live members; then the cluster is *compacted*:
    tombstones dropped, live members pointed straight at a live root. Each tombstone is dropped once and
    a compaction costs under twice the tombstones it drops, so forgetting is amortised O(1) per
    account (plus O(its keys)), and ``link`` on a steady account costs what it did. The alternative, a
    global rebuild once the dead outnumber the live, is as cheap amortised but stalls the stream for a
    pass over every account (seconds at a million); a compaction touches one cluster.

    An account alone (a cluster of one: most accounts) is in no tree: it has no ``_parent`` or ``_size``
    entry, only its keys, and :meth:`root` returns it as its own root. Trees hold clusters of two or more
    nodes only; a compaction that leaves one live member takes it out of the tree again.

    Memory is bounded by the live accounts: a node each in a cluster of two or more plus at most as many
    tombstones, their keys (at most ``MAX_KEYS_PER_ACCOUNT`` each), and per key shared by two or more live
    accounts a list of its other holders, at most twice as long as they are many (so a forgotten
    representative can be replaced at once). Forgetting every account empties every structure (Python
    dicts give back their capacity on their next resize).

    ``merges`` lists ``(old root, new root)`` pairs in the order they happened, drained by the caller:
    the old root's cluster now lives under the new root. A union records ``(absorbed, surviving)``; a
    compaction whose root was forgotten records ``(forgotten root, new live root)``. Either way the
    caller moves its per-cluster state from the first to the second.
    """

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}  # nodes of trees of two or more (live accounts and tombstones)
        self._size: dict[str, int] = {}  # root of a tree -> live members of its cluster (alone: no entry, 1)
        self._nodes: dict[str, list[str]] = {}  # root -> every node of its tree, root first (2+ nodes only)
        self._dead: set[str] = set()  # tombstones: forgotten accounts still in a tree
        self._key_rep: dict[tuple[str, object], str] = {}  # key -> a live holder (the first, while it lives)
        self._key_others: dict[tuple[str, object], list[str]] = {}  # key -> its other holders, newest last
        self._key_degree: dict[tuple[str, object], int] = {}  # key -> live accounts holding it
        self._keys: dict[str, tuple[Key, ...]] = {}  # live account -> its keys (bounded; shared objects)
        self.merges: list[tuple[str, str]] = []  # (old root, new root), drained by the caller

    def root(self, account: str) -> str:
        """The root of the account's cluster: the account itself if it is alone (or not seen before; nothing is
        stored for it)."""
        parent = self._parent
        up = parent.get(account)
        if up is None:
            return account
        # Path halving (each node on the way points to its grandparent), each parent read once.
        while up != account:
            grand = parent[up]
            parent[account] = grand
            account, up = grand, parent[grand]
        return account

    def keys_of(self, account: str) -> tuple[Key, ...]:
        """The link keys ``account`` holds (none for an account not linked)."""
        return self._keys.get(account, ())

    def knows(self, account: str) -> bool:
        """Whether ``account`` is a live member of some cluster (a cluster of one included)."""
        return account in self._keys

    def size(self, root: str) -> int:
        """Live members of the cluster of ``root`` (a root, as :meth:`root` or :meth:`link` return)."""
        return self._size.get(root, 1)

    def card_sharers(self, account: str) -> int:
        """Live accounts holding the payment key of ``account`` if it holds no org key, else 0: how many
        personal accounts one card pays for (an organisation's members sharing its card are not counted).

        >>> lk = Linker()
        >>> for a in ("a1", "a2", "a3"):
        ...     _ = lk.link(a, [("pay", "pm_1")])
        >>> _ = lk.link("b1", [("pay", "pm_2"), ("org", "o")]); _ = lk.link("b2", [("pay", "pm_2"), ("org", "o")])
        >>> lk.card_sharers("a1"), lk.card_sharers("b1"), lk.card_sharers("nobody")
        (3, 0, 0)
        """
        card = self.personal_card(account)
        return 0 if card is None else self._key_degree.get(("pay", card), 0)

    def personal_card(self, account: str) -> object | None:
        """The payment key's value of ``account`` if it holds one and no org key, else None."""
        card = None
        for kind, value in self._keys.get(account, ()):
            if kind == "org":
                return None
            if kind == "pay":
                card = value
        return card

    def across_orgs(self, account: str, kinds: Collection[str] = ("pay", "ip24"), limit: int = 64) -> float:
        """How strongly ``account``, a member of an organisation, shares a key of ``kinds`` (its card, its IP
        range) with another organisation's accounts: the largest rarity of such a key (its weight over its
        kind's full weight, so a range that many accounts hold counts little), 0 if none or if it is in no
        organisation. Looks at up to ``limit`` holders per key. An organisation pays with its own card and
        calls from its own network; one card or one small range behind two is one operator posing as two.

        >>> lk = Linker()
        >>> for a in ("a1", "a2"):
        ...     _ = lk.link(a, [("org", "o1"), ("ip24", "10.0.0")])
        >>> lk.across_orgs("a1")
        0.0
        >>> _ = lk.link("p1", [("ip24", "10.0.0")]); _ = lk.link("b1", [("org", "o2"), ("ip24", "10.0.0")])
        >>> lk.across_orgs("a1"), lk.across_orgs("p1"), lk.across_orgs("nobody")
        (1.0, 0.0, 0.0)
        """
        own = self._keys.get(account, ())
        org = next((k for k in own if k[0] == "org"), None)
        if org is None:
            return 0.0
        strongest = 0.0
        for key in own:
            if key[0] not in kinds:
                continue
            rarity = key_weight(key[0], self._key_degree[key]) / KEY_KINDS[key[0]][0]
            if rarity <= strongest:
                continue
            for holder in (self._key_rep[key], *self._key_others.get(key, ())[:limit]):
                keys = self._keys.get(holder, ())
                # another org's account that holds the key (a forgotten holder stays listed until pruned)
                if key in keys and any(k[0] == "org" and k != org for k in keys):
                    strongest = rarity
                    break
        return strongest

    def cluster_id(self, account: str) -> str:
        """An id for the account's cluster: ``c_`` and 12 hex digits of its root's name.

        Stable while the cluster grows or absorbs smaller ones; it changes when another cluster absorbs
        this one, or when the root account was forgotten and a compaction moved the cluster to a new
        root. Both are reported in ``merges``.
        """
        return "c_" + hashlib.blake2b(self.root(account).encode(), digest_size=6).hexdigest()

    def _union(self, a: str, b: str) -> str:
        size = self._size
        if size.get(a, 1) < size.get(b, 1):
            a, b = b, a
        self._parent[b] = a
        self._parent.setdefault(a, a)  # an account alone until now becomes the root of a tree
        self.merges.append((b, a))
        size[a] = size.get(a, 1) + size.pop(b, 1)
        nodes = self._nodes.get(a)
        if nodes is None:
            nodes = self._nodes[a] = [a]
        absorbed = self._nodes.pop(b, None)
        if absorbed is None:
            nodes.append(b)
        else:
            nodes.extend(absorbed)  # O(smaller side), as union by size keeps it
        return a

    def degree(self, key: tuple[str, object]) -> int:
        """Live accounts holding ``key``."""
        return self._key_degree.get(key, 0)

    def link(self, account: str, keys: Iterable[tuple[str, object]]) -> str:
        """Register the account's keys; merge it into every cluster its keys point to with weight >= 1.

        Returns the account's cluster root. Cost: a few dict look-ups per event for a steady account (no key
        new to it); O(keys of the account x LINK_HOLDERS) on an event that adds a key. A forgotten account
        linked again while its tombstone is still in a tree rejoins that cluster (it never left the tree);
        once compacted away it starts afresh. Either way its keys link it anew.
        """
        own = self._keys.get(account)
        if own is None:
            own = self._keys[account] = ()
            if account in self._dead:
                self._dead.remove(account)
                self._size[self.root(account)] += 1
        new = [k for k in keys if k not in own]
        if not new:
            return self.root(account)
        before = len(own)
        held = list(own)
        for key in new:
            if len(held) >= MAX_KEYS_PER_ACCOUNT:
                break  # an account rotating through endless IPs stops adding keys; it is linked by then
            if key in held:
                continue  # given twice in one call: one holder, one degree
            degree = self._key_degree.get(key, 0)
            self._key_degree[key] = degree + 1
            if degree == 0:
                self._key_rep[key] = account
            else:
                key = self._interned(key)
                others = self._key_others.get(key)
                if others is None:
                    self._key_others[key] = [account]
                else:
                    others.append(account)
            held.append(key)
        # A tuple, not a list: an account's keys change rarely (on its first events), and a tuple of 7 keys
        # is 48 bytes smaller than a list of them.
        own = self._keys[account] = tuple(held)
        me = self.root(account)
        # Two sums, each the strongest key of each kind summed over kinds (two bands of one template or two
        # IPs of one range are one piece of evidence, not two):
        # - per cluster, through each key's representative (its first live holder);
        # - per account, once a key was added, over the keys for which that account is a recent holder (the
        #   representative or one of the newest LINK_HOLDERS others): keys whose first holders differ (an IP
        #   range's first user is not a template's) still add up toward an account that took them up at
        #   about the same time. This sum is one account's, so a large cluster that holds a popular
        #   template in one member and an IP range in another draws no newcomer that merely shares one of
        #   each; and two strangers who share a template and an IP range, but not recently, stay apart.
        best: dict[tuple[str, str], float] = {}
        pair: dict[tuple[str, str], float] = {}
        added = len(own) > before  # only then is the account weighed against its keys' recent holders
        for key in own:
            kind = key[0]
            w = key_weight(kind, self._key_degree[key])
            if w <= 0.0:
                continue
            rep = self._key_rep[key]
            if rep != account:
                r = self.root(rep)
                if r != me and w > best.get((r, kind), 0.0):
                    best[(r, kind)] = w
            if added:
                for holder in self._holders(key):
                    if holder != account and w > pair.get((holder, kind), 0.0):
                        pair[(holder, kind)] = w
        weight_by_root: dict[str, float] = {}
        for (r, _kind), w in best.items():
            weight_by_root[r] = weight_by_root.get(r, 0.0) + w
        weight_by_holder: dict[str, float] = {}
        for (holder, _kind), w in pair.items():
            weight_by_holder[holder] = weight_by_holder.get(holder, 0.0) + w
        for holder, w in weight_by_holder.items():
            if w >= LINK_THRESHOLD:
                r = self.root(holder)
                if r != me:
                    weight_by_root[r] = max(weight_by_root.get(r, 0.0), w)
        for r, w in sorted(weight_by_root.items()):
            if w >= LINK_THRESHOLD:
                me = self._union(self.root(me), self.root(r))
        return self.root(account)

    def _holders(self, key: Key) -> Iterator[str]:
        """The representative of ``key`` and its newest :data:`LINK_HOLDERS` other holders that still hold it
        (the list keeps forgotten holders until it is pruned). Cost: O(LINK_HOLDERS)."""
        yield self._key_rep[key]
        keys = self._keys
        for holder in self._key_others.get(key, ())[-LINK_HOLDERS:]:
            if key in keys.get(holder, ()):
                yield holder

    def _interned(self, key: Key) -> Key:
        """The key object the other holders of ``key`` (one held already) share, found among the keys of its
        representative; ``key`` itself if none is (never, as a representative holds its key).

        Every event builds its link keys afresh (a new tuple, a new IP /24 string), so without this each
        holder of a key shared by thousands of accounts would keep its own copy of it: 480 bytes per account
        in the memory benchmark (bench/run.py), whose event has 6 keys. Equal keys are one key to every dict
        here, so which object is kept does not change what is linked. Cost: a scan of at most
        ``MAX_KEYS_PER_ACCOUNT`` keys, once per account and key (on the account's first events), not per
        event.

        >>> lk = Linker()
        >>> _ = lk.link("a1", [("ip24", "10.0.0")]); _ = lk.link("a2", [("ip24", ".".join(["10", "0", "0"]))])
        >>> lk._keys["a1"][0] is lk._keys["a2"][0]
        True
        """
        for k in self._keys[self._key_rep[key]]:
            if k == key:
                return k
        return key

    def forget(self, accounts: Iterable[str]) -> list[str]:
        """Forget accounts whose state the caller evicted; return the roots of clusters left with no live
        member, whose per-cluster state the caller drops.

        The accounts' keys go: degrees drop (so rarity weights are right), a key no live account holds
        is dropped, and a key whose representative went passes to its newest live holder. Live members
        of a cluster stay together. A cluster whose root was forgotten keeps that root as a tombstone
        until it is compacted; then the new root is reported as ``(old root, new root)`` in ``merges``.
        The caller applies ``merges`` before dropping the returned roots: a root moved to in this call
        may itself be left empty later in it. Unknown or already forgotten accounts are ignored.

        Cost: O(keys) per account (at most ``MAX_KEYS_PER_ACCOUNT``), plus amortised O(1) for the tree.

        >>> lk = Linker()
        >>> roots = [lk.link(a, [("pay", "pm_1")]) for a in ("a1", "a2", "a3")]
        >>> lk.root("a1"), lk.size("a2"), lk.degree(("pay", "pm_1"))
        ('a2', 3, 3)
        >>> lk.merges.clear()
        >>> lk.forget(["a2"]), lk.size(lk.root("a3")), lk.root("a1") == lk.root("a3")  # the root goes
        ([], 2, True)
        >>> lk.forget(["a1"]), lk.merges, lk.size("a3"), lk.degree(("pay", "pm_1"))  # compacted
        ([], [('a2', 'a3')], 1, 1)
        >>> lk.forget(["a3"]), lk.members(), lk.degree(("pay", "pm_1"))
        (['a3'], 0, 0)
        """
        if isinstance(accounts, str):
            raise TypeError("forget() takes an iterable of account ids, not one id")
        gone: list[str] = []
        for account in accounts:
            if account in self._dead:
                continue
            if account not in self._parent:  # alone (a cluster of one: in no tree), or unknown
                keys = self._keys.pop(account, None)
                if keys is not None:
                    for key in keys:
                        self._drop_holder(key, account)
                    gone.append(account)
                continue
            for key in self._keys.pop(account, ()):
                self._drop_holder(key, account)
            root = self.root(account)
            self._size[root] -= 1
            nodes = self._nodes[root]  # a tree has two or more nodes
            self._dead.add(account)
            if len(nodes) > 2 * self._size[root] and self._compact(root) is None:
                gone.append(root)
        return gone

    def _drop_holder(self, key: tuple[str, object], account: str) -> None:
        """Take ``account`` (already out of ``_keys``) off the holders of ``key``. Amortised O(1).

        The list of other holders is pruned lazily: a forgotten holder stays listed (removing it would
        cost O(degree), and a cloud ASN has a million holders) until the list is over twice as long as
        the live holders, then it is rebuilt, a cost paid by the entries it drops. A forgotten
        representative passes to the newest listed holder that still holds the key; the entries popped
        on the way are dropped for good.
        """
        degree = self._key_degree[key] - 1
        if degree == 0:
            del self._key_degree[key], self._key_rep[key]
            self._key_others.pop(key, None)
            return
        self._key_degree[key] = degree
        others = self._key_others[key]
        if self._key_rep[key] == account:
            holder = others.pop()
            while key not in self._keys.get(holder, ()):  # forgotten since it was listed
                holder = others.pop()
            self._key_rep[key] = holder
        if degree == 1:  # the representative alone holds it
            del self._key_others[key]
        elif len(others) > 2 * degree:
            rep = self._key_rep[key]
            others[:] = dict.fromkeys(h for h in others if h != rep and key in self._keys.get(h, ()))

    def _compact(self, root: str) -> str | None:
        """Drop the tombstones of ``root``'s cluster and point its live members straight at its first live
        node (``root`` itself if live). Returns the new root, None if no member was live. O(nodes)."""
        live: list[str] = []
        for node in self._nodes.pop(root):
            if node in self._dead:
                self._dead.remove(node)
                del self._parent[node]
            else:
                live.append(node)
        del self._size[root]
        if not live:
            return None
        new = live[0]
        if len(live) > 1:
            for node in live:
                self._parent[node] = new
            self._size[new] = len(live)
            self._nodes[new] = live
        else:  # one live member left: alone again, out of the tree
            del self._parent[new]
        if new != root:
            self.merges.append((root, new))
        return new

    def link_weight_to(self, account: str, accept: Callable[[str], bool], kinds: Collection[str]) -> float:
        """Summed key weight (strongest key per kind) from ``account`` into clusters ``accept`` picks,
        whether or not it reached the linking threshold: "weakly linked to a blocked cluster"."""
        best: dict[str, float] = {}
        for key in self._keys_toward(account, accept, kinds):
            best[key[0]] = max(best.get(key[0], 0.0), key_weight(key[0], self._key_degree[key]))
        return sum(best.values())

    def filled_by(self, account: str, kind: str, accept: Callable[[str], bool], min_holders: int,
                  share: float) -> bool:
        """Whether a key of ``kind`` of ``account`` has, among its recent holders (its representative and newest
        :data:`LINK_HOLDERS` others, ``account`` aside), ``min_holders`` or more that ``accept`` picks, and they are
        ``share`` or more of them: an IP range a campaign's accounts fill, however many of them there are. (Its
        weight falls with its holders, so the more accounts a campaign puts on a range the weaker it links them.)

        >>> lk = Linker()
        >>> for i in range(6):
        ...     _ = lk.link(f"c{i}", [("ip24", "10.0.0")])
        >>> _ = lk.link("new", [("ip24", "10.0.0")])
        >>> caught = {"c0", "c1", "c2", "c3", "c4"}
        >>> lk.filled_by("new", "ip24", caught.__contains__, 4, 0.75)
        True
        >>> lk.filled_by("new", "ip24", {"c0", "c1"}.__contains__, 4, 0.75)
        False
        """
        for key in self._keys.get(account, ()):
            if key[0] != kind:
                continue
            held = picked = 0
            for holder in self._holders(key):
                if holder != account:
                    held += 1
                    picked += accept(holder)
            if picked >= min_holders and picked >= share * held:
                return True
        return False

    def keys_into(self, account: str, accept: Callable[[str], bool], kind: str, min_degree: int = 1) -> int:
        """How many of ``account``'s keys of ``kind``, each held by ``min_degree`` or more live accounts, point
        into other clusters ``accept`` picks (linked or not): "fills two of a blocked cluster's templates".

        >>> lk = Linker()
        >>> for a in ("c1", "c2"):
        ...     _ = lk.link(a, [("pay", "pm_c"), ("tmpl", 1), ("tmpl", 2)])
        >>> _ = lk.link("r", [("tmpl", 1), ("tmpl", 2), ("tmpl", 3)])  # two bands weigh as one: not linked
        >>> _ = lk.link("s", [("tmpl", 1), ("tmpl", 3)])
        >>> campaign = lk.root("c1")
        >>> [lk.keys_into(a, lambda r: r == campaign, "tmpl") for a in ("r", "s", "c2")]
        [2, 1, 0]
        >>> _ = lk.link("c1", [("tmpl", 9)])  # a prompt one campaign account sent, and one other account
        >>> _ = lk.link("t", [("tmpl", 9), ("tmpl", 1)])
        >>> lk.keys_into("t", lambda r: r == campaign, "tmpl"), lk.keys_into("t", lambda r: r == campaign, "tmpl", 3)
        (2, 1)
        """
        return sum(1 for _ in self._keys_toward(account, accept, (kind,), min_degree))

    def shared_beyond(self, account: str, kind: str, holder_kind: str, upto: int = 1, min_degree: int = 1,
                      limit: int = 64) -> int:
        """How many keys of ``kind`` of ``account`` (counted up to ``upto``), each held by ``min_degree`` or
        more live accounts, are held outside its cluster (linked or not) by accounts holding a key of
        ``holder_kind``. Two keys or more count only if holders that share one and the same key of that kind
        hold them all: "its org's templates are one other org's too". One key shared with any such holder
        gives 1. Looks at up to ``limit`` holders per key, and counts only those that still hold it (the list
        keeps a forgotten holder until it is pruned). Public text (a popular question, a textbook exercise, a
        benchmark item) is held by a different organisation's account each time; one operation split over
        organisations of its own runs the same templates in each. A key whose outside holders are mostly
        people on their own (no ``holder_kind`` key, in no cluster) is public text and counts for nothing: a
        large company's staff ask the popular questions an app's users ask, many of them (held-out seed 31:
        an app's org blocked on two such questions shared with a corporate org, one also sent by five people
        on their own, the other by over a dozen). A campaign's org-less accounts are linked, and their
        templates still count.

        >>> lk = Linker()
        >>> for a in ("a1", "a2"):
        ...     _ = lk.link(a, [("org", "o1"), ("tmpl", 7), ("tmpl", 8)])
        >>> lk.shared_beyond("a1", "tmpl", "org")
        0
        >>> _ = lk.link("p1", [("tmpl", 7)])  # a personal account (no org) with the same template
        >>> lk.shared_beyond("a1", "tmpl", "org")
        0
        >>> _ = lk.link("c1", [("org", "o3"), ("tmpl", 8)])  # another org with the other template
        >>> lk.shared_beyond("a1", "tmpl", "org", upto=2)  # two orgs, one template each: public text
        1
        >>> _ = lk.link("b1", [("org", "o2"), ("tmpl", 7), ("tmpl", 8)])
        >>> lk.shared_beyond("a1", "tmpl", "org"), lk.shared_beyond("a1", "tmpl", "org", upto=2)
        (1, 2)
        >>> _ = lk.forget(["p1", "c1", "b1"])  # idle accounts forgotten: o1's templates are its own again
        >>> lk.shared_beyond("a1", "tmpl", "org", upto=2)
        0
        """
        me = self.root(account)
        keys, parent = self._keys, self._parent
        shared: dict[Key, int] = {}  # an outside holder's key of holder_kind -> how many of these keys it shares
        best = 0
        for key in keys.get(account, ()):
            if key[0] != kind or self._key_degree[key] < min_degree:
                continue
            theirs: set[Key] = set()
            outside = lone = 0
            for h in (self._key_rep[key], *self._key_others.get(key, ())[:limit]):
                if self.root(h) == me or key not in (held := keys.get(h, ())):
                    continue
                outside += 1
                mine = [k for k in held if k[0] == holder_kind]
                if mine:
                    theirs.update(mine)
                elif h not in parent:
                    lone += 1
            if 2 * lone > outside:
                continue  # public text: mostly sent by people on their own (no org, no cluster)
            for k in theirs:
                shared[k] = n = shared.get(k, 0) + 1
                best = max(best, n)
            if best >= upto:
                break
        return min(best, upto)

    def held_outside(self, account: str, kind: str, min_degree: int = 1, limit: int = 64) -> tuple[int, int]:
        """``(outside, recurring)``: how many keys of ``kind`` of ``account`` are held by ``min_degree`` or more
        live accounts (recurring), and how many of those are held by a live account outside its cluster (any
        one, linked or not). Looks at up to ``limit`` holders per key.

        >>> lk = Linker()
        >>> for a in ("a1", "a2"):
        ...     _ = lk.link(a, [("org", "o1"), ("tmpl", 7), ("tmpl", 8), ("tmpl", 9)])
        >>> lk.held_outside("a1", "tmpl", min_degree=2)
        (0, 3)
        >>> _ = lk.link("p1", [("tmpl", 9)])  # someone else sends one of them: public text, or a partner
        >>> lk.held_outside("a1", "tmpl", min_degree=2)
        (1, 3)
        """
        me = self.root(account)
        keys = self._keys
        outside = recurring = 0
        for key in keys.get(account, ()):
            if key[0] != kind or self._key_degree[key] < min_degree:
                continue
            recurring += 1
            outside += any(self.root(h) != me and key in keys.get(h, ())
                           for h in (self._key_rep[key], *self._key_others.get(key, ())[:limit]))
        return outside, recurring

    def held_by(self, account: str, kind: str, suspect: Callable[[str], bool], min_degree: int = 1,
                limit: int = 64) -> bool:
        """Whether a key of ``kind`` of ``account``, held by ``min_degree`` or more live accounts, is held outside
        its cluster by an account ``suspect`` picks. Looks at up to ``limit`` holders per key.

        >>> lk = Linker()
        >>> for a, org in (("a1", "o1"), ("b1", "o2")):  # two companies filling one vendor's frame
        ...     _ = lk.link(a, [("org", org), ("pay", f"pm_{org}"), ("tmpl", 7)])
        >>> _ = lk.link("a2", [("org", "o1"), ("pay", "pm_o1"), ("tmpl", 7)])  # a1's colleague: not outside
        >>> lk.held_by("a1", "tmpl", lambda h: h in ("a2", "x1")), lk.held_by("a1", "tmpl", lambda h: h == "b1")
        (False, True)
        >>> _ = lk.link("x1", [("tmpl", 8)])  # another template: not a1's
        >>> lk.held_by("a1", "tmpl", lambda h: h in ("a2", "x1"))
        False
        """
        me = self.root(account)
        keys = self._keys
        for key in keys.get(account, ()):
            if key[0] != kind or self._key_degree[key] < min_degree:
                continue
            for h in (self._key_rep[key], *self._key_others.get(key, ())[:limit]):
                if self.root(h) != me and key in keys.get(h, ()) and suspect(h):
                    return True
        return False

    def _keys_toward(self, account: str, accept: Callable[[str], bool], kinds: Collection[str],
                     min_degree: int = 1) -> Iterator[tuple[str, object]]:
        """``account``'s keys of ``kinds``, held by ``min_degree`` or more live accounts, that point into another
        cluster ``accept`` picks (the degree is read first: ``accept`` may cost a cluster's windows)."""
        me = self.root(account)
        for key in self._keys.get(account, ()):
            if key[0] in kinds and self._key_degree[key] >= min_degree:
                r = self.root(self._key_rep[key])
                if r != me and accept(r):
                    yield key

    def cluster_keys(self, root: str, kinds: Collection[str], accounts: Iterable[str] | None = None
                     ) -> Iterator[tuple[Key, float]]:
        """The keys of ``kinds`` that lead into the cluster of ``root`` (their representative is a member, so an
        account holding them links toward this cluster), each once, with its weight now: of every live member,
        or of ``accounts`` (members) only. Cost: O(keys of the accounts looked at).

        >>> lk = Linker()
        >>> for a in ("a1", "a2"):
        ...     _ = lk.link(a, [("pay", "pm_1"), ("asn", 64500)])
        >>> _ = lk.link("x", [("asn", 64500), ("pay", "pm_x")])  # alone: the ASN alone does not link it
        >>> sorted(lk.cluster_keys(lk.root("a1"), ("pay", "asn")))
        [(('asn', 64500), 0.15), (('pay', 'pm_1'), 1.0)]
        >>> list(lk.cluster_keys(lk.root("x"), ("pay", "asn")))  # its ASN's representative is a1
        [(('pay', 'pm_x'), 1.0)]
        """
        seen: set[Key] = set()
        nodes = accounts if accounts is not None else (self._nodes.get(root) or (root,))
        for node in nodes:
            if node in self._dead:
                continue
            for key in self._keys.get(node, ()):
                if key[0] in kinds and key not in seen:
                    seen.add(key)
                    if self.root(self._key_rep[key]) == root:
                        yield key, key_weight(key[0], self._key_degree[key])

    def members(self) -> int:
        """Live accounts (tombstones of forgotten ones not counted): the accounts linked and not forgotten."""
        return len(self._keys)


class OpenedOnCard:
    """How many accounts, newly created and of no organisation, each card brought in within the last ``horizon_ms``
    of event time: remembered after the accounts are evicted. A campaign that rotates fast keeps one or two
    throwaway accounts at work on a card at once, each for a day, and opens the next on the same card; the linker,
    which holds live accounts only (``idle_evict_s``), then sees two or three on it, a family's count. This sees
    the card open one after another.

    Noted once per account (an account evicted and seen again is not counted twice). Bounded: at most ``per_card``
    accounts a card (enough to saturate ``fresh_card``) and ``max_cards`` cards (the card noted least recently
    forgotten first), so a flood of random new accounts on random cards cannot grow it without bound: at most about
    21 MiB (333 bytes a card with one account, measured with tracemalloc over 300,000 cards).

    Not in the account snapshots, as the links are not: after a restart it refills from the stream, so for up to two
    weeks ``fresh_card`` and ``card_cycling`` see only the accounts a card brought in since.

    >>> cards = OpenedOnCard()
    >>> for day in range(5):
    ...     cards.note("pm_1", f"acct_{day}", day * DAY_MS)
    >>> cards.note("pm_1", "acct_4", 4 * DAY_MS)  # the same account again
    >>> cards.count("pm_1", 4 * DAY_MS), cards.count("pm_1", 15 * DAY_MS), cards.count("pm_2", 0)
    (5, 4, 0)
    >>> few = OpenedOnCard(max_cards=2)
    >>> for i in range(3):
    ...     few.note(f"pm_{i}", "acct_1", 0)
    >>> len(few), few.count("pm_0", 0), few.count("pm_2", 0)
    (2, 0, 1)
    """

    def __init__(self, horizon_ms: int = 14 * DAY_MS, per_card: int = 32, max_cards: int = 1 << 16) -> None:
        self.horizon_ms, self.per_card, self.max_cards = horizon_ms, per_card, max_cards
        self._cards: dict[object, list[tuple[int, int]]] = {}  # card -> (first seen, account's CRC-32), oldest first

    def note(self, card: object, account: str, ts: int) -> None:
        """``account``, newly created, first seen on ``card`` at ``ts``."""
        h = zlib.crc32(account.encode())
        opened = self._cards.pop(card, None)
        if opened is None:
            opened = []
            if len(self._cards) >= self.max_cards:
                del self._cards[next(iter(self._cards))]
        self._cards[card] = opened  # now the most recently noted
        if any(h == seen for _, seen in opened):
            return
        since = ts - self.horizon_ms
        opened[:] = [item for item in opened if item[0] >= since][-(self.per_card - 1):]
        opened.append((ts, h))

    def count(self, card: object, now: int) -> int:
        """Accounts noted on ``card`` within the horizon before ``now``."""
        since = now - self.horizon_ms
        return sum(1 for ts, _ in self._cards.get(card, ()) if ts >= since)

    def __len__(self) -> int:
        return len(self._cards)


class ClusterState:
    """Windowed aggregates of one cluster (day horizon, decayed like account features; O(1) per event).

    ``active`` counts account arrivals (an account's first event, or its first after a day of silence),
    decayed over a day: an estimate of the accounts active in the last day without a set of them.
    """

    __slots__ = ("t0", "last_ts", "day", "blocked_members", "throttled_members", "blocked", "org_bits",
                 "new_model_1h", "n_1h")

    def __init__(self) -> None:
        self.t0 = 0
        self.last_ts = 0
        self.day = array("d", bytes(8 * _C_SLOTS))
        self.blocked_members = 0
        self.throttled_members = 0  # members that reached throttle or block (each counted once)
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
            day[_C_ORG] += w
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
        self.throttled_members += other.throttled_members
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
        spread = spread_over_hours(list(day[_C_HOUR0:_C_SLOTS]))
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
            "org_share": day[_C_ORG] / n,  # traffic from members of an organisation
        }


_C_N, _C_ACTIVE, _C_TEMPLATED, _C_COT, _C_MAX_LEN, _C_NEW, _C_MACHINE, _C_NEW_MODEL, _C_ORG = range(9)
_C_HOUR0 = 9
_C_SLOTS = _C_HOUR0 + 24
