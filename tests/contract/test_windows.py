"""Checks run over every window aggregator: account windows, cluster windows and the content sketch."""

import random

import pytest

from detector import features as feat
from detector.clusters import ClusterState
from detector.content import ContentIndex, SeenFilter
from tests.factory import BASE_TS, event

HOUR = 3_600_000
ORDER_FREE = [k for k in feat.FEATURE_NAMES if k not in ("n_10m", "n_1h", "gap_log_std")]
CTX = feat.EventContext(template_accounts=1, exact_accounts=1, model_age_ms=1 << 62)
# Account windows are stored in float32 (detector.features.WINDOW_TYPECODE): each update rounds a sum by at most
# 6e-8 of it, so 60 events in two orders may differ by up to about 4e-6 (relative); an event in the wrong slot
# differs by a whole event's share.
ACCOUNT_REL = 1e-5


def _events(n=60, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(event("acct_w", BASE_TS + rng.randrange(30 * HOUR), f"prompt number {i}",
                         input_tokens=rng.randrange(1, 500), output_tokens=rng.randrange(1, 4000),
                         response={"stop_reason": rng.choice(["end_turn", "max_tokens"])}))
    return out


def _fold(events):
    st = feat.AccountState(created_ts=BASE_TS - HOUR)
    for ev in events:
        feat.update(st, ev, CTX)
    return st


def test_account_windows_do_not_depend_on_arrival_order():
    """Day-horizon aggregates are sums, so late events land where they belong (gap statistics and the
    short horizons, which measure arrival, are excluded)."""
    events = _events()
    in_order = sorted(events, key=lambda e: e["ts"])
    shuffled = events[:]
    random.Random(1).shuffle(shuffled)
    now = in_order[-1]["ts"]
    a = feat.features(_fold(in_order), now)
    b = feat.features(_fold(shuffled), now)
    for k in ORDER_FREE:
        assert a[k] == pytest.approx(b[k], rel=ACCOUNT_REL, abs=1e-9), k


def test_account_windows_decay_with_event_time():
    st = _fold([event("acct_w", BASE_TS)])
    assert feat.features(st, BASE_TS)["n_24h"] == pytest.approx(1.0)
    assert feat.features(st, BASE_TS + 24 * HOUR)["n_24h"] == pytest.approx(0.5)
    assert feat.features(st, BASE_TS + HOUR)["n_1h"] == pytest.approx(0.5)


def test_account_windows_survive_long_gaps():
    """Scaled sums are renormalised; a month of silence neither overflows nor loses the shares."""
    st = _fold([event("acct_w", BASE_TS, response={"stop_reason": "max_tokens"}),
                event("acct_w", BASE_TS + 40 * 24 * HOUR, response={"stop_reason": "end_turn"})])
    f = feat.features(st, BASE_TS + 40 * 24 * HOUR)
    assert 0.0 < f["max_len_share"] < 1e-6 and f["n_24h"] == pytest.approx(1.0, rel=1e-6)


def test_cluster_windows_merge_like_one_stream():
    rng = random.Random(4)
    stamps = sorted(BASE_TS + rng.randrange(20 * HOUR) for _ in range(50))
    whole, left, right = ClusterState(), ClusterState(), ClusterState()
    for i, ts in enumerate(stamps):
        kw = dict(arrival=i % 7 == 0, templated=i % 2 == 0, cot=i % 3 == 0, max_len=False, new_account=True)
        whole.add(ts, **kw)
        (left if i % 2 else right).add(ts, **kw)
    left.merge(right)
    now = stamps[-1]
    a, b = whole.features(now, 10), left.features(now, 10)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9), k


def test_content_sketch_never_undercounts_and_forgets_after_two_windows():
    idx = ContentIndex(width=1 << 10, depth=2, window_ms=HOUR)
    filters = [SeenFilter() for _ in range(30)]
    for a, f in enumerate(filters):
        idx.observe(f, [0x1234], 0x9000 + a, ts=BASE_TS)
    assert idx.observe(SeenFilter(), [0x1234], 1, ts=BASE_TS)[0] >= 31
    assert idx.observe(SeenFilter(), [0x1234], 2, ts=BASE_TS + 3 * HOUR)[0] == 1


def test_networks_are_counted_over_the_current_and_the_previous_day():
    """Six networks on day 0 still count on day 1 (with day 1's own) and are forgotten by day 2, so a user
    who travelled last month does not look like one rotating proxies today."""
    day0 = BASE_TS - BASE_TS % (24 * HOUR)
    st = feat.AccountState(created_ts=day0 - 30 * 24 * HOUR)

    def call(ts, asn):
        feat.update(st, event("acct_n", ts, "hi", client={"ip": f"10.0.{asn}.1", "asn": asn, "country": "US",
                                                           "user_agent": "ua", "tls_fp": None}), CTX)
        return int(feat.features(st, ts)["distinct_asns"])  # linear counting: a slight overestimate

    # Networks 100-105 and 202 fall on seven different bits of the 32 (crc32 % 32), 300 on another.
    assert [call(day0 + i * HOUR, 100 + i) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert call(day0 + 25 * HOUR, 202) == 7  # yesterday's six and today's one
    assert call(day0 + 49 * HOUR, 202) == 1  # day 2: day 0 is gone, day 1 had only network 202
    assert call(day0 + 5 * 24 * HOUR, 300) == 1  # days later: both halves start over
