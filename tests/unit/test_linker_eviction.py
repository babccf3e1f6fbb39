"""Forgetting accounts in the cluster linker (issue 5): memory follows the live accounts, so a flood of
random account ids cannot grow it without bound; clusters keep their live members together when their
root goes; key degrees (and so rarity weights) count live holders only; and ``merges`` with the roots
``forget`` returns let a caller keep per-cluster state keyed by the current roots.

Every check of the internals goes through :func:`check`, which recomputes them from scratch. The
property tests compare the linker with a model made of plain sets; each example is a short random
sequence of links and forgets over a few accounts and keys, drawn deterministically (``derandomize``).
Cost: about 5 s of CPU for the 100,000-account flood, 3 s for the property tests, 1 s for the rest.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.clusters import MAX_KEYS_PER_ACCOUNT, Linker, key_weight

Key = tuple[str, object]
PAY: list[Key] = [("pay", f"pm_{i}") for i in range(8)]


def live_accounts(lk: Linker) -> set[str]:
    return (set(lk._parent) - lk._dead) | set(lk._keys)


def tree_root(lk: Linker, node: str) -> str:
    """The root of ``node`` without path halving, so checking does not change what it checks (an account
    alone is in no tree: its own root)."""
    while lk._parent.get(node, node) != node:
        node = lk._parent[node]
    return node


def partition(lk: Linker) -> set[frozenset[str]]:
    """The clusters of live accounts."""
    groups: dict[str, set[str]] = {}
    for account in live_accounts(lk):
        groups.setdefault(tree_root(lk, account), set()).add(account)
    return {frozenset(g) for g in groups.values()}


def check(lk: Linker) -> None:
    """Every internal structure agrees with the live accounts and their keys, and memory is bounded."""
    live = live_accounts(lk)
    assert lk._dead <= set(lk._parent)
    assert set(lk._keys) == live  # every live account is linked (alone or in a tree)
    assert lk.members() == len(live)
    # keys: degree = live holders; the representative is a live holder; the others list the rest (and
    # holders forgotten since, at most as many as the live ones plus one)
    holders: dict[Key, set[str]] = {}
    for account, keys in lk._keys.items():
        assert len(keys) == len(set(keys)) <= MAX_KEYS_PER_ACCOUNT
        for key in keys:
            holders.setdefault(key, set()).add(account)
    assert lk._key_degree == {key: len(h) for key, h in holders.items()}
    assert set(lk._key_rep) == set(holders)
    for key, h in holders.items():
        assert lk._key_rep[key] in h
        others = lk._key_others.get(key, [])
        assert set(others) >= h - {lk._key_rep[key]}
        assert len(others) <= 2 * len(h)
        assert (key in lk._key_others) == (len(h) > 1)
    # trees: sizes count live members; node lists hold every node, root first; tombstones <= live members
    trees: dict[str, list[str]] = {}
    for node in lk._parent:
        trees.setdefault(tree_root(lk, node), []).append(node)
    assert set(lk._size) == set(trees) == set(lk._nodes)
    for root, nodes in trees.items():
        n_live = sum(node in live for node in nodes)
        assert lk._size[root] == n_live >= 1
        assert len(nodes) - n_live <= n_live  # tombstones never outnumber the live
        assert len(nodes) >= 2  # an account alone is in no tree: no parent, size or node-list entry
        assert lk._nodes[root][0] == root
        assert sorted(lk._nodes[root]) == sorted(nodes)
    assert len(lk._parent) <= 2 * len(live)


def structure_sizes(lk: Linker) -> dict[str, int]:
    return {"parent": len(lk._parent), "size": len(lk._size), "nodes": len(lk._nodes), "dead": len(lk._dead),
            "keys": len(lk._keys), "key_rep": len(lk._key_rep), "key_degree": len(lk._key_degree),
            "key_others": len(lk._key_others), "others_entries": sum(map(len, lk._key_others.values()))}


def random_keys(rng: random.Random, n_shared: int) -> list[Key]:
    """A random account's keys: a few drawn from small shared pools (so clusters form), the rest its own."""
    return [("pay", f"pm_{rng.randrange(n_shared)}"), ("ip24", f"10.{rng.randrange(n_shared)}"),
            ("asn", rng.randrange(20)), ("ua", f"ua{rng.randrange(50)}"),
            ("cohort", (rng.randrange(n_shared), rng.randrange(20))), ("tls", f"tls_{rng.random()}")]


class Caller:
    """Per-cluster state kept as :class:`detector.detection.Detector` keeps it: keyed by root, moved along
    ``merges``, dropped for the roots ``forget`` returns. The state is the set of accounts the cluster saw."""

    def __init__(self, lk: Linker) -> None:
        self.lk = lk
        self.clusters: dict[str, set[str]] = {}

    def link(self, account: str, keys: list[Key]) -> None:
        root = self.lk.link(account, keys)
        self.apply_merges()
        self.clusters.setdefault(root, set()).add(account)

    def forget(self, accounts: list[str]) -> None:
        gone = self.lk.forget(accounts)
        self.apply_merges()
        for root in gone:
            del self.clusters[root]

    def apply_merges(self) -> None:
        for old, new in self.lk.merges:
            self.clusters.setdefault(new, set()).update(self.clusters.pop(old, set()))
        self.lk.merges.clear()

    def check(self) -> None:
        """The state is keyed by exactly the current roots, and each holds its cluster's live members."""
        assert set(self.clusters) == {tree_root(self.lk, a) for a in live_accounts(self.lk)}
        for account in live_accounts(self.lk):
            assert account in self.clusters[tree_root(self.lk, account)]


# --------------------------------------------------------------------------------------------------
# Memory

def test_forgetting_a_flood_of_random_accounts_gives_the_memory_back() -> None:
    rng = random.Random(5)
    lk = Linker()
    accounts = [f"rnd_{rng.getrandbits(64):016x}" for _ in range(100_000)]
    for account in accounts:
        lk.link(account, random_keys(rng, 5_000))
    lk.merges.clear()
    assert lk.members() == 100_000 and len(lk._nodes) > 1_000  # clusters formed: the tree part is exercised
    rng.shuffle(accounts)
    half = len(accounts) // 2
    lk.forget(accounts[:half])
    check(lk)
    assert lk.members() == len(accounts) - half
    for i in range(half, len(accounts), 1_000):
        lk.forget(accounts[i:i + 1_000])
    assert structure_sizes(lk) == dict.fromkeys(structure_sizes(lk), 0)


def test_memory_stays_bounded_under_a_flood_while_a_population_lives_on() -> None:
    """Random ids arrive once each and are evicted least recently seen first (as the detector does beyond
    ``max_accounts``), while 300 steady accounts keep sending; memory stays at what the live accounts hold."""
    rng = random.Random(6)
    lk = Linker()
    caller = Caller(lk)
    steady = {f"steady_{i}": random_keys(rng, 40) for i in range(300)}
    window: list[str] = []  # flood accounts not yet evicted, oldest first
    peaks: Counter[str] = Counter()
    for step in range(30_000):
        caller.link(f"flood_{step}", [("pay", f"pm_{rng.randrange(20)}"), ("asn", 16509), ("ua", "curl"),
                                      ("ip24", f"10.0.{rng.randrange(4)}"), ("tls", f"t{step}")])
        window.append(f"flood_{step}")
        if len(window) > 500:
            caller.forget(window[:100])
            del window[:100]
        account = rng.choice(list(steady))
        caller.link(account, steady[account])
        if step % 5_000 == 0:
            check(lk)
            caller.check()
        for name, n in structure_sizes(lk).items():
            peaks[name] = max(peaks[name], n)
    check(lk)
    caller.check()
    assert lk.members() == 300 + len(window)
    assert lk._dead and len(caller.clusters) < 300  # flood accounts joined steady clusters and left tombstones
    most_live = 300 + 500
    assert peaks["parent"] <= 2 * most_live and peaks["keys"] <= most_live
    assert peaks["key_degree"] <= MAX_KEYS_PER_ACCOUNT * most_live
    assert peaks["others_entries"] <= 2 * MAX_KEYS_PER_ACCOUNT * most_live


# --------------------------------------------------------------------------------------------------
# Clusters

def test_live_members_stay_together_when_their_root_is_forgotten() -> None:
    lk = Linker()
    caller = Caller(lk)
    members = [f"a{i}" for i in range(12)]
    for account in members:
        caller.link(account, [PAY[0]])
    roots_forgotten = 0
    while len(members) > 1:
        root = lk.root(members[0])
        victim = root if root in members else members[-1]  # a forgotten root stays root until compacted
        roots_forgotten += victim == root
        caller.forget([victim])
        members.remove(victim)
        check(lk)
        caller.check()
        assert partition(lk) == {frozenset(members)}
        assert lk.size(lk.root(members[0])) == len(members)
    assert roots_forgotten >= 3
    # the caller's state followed every change of root
    assert caller.clusters == {lk.root(members[0]): {f"a{i}" for i in range(12)}}


def test_inner_nodes_of_a_merged_cluster_can_be_forgotten() -> None:
    """Two clusters joined by a bridging account: the absorbed side's root is now an inner node that its
    members point through. Forgetting it (and the bridge) keeps all the rest together."""
    lk = Linker()
    caller = Caller(lk)
    left, right = [f"l{i}" for i in range(6)], [f"r{i}" for i in range(4)]
    for account in left:
        caller.link(account, [PAY[0]])
    for account in right:
        caller.link(account, [PAY[1]])
    inner = lk.root(right[0])
    caller.link("bridge", [PAY[0], PAY[1]])
    assert lk.root(inner) != inner and lk._parent[inner] != inner  # the absorbed root: an inner node
    caller.forget([inner, "bridge", lk.root(left[0])])
    check(lk)
    caller.check()
    rest = set(left + right) - {inner, "bridge"} - lk._dead
    assert partition(lk) == {frozenset(rest)} and len(rest) == 8
    caller.forget(sorted(rest)[:6])  # tombstones now outnumber the live: compacted to live members only
    check(lk)
    caller.check()
    assert not lk._dead and set(lk._parent) == set(sorted(rest)[6:])


def test_forgetting_a_whole_cluster_returns_its_root() -> None:
    lk = Linker()
    for account in ("a", "b", "c"):
        lk.link(account, [PAY[0]])
    lk.link("solo", [PAY[1]])
    lk.merges.clear()
    assert lk.root("a") == "b"
    assert lk.forget(["solo"]) == ["solo"]
    # "c" goes, then "b" (the root: compacted, the cluster moves to "a"), then "a": the caller applies
    # merges, then drops the returned roots
    assert lk.forget(["c", "b", "a"]) == ["a"] and lk.merges == [("b", "a")]
    assert lk.members() == 0 and not lk._parent and not lk._key_degree


def test_a_forgotten_account_linked_again() -> None:
    """While its tombstone is in the tree it rejoins its cluster; once compacted away it starts afresh."""
    lk = Linker()
    for account in ("a", "b", "c", "d"):
        lk.link(account, [PAY[0]])
    lk.forget(["a"])
    assert lk.size(lk.root("b")) == 3
    assert lk.link("a", [("ua", "x")]) == lk.root("b") and lk.size(lk.root("b")) == 4
    check(lk)
    lk.forget(["a", "b", "c"])  # three tombstones, one live member: compacted
    assert not lk._dead and lk.members() == 1
    assert lk.link("a", [("ua", "x")]) == "a" and lk.size("a") == 1
    assert lk.link("b", [PAY[0]]) == lk.root("d")  # its keys still link it
    check(lk)


def test_forget_ignores_unknown_and_repeated_accounts_and_refuses_a_bare_string() -> None:
    lk = Linker()
    lk.link("a", [PAY[0]])
    lk.link("b", [PAY[0]])
    assert lk.forget(["nobody", "a", "a"]) == []
    assert lk.forget(["a"]) == [] and lk.members() == 1
    check(lk)
    with pytest.raises(TypeError):
        lk.forget("b")


# --------------------------------------------------------------------------------------------------
# Keys

def test_degrees_and_weights_count_live_holders_only() -> None:
    lk = Linker()
    ip = ("ip24", "198.51.100")
    holders = [f"h{i}" for i in range(40)]
    for account in holders:
        lk.link(account, [ip, ("asn", 64500)])
    assert lk.degree(ip) == 40 and key_weight("ip24", lk.degree(ip)) < 0.5
    lk.forget(holders[:30])
    assert lk.degree(ip) == lk.degree(("asn", 64500)) == 10
    assert key_weight("ip24", lk.degree(ip)) == 0.5  # rare again: full weight
    check(lk)
    lk.forget(holders[30:])
    assert lk.degree(ip) == 0 and ip not in lk._key_rep and not lk._key_others


@pytest.mark.parametrize("order", ["oldest first", "newest first", "random"])
def test_a_key_held_by_many_keeps_a_live_representative_and_a_short_list(order: str) -> None:
    lk = Linker()
    asn = ("asn", 16509)
    holders = [f"h{i}" for i in range(400)]
    for account in holders:
        lk.link(account, [asn])
    if order == "newest first":
        holders.reverse()
    elif order == "random":
        random.Random(4).shuffle(holders)
    longest = 0.0
    for i, account in enumerate(holders[:-1]):
        lk.forget([account])
        live = set(holders[i + 1:])
        assert lk.degree(asn) == len(live) and lk._key_rep[asn] in live
        longest = max(longest, len(lk._key_others.get(asn, [])) / len(live))
        if i % 50 == 0:
            check(lk)
    assert longest <= 2.0 and asn not in lk._key_others  # one holder left: no list
    check(lk)


def test_a_key_whose_representative_went_still_links_to_its_live_holders() -> None:
    lk = Linker()
    for account in ("first", "second", "third"):
        lk.link(account, [PAY[0]])
    assert lk._key_rep[PAY[0]] == "first"
    lk.forget(["first"])
    assert lk._key_rep[PAY[0]] in {"second", "third"}
    assert lk.link("newcomer", [PAY[0]]) == lk.root("second")  # the card still links
    lk.forget(["second", "third", "newcomer"])
    assert lk.link("later", [PAY[0]]) == "later" and lk.size("later") == 1  # no holder left: a new start
    check(lk)


# --------------------------------------------------------------------------------------------------
# Properties against a model made of sets

class Model:
    """The expected linker for payment keys only (each new holder of a card joins its holders' cluster;
    degrees stay below 60, so every card weighs 1). A cluster is a pair of sets: live members and
    tombstones, dropped when they outnumber the live ones; a forgotten account linked again while a
    tombstone rejoins its cluster."""

    def __init__(self) -> None:
        self.clusters: list[tuple[set[str], set[str]]] = []
        self.keys: dict[str, list[Key]] = {}

    def cluster_of(self, account: str) -> tuple[set[str], set[str]] | None:
        return next((c for c in self.clusters if account in c[0] or account in c[1]), None)

    def link(self, account: str, keys: list[Key]) -> None:
        cluster = self.cluster_of(account)
        if cluster is None:
            cluster = ({account}, set())
            self.clusters.append(cluster)
        elif account in cluster[1]:
            cluster[1].remove(account)
            cluster[0].add(account)
        own = self.keys.setdefault(account, [])
        for key in keys:
            if key not in own and len(own) < MAX_KEYS_PER_ACCOUNT:
                own.append(key)
        for other, their in self.keys.items():
            found = self.cluster_of(other)
            if other != account and set(own) & set(their) and found is not cluster:
                assert found is not None
                self.clusters.remove(found)
                cluster[0].update(found[0])
                cluster[1].update(found[1])

    def forget(self, accounts: list[str]) -> None:
        for account in accounts:
            cluster = self.cluster_of(account)
            if cluster is None or account not in cluster[0]:
                continue
            del self.keys[account]
            cluster[0].remove(account)
            cluster[1].add(account)
            if len(cluster[1]) > len(cluster[0]):
                cluster[1].clear()
            if not cluster[0]:
                self.clusters.remove(cluster)

    def partition(self) -> set[frozenset[str]]:
        return {frozenset(live) for live, _ in self.clusters}


ACCOUNTS = [f"acct_{i}" for i in range(12)]
LINK = st.tuples(st.just("link"), st.sampled_from(ACCOUNTS), st.lists(st.sampled_from(PAY), max_size=3))
FORGET = st.tuples(st.just("forget"), st.lists(st.sampled_from(ACCOUNTS), max_size=4))
OPS = st.lists(st.one_of(LINK, LINK, FORGET), max_size=60)
PROPERTY = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(OPS)
def test_partition_of_live_accounts_matches_the_model(ops: list[tuple]) -> None:
    lk, model = Linker(), Model()
    caller = Caller(lk)
    for op in ops:
        if op[0] == "link":
            caller.link(op[1], op[2])
            model.link(op[1], op[2])
        else:
            caller.forget(op[1])
            model.forget(op[1])
        assert partition(lk) == model.partition()
        assert lk._dead == set().union(*(dead for _, dead in model.clusters))
        assert lk._key_degree == Counter(key for keys in model.keys.values() for key in keys)
        check(lk)
        caller.check()


KEYS: list[Key] = [*PAY[:3], ("ip24", "10.0.0"), ("ip24", "10.0.1"), ("asn", 1), ("asn", 2), ("ua", "x"),
                   ("cohort", (1, 1)), ("tls", "t")]
MIXED = st.lists(st.one_of(
    st.tuples(st.just("link"), st.sampled_from(ACCOUNTS), st.lists(st.sampled_from(KEYS), max_size=5)),
    st.tuples(st.just("forget"), st.lists(st.sampled_from(ACCOUNTS), max_size=4))), max_size=60)


@PROPERTY
@given(MIXED)
def test_with_weak_keys_forgetting_never_splits_or_joins_live_accounts(ops: list[tuple]) -> None:
    """With keys of every weight the model cannot say which links form, but forgetting must leave the
    clusters of the remaining live accounts exactly as they were, and linking never splits one."""
    lk = Linker()
    caller = Caller(lk)
    for op in ops:
        before = partition(lk)
        if op[0] == "link":
            caller.link(op[1], op[2])
            assert all(any(group <= after for after in partition(lk)) for group in before)
        else:
            caller.forget(op[1])
            expected = {group - set(op[1]) for group in before} - {frozenset()}
            assert partition(lk) == expected
        check(lk)
        caller.check()


def test_an_account_alone_is_in_no_tree() -> None:
    """Most accounts are alone: they hold their keys and nothing in the union-find (issue 5's memory)."""
    lk = Linker()
    lk.link("solo", [("ua", "x"), ("asn", 1)])
    lk.link("other", [("ua", "x"), ("asn", 1)])  # two weak keys shared: not linked
    assert lk.root("solo") == "solo" and lk.size("solo") == 1 and lk.members() == 2
    assert not lk._parent and not lk._size and not lk._nodes
    lk.link("mate", [PAY[0]])
    lk.link("solo", [PAY[0]])  # a shared card: a cluster of two, a tree
    assert set(lk._parent) == {"solo", "mate"} and lk.size(lk.root("solo")) == 2
    check(lk)
    lk.merges.clear()
    assert lk.forget(["other"]) == ["other"]  # alone: its own root comes back, emptied
    lk.forget(["solo", "mate"])
    assert lk.members() == 0 and not lk._parent and not lk._size and not lk._keys
