"""How the cluster linker weighs an account's keys against the clusters that hold them."""

from __future__ import annotations

from detector.clusters import LINK_HOLDERS, Linker

IP, TMPL = ("ip24", "203.0.113"), ("tmpl", 77)  # 0.5 each while rare: two of them link, one does not


def test_two_half_keys_link_to_the_account_that_holds_both_whoever_held_them_first() -> None:
    """Each key's first holder is someone else (a neighbour on the IP range, another user of the template),
    but one account holds both: a newcomer holding both is linked to it, and to neither first holder."""
    lk = Linker()
    lk.link("neighbour", [IP])
    lk.link("other_user", [TMPL])
    lk.link("campaign_1", [IP, TMPL])
    lk.link("campaign_2", [IP, TMPL])
    assert lk.root("campaign_2") == lk.root("campaign_1")
    assert lk.size(lk.root("campaign_1")) == 2
    assert lk.root("neighbour") != lk.root("campaign_1") != lk.root("other_user")


def test_only_the_newest_holders_are_weighed() -> None:
    """The account holding both keys is weighed while it is among the newest LINK_HOLDERS holders of one of
    them; behind more newcomers on both keys than that, it is out of reach (the cost stays bounded)."""
    lk = Linker()
    lk.link("neighbour", [IP])
    lk.link("other_user", [TMPL])
    lk.link("campaign_1", [IP, TMPL])
    for i in range(LINK_HOLDERS):
        lk.link(f"ip_only_{i}", [IP])
        lk.link(f"tmpl_only_{i}", [TMPL])
    lk.link("campaign_2", [IP, TMPL])
    assert lk.root("campaign_2") != lk.root("campaign_1")


def test_a_cluster_holding_each_key_in_a_different_member_draws_no_newcomer() -> None:
    """One member of a cluster fills the template, another uses the IP range: a newcomer sharing one of each
    shares with no single account more than half a link, and stays alone (the sum is per account, not per
    cluster, or one popular template plus one neighbour would let a large cluster snowball)."""
    lk = Linker()
    lk.link("neighbour", [IP])
    lk.link("other_user", [TMPL])
    lk.link("member_1", [("pay", "pm_team"), TMPL])
    lk.link("member_2", [("pay", "pm_team"), IP])
    assert lk.root("member_1") == lk.root("member_2")
    lk.link("newcomer", [IP, TMPL])
    assert lk.size(lk.root("newcomer")) == 1


def test_templates_two_orgs_share_with_many_people_on_their_own_are_public_text() -> None:
    """An app's org and a company's org both send two popular questions that many people on their own send
    too: public text, not the same private templates run by two organisations. The same two templates held
    by a linked cluster of org-less accounts (a campaign's, on one card) besides the other org stay shared."""
    lk = Linker()
    popular = [("tmpl", 1), ("tmpl", 2)]
    for a in ("app_1", "app_2"):
        lk.link(a, [("org", "o_app"), *popular])
    lk.link("company_1", [("org", "o_company"), *popular])
    assert lk.shared_beyond("app_1", "tmpl", holder_kind="org", upto=2) == 2  # only the company holds them
    for i in range(3):
        lk.link(f"person_{i}", popular)  # alone: no org, no cluster
    assert lk.shared_beyond("app_1", "tmpl", holder_kind="org", upto=2) == 0

    lk = Linker()
    for a in ("app_1", "app_2"):
        lk.link(a, [("org", "o_app"), *popular])
    lk.link("company_1", [("org", "o_company"), *popular])
    for i in range(3):
        lk.link(f"campaign_{i}", [("pay", "pm_shared"), *popular])  # linked by their card: not on their own
    assert lk.size(lk.root("campaign_0")) == 3
    assert lk.shared_beyond("app_1", "tmpl", holder_kind="org", upto=2) == 2
