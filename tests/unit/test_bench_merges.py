"""``bench.groupby.count_merges`` counts what a stage keyed by cluster id would move: a merge of two clusters that
both hold windows, and not an account joining a cluster alone (README, *Why a copy per worker*)."""

from __future__ import annotations

from bench.groupby import count_merges
from tests.factory import BASE_TS, event

MINUTE = 60_000


def _on(account: str, card: str, minute: int) -> dict[str, object]:
    """An event of ``account`` paid with ``card``; nothing else of it is shared with another account."""
    n = sum(map(ord, account))
    return event(account, ts=BASE_TS + minute * MINUTE,
                 client={"ip": f"10.{n % 250}.{n // 250}.7", "asn": 64500 + n, "country": "US",
                         "user_agent": f"agent/{account}", "tls_fp": f"t13d_{account}"},
                 billing={"payment_fp": card, "tier": "build", "account_created_ts": BASE_TS - 400 * 86_400_000})


def test_two_clusters_joined_is_one_move_and_an_account_joining_is_none() -> None:
    pairs = [_on("a1", "pm_a", 0), _on("a2", "pm_a", 1), _on("b1", "pm_b", 2), _on("b2", "pm_b", 3)]
    before = count_merges(pairs)
    assert (before["merges"], before["moves"], before["clusters_with_windows"]) == (2, 0, 2)

    bridge = [_on("c1", "pm_a", 4), _on("c1", "pm_b", 5)]  # one account on both cards: the two clusters join
    joined = count_merges(pairs + bridge)
    assert (joined["merges"], joined["moves"], joined["clusters_with_windows"]) == (4, 1, 1)
    assert joined["moves_by_hour"] == {0: 1}

    late = count_merges(pairs + bridge + [_on("d1", "pm_b", 61)])  # a newcomer on a card, an hour in
    assert (late["merges"], late["moves"]) == (5, 1)
