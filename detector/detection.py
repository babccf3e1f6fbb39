"""The detection core: valid events in, risk-score records out. Plain Python; no Kafka, no Faust.

Per event, in order::

    event ─▶ content index ─▶ account windows ─▶ cluster linker ─▶ cluster windows
                 (templates shared?)  (features)    (shared rare keys)  (coordination)
                                   └──────────────┬───────────────────────┘
                                                  ▼
                         evidence ─▶ fusion (online logistic regression) ─▶ action + reasons
                                                  │
                             anomaly model learns ◀┘ (only from accounts it did not flag)

A record is returned when an account's action changes, or its score moves by at least
``min_score_change`` while the action is not ``allow``; an account with no record is allowed.
The same ``Detector`` runs in the Faust worker and in ``detector replay``: given the same events in the
same order it returns the same records (``emitted_at`` aside).

>>> from detector.gateway import make_event
>>> det = Detector()
>>> ev = make_event(account_id="a1", ts=1775000000000, api_key_id="k", model="m", endpoint="/v1/messages",
...                 status=200, input_tokens=10, output_tokens=10, latency_ms=5, prompt_text="hello there",
...                 response={"stop_reason": "end_turn"}, fingerprint_key=b"k")
>>> det.process(ev) is None  # one ordinary event: allowed, nothing to publish
True
>>> det.stats["events"]
1
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from itertools import islice
from typing import Any

from detector import features as feat
from detector.clusters import KEY_KINDS, ClusterState, Linker, OpenedOnCard, link_keys
from detector.content import CaughtContent, ContentIndex, SeenBits, SeenFilter
from detector.fusion import ACTIONS, PRIOR_WEIGHTS, Fusion, decide, detail
from detector.keyblocks import KEY_BLOCK_KINDS, REPUBLISH_WEIGHT_CHANGE, key_block_record
from detector.models import RankScorer, Sampler, make_model, squash
from detector.settings import DetectionSettings
from detector.signals import (
    ARRIVAL,
    BLOCKED,
    CLUSTER_BLOCKED,
    COT,
    MACHINE,
    MAX_LEN,
    NEW_ACCOUNT,
    NEW_MODEL,
    TEMPLATED,
    THROTTLED,
    Signal,
)

MODEL_VERSION = "0.1.0"
CAUGHT = ("throttle", "block")
MAX_REASONS = 5
NEW_ACCOUNT_DAYS = 14.0
MACHINE_MIN_EVENTS = 12.0  # an account needs this many events in its day window to judge its schedule
MACHINE_SPREAD = 0.85  # hour-of-day entropy (normalised) above which an account runs around the clock
# A blocked account of a blocked cluster (at this score or more) is scored once in this much event time: a day,
# as a campaign's account may call once an hour or less.
SETTLED_SCORE, SETTLED_RESCORE_MS = 0.99, 24 * 3_600_000
MODEL_WARM_UP_MS = 3_600_000  # models first seen in the stream's first hour existed before it started
# Key kinds specific enough to tie an account to a blocked cluster below the linking threshold (a shared
# user agent, TLS library or cloud ASN is not).
NEAR_KINDS = frozenset({"pay", "ip24", "cohort"})
# A shared template ties an account to a blocked cluster only if that cluster's traffic is largely templated
# (the template is the campaign's). The bands of a barely templated cluster are boilerplate everyone uses
# ("Think step by step."), which public-benchmark runs share too.
NEAR_TEMPLATE_SHARE = 0.25
# ... and only through bands held by this many accounts or more: the campaign's templates. A band one of its
# accounts and one other account hold is a prompt both sent, as a coding app's users ask questions a
# harvesting campaign also took from public coding sets (held-out seed 41: an app's account blocked on two
# such bands, each shared with one account of the caught model hopper).
NEAR_BAND_HOLDERS = 3
# near_blocked counts an IP range in full for a new personal account where this many of the range's recent holders
# (Linker.filled_by), and this share of them, are caught or in blocked clusters (see Detector._evidence).
RANGE_FILLED_HOLDERS = 4
RANGE_FILLED_SHARE = 0.75
# Two organisations share a template (ending the one-org presumption, see _evidence) through bands held by this
# many accounts or more: a template, not one public-dataset item both happened to send.
ORG_SHARED_BAND_HOLDERS = 4
# A payment fingerprint on more personal (organisation-less) accounts than SHARED_CARD_FROM is evidence,
# full at SHARED_CARD_FROM + SHARED_CARD_SPAN accounts.
SHARED_CARD_FROM = 3
SHARED_CARD_SPAN = 27
# card_cycling: a new account on a card that brought in new accounts within two weeks which have since gone quiet
# and been evicted: more than CYCLED_FROM of them is evidence, full at CYCLED_FROM + CYCLED_SPAN.
CYCLED_FROM = 2
CYCLED_SPAN = 8
# A cluster that is one organisation (every member's traffic under the same org) is one paying customer:
# its accounts share templates, networks and a card because they are one company's pipeline, not to stay
# under per-account limits. Its coordination terms count this much (see Detector._evidence).
ONE_ORG_DISCOUNT = 0.35
ONE_ORG_SHARE = 0.98
# Networks (ASNs) an account's calls came from over its current and previous day (features.distinct_asns).
# A home user has one or two, a traveller or a VPN user a few; a company's pipeline runs from its own
# servers. ROTATING_ASNS or more is rotation through residential or mobile proxies: evidence from
# ROTATION_FROM networks, full at ROTATION_FROM + ROTATION_SPAN, and the end of the one-organisation
# presumption above (a company's pipeline does not hop networks).
ROTATION_FROM = 3.0
ROTATION_SPAN = 6.0
ROTATING_ASNS = 5.0
# near_blocked: prompts a day (day window) filling a blocked cluster's templates from which their volume
# counts, full at NEAR_VOLUME_FROM + NEAR_VOLUME_SPAN (see Detector._evidence).
NEAR_VOLUME_FROM = 20.0
NEAR_VOLUME_SPAN = 60.0
# echoes_caught: an event echoes caught accounts' prompts if ECHO_BANDS or more of its template bands are among
# theirs (CaughtContent). Evidence from ECHO_SHARE_FROM of the account's traffic (full at FROM + SPAN), times
# its volume: from ECHO_VOLUME_FROM such prompts a day, full at FROM + SPAN (see Detector._evidence).
ECHO_BANDS = 2
ECHO_SHARE_FROM = 0.05
ECHO_SHARE_SPAN = 0.15
ECHO_VOLUME_FROM = 20.0
ECHO_VOLUME_SPAN = 40.0
# A member throttled with echoes_caught this share of the push or more is not counted toward its cluster's block
# (Detector._echoed).
ECHO_SPREADS_BELOW = 0.5
# harvest_cross_org trusts a harvest's pace before a whole hour of it (its kept-up factor starts at 2/3, not 1/3)
# once the account has made this many calls in its day window (see Detector._evidence).
CROSS_ORG_PACE_EVENTS = 12.0
#: An account's link keys travel in its cluster signals (detector.signals) at least this often (event time).
KEYS_EVERY_MS = 600_000
DEDUP_IDS = 100_000  # event ids remembered for deduplication: between this many and twice as many
RECENT_PER_ACCOUNT = 8  # event-id hashes kept in each account's snapshot (duplicates across a restart)
MAX_PENDING_KEY_BLOCKS = 100_000  # key-block records held for drain_key_blocks(); beyond, counted and dropped
EVICT_AHEAD = 1024  # accounts next in eviction order read ahead at a time (Detector._oldest)
DEFAULT_KEY_SECRET = b"distill-detector-demo-key"  # Settings.fingerprint_key's default, as the gateway's
# Integer fields the detector reads. JSON Schema's "integer" admits 1.0 (to JSON, the same number as 1), but a
# Python float cannot index an array and hashes to another link key ("1.0" is not "1"): see _integral().
_INT_FIELDS = ("ts", "status", "input_tokens", "output_tokens")
_INT_SUBFIELDS = (("client", "asn"), ("billing", "account_created_ts"))


def _clip(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def _integral(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with integral floats in its integer fields made ints: a copy, made only when needed (the
    input is never mutated). Costs a few dict look-ups per event.

    >>> ev = {"ts": 1775000000000.0, "status": 200, "input_tokens": 1, "output_tokens": 2,
    ...       "client": {"asn": 64500.0}, "billing": {"account_created_ts": None}}
    >>> out = _integral(ev)
    >>> out["ts"], out["client"], ev["ts"]
    (1775000000000, {'asn': 64500}, 1775000000000.0)
    >>> _integral(out) is out
    True
    """
    top = [k for k in _INT_FIELDS if type(event[k]) is float]
    nested = [(p, k) for p, k in _INT_SUBFIELDS if type(event[p].get(k)) is float]
    if not (top or nested):
        return event
    out = dict(event)
    for k in top:
        out[k] = int(out[k])
    for p, k in nested:
        out[p] = {**out[p], k: int(out[p][k])}
    return out


# Throttled members that block their cluster: two, and at least this share of its members. Two of a large
# cluster is little: a popular coding tool's system prompt glues its users across orgs into one cluster of
# dozens, and two teams in it on cards of their own may each come near the line (detector evaluate --scenario
# paraphrase --scale 0.3: 2 of 89 blocked all 89, 56 false positives; with the share, 3). A campaign's cluster
# is blocked while small, before it grows (scale 1: no served share moved by more than 0.01 point).
BLOCK_THROTTLED_SHARE = 0.1


def _blocks(cluster: ClusterState, size: float) -> bool:
    """Whether a cluster's tallies of caught members block it: one blocked member in a cluster of three or
    more, two blocked in a pair, or two members throttled (or worse) in a cluster of three or more, and at
    least :data:`BLOCK_THROTTLED_SHARE` of its members.

    >>> c = ClusterState()
    >>> c.throttled_members = 2
    >>> _blocks(c, 3), _blocks(c, 20), _blocks(c, 21)
    (True, True, False)
    """
    return ((cluster.blocked_members >= 1 and (cluster.blocked_members >= 2 or size >= 3))
            or (cluster.throttled_members >= max(2.0, BLOCK_THROTTLED_SHARE * size) and size >= 3))


def id_hash(event_id: str) -> int:
    """The 64-bit hash under which an event id is remembered (BLAKE2b, the same in every process).

    >>> id_hash("evt_1") == id_hash("evt_1") != id_hash("evt_2")
    True
    """
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


class RecentIds:
    """The event ids seen lately, so an event redelivered by Kafka (at-least-once: after a crash, a
    rebalance, or a producer's retry) is not counted twice.

    Holds 64-bit keyed hashes (BLAKE2b; not ``hash()``, which is salted per process, so replay equals the
    worker) in two generations: when the current one holds ``capacity`` ids it becomes the previous one
    and the previous one is dropped, so the last ``capacity`` to ``2 * capacity`` ids are remembered.
    The window is counted in ids, not event time, so a hostile far-future timestamp cannot flush it; at
    10,000 events per second the default 100,000 ids cover 10 to 20 s, well beyond a batch (2,000 events)
    or a producer's retry. Memory: about 80 bytes per id held, at most ``160 * capacity`` bytes (16 MB at
    the default). Cost: one hash and at most two set look-ups per event, under 1 µs. A false duplicate
    needs a 64-bit collision: about ``2 * capacity / 2 ** 64`` per event, 1e-14 at the default.

    >>> ids = RecentIds(capacity=2)
    >>> [ids.seen(e) for e in ("a", "a", "b", "c", "a", "d", "e", "a")]
    [False, True, False, False, True, False, False, False]
    >>> len(ids) <= 2 * ids.capacity
    True
    """

    def __init__(self, capacity: int = DEDUP_IDS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._new: set[int] = set()
        self._old: set[int] = set()

    def seen(self, event_id: str) -> bool:
        """True if ``event_id`` was seen lately; otherwise remember it and return False."""
        return self.seen_hash(id_hash(event_id))

    def seen_hash(self, h: int) -> bool:
        """:meth:`seen` for an id already hashed with :func:`id_hash`."""
        if h in self._new or h in self._old:
            return True
        if len(self._new) >= self.capacity:
            self._old, self._new = self._new, set()
        self._new.add(h)
        return False

    def __len__(self) -> int:
        return len(self._new) + len(self._old)


class _Account(feat.AccountState):
    """One tracked account: its windows (it *is* its :class:`~detector.features.AccountState`), the bits of
    its :class:`~detector.content.SeenFilter`, and the detector's bookkeeping, all in one object.

    One object rather than four (window array, windows, filter, bookkeeping) saves three object headers,
    three pointers and pymalloc rounding: about 130 bytes of the detector's per-account memory. ``state``
    and ``seen`` name the parts as before; both are the account itself, which is also its window array
    (``acct[i]``, see :class:`~detector.features.AccountState`).

    The filter's bits, the scores, timestamps, position and counted flags are packed after the window's
    (:class:`~detector.features.Packed`), not objects of their own: a 1024-bit int is 160 bytes, a float
    24 and a timestamp 32, each with an 8-byte slot. Measured with tracemalloc (issue 5): 540 bytes for an
    account of one event, 648 before (object and array 432, filter 156, timestamp 36, score 24); a busy
    account holds several timestamps, two scores and a Kafka offset, which saves more. Each packed read or
    write costs about 120 ns (the filter's 350 ns): 3% of replay speed.

    >>> acct = _Account(created_ts=5)
    >>> acct.state is acct.seen is acct, acct.state.created_ts, acct.seen.bits, acct.shard, acct.score
    (True, 5, 0, -1, 0.0)
    """

    __slots__ = ("action", "root", "recent_ids")
    _AT = feat.PACKED_END
    bits = feat.PackedInt(_AT, SeenFilter.SIZE // 8)  # the SeenFilter's (ContentIndex.observe takes the account)
    score = feat.Packed(_AT + 128, "d")
    emitted_score = feat.Packed(_AT + 136, "d")
    learned_ts = feat.Packed(_AT + 144, "q")
    scored_ts = feat.Packed(_AT + 152, "q")  # when last scored (not in its snapshot: after a restore, at once)
    shard = feat.Packed(_AT + 160, "q")  # where the account's events come from (a Kafka partition); -1: unknown
    seq = feat.Packed(_AT + 168, "q")  # position (offset) of the last event folded in from ``shard``
    blocked_counted = feat.Packed(_AT + 176, "?")
    throttled_counted = feat.Packed(_AT + 177, "?")
    confirmed = feat.Packed(_AT + 178, "?")  # an analyst's attack verdict: blocked until a benign one
    _zero = array(feat.WINDOW_TYPECODE, bytes(_AT + 180))

    def __init__(self, created_ts: int | None) -> None:
        super().__init__(created_ts)
        self.action = "allow"
        self.root = ""
        self.shard = self.seq = -1
        # id_hash of its last RECENT_PER_ACCOUNT events, oldest first, 8 bytes each (little-endian, as in its
        # snapshot): one bytes object of 41 to 97 bytes, where an array of them would be 88 to 144.
        self.recent_ids = b""

    @property
    def state(self) -> feat.AccountState:
        """The account's windows (the account itself)."""
        return self

    @property
    def recent(self) -> tuple[int, ...]:
        """The id hashes in ``recent_ids``, oldest first.

        >>> acct = _Account(None)
        >>> acct.recent = [7, 2**64 - 1]
        >>> acct.recent, len(acct.recent_ids), _holds(acct.recent_ids, 7), _holds(acct.recent_ids, 8)
        ((7, 18446744073709551615), 16, True, False)
        """
        return struct.unpack(f"<{len(self.recent_ids) // 8}Q", self.recent_ids)

    @recent.setter
    def recent(self, ids: Iterable[int]) -> None:
        ids = tuple(ids)
        self.recent_ids = struct.pack(f"<{len(ids)}Q", *ids)

    @property
    def seen(self) -> SeenBits:
        """The account's filter of content keys it contributed (the account itself: see ``bits``)."""
        return self


def _holds(ids: bytes, h: int) -> bool:
    """Whether the packed 64-bit id hashes ``ids`` (an account's ``recent_ids``) hold ``h``: a match at an
    8-byte boundary (bytes of two neighbouring ids may match too)."""
    key = h.to_bytes(8, "little")
    at = ids.find(key)
    while at > 0 and at & 7:
        at = ids.find(key, at + 1)
    return at >= 0


# Account snapshot, version 2 (little-endian): this header, the account's 1024-bit SeenFilter, its recent
# event-id hashes (``n_recent`` of them) and the day-window array (feat.N_SLOTS doubles): 652 to 716 bytes.
# Version 1 lacked the window's ECHO slot; it loads with that slot empty.
_SNAPSHOT_VERSION = 2
_V1_SLOTS = feat.N_SLOTS - 1
_HEAD = struct.Struct("<BBBBqqqqqqqqdddddQQQ")
_SEEN_BYTES = SeenFilter.SIZE // 8
_HAS_CREATED, _ALLOWLISTED, _CONFIRMED = 1, 2, 4


def dump_account(acct: _Account, allowlisted: bool = False) -> bytes:
    """The account's state as bytes: everything needed to go on counting it exactly after a restart.

    Cluster membership is not in it (the linker re-links an account from its next events), nor are
    ``blocked_counted`` and ``throttled_counted`` (a cluster's counts of blocked and throttled members are
    rebuilt with the cluster). Plain ``struct`` packing, never pickle: a snapshot travels through a Kafka
    topic. Cost: about 2 µs.
    """
    st = acct.state
    flags = ((_HAS_CREATED if st.created_ts is not None else 0) | (_ALLOWLISTED if allowlisted else 0)
             | (_CONFIRMED if acct.confirmed else 0))
    head = _HEAD.pack(_SNAPSHOT_VERSION, ACTIONS.index(acct.action), flags, len(acct.recent_ids) // 8,
                      st.created_ts or 0, st.first_ts, st.last_ts, st.t0, st.events, acct.learned_ts,
                      acct.shard, acct.seq, st.n_10m, st.n_1h, st.new_model_1h, acct.score, acct.emitted_score,
                      st.ip_bits, st.asn_bits, st.ua_bits)
    window = array("d", st[:feat.N_SLOTS]).tobytes()
    return head + acct.bits.to_bytes(_SEEN_BYTES, "little") + acct.recent_ids + window


def load_account(blob: bytes) -> tuple[_Account, bool]:
    """The account in ``blob`` (from :func:`dump_account`) and whether it was allowlisted.

    Raises ValueError on a blob of another version or the wrong length.

    >>> acct = _Account(created_ts=5)
    >>> acct.state.events, acct.seq, acct.recent, acct.action, acct.confirmed = 3, 41, array("Q", [7, 9]), "watch", True
    >>> back, allowlisted = load_account(dump_account(acct, allowlisted=True))
    >>> back.state.events, back.state.created_ts, back.seq, list(back.recent), back.action, back.confirmed, allowlisted
    (3, 5, 41, [7, 9], 'watch', True, True)
    >>> load_account(b"\\x03junk")
    Traceback (most recent call last):
    ...
    ValueError: account snapshot: version 3 (expected 1 or 2) or length 5 wrong
    """
    n_recent = blob[3] if len(blob) >= _HEAD.size else 0
    version = blob[0] if blob else None
    slots = feat.N_SLOTS if version == _SNAPSHOT_VERSION else _V1_SLOTS
    size = _HEAD.size + _SEEN_BYTES + 8 * n_recent + 8 * slots
    if len(blob) != size or version not in (1, _SNAPSHOT_VERSION) or n_recent > RECENT_PER_ACCOUNT:
        raise ValueError(f"account snapshot: version {version} (expected 1 or {_SNAPSHOT_VERSION})"
                         f" or length {len(blob)} wrong")
    (_, action, flags, _, created_ts, first_ts, last_ts, t0, events, learned_ts, shard, seq, n_10m, n_1h,
     new_model_1h, score, emitted_score, ip_bits, asn_bits, ua_bits) = _HEAD.unpack_from(blob)
    acct = _Account(created_ts if flags & _HAS_CREATED else None)
    st = acct.state
    st.first_ts, st.last_ts, st.t0, st.events = first_ts, last_ts, t0, events
    st.n_10m, st.n_1h, st.new_model_1h = n_10m, n_1h, new_model_1h
    st.ip_bits, st.asn_bits, st.ua_bits = ip_bits, asn_bits, ua_bits
    acct.action, acct.score, acct.emitted_score = ACTIONS[action], score, emitted_score
    acct.learned_ts, acct.shard, acct.seq = learned_ts, shard, seq
    acct.confirmed = bool(flags & _CONFIRMED)
    at = _HEAD.size
    acct.bits = int.from_bytes(blob[at:at + _SEEN_BYTES], "little")
    at += _SEEN_BYTES
    acct.recent_ids = bytes(blob[at:at + 8 * n_recent])
    at += 8 * n_recent
    day = array("d", blob[at:])
    if slots != feat.N_SLOTS:  # version 1: no ECHO slot
        day.insert(feat.ECHO, 0.0)
    # Into the exact-size window (frombytes() over-allocates), in the window's own array type.
    st[:feat.N_SLOTS] = array(feat.WINDOW_TYPECODE, day)
    return acct, bool(flags & _ALLOWLISTED)


class Detector:
    """Stateful detector over a stream of valid events (see the module docstring).

    ``anomaly_model`` is one of :data:`detector.models.MODEL_NAMES` (default: the settings'). Memory: about
    960 bytes per tracked account (bench/run.py, 1M accounts) plus a fixed 64 MiB content sketch, plus at most 16 MB of
    recent event ids (:class:`RecentIds`, ``dedup_ids``) and 21 MiB of the new accounts each card brought in
    (:class:`~detector.clusters.OpenedOnCard`); accounts idle for ``idle_evict_s`` of event time, and the least
    recently active beyond ``max_accounts``, are evicted.

    An event whose ``event_id`` was seen lately (Kafka's at-least-once redelivery) changes nothing:
    ``process`` returns None and counts it in ``stats["duplicates"]``.

    >>> from detector.gateway import make_event
    >>> det = Detector(dedup_ids=1000)
    >>> ev = make_event(account_id="a1", ts=1775000000000, api_key_id="k", model="m", endpoint="/v1/messages",
    ...                 status=200, input_tokens=10, output_tokens=10, latency_ms=5, prompt_text="hello",
    ...                 response={"stop_reason": "end_turn"}, fingerprint_key=b"k")
    >>> det.process(ev), det.process(ev), det.stats["events"], det.stats["duplicates"]
    (None, None, 1, 1)
    """

    def __init__(self, settings: DetectionSettings | None = None, *, anomaly_model: str | None = None,
                 seed: int = 42, content: ContentIndex | None = None, dedup_ids: int = DEDUP_IDS,
                 track_changes: bool = False, key_secret: bytes = DEFAULT_KEY_SECRET,
                 share_clusters: bool = False) -> None:
        self.settings = settings or DetectionSettings()
        self.anomaly_model = anomaly_model = anomaly_model or self.settings.anomaly_model
        # Tracked accounts, least recently active first: an event moves its account to the end (pop and insert
        # again). A plain dict, not an OrderedDict: 49 bytes an account less at 1M accounts (bench/run.py),
        # the OrderedDict's linked list and node table. _evict_ahead holds, in order, the first accounts of
        # ``accounts`` (see _oldest).
        self.accounts: dict[str, _Account] = {}
        self._evict_ahead: dict[str, None] = {}
        self.clusters: dict[str, ClusterState] = {}
        self.linker = Linker()
        self.opened_on_card = OpenedOnCard()  # new accounts each card brought in, remembered past their eviction
        self.content = content or ContentIndex()
        self.caught_content = CaughtContent()
        self.model = RankScorer(make_model(anomaly_model, seed))
        self.sampler = Sampler()
        self.fusion = Fusion()
        self.model_first_seen: dict[str, int] = {}
        self.allowlist = set(self.settings.allowlist)
        self.stats = {"events": 0, "scored": 0, "records": 0, "evicted": 0, "labels": 0, "duplicates": 0,
                      "restored": 0, "restore_errors": 0, "key_blocks": 0, "key_blocks_dropped": 0}
        self.recent_ids = RecentIds(dedup_ids)
        self._last_ts = 0
        self._learned_ts = 0  # the event-time high-water mark when the fusion model last learned a verdict
        # The emitted_at of the latest event processed (None: the wall clock), for the records a merge makes
        # outside any one event's scoring: replay stamps them in event time as it does every other record.
        self._emitted_at: int | None = None
        self._stream_start = 0
        self._blocked_roots: set[str] = set()
        # With track_changes, the accounts changed or evicted since the last drain_changes() (for a changelog).
        self._changed: set[str] | None = set() if track_changes else None
        self._evicted: list[tuple[str, int]] = []
        # Key blocks (detector.keyblocks): records waiting for drain_key_blocks(), and per key published the
        # weight, event time and cluster id it went out with (so it is re-sent only when one of them moves).
        self._key_secret = key_secret
        self._key_blocks: list[dict[str, Any]] = []
        self._key_sent: dict[tuple[str, object], tuple[float, int, str]] = {}
        self._key_sweep_at = 4096
        # Cluster sharing (detector.signals): with share_clusters, what each event of an own account did to the
        # cross-account state, for drain_signals(); and the accounts other workers hold that apply_signals()
        # linked, by the event time they were last seen (evicted as idle as own accounts are).
        self._signals: list[Signal] | None = [] if share_clusters else None
        self._foreign: OrderedDict[str, int] = OrderedDict()
        # Other workers' accounts caught (their prompts feed caught_content), with the levels (THROTTLED, BLOCKED)
        # counted in their clusters' tallies: an account that becomes this detector's keeps them counted.
        self._foreign_caught_ids: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------------
    def process(self, event: dict[str, Any], emitted_at: int | None = None,
                position: tuple[int, int] | None = None) -> dict[str, Any] | None:
        """Fold one *valid* event in (see :func:`detector.schemas.decode_event`); return a risk-score
        record (``schemas/risk_score.v1.json``) when the account's decision changed, else None.

        A duplicate changes nothing but ``stats["duplicates"]`` and returns None. An event is a duplicate
        if its ``event_id`` was seen lately (:class:`RecentIds`) or is among its account's last
        :data:`RECENT_PER_ACCOUNT` ids, or if ``position`` (``(shard, seq)``: a Kafka partition and
        offset) is at or before the last position folded into its account from that shard. The account's
        ids and position are part of its snapshot (:func:`dump_account`), so an event redelivered after a
        crash is recognised even by a detector restored from a changelog.

        The id is remembered before the event is folded in, so an event the detector raised on (and the
        router dead-lettered as ``internal``) is not folded in again if redelivered.

        >>> from detector.gateway import make_event
        >>> det = Detector()
        >>> ev = make_event(account_id="a1", ts=1775000000000, api_key_id="k", model="m", endpoint="/v1/x",
        ...                 status=200, input_tokens=1, output_tokens=1, latency_ms=5, prompt_text="hi",
        ...                 response={"stop_reason": "end_turn"}, fingerprint_key=b"k")
        >>> again = {**ev, "event_id": "evt_other"}  # a different id, redelivered from the same offset
        >>> det.process(ev, position=(0, 10)), det.process(again, position=(0, 10)), det.stats["duplicates"]
        (None, None, 1)
        """
        event_id = event.get("event_id")
        h = id_hash(event_id) if event_id is not None else None
        if h is not None and self.recent_ids.seen_hash(h):
            self.stats["duplicates"] += 1
            return None
        aid: str = event["account_id"]
        acct = self.accounts.get(aid)
        if acct is not None and ((h is not None and _holds(acct.recent_ids, h)) or (
                position is not None and position[0] == acct.shard and position[1] <= acct.seq)):
            self.stats["duplicates"] += 1
            return None
        event = _integral(event)
        ts: int = event["ts"]
        self.stats["events"] += 1
        self._last_ts = max(self._last_ts, ts)
        self._emitted_at = emitted_at
        if acct is None:
            self._evict(ts)
            acct = self.accounts[aid] = _Account(event["billing"].get("account_created_ts"))
            if self._foreign:
                self._foreign.pop(aid, None)  # another worker's account until a rebalance brought it here
                self._adopt_counts(acct, self._foreign_caught_ids.pop(aid, 0))
        else:
            self.accounts[aid] = self.accounts.pop(aid)  # now the most recently active
            self._evict_ahead.pop(aid, None)
        if position is not None:
            acct.shard, acct.seq = position
        if h is not None:
            ids = acct.recent_ids
            if len(ids) >= 8 * RECENT_PER_ACCOUNT:
                ids = ids[8:]
            acct.recent_ids = ids + h.to_bytes(8, "little")
        if self._changed is not None:
            self._changed.add(aid)
        if aid in self.allowlist or (event.get("org_id") and event["org_id"] in self.allowlist):
            return self._emit(acct, aid, ts, 0.0, "allow", [("allowlisted", 1.0, 1.0, 0)], None, emitted_at)

        prompt = event["prompt"]
        if not self._stream_start:
            self._stream_start = ts
        first_seen = self.model_first_seen.setdefault(event["model"], ts)
        # A model counts as newly released only if the stream ran for a while without it: at start-up,
        # every model is "first seen", and none of them is new.
        model_age = ts - first_seen if first_seen - self._stream_start >= MODEL_WARM_UP_MS else 1 << 62
        bands, exact = [int(b, 16) for b in prompt["bands"]], int(prompt["exact"], 16)
        template_accounts, exact_accounts, self_repeat, top_band, self_exact = self.content.observe(
            acct, bands, exact, ts)
        # An account already caught does not echo itself (its own prompts are in caught_content).
        echo = acct.action not in CAUGHT and self.caught_content.hits(bands, ts) >= ECHO_BANDS
        ctx = feat.EventContext(template_accounts, exact_accounts, model_age, self_repeat, self_exact, echo)
        st = acct.state
        previous_ts = st.last_ts
        arrival = st.events == 0 or ts - previous_ts >= feat.DAY_MS
        feat.update(st, event, ctx)

        keys = link_keys(event)
        templated = template_accounts >= feat.SHARED_TEMPLATE_ACCOUNTS > exact_accounts
        if templated and self_repeat:
            keys.append(("tmpl", top_band))  # the account keeps using a template other accounts use
        held = len(self.linker.keys_of(aid))
        root = self.linker.link(aid, keys)
        self._apply_merges()
        cluster = self.clusters.get(root)
        if cluster is None:
            # Windows are kept for clusters of two or more accounts only (most accounts are alone, and a
            # cluster's evidence is weighted by its size: nothing for one account); alone, a throwaway.
            cluster = ClusterState()
            if self.linker.size(root) > 1:
                self.clusters[root] = cluster
        age_days = (ts - st.created_ts) / feat.DAY_MS if st.created_ts is not None else math.inf
        cot, max_len = prompt["cot"], event["response"].get("stop_reason") == "max_tokens"
        new_account, new_model = age_days < NEW_ACCOUNT_DAYS, model_age < feat.NEW_MODEL_MS
        if new_account and not held:
            self._note_opened(aid, ts)
        rerooted, acct.root = root != acct.root, root
        settings = self.settings
        # Scoring on change: a quiet account was scored moments ago, and it joined no cluster and no blocked one
        # since. Its windows take the event; the next event after rescore_ms scores them.
        # And a settled account: blocked in a blocked cluster, last scored at SETTLED_SCORE or more (within
        # SETTLED_RESCORE_MS, and since the fusion model last learned), its published score within
        # min_score_change of 1. A cluster stays blocked, and linked_to_blocked alone holds the score over 0.99
        # with the prior weights (every term adds): no record can be due. A quarter of the bench traffic's events
        # are such (campaign accounts calling on after their block). Its prompts still feed caught_content and its
        # new keys are still blocked (below).
        settled = (acct.action == "block" and cluster.blocked and acct.score >= SETTLED_SCORE
                   and acct.emitted_score > 1.0 - settings.min_score_change
                   and not rerooted and acct.scored_ts > self._learned_ts and ts - acct.scored_ts < SETTLED_RESCORE_MS)
        quiet = settled or (acct.score < settings.quiet_score and acct.action == "allow" and not cluster.blocked
                            and ts - acct.scored_ts < settings.rescore_ms and not rerooted)
        if quiet:  # the two features the cluster's windows take, read alone
            machine = feat.day_count(st, ts) >= MACHINE_MIN_EVENTS and feat.hour_spread(st) >= MACHINE_SPREAD
        else:  # from the whole vector (9 µs), which scoring reads below: nothing changes the account's windows between
            f = feat.features(st, ts)
            machine = f["n_24h"] >= MACHINE_MIN_EVENTS and f["hour_spread"] >= MACHINE_SPREAD
        cluster.add(ts, arrival=arrival, templated=templated, cot=cot, max_len=max_len, new_account=new_account,
                    machine=machine, new_model=new_model, org=event.get("org_id"))
        if self._signals is not None:
            flags = (ARRIVAL * arrival | TEMPLATED * templated | COT * cot | MAX_LEN * max_len
                     | NEW_ACCOUNT * new_account | MACHINE * machine | NEW_MODEL * new_model)
            # The link keys go along when they changed, on the account's first event here, and once per
            # KEYS_EVERY_MS of event time (so a worker started later learns them); the other events of a busy
            # account leave them out (a third of a signal's bytes and of its decoding).
            send_keys = (not held or len(self.linker.keys_of(aid)) != held
                         or ts // KEYS_EVERY_MS != previous_ts // KEYS_EVERY_MS)
            # Tuples all the way down: the garbage collector stops tracking them, so a batch of signals waiting to
            # be published adds nothing to its passes (lists cost 6 µs an event in collections, measured).
            self._signals.append(("e", aid, ts, tuple(keys) if send_keys else (),
                                  tuple(self.content.added_keys(bands, exact)), flags, event.get("org_id")))
        if quiet:
            if settled:
                self.caught_content.add(bands, ts)
                self._publish_keys(root, ts, emitted_at, (aid,))
            return None
        acct.scored_ts = ts
        self.stats["scored"] += 1

        x = squash(f)
        rank = self.model.score_one(x)
        evidence, values, size = self._evidence(f, rank, cluster, root, ts, aid)
        score = 1.0 if acct.confirmed else self.fusion.score(evidence)
        action = decide(score, acct.action, self.settings)
        if action in CAUGHT:
            self.caught_content.add(bands, ts)
        if self.sampler.should_learn(acct.learned_ts, ts, flagged=action != "allow"):
            self.model.learn_one(x)
            acct.learned_ts = ts
        blocks = False
        if action in CAUGHT and root in self.clusters and (action == "block" or not self._echoed(evidence)):
            counted = (acct.throttled_counted, acct.blocked_counted)
            blocks = self._count_caught(acct, action, cluster, size)
            if self._signals is not None and counted != (acct.throttled_counted, acct.blocked_counted):
                self._signals.append(("c", aid, ts, THROTTLED * (acct.throttled_counted and not counted[0])
                                      | BLOCKED * (acct.blocked_counted and not counted[1]) | CLUSTER_BLOCKED * blocks))
        if blocks:
            cluster.blocked = True
            self._blocked_roots.add(root)
            self._publish_keys(root, ts, emitted_at)
        elif cluster.blocked:
            self._publish_keys(root, ts, emitted_at, (aid,))  # a member's keys new since the cluster was blocked
        if not self._decided(acct, score, action):
            return None
        reasons = [(code, share, values.get(code, 0.0), int(size)) for code, share in self.fusion.reasons(evidence)]
        cluster_id = self.linker.cluster_id(aid) if self.linker.size(root) > 1 else None
        return self._record(acct, aid, ts, score, action, reasons, cluster_id, emitted_at)

    def _echoed(self, evidence: dict[str, float]) -> bool:
        """Whether ``echoes_caught`` is half or more of the push behind a score. A member throttled on that does not
        count toward its cluster's block (:meth:`_count_caught`): the echo is about its own prompts, which re-send
        what caught accounts sent, not about the accounts it is linked to; and public prompts that a campaign
        re-sends for weeks are a researcher's too. Over 44 days of fast_rotation, two researchers of a lab on one
        card throttled on echoes blocked five labmates with them (docs/DETECTION-LOG.md, *Over 44 days*)."""
        return dict(self.fusion.reasons(evidence)).get("echoes_caught", 0.0) >= ECHO_SPREADS_BELOW

    @staticmethod
    def _count_caught(acct: _Account, action: str, cluster: ClusterState, size: float) -> bool:
        """Count a member newly throttled or blocked in its cluster's tallies; whether the cluster is now to
        be blocked: a member blocked in a cluster of three or more, two blocked in a pair, or two members
        throttled (or worse) in a cluster of three or more, and a tenth of it (:func:`_blocks`). Each of two
        linked accounts over the throttle line on its next events is at least the evidence of one over the
        block line; waiting for one of them to reach it on its own serves the whole cluster meanwhile (a
        campaign's accounts can hover between the two for hours). Each member counts once (an account that
        falls back below the line stays counted, as a blocked one does).

        >>> acct, other, cluster = _Account(None), _Account(None), ClusterState()
        >>> Detector._count_caught(acct, "throttle", cluster, 3), Detector._count_caught(acct, "throttle", cluster, 3)
        (False, False)
        >>> Detector._count_caught(other, "throttle", cluster, 3), cluster.throttled_members
        (True, 2)
        """
        counted = False
        if not acct.throttled_counted:
            acct.throttled_counted = counted = True
            cluster.throttled_members += 1
        if action == "block" and not acct.blocked_counted:
            acct.blocked_counted = counted = True
            cluster.blocked_members += 1
        return counted and not cluster.blocked and _blocks(cluster, size)

    # ----------------------------------------------------------------------------------------------
    def drain_signals(self) -> list[Signal]:
        """What the events of this detector's accounts did to the cross-account state since the last call,
        for the other workers' :meth:`apply_signals` (:mod:`detector.signals`). Needs ``share_clusters=True``
        (else: empty)."""
        if not self._signals:
            return []
        out, self._signals = self._signals, []
        return out

    def apply_signals(self, signals: Iterable[Signal]) -> None:
        """Fold in what another worker's accounts did (:mod:`detector.signals`): link them, count their
        templates, add their traffic to their clusters' windows and their caught members to the tallies, so
        this detector's accounts are scored against whole clusters. Signals of an account this detector holds
        are ignored (its own events count; a signal from its previous owner, before a rebalance, is stale).
        Creates no record: a member of a cluster blocked this way is blocked on its own next event.

        >>> from detector.signals import ARRIVAL
        >>> a, b = Detector(share_clusters=True), Detector(share_clusters=True)
        >>> b.apply_signals([("e", f"x{i}", 1775000000000, [("pay", "pm_9")], [], ARRIVAL, None) for i in range(3)])
        >>> b.linker.size(b.linker.root("x0")), len(b.clusters)
        (3, 1)
        >>> b.apply_signals([("c", "x0", 1775000000001, BLOCKED | CLUSTER_BLOCKED)])
        >>> b.clusters[b.linker.root("x1")].blocked
        True
        """
        # Sketch keys are counted together at the end (ContentIndex.add_many), or before a signal that starts a new
        # window: nothing reads the sketch in between.
        content, sketch_keys = self.content, list[int]()
        for s in signals:
            aid, ts = s[1], s[2]
            if aid in self.accounts:
                continue
            if s[0] == "e":
                if sketch_keys and content.rotates_at(ts):
                    content.add_many(sketch_keys)
                    sketch_keys = []
                content.advance(ts)
                sketch_keys += s[4]
                if aid in self._foreign_caught_ids:
                    self.caught_content.add(s[4], ts)  # its prompts' new bands (and its exact key: harmless)
                self._fold_foreign(aid, ts, s[3], s[5], s[6])
            elif s[0] == "l":
                # Another worker's analyst verdict: learn from the evidence its account showed (known terms only).
                self._learn({k: float(v) for k, v in s[4].items() if k in PRIOR_WEIGHTS}, bool(s[3]))
            elif self.linker.knows(aid):
                counted = self._foreign_caught(aid, s[3])
                if s[3] & (THROTTLED | BLOCKED):
                    levels = self._foreign_caught_ids.get(aid, 0)
                    self._foreign_caught_ids[aid] = levels | (s[3] & (THROTTLED | BLOCKED) if counted else 0)
        if sketch_keys:
            content.add_many(sketch_keys)

    def _fold_foreign(self, aid: str, ts: int, keys: list[tuple[str, object]], flags: int, org: str | None) -> None:
        foreign = self._foreign
        if aid in foreign:
            foreign.move_to_end(aid)
        foreign[aid] = ts
        self._last_ts = max(self._last_ts, ts)
        self._evict_foreign(ts)
        first = flags & NEW_ACCOUNT and not self.linker.keys_of(aid)
        root = self.linker.link(aid, keys)
        if first:
            self._note_opened(aid, ts)
        self._apply_merges()
        cluster = self.clusters.get(root)
        if cluster is None:
            if self.linker.size(root) < 2:
                return  # alone: no windows (as in process)
            cluster = self.clusters[root] = ClusterState()
        cluster.add(ts, arrival=bool(flags & ARRIVAL), templated=bool(flags & TEMPLATED), cot=bool(flags & COT),
                    max_len=bool(flags & MAX_LEN), new_account=bool(flags & NEW_ACCOUNT),
                    machine=bool(flags & MACHINE), new_model=bool(flags & NEW_MODEL), org=org)

    def _note_opened(self, aid: str, ts: int) -> None:
        """A newly created account first seen here (its own event or another worker's signal): count it on its card
        if it pays with one of its own, outside any organisation (:class:`OpenedOnCard`)."""
        card = self.linker.personal_card(aid)
        if card is not None:
            self.opened_on_card.note(card, aid, ts)

    def _foreign_caught(self, aid: str, level: int) -> bool:
        """Count another worker's account caught in its cluster's tallies; False if it is in no cluster here."""
        root = self.linker.root(aid)
        cluster = self.clusters.get(root)
        if cluster is None:
            return False
        cluster.throttled_members += bool(level & THROTTLED)
        cluster.blocked_members += bool(level & BLOCKED)
        if not cluster.blocked and (level & CLUSTER_BLOCKED or _blocks(cluster, self.linker.size(root))):
            cluster.blocked = True
            self._blocked_roots.add(root)
        return True

    @staticmethod
    def _adopt_counts(acct: _Account, levels: int) -> None:
        """An account that was another worker's comes here (a rebalance, a restore, or a warm start): it stays
        counted in its cluster's tallies at the levels its old owner's signals counted, not counted twice."""
        if levels & THROTTLED:
            acct.throttled_counted = True
        if levels & BLOCKED:
            acct.blocked_counted = True

    def _evict_foreign(self, now: int) -> None:
        """Forget other workers' accounts idle for ``idle_evict_s`` and the least recently seen beyond
        ``max_accounts``, as :meth:`_evict` does own accounts (memory stays bounded by the live accounts)."""
        foreign = self._foreign
        horizon = now - self.settings.idle_evict_s * 1000
        gone: list[str] = []
        while foreign:
            aid, last = next(iter(foreign.items()))
            if len(foreign) < self.settings.max_accounts and last >= horizon:
                break
            del foreign[aid]
            self._foreign_caught_ids.pop(aid, None)
            if aid not in self.accounts:
                gone.append(aid)
        if gone:
            emptied = self.linker.forget(gone)
            self._apply_merges()
            for root in emptied:
                self.clusters.pop(root, None)
                self._blocked_roots.discard(root)

    # ----------------------------------------------------------------------------------------------
    def _evidence(self, f: dict[str, float], rank: float, cluster: ClusterState, root: str,
                  ts: int, account: str) -> tuple[dict[str, float], dict[str, float], float]:
        """Evidence terms in [0, 1], the raw values behind them (for reason texts) and cluster size."""
        n = f["n_24h"]
        on = self.linker.personal_card(account)  # its card, if a personal account's (else None)
        card = self.linker.degree(("pay", on)) if on is not None else 0  # the accounts on it now (card_sharers)
        shrink = n / (n + 2.0)  # one event is weak evidence of a share
        age = f["account_age_days"]
        c = cluster.features(ts, self.linker.size(root))
        size = c["size"]
        sf = _clip(math.log(size / 2.0) / math.log(25.0)) if size >= 3 else 0.0  # 3 -> 0.13, 10 -> 0.5, 50 -> 1
        template_share = f["template_share"] * shrink
        near = toward = 0.0
        filled = False  # a new personal account whose IP range and client caught accounts fill (below)
        if not cluster.blocked and template_share > 0.2:
            # Below the linking threshold, but filling the templates of (or sharing keys with) a blocked
            # cluster: a reseller proxy mixing a campaign's traffic with its customers'.
            blocked = self._blocked_roots
            toward = self.linker.link_weight_to(account, lambda r: r in blocked, NEAR_KINDS)
            # A new personal account on an IP range that caught accounts fill: its range counts in full, however
            # many accounts hold it. A campaign opening accounts day after day on its hosting ranges makes them
            # common (hundreds of holders over a few days: no weight), and each new card is on no blocked cluster.
            # (Read also where other keys already tie it half-way: what its client adds below is not a weight.)
            if on is not None and age < NEW_ACCOUNT_DAYS and self._filled(account, "ip24"):
                toward = max(toward, KEY_KINDS["ip24"][0])
                # ... and its client too (user agent or TLS fingerprint): the campaign's own set-up, not a VPN exit
                # or a host's other customers on its range, who bring clients of their own.
                filled = self._filled(account, "ua") or self._filled(account, "tls")
            # Through templates: two or more recurring bands of the blocked cluster's, on prompts of its own.
            # One shared band can be boilerplate ("Let's think step by step.") that a benchmark run sends too.
            shared = self.linker.keys_into(account, lambda r: r in blocked and self._templated(r, ts), "tmpl",
                                           min_degree=NEAR_BAND_HOLDERS)
            if shared >= 2:
                toward += KEY_KINDS["tmpl"][0] * (1.0 - f["exact_shared_share"])
            # How much of it: a share of its traffic (from 20%, full at 60%), or a volume (from NEAR_VOLUME_FROM
            # such prompts a day, full at NEAR_VOLUME_FROM + NEAR_VOLUME_SPAN), whichever is more. A reseller
            # mixing a blocked campaign's traffic with its customers' has the volume when not the share.
            # On a range and a client that caught accounts fill, the share counts from nothing (full at 40%): the
            # account is the campaign's set-up on a fresh card, and what is not templated is what it mixes in.
            # (The gate above still asks for over 20%, so there it reads a half or more.)
            amount = max(_clip((template_share - (0.0 if filled else 0.2)) * 2.5),
                         _clip((n * template_share - NEAR_VOLUME_FROM) / NEAR_VOLUME_SPAN))
            near = _clip(toward / 0.5) * amount
        # One paying organisation (a publisher's content pipeline, an enterprise's batch jobs): its accounts
        # sharing templates, a schedule and a steady harvest of long answers is its own pipeline. Those terms
        # count ONE_ORG_DISCOUNT; what still counts in full is what a company's pipeline does not show:
        # freshly created accounts, a jump to a new model, replays, chain-of-thought asks, a link to a
        # blocked cluster, the anomaly rank. A campaign that puts its accounts in one org of its own is seen
        # by those, or once its clusters link across orgs (the presumption then ends).
        # The presumption ends where the org's content or keys lead to a blocked cluster (near_blocked), or
        # where two or more of its recurring templates are one other org's accounts' too: the same private
        # prompts run by two organisations are coordination beyond one company. (One shared band, a personal
        # account filling the same template, two bands each shared with a different org, or bands sent mostly
        # by people on their own (popular questions a company's staff ask too) do not end it: the public
        # datasets a pipeline processes, the textbook exercises an app's users send, are other orgs' and
        # campaigns' raw material too. Linker.shared_beyond.)
        # Not for an org's lone account: a proxy on one account of an org of its own, forwarding a caught
        # campaign's prompts, would lose its echoes (test_a_proxy_rewording_...). A small app on one account
        # pays for that (README, *one paying organisation*).
        asns = f["distinct_asns"]
        st = self.accounts[account].state
        harvest = (_clip((f["out_tokens"] - 1000.0) / 1500.0) * _clip((feat.hourly_count(st, ts) - 8.0) / 16.0)
                   * (1.0 - f["exact_shared_share"]))
        org_cluster = (size >= 2 and c["orgs"] == 1.0 and c["org_share"] >= ONE_ORG_SHARE and not near
                       and asns < ROTATING_ASNS)
        # How many of its recurring templates (up to two) are another organisation's too (read once: a scan of
        # the holders of its template keys, up to 64 each), only where it matters: the presumption, or a harvest.
        # Outside the presumption only "one or more" is read (harvest_cross_org), so the scan stops at the first
        # (upto=1: under half the cost of upto=2 over the bench replay, the same records).
        shared_with_orgs = self.linker.shared_beyond(
            account, "tmpl", holder_kind="org", upto=2 if org_cluster else 1, min_degree=ORG_SHARED_BAND_HOLDERS
        ) if org_cluster or harvest > 0.0 else 0
        cross_org = shared_with_orgs >= 2
        one_org = org_cluster and not cross_org
        own = ONE_ORG_DISCOUNT if one_org else 1.0
        csf = sf * own
        # Harvest: long answers (1,000 -> 2,500 output tokens on average) at a high rate (hour-horizon count
        # 8 -> 24, i.e. about 6 -> 17 calls an hour at a steady pace), kept up for two whole hours (a
        # researcher's session is a burst) and on prompts of its own (a benchmark run sends prompts other
        # accounts send too). Batch classification has short answers; chat, agents and labs do not keep up
        # that pace. A content-generation pipeline would: alone it is weak evidence, from an account linked
        # to others it is strong.
        # The rate is read over the time the account has been observed (hourly_count: the hour-horizon count
        # alone lags a pace that began less than a few hours ago, as every one did at a cold start), and
        # "kept up" to the minute (kept_up_hours), not in whole clock hours.
        # The same harvest on another organisation's private templates (harvest_cross_org, below) is trusted sooner:
        # from 2/3 before a whole hour at pace instead of 1/3, once the account has made CROSS_ORG_PACE_EVENTS calls
        # in the day. The coordination is in the content already; what the hour guards against there is a burst, a
        # few long answers within minutes reading as a fast pace (on default, a researcher's account with four calls
        # in its day reached 0.66 without the count). EVALUATION.md: the resellers are first caught after 0.56 h
        # instead of 0.84 h on default, 1.15 h instead of 1.85 h on paraphrase; no ordinary account newly caught.
        cross_harvest = harvest
        if harvest > 0.0:  # kept_up_hours reads up to 23 slots: only for the few accounts it can matter to
            kept = feat.kept_up_hours(st, ts)
            harvest *= _clip((kept + 1.0) / 3.0)
            cross_harvest *= _clip((kept + (2.0 if n >= CROSS_ORG_PACE_EVENTS else 1.0)) / 3.0)
        # ... and whether half or more of its recurring templates are filled outside its cluster, and one of them by
        # a suspect (two more scans, only for a harvest on a template another org fills): see harvest_cross_org below.
        mostly_shared = False
        if harvest > 0.0 and shared_with_orgs >= 1:
            outside, recurring = self.linker.held_outside(account, "tmpl", min_degree=ORG_SHARED_BAND_HOLDERS)
            mostly_shared = 2 * outside >= recurring and self.linker.held_by(
                account, "tmpl", self._suspect, min_degree=ORG_SHARED_BAND_HOLDERS)
        jump = f["new_model_share_1h"] * f["n_1h"] / (f["n_1h"] + 2.0)  # last-hour share on a new model
        shared_card = _clip((card - SHARED_CARD_FROM) / SHARED_CARD_SPAN)
        # The accounts a card brought in one after another, within two weeks, count as well as those it pays for at
        # once: a campaign rotating its accounts daily holds two or three on a card at a time (OpenedOnCard).
        opened = max(card, self.opened_on_card.count(on, ts)) if on is not None and age < NEW_ACCOUNT_DAYS else card
        # Its card or IP range shared with another organisation's accounts, read only in a cluster that spans two
        # or more organisations (a scan of up to 64 holders of each).
        across_orgs = self.linker.across_orgs(account) if c["orgs"] >= 2.0 else 0.0
        echo = feat.echo_share(st) * shrink
        # A new personal account on a card that an account caught for itself holds (not on echoes alone: _counted).
        caught_card = (on is not None and age < NEW_ACCOUNT_DAYS
                       and self.linker.filled_by(account, "pay", self._counted, 1, 0.0))
        values = {
            "shared_template": f["template_share"],
            "cot_requests": f["cot_share"],
            "max_length_outputs": f["max_len_share"],
            "capability_focus": f["capability_concentration"],
            "machine_schedule": f["hour_spread"],
            "new_model_jump": f["new_model_share_1h"],
            "new_model_replay": f["new_model_replay_share"],
            "young_account": age,
            "anomaly": rank,
            "cluster_templates": c["template_share"],
            "cluster_new_accounts": c["new_account_share"],
            "cluster_cot": c["cot_share"],
            "cluster_new_model": c["new_model_share_1h"],
            "harvest": f["out_tokens"],
            "cluster_harvest": f["out_tokens"],
            "harvest_new_model": f["new_model_share_1h"],
            "harvest_cross_org": f["out_tokens"],
            "across_orgs": c["orgs"],
            "shared_payment": float(card),
            "fresh_card": float(opened),
            "card_cycling": float(opened - card),
            "caught_card": float(caught_card),
            "network_rotation": asns,
            "echoes_caught": echo,
        }
        evidence = {
            "shared_template": _clip((f["template_share"] * shrink - 0.1) / 0.6),
            "cot_requests": f["cot_share"] * shrink,
            "max_length_outputs": f["max_len_share"] * shrink,
            "capability_focus": f["capability_concentration"] * n / (n + 10.0),
            "machine_schedule": own * _clip((f["hour_spread"] - 0.8) / 0.15) * n / (n + MACHINE_MIN_EVENTS),
            "new_model_jump": jump,
            "new_model_replay": _clip(2.0 * f["new_model_replay_share"] * shrink),
            "young_account": 1.0 if age < 2 else 0.5 if age < NEW_ACCOUNT_DAYS else 0.0,
            "anomaly": _clip((rank - 0.95) / 0.05),
            "cluster_size": csf,
            # linked accounts each running around the clock, together a steady 24 h load
            "cluster_load_balanced": csf * c["machine_share"] * _clip((c["hour_spread"] - 0.85) / 0.1),
            "cluster_templates": csf * c["template_share"],
            "cluster_new_accounts": sf * c["new_account_share"],
            "cluster_cot": csf * c["cot_share"],
            "cluster_new_model": sf * c["new_model_share_1h"],
            "linked_to_blocked": 1.0 if cluster.blocked else 0.0,
            # An organisation's account on the card or the IP range of another organisation's, in a linked
            # cluster: one operator posing as several companies.
            "across_orgs": sf * across_orgs,
            "harvest": own * harvest,
            "cluster_harvest": csf * harvest,
            # The harvest follows a model released within the last day, at once (the documented campaigns moved
            # within 24 h). Not discounted for one org: a company's pipeline is not moved within hours of a
            # release, a harvester's is, as it wants the new model's answers first.
            "harvest_new_model": harvest * jump,
            # The harvest fills private templates that another organisation's accounts fill too: one operation
            # split over organisations to look like two companies' pipelines (a company's own pipeline runs
            # its own templates).
            # One such template is enough here, with the harvest beside it (two end the presumption above): a
            # campaign that paraphrases its prompts shares few bands (EVALUATION.md: the paraphrasing resellers
            # were first caught after 3.9 h with two, 1.9 h with one; no false positive, and the top ordinary
            # scores did not move).
            # And only if half or more of its recurring templates are filled outside its cluster: a company's
            # pipeline runs mostly templates of its own, and one band of its six that other orgs' accounts
            # send too is the public text its job processes (held-out seed 11: an edtech job's exercise that a
            # tutoring app, a lab and the CoT campaign also send). The campaigns' accounts that this term
            # catches had one to four recurring bands, three in four or more of them filled elsewhere.
            # And only if a suspect fills one of them too: an account already caught, or one of more than three
            # accounts of no organisation on one card, as a campaign's throwaway accounts are (Detector._suspect).
            # Companies running one vendor's tool with their own keys fill its frame at a harvest's pace, each from
            # its own org, card and network: nothing but the count of orgs tells them from an operation split over
            # organisations of its own, and that is caught once one of its accounts is (vendor_tool: 34 of 36
            # customers blocked without this, none with it; docs/DETECTION-LOG.md has what it cost the model hopper).
            "harvest_cross_org": cross_harvest * mostly_shared,
            # A family or a small team on one card: weak; a card paying for dozens of personal accounts: strong.
            "shared_payment": shared_card,
            # ... and those accounts freshly created: accounts opened in bulk on one card.
            "fresh_card": _clip((opened - SHARED_CARD_FROM) / SHARED_CARD_SPAN) * (age < NEW_ACCOUNT_DAYS)
                          * c["new_account_share"],
            # ... and those accounts already dropped: each used for days, then the next opened on the same
            # card. A team's accounts stay in use (and on the card's live count); a campaign rotating its accounts
            # daily, to stay under per-account limits and out of clusters, leaves a trail of them. Only a new
            # account counts, and only accounts evicted as idle (idle_evict_s) are "dropped" (or as the least
            # recently active beyond max_accounts, on a worker at its bound).
            "card_cycling": (age < NEW_ACCOUNT_DAYS) * _clip((opened - card - CYCLED_FROM) / CYCLED_SPAN),
            # ... and one of them already caught: the account opened to go on where a caught one was stopped (ban
            # evasion). A campaign rotating one account at a time on a card otherwise starts each new account
            # afresh, until two are caught and their cluster is blocked; over fast_rotation's 44 days, accounts
            # whose card's earlier account had been caught within three days were served 26,214 exchanges of
            # hydra's 42,380 (docs/DETECTION-LOG.md, *`caught_card`*). Not an organisation's card, and not
            # on a holder caught on echoes alone (a researcher re-sending public prompts): _counted.
            "caught_card": 1.0 if caught_card else 0.0,
            # Calls from many networks within a day or two: proxy rotation (a VPN user alone reaches a few).
            "network_rotation": _clip((asns - ROTATION_FROM) / ROTATION_SPAN) * n / (n + 10.0),
            # A good share of its prompts, and many a day, re-send (reworded or not) what caught accounts sent:
            # the same prompt set. A few such prompts are anyone's (popular questions); a busy account whose
            # traffic is largely that is a reseller forwarding a campaign, or the campaign on a fresh account.
            # Not from an organisation presumed one company: its pipeline may process the public dataset a
            # campaign drew on (an edtech job's math exercises are a reasoning harvest's too).
            "echoes_caught": (not one_org) * _clip((echo - ECHO_SHARE_FROM) / ECHO_SHARE_SPAN)
                             * _clip((n * echo - ECHO_VOLUME_FROM) / ECHO_VOLUME_SPAN),
        }
        if near:
            evidence["near_blocked"] = near
            values["near_blocked"] = toward
        return evidence, values, c["size"]

    def _caught(self, aid: str) -> bool:
        """Whether ``aid`` is throttled or blocked, here or on another worker (its signals folded in)."""
        acct = self.accounts.get(aid)
        return (acct is not None and acct.action in CAUGHT) or aid in self._foreign_caught_ids

    def _counted(self, aid: str) -> bool:
        """Whether ``aid`` was throttled or blocked for itself, here or on another worker: counted toward its
        cluster's block, which a member caught on ``echoes_caught`` alone is not (:meth:`_echoed`). It stays
        counted if its score falls back (:meth:`_count_caught`)."""
        acct = self.accounts.get(aid)
        if acct is not None:
            return acct.throttled_counted or acct.blocked_counted
        return aid in self._foreign_caught_ids  # other workers signal only the members they counted

    def _caught_or_blocked(self, aid: str) -> bool:
        """Whether ``aid`` is caught (:meth:`_caught`) or in a blocked cluster."""
        return self._caught(aid) or self.linker.root(aid) in self._blocked_roots

    def _filled(self, account: str, kind: str) -> bool:
        """Whether caught accounts fill ``account``'s key of ``kind``: RANGE_FILLED_HOLDERS or more of its recent
        holders, and RANGE_FILLED_SHARE of them, caught or in blocked clusters (:meth:`Linker.filled_by`)."""
        return self.linker.filled_by(account, kind, self._caught_or_blocked, RANGE_FILLED_HOLDERS, RANGE_FILLED_SHARE)

    def _suspect(self, aid: str) -> bool:
        """Whether ``aid`` is caught (:meth:`_caught`), or one of more than SHARED_CARD_FROM accounts of no
        organisation on one card (``shared_payment``): a campaign's throwaway accounts. A small team on personal
        accounts and one card is not."""
        return self._caught(aid) or self.linker.card_sharers(aid) > SHARED_CARD_FROM

    def _templated(self, root: str, ts: int) -> bool:
        """Whether the cluster of ``root`` fills shared templates in :data:`NEAR_TEMPLATE_SHARE` or more of
        its traffic (day window). Cost: one read of the cluster's windows, about 5 µs."""
        cluster = self.clusters.get(root)
        return cluster is not None and cluster.features(ts, 1)["template_share"] >= NEAR_TEMPLATE_SHARE

    def _emit(self, acct: _Account, aid: str, ts: int, score: float, action: str,
              reasons: list[tuple[str, float, float, int]], cluster_id: str | None,
              emitted_at: int | None) -> dict[str, Any] | None:
        if not self._decided(acct, score, action):
            return None
        return self._record(acct, aid, ts, score, action, reasons, cluster_id, emitted_at)

    def _decided(self, acct: _Account, score: float, action: str) -> bool:
        """Take the account's new score and action; whether a record is due (see the module docstring)."""
        changed = action != acct.action
        moved = action != "allow" and abs(score - acct.emitted_score) >= self.settings.min_score_change
        acct.action, acct.score = action, score
        return changed or moved

    def _record(self, acct: _Account, aid: str, ts: int, score: float, action: str,
                reasons: list[tuple[str, float, float, int]], cluster_id: str | None,
                emitted_at: int | None) -> dict[str, Any]:
        acct.emitted_score = score
        self.stats["records"] += 1
        return {
            "schema_version": 1,
            "account_id": aid,
            "cluster_id": cluster_id,
            "score": round(score, 4),
            "action": action,
            "reasons": [
                {"code": code, "detail": detail(code, value, n), "weight": round(min(share, 1.0), 4)}
                for code, share, value, n in reasons[:MAX_REASONS]
            ],
            "event_ts": ts,
            "emitted_at": emitted_at if emitted_at is not None else int(time.time() * 1000),
            "model_version": f"{MODEL_VERSION}+{self.anomaly_model}",
        }

    def _apply_merges(self) -> None:
        for absorbed, into in self.linker.merges:
            old = self.clusters.pop(absorbed, None)
            if old is not None:
                merged = self.clusters.setdefault(into, ClusterState())
                merged.merge(old)
                if merged.blocked:
                    self._blocked_roots.add(into)
                    self._publish_keys(into, self._last_ts, self._emitted_at)  # under the merged cluster's id
            self._blocked_roots.discard(absorbed)
        self.linker.merges.clear()

    def _publish_keys(self, root: str, ts: int, emitted_at: int | None, accounts: Iterable[str] | None = None) -> None:
        """Queue ``key_block.v1`` records (:mod:`detector.keyblocks`) for the keys leading into the blocked
        cluster of ``root`` (of ``accounts`` only, if given): each key new, or whose weight or cluster id
        moved, or sent over half its time to live ago. Cost: O(keys looked at), a dict read per key."""
        ttl = self.settings.key_block_ttl_s * 1000
        if ttl <= 0 or not self._key_secret:
            return
        cluster_id = self.linker.cluster_id(root)
        sent = self._key_sent
        for key, weight in self.linker.cluster_keys(root, KEY_BLOCK_KINDS, accounts):
            if weight <= 0.0:
                continue
            prev = sent.get(key)
            if (prev is not None and prev[2] == cluster_id and abs(prev[0] - weight) < REPUBLISH_WEIGHT_CHANGE
                    and ts - prev[1] < ttl // 2):
                continue
            sent[key] = (weight, ts, cluster_id)
            if len(self._key_blocks) >= MAX_PENDING_KEY_BLOCKS:
                self.stats["key_blocks_dropped"] += 1
                continue
            self._key_blocks.append(key_block_record(
                key, self._key_secret, weight=weight, cluster_id=cluster_id, event_ts=ts, ttl_ms=ttl,
                emitted_at=emitted_at if emitted_at is not None else int(time.time() * 1000),
                model_version=f"{MODEL_VERSION}+{self.anomaly_model}"))
            self.stats["key_blocks"] += 1
        if len(sent) >= self._key_sweep_at:  # forget keys whose block has expired; amortised O(1)
            self._key_sent = sent = {k: v for k, v in sent.items() if ts - v[1] < ttl}
            self._key_sweep_at = max(4096, 2 * len(sent))

    def drain_key_blocks(self) -> list[dict[str, Any]]:
        """The ``key_block.v1`` records queued since the last call, for the compacted ``blocked-keys`` topic
        (key = ``key_id``), in the order they were made. Queued when a cluster is blocked (its members' keys,
        see :mod:`detector.keyblocks`) and as its members show new keys; at most
        :data:`MAX_PENDING_KEY_BLOCKS` wait (more are counted in ``stats["key_blocks_dropped"]``).

        >>> det = Detector()
        >>> for a in ("a1", "a2", "a3"):
        ...     _ = det.apply_label({"account_id": a, "label": "benign", "ts": 1})
        >>> det.drain_key_blocks()
        []
        """
        out, self._key_blocks = self._key_blocks, []
        return out

    def _evict(self, now: int) -> None:
        """Drop accounts idle for ``idle_evict_s`` and the least recently active beyond ``max_accounts``,
        with their links (:meth:`Linker.forget`) and the windows of clusters left without members, so a
        flood of new account ids cannot grow memory without bound."""
        accounts = self.accounts
        horizon = now - self.settings.idle_evict_s * 1000
        evicted: list[str] = []
        while accounts:
            aid = self._oldest()
            oldest = accounts[aid]
            if len(accounts) >= self.settings.max_accounts or oldest.state.last_ts < horizon:
                del accounts[aid]
                del self._evict_ahead[aid]
                evicted.append(aid)
                self.stats["evicted"] += 1
                if self._changed is not None:
                    self._changed.discard(aid)
                    self._evicted.append((aid, oldest.shard))
            else:
                break
        if evicted:
            emptied = self.linker.forget(evicted)
            self._apply_merges()  # clusters whose root was forgotten move first, then the emptied ones go
            for root in emptied:
                self.clusters.pop(root, None)
                self._blocked_roots.discard(root)

    def _oldest(self) -> str:
        """The least recently active account (the next to evict); there must be one.

        A dict finds its first entry by skipping the holes that entries popped before it left, and keeps
        them until it next grows: as many as it has entries, or more. Each eviction would skip all those
        evicted before it (44 us an account in a flood of new ids at 100k accounts, measured). So the
        next :data:`EVICT_AHEAD` accounts are read ahead into ``_evict_ahead``, which an account leaves
        when it is evicted, dropped or active again. Amortised O(1), and the same order as before.
        """
        ahead = self._evict_ahead
        if not ahead:
            ahead.update(dict.fromkeys(islice(self.accounts, EVICT_AHEAD)))
        return next(iter(ahead))

    # ----------------------------------------------------------------------------------------------
    def apply_label(self, label: dict[str, Any], emitted_at: int | None = None) -> dict[str, Any] | None:
        """Learn from an analyst verdict (``schemas/analyst_label.v1.json``) and act on it at once:
        ``attack`` blocks the account (and marks its cluster blocked) until a ``benign`` verdict, which
        allowlists it. The fusion model learns from the account's current evidence. Returns the record to
        publish, if any.

        >>> from detector.gateway import make_event
        >>> det = Detector()
        >>> _ = det.apply_label({"account_id": "a1", "label": "attack", "ts": 1})
        >>> ev = make_event(account_id="a1", ts=1775000000000, api_key_id="k", model="m", endpoint="/v1/x",
        ...                 status=200, input_tokens=1, output_tokens=1, latency_ms=5, prompt_text="hi",
        ...                 response={"stop_reason": "end_turn"}, fingerprint_key=b"k")
        >>> _ = det.process(ev); det.accounts["a1"].action
        'block'
        """
        aid = label["account_id"]
        attack = label["label"] == "attack"
        self.stats["labels"] += 1
        if not self.linker.knows(aid):
            # Linked with no keys (alone), so the linker holds it and evicting it hands back its root, as for
            # an account its events linked (the cluster state an attack label makes below goes with it).
            self.linker.link(aid, ())
        acct = self.accounts.get(aid)
        ts = label["ts"]
        if acct is not None and acct.state.events:
            cluster = self.clusters.get(self.linker.root(aid)) or ClusterState()
            f = feat.features(acct.state, max(acct.state.last_ts, 1))
            evidence, _, _ = self._evidence(f, self.model.score_one(squash(f)), cluster,
                                            self.linker.root(aid), acct.state.last_ts, aid)
            self._learn(evidence, attack)
            ts = acct.state.last_ts
            if self._signals is not None:
                self._signals.append(("l", aid, label["ts"], int(attack), evidence))
        else:
            acct = self.accounts[aid] = _Account(None)
        if self._changed is not None:
            self._changed.add(aid)
        acct.confirmed = attack
        if attack:
            self.allowlist.discard(aid)
            root = self.linker.root(aid)
            cluster = self.clusters.setdefault(root, ClusterState())
            if self.linker.size(root) > 1 and not cluster.blocked:
                cluster.blocked = True
                self._blocked_roots.add(root)
                self._publish_keys(root, ts, emitted_at)
                if self._signals is not None:
                    self._signals.append(("c", aid, ts, CLUSTER_BLOCKED))
            cluster_id = self.linker.cluster_id(aid) if self.linker.size(root) > 1 else None
            return self._emit(acct, aid, ts, 1.0, "block", [("analyst_label", 1.0, 1.0, 0)], cluster_id, emitted_at)
        self.allowlist.add(aid)
        return self._emit(acct, aid, ts, 0.0, "allow", [("analyst_label", 1.0, 0.0, 0)], None, emitted_at)

    def _learn(self, evidence: dict[str, float], attack: bool) -> None:
        """The fusion model learns a verdict; every account scored before it is scored again on its next event."""
        self.fusion.learn_one(evidence, attack)
        self._learned_ts = self._last_ts

    # ----------------------------------------------------------------------------------------------
    def drain_changes(self) -> list[tuple[str, int, bytes | None]]:
        """``(account, shard, snapshot)`` for every account changed since the last call, and
        ``(account, shard, None)`` for every account evicted since: what a changelog needs to rebuild
        this detector's accounts with :meth:`restore`. Needs ``track_changes=True`` (else: empty).

        >>> det = Detector(track_changes=True)
        >>> _ = det.apply_label({"account_id": "a1", "label": "benign", "ts": 1})
        >>> [(aid, shard, len(blob)) for aid, shard, blob in det.drain_changes()], det.drain_changes()
        ([('a1', -1, 652)], [])
        """
        if self._changed is None:
            return []
        out: list[tuple[str, int, bytes | None]] = [(aid, shard, None) for aid, shard in self._evicted]
        for aid in self._changed:
            acct = self.accounts[aid]
            out.append((aid, acct.shard, dump_account(acct, aid in self.allowlist)))
        self._changed.clear()
        self._evicted.clear()
        return out

    def restore(self, snapshots: Iterable[tuple[str, bytes]]) -> int:
        """Take accounts in from snapshots (:func:`dump_account`, e.g. read back from a changelog) and
        return how many; an account already tracked keeps its live state, and a damaged snapshot is
        skipped and counted in ``stats["restore_errors"]``. Restored accounts enter the eviction order by
        their last event time, so the idlest are evicted first.

        >>> a, b = Detector(track_changes=True), Detector()
        >>> _ = a.apply_label({"account_id": "a1", "label": "attack", "ts": 1})
        >>> b.restore([(aid, blob) for aid, _, blob in a.drain_changes()] + [("a2", b"junk")])
        1
        >>> b.accounts["a1"].action, b.stats["restore_errors"]
        ('block', 1)
        """
        loaded = []
        for aid, blob in snapshots:
            if aid in self.accounts:
                continue
            try:
                acct, allowlisted = load_account(blob)
            except ValueError:
                self.stats["restore_errors"] += 1
                continue
            loaded.append((acct.state.last_ts, aid, acct))
            if allowlisted:
                self.allowlist.add(aid)
        loaded.sort(key=lambda item: item[0], reverse=True)
        # Before the accounts tracked already, the idlest first (as moving each of ``loaded`` to the front did).
        restored: dict[str, _Account] = {}
        for _, aid, acct in reversed(loaded):
            restored.setdefault(aid, acct)
        if self._foreign_caught_ids:
            for aid, acct in restored.items():
                self._adopt_counts(acct, self._foreign_caught_ids.pop(aid, 0))
        tracked = list(self.accounts.items())
        self.accounts.clear()
        self.accounts.update(restored)
        self.accounts.update(tracked)
        self._evict_ahead.clear()
        self.stats["restored"] += len(loaded)
        return len(loaded)

    def drop_shards(self, shards: Iterable[int]) -> int:
        """Forget the accounts whose events come from ``shards`` (partitions now owned by another
        worker): they are moved, not evicted, so :meth:`drain_changes` reports nothing for them. Also
        clears the worker-wide memory of recent event ids (see :class:`RecentIds`). Returns how many
        accounts were dropped. Cost: one pass over the tracked accounts."""
        gone = set(shards)
        dropped = [aid for aid, acct in self.accounts.items() if acct.shard in gone]
        for aid in dropped:
            acct = self.accounts.pop(aid)
            self._evict_ahead.pop(aid, None)
            if self._changed is not None:
                self._changed.discard(aid)
            if self._signals is not None and self.linker.knows(aid):
                self._foreign[aid] = acct.state.last_ts  # its new owner's signals keep it linked here
        # The worker-wide id memory may hold ids whose effects left with the dropped accounts: were they
        # restored from an older snapshot, their redelivered events would be skipped and lost. From here
        # on, each account's own positions and ids (which travel with its snapshot) decide.
        self.recent_ids = RecentIds(self.recent_ids.capacity)
        return len(dropped)

    @property
    def actions(self) -> dict[str, str]:
        """Current action of every tracked account that is not allowed."""
        return {aid: a.action for aid, a in self.accounts.items() if a.action != "allow"}

    def action_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIONS, 0)
        for a in self.accounts.values():
            counts[a.action] += 1
        return counts
