"""Per-account features over event-time windows.

Windows are exponentially decaying sums (a standard streaming aggregate: O(1) per event, a few floats per
horizon, correct for out-of-order events). The day horizon (half-life 24 h) holds most features; the
10-minute and 1-hour horizons hold volume only. The day-horizon sums are stored *scaled* by
``2 ** ((t - t0) / H)``, so an update touches only the slots the event changes; ratios of two sums need
no rescaling, and absolute values are rescaled on read.

::

    event time  ───●──●───────●─────────────────●──▶
    weight         ¼  ¼       ½                 1     (half-life H: an event H old counts half)

>>> st = AccountState(created_ts=None)
>>> ev = {"ts": 3_600_000, "input_tokens": 100, "output_tokens": 400, "status": 200,
...       "response": {"stop_reason": "max_tokens"}, "model": "m", "client": {"ip": "10.0.0.1", "asn": 1,
...       "user_agent": "ua"}, "prompt": {"cot": True, "capability": "coding", "script": "latin"}}
>>> update(st, ev, shared=EventContext(template_accounts=1, exact_accounts=1, model_age_ms=10**9))
>>> f = features(st, 3_600_000)
>>> f["cot_share"], f["max_len_share"], f["out_in_ratio"], round(f["n_24h"], 3)
(1.0, 1.0, 4.0, 1.0)
"""

from __future__ import annotations

import math
import struct
import zlib
from array import array
from dataclasses import dataclass
from typing import Any, ClassVar

from detector.fingerprints import CAPABILITIES

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
H_DAY = DAY_MS  # half-life of the day horizon
H_10M = 10 * 60_000
H_1H = HOUR_MS
NEW_MODEL_MS = DAY_MS  # traffic on a model in its first day counts as a "jump to a new model"
SHARED_TEMPLATE_ACCOUNTS = 3  # a template used by this many accounts (self included) is "shared"
_RENORM = 24.0  # rescale the scaled sums after this many half-lives
MIN_RATE_SPAN_MS = 15 * 60_000  # hourly_count reads a shorter observed span as this long

# Slots of the day-horizon array.
N, IN_TOK, OUT_TOK, MAX_LEN, ERR, REFUSED, COT, TEMPLATED, EXACT_SHARED, NEW_MODEL, NON_LATIN, \
    GAPS, GAP_LOG, GAP_LOG2, SELF_REPEAT, NEW_MODEL_REPLAY, ECHO = range(17)
CAP0 = 17  # 8 capability slots
HOUR0 = CAP0 + len(CAPABILITIES)  # 24 hour-of-day slots
N_SLOTS = HOUR0 + 24
# The short-horizon counts follow the day-horizon slots in the same array (AccountState.day): three floats
# stored in it cost 24 bytes, as Python float objects 96 (three objects of 32 bytes, and their slots).
N_10M_AT, N_1H_AT, NEW_MODEL_1H_AT = N_SLOTS, N_SLOTS + 1, N_SLOTS + 2
_STATE_SLOTS = N_SLOTS + 3

# The window is stored in float32 (204 bytes instead of 408 per account; issue 5). Its values are decayed sums
# read as ratios of one another or as decayed counts, never as exact quantities: each update rounds a sum to
# 24 bits (a relative error of 6e-8), far below what moves a score by its published 4 decimals. Scaled
# sums stay below 2 ** 24 times the raw ones (_RENORM), far inside float32's range (3.4e38). What must be
# exact (timestamps, event counts, bitmaps, scores) is kept outside the window. Measured (run I in
# BENCHMARKS.md): records byte-identical to the float64 window on the demo (plain, with labels and a
# drain/restore, with eviction) and the same evaluation numbers on the default scenario. Snapshots carry
# the window as float64 (unchanged format): a float32 value converts exactly.
WINDOW_TYPECODE = "f"  # the array type of an account's window (AccountState)
# The timestamps, which must be exact, follow the window in the same array, as bytes (Packed) from byte
# PACKED_AT on: an int64 timestamp costs 8 bytes there, as an attribute 40 (its int object and a slot).
# AccountState's own packed fields end at PACKED_END, where a subclass may pack more (detector.detection._Account
# does). net_bits stays an attribute: packed, it would save 16 bytes (pymalloc rounds objects to 16) and cost
# 0.8 us an event (three reads or writes, measured).
WINDOW_SLOTS = _STATE_SLOTS  # the window's items in an account's array (st[:WINDOW_SLOTS]); packed bytes follow
_ITEMSIZE = array(WINDOW_TYPECODE).itemsize
PACKED_AT = _ITEMSIZE * WINDOW_SLOTS
PACKED_END = PACKED_AT + 24

FEATURE_NAMES = (
    "n_10m", "n_1h", "n_24h", "in_tokens", "out_tokens", "out_in_ratio", "max_len_share", "error_share",
    "refusal_share", "cot_share", "template_share", "exact_shared_share", "self_repeat_share",
    "new_model_share", "new_model_share_1h", "new_model_replay_share", "non_latin_share",
    "capability_concentration", "hour_spread", "gap_log_std",
    "distinct_ips", "distinct_asns", "distinct_uas", "account_age_days",
)


@dataclass(frozen=True, slots=True)
class EventContext:
    """What the rest of the stream says about one event: filled in by the detector before ``update``.

    ``template_accounts``: most accounts sharing one of the prompt's template bands (self included);
    ``exact_accounts``: accounts that sent this exact prompt; ``model_age_ms``: time since the model was
    first seen in the stream; ``self_repeat``: this account used one of the prompt's bands before;
    ``echo``: caught accounts sent prompts with the same bands lately (:class:`detector.content.CaughtContent`).
    """

    template_accounts: int
    exact_accounts: int
    model_age_ms: int
    self_repeat: bool = False
    self_exact: bool = False
    echo: bool = False


class _WindowSlot:
    """A float attribute kept in the account's window array at ``index`` rather than as an object of its own
    (an account then holds one array, not three more boxed floats).

    >>> st = AccountState(created_ts=None)
    >>> st.n_1h = 2.5
    >>> st.n_1h, st.day[N_1H_AT]
    (2.5, 2.5)
    """

    def __init__(self, index: int, doc: str) -> None:
        self.index = index
        self.__doc__ = doc

    def __get__(self, obj: AccountState, owner: type | None = None) -> float:
        return obj[self.index]

    def __set__(self, obj: AccountState, value: float) -> None:
        obj[self.index] = value


class Packed:
    """A number kept as bytes after the window in the account's array (``struct`` format ``fmt``,
    little-endian, from byte ``at``), rather than as an object of its own and a slot pointing to it. Cost:
    about 110 ns a read or a write (an attribute: 8 ns).

    >>> st = AccountState(created_ts=None)
    >>> st.last_ts = 1775000000123
    >>> st.last_ts, st.first_ts, st[N]
    (1775000000123, 0, 0.0)
    """

    def __init__(self, at: int, fmt: str) -> None:
        self.at = at
        packed = struct.Struct("<" + fmt)
        self.unpack_from, self.pack_into = packed.unpack_from, packed.pack_into

    def __get__(self, obj: AccountState, owner: type | None = None) -> Any:
        return self.unpack_from(obj, self.at)[0]

    def __set__(self, obj: AccountState, value: object) -> None:
        self.pack_into(obj, self.at, value)


class PackedInt:
    """A non-negative integer of up to ``8 * size`` bits kept as bytes after the window in the account's
    array (from byte ``at``), as :class:`Packed` keeps a number. Cost: about 300 ns a read or a write.

    >>> st = AccountState(created_ts=None)
    >>> PackedInt(PACKED_AT + 8, 24).__set__(st, 1 << 191 | 5)  # over last_ts and t0, as an example
    >>> PackedInt(PACKED_AT + 8, 24).__get__(st) == 1 << 191 | 5, st.last_ts
    (True, 5)
    """

    def __init__(self, at: int, size: int) -> None:
        if at % _ITEMSIZE or size % _ITEMSIZE:
            raise ValueError("a packed integer takes whole items of the window's array")
        self.start, self.stop, self.size = at // _ITEMSIZE, (at + size) // _ITEMSIZE, size

    def __get__(self, obj: AccountState, owner: type | None = None) -> int:
        return int.from_bytes(obj[self.start:self.stop].tobytes(), "little")

    def __set__(self, obj: AccountState, value: int) -> None:
        obj[self.start:self.stop] = array(WINDOW_TYPECODE, value.to_bytes(self.size, "little"))


class _NetBits:
    """One of the account's three network bitmaps (see ``_LOW``), kept as the 64-bit lane ``lane`` of the
    single integer ``net_bits`` rather than as an integer of its own (one object of 48 to 56 bytes instead of
    three of 32 and their slots).

    >>> st = AccountState(created_ts=None)
    >>> st.asn_bits = 0b101
    >>> st.ip_bits, st.asn_bits, st.ua_bits, st.net_bits == 0b101 << 64
    (0, 5, 0, True)
    """

    def __init__(self, lane: int) -> None:
        self.shift = 64 * lane

    def __get__(self, obj: AccountState, owner: type | None = None) -> int:
        return (obj.net_bits >> self.shift) & _LANE

    def __set__(self, obj: AccountState, value: int) -> None:
        obj.net_bits = obj.net_bits & ~(_LANE << self.shift) | (value & _LANE) << self.shift


class AccountState(array):  # type: ignore[type-arg]
    """Compact per-account window state: an array of the window sums that also holds a few ints.

    The state *is* its window: ``st[i]`` (or ``st.day[i]``) holds the day-horizon sums (``N_SLOTS``
    doubles) and after them the 10-minute and 1-hour counts, read and written here as the slots
    ``N_10M_AT``, ``N_1H_AT`` and ``NEW_MODEL_1H_AT``; elsewhere as the attributes ``n_10m``, ``n_1h`` and
    ``new_model_1h`` (:class:`_WindowSlot`). One object instead of an object and an array saves an array
    header (80 bytes with its garbage-collector header) and a pointer per account. After the window (from
    byte ``PACKED_AT``) the array holds the timestamps ``first_ts``, ``last_ts`` and ``t0`` as bytes
    (:class:`Packed`). Allocated at its exact size (``PACKED_END`` bytes, all zero: every packed field
    starts at 0).

    >>> st = AccountState(created_ts=3)
    >>> len(st) * st.itemsize == PACKED_END, st.day is st, st.created_ts, st[N], st.last_ts
    (True, True, 3, 0.0, 0)
    """

    __slots__ = ("created_ts", "events", "net_bits")
    _zero: ClassVar[array] = array(WINDOW_TYPECODE, bytes(PACKED_END))  # type: ignore[type-arg]

    def __new__(cls, created_ts: int | None, *args: object, **kwargs: object) -> AccountState:
        return super().__new__(cls, WINDOW_TYPECODE, cls._zero)  # an exact-size copy of the zero array

    def __init__(self, created_ts: int | None) -> None:
        self.created_ts = created_ts
        self.events = 0
        self.net_bits = 0  # the bitmaps ip_bits, asn_bits and ua_bits, one 64-bit lane each (_NetBits)

    first_ts = Packed(PACKED_AT, "q")
    last_ts = Packed(PACKED_AT + 8, "q")
    t0 = Packed(PACKED_AT + 16, "q")  # the window's reference time (its sums are scaled to it)

    @property
    def day(self) -> AccountState:
        """The window array: the state itself (kept as a name for readers of the window slots)."""
        return self

    ip_bits = _NetBits(0)
    asn_bits = _NetBits(1)
    ua_bits = _NetBits(2)
    n_10m = _WindowSlot(N_10M_AT, "The 10-minute-horizon event count, as of the newest event.")
    n_1h = _WindowSlot(N_1H_AT, "The 1-hour-horizon event count, as of the newest event.")
    new_model_1h = _WindowSlot(NEW_MODEL_1H_AT, "The 1-hour-horizon count of events on a newly released model, "
                               "as of the newest event.")

    def to_list(self) -> list[object]:
        """A JSON-friendly snapshot (for changelogs and tests).

        >>> AccountState(created_ts=7).to_list()[:4], len(AccountState(created_ts=7).to_list()[4]) == N_SLOTS
        ([7, 0, 0, 0], True)
        """
        return [self.created_ts, self.first_ts, self.last_ts, self.t0, list(self[:N_SLOTS]), self.n_10m,
                self.n_1h, self.new_model_1h, self.events, self.ip_bits, self.asn_bits, self.ua_bits]


# The distinct IPs, networks (ASNs) and user agents of an account are counted over its current and its
# previous UTC day of event time: each of ``ip_bits``, ``asn_bits``, ``ua_bits`` is one 64-bit integer
# holding two 32-bit linear-counting bitmaps, the current day's in the low half and the day before's in the
# high half. A user who travelled last month does not count as hopping networks today, and an account
# rotating through residential proxies does, within its first day. The three are kept as the lanes of one
# integer, ``AccountState.net_bits`` (ip in bits 0-63, asn in 64-127, ua in 128-191).
_LOW = (1 << 32) - 1
_LANE = (1 << 64) - 1  # one bitmap pair in AccountState.net_bits (ip, asn, ua: lanes 0, 1, 2)
_LOWS = _LOW | _LOW << 64 | _LOW << 128  # the current day's half of each lane


def _bit(value: object) -> int:
    # crc32, not hash(): str hashes are salted per process, and replay must equal the worker.
    return 1 << (zlib.crc32(str(value).encode()) & 31) if value is not None else 0


def _linear_count(bits: int) -> float:
    """Distinct values over the two days of a pair of bitmaps (see ``_LOW``), estimated by linear counting:
    exact for a handful of values, within about 10% up to a dozen.

    >>> [round(_linear_count(b), 2) for b in (0, 0b11, (0b101 << 32) | 0b11)]  # 0, 2 and 3 values
    [0.0, 2.07, 3.15]
    """
    bits = (bits >> 32) | (bits & _LOW)
    zeros = 32 - bits.bit_count()
    return 32 * math.log(32 / zeros) if zeros else 32 * math.log(32)


def update(st: AccountState, ev: dict, shared: EventContext) -> None:
    """Fold one valid event into the account's windows. Cost: about 3 µs."""
    t = ev["ts"]
    if st.events == 0:
        st.first_ts = st.last_ts = st.t0 = t
    last, t0 = st.last_ts, st.t0  # packed fields (Packed): read once
    # Short horizons: plain decay to the newest event time (older events are added pre-decayed).
    new_model = 1.0 if shared.model_age_ms < NEW_MODEL_MS else 0.0
    day = st
    if t >= last:
        dt = t - last
        f_1h = 2.0 ** (-dt / H_1H)
        day[N_10M_AT] = day[N_10M_AT] * 2.0 ** (-dt / H_10M) + 1.0
        day[N_1H_AT] = day[N_1H_AT] * f_1h + 1.0
        day[NEW_MODEL_1H_AT] = day[NEW_MODEL_1H_AT] * f_1h + new_model
    else:
        w_1h = 2.0 ** ((t - last) / H_1H)
        day[N_10M_AT] += 2.0 ** ((t - last) / H_10M)
        day[N_1H_AT] += w_1h
        day[NEW_MODEL_1H_AT] += w_1h * new_model
    x = (t - t0) / H_DAY
    if x > _RENORM:
        f = 2.0 ** -x
        for i in range(N_SLOTS):
            day[i] *= f
        st.t0, x = t, 0.0
    w = 2.0 ** x
    resp = ev["response"]
    prompt = ev["prompt"]
    day[N] += w
    day[IN_TOK] += w * ev["input_tokens"]
    day[OUT_TOK] += w * ev["output_tokens"]
    stop = resp.get("stop_reason")
    if stop == "max_tokens":
        day[MAX_LEN] += w
    if ev["status"] >= 400 or stop == "error":
        day[ERR] += w
    if resp.get("refused") or stop == "refusal":
        day[REFUSED] += w
    if prompt["cot"]:
        day[COT] += w
    if shared.template_accounts >= SHARED_TEMPLATE_ACCOUNTS and shared.exact_accounts < SHARED_TEMPLATE_ACCOUNTS:
        day[TEMPLATED] += w  # a template shared across accounts, filled with content nobody else sent
    if shared.exact_accounts >= SHARED_TEMPLATE_ACCOUNTS:
        day[EXACT_SHARED] += w  # e.g. a public benchmark sent by many accounts
    if shared.self_repeat:
        day[SELF_REPEAT] += w
    if shared.model_age_ms < NEW_MODEL_MS:
        day[NEW_MODEL] += w
        if shared.self_exact and shared.exact_accounts < SHARED_TEMPLATE_ACCOUNTS:
            day[NEW_MODEL_REPLAY] += w  # re-sends its own private prompts to a model released today
    if shared.echo:
        day[ECHO] += w
    if prompt["script"] != "latin":
        day[NON_LATIN] += w
    day[CAP0 + CAPABILITIES.index(prompt["capability"])] += w
    day[HOUR0 + (t // HOUR_MS) % 24] += w
    if t > last:
        g = math.log((t - last) / 1000.0 + 1.0)
        day[GAPS] += w
        day[GAP_LOG] += w * g
        day[GAP_LOG2] += w * g * g
    days = t // DAY_MS - last // DAY_MS if st.events else 0
    if days > 0:  # a new day: today's bitmaps become yesterday's (two days on: both empty), in every lane
        st.net_bits = (st.net_bits & _LOWS) << 32 if days == 1 else 0
    if t > last:
        st.last_ts = t
    st.events += 1
    client = ev["client"]
    st.net_bits |= _bit(client.get("ip")) | _bit(client.get("asn")) << 64 | _bit(client.get("user_agent")) << 128


def steady_hours(st: AccountState, now: int, floor: float = 0.25) -> int:
    """Whole hours in a row, just before the current one, in each of which the account ran at ``floor``
    or more of its current hourly rate: how long it has kept up its present pace without a break.

    Read from the day window's hour-of-day slots, each slot's weight undone for the time since that hour
    (so the slot ``k`` hours back counts as if all of it were ``k`` hours old; what it holds from earlier
    days makes it only larger). The current rate is the hour-horizon count (``n_1h * ln 2`` calls per
    hour at a steady pace). A burst after a quiet spell scores 0; a business-hours job at most its length
    (about 9); only traffic that keeps going through the evening and night gets past that. Assumes events
    up to ``now`` (the latest one) have been folded in. Cost: at most 23 slot reads, about 5 µs.

    >>> st = AccountState(created_ts=None)
    >>> ctx = EventContext(template_accounts=1, exact_accounts=1, model_age_ms=1 << 62)
    >>> ev = {"input_tokens": 100, "output_tokens": 400, "status": 200, "response": {"stop_reason": "end_turn"},
    ...       "model": "m", "client": {}, "prompt": {"cot": False, "capability": "qa", "script": "latin"}}
    >>> for i in range(14 * 20):  # 20 calls an hour for 14 hours
    ...     update(st, {**ev, "ts": i * 180_000}, ctx)
    >>> steady_hours(st, 14 * HOUR_MS - 180_000)
    13
    >>> burst = AccountState(created_ts=None)
    >>> for i in range(40):  # one call, then a 39-call session 12 hours later
    ...     update(burst, {**ev, "ts": i and 12 * HOUR_MS + i * 60_000}, ctx)
    >>> steady_hours(burst, 12 * HOUR_MS + 39 * 60_000)
    0
    """
    day = st
    if st.events == 0 or day[N_1H_AT] <= 0.0:
        return 0
    scale = 2.0 ** min(-(now - st.t0) / H_DAY, _RENORM)
    rate = day[N_1H_AT] * 2.0 ** (-max(now - st.last_ts, 0) / H_1H) * math.log(2.0)
    need = floor * rate
    hour = now // HOUR_MS
    k = 1
    while k < 24 and day[HOUR0 + (hour - k) % 24] * scale * 2.0 ** (k * HOUR_MS / H_DAY) >= need:
        k += 1
    return k - 1


def kept_up_hours(st: AccountState, now: int, floor: float = 0.25) -> float:
    """How long, in hours, the account has kept up its present pace: :func:`steady_hours`, plus the part
    of the current hour gone by when the hour before it was at pace (the run then spans the hour's start,
    so the minutes since belong to it). A run is measured to the minute rather than in clock hours: one
    that started at 00:00 has kept up 1.7 hours at 01:42, not 1. Without a whole hour at pace before the
    current one (a burst, or the first hour of anything) it is 0: the run may have begun at any minute of
    the current hour. Same assumptions and cost as :func:`steady_hours`.

    >>> st = AccountState(created_ts=None)
    >>> ctx = EventContext(template_accounts=1, exact_accounts=1, model_age_ms=1 << 62)
    >>> ev = {"input_tokens": 100, "output_tokens": 400, "status": 200, "response": {"stop_reason": "end_turn"},
    ...       "model": "m", "client": {}, "prompt": {"cot": False, "capability": "qa", "script": "latin"}}
    >>> for i in range(35):  # 20 calls an hour from 00:00 to 01:42
    ...     update(st, {**ev, "ts": i * 180_000}, ctx)
    >>> steady_hours(st, 34 * 180_000), kept_up_hours(st, 34 * 180_000)
    (1, 1.7)
    >>> kept_up_hours(st, 19 * 180_000)  # at 00:57 no whole hour has gone by yet
    0.0
    """
    k = steady_hours(st, now, floor)
    return k + (now % HOUR_MS) / HOUR_MS if k else 0.0


def hourly_count(st: AccountState, now: int, min_span_ms: int = MIN_RATE_SPAN_MS) -> float:
    """The hour-horizon count ``n_1h`` at ``now``, corrected for how long the account has been observed.

    A count decayed with half-life H over a span ``s`` after the account's first event holds only
    ``1 - 2 ** (-s / H)`` of what the same pace gives in the long run (half after one hour), so an account
    seen for a short while reads as slower than it runs: every account after a cold start of the
    detector, every new account, a campaign in its first hour. Divided by that factor, it is the long-run
    count of the pace observed so far (``count * ln 2`` calls an hour), assuming nothing about the time
    before the first event; after a few hours the factor is 1. Spans under ``min_span_ms`` count as
    ``min_span_ms`` (two calls a minute apart are not an hourly rate). Cost: two powers.

    >>> st = AccountState(created_ts=None)
    >>> ctx = EventContext(template_accounts=1, exact_accounts=1, model_age_ms=1 << 62)
    >>> ev = {"input_tokens": 100, "output_tokens": 400, "status": 200, "response": {"stop_reason": "end_turn"},
    ...       "model": "m", "client": {}, "prompt": {"cot": False, "capability": "qa", "script": "latin"}}
    >>> for i in range(11):  # 11 calls in half an hour: 22 an hour, a long-run count of 22 / ln 2 = 31.7
    ...     update(st, {**ev, "ts": i * 180_000}, ctx)
    >>> round(features(st, 30 * 60_000)["n_1h"], 1), round(hourly_count(st, 30 * 60_000), 1)
    (9.3, 31.8)
    >>> one = AccountState(created_ts=None)
    >>> update(one, {**ev, "ts": 0}, ctx)
    >>> round(hourly_count(one, 0), 1)  # one call: read over min_span_ms, not as a pace
    6.3
    """
    n_1h = st[N_1H_AT]
    last = st.last_ts
    n = n_1h * 2.0 ** (-(now - last) / H_1H) if now >= last else n_1h
    span = max(now - st.first_ts, min_span_ms)
    return n / (1.0 - 2.0 ** (-span / H_1H))


def echo_share(st: AccountState) -> float:
    """Share of the account's day-window traffic echoing what caught accounts sent (``EventContext.echo``).
    Not among :func:`features`: the anomaly model does not see it (it is about other accounts' verdicts)."""
    return st[ECHO] / (st[N] or 1.0)


def _entropy(values: list[float]) -> float:
    total = sum(values)
    if total <= 0:
        return 0.0
    # A list, not a generator: the same sum in the same order, a third cheaper (24 hour slots, per event). Each
    # share is divided once (``p``), the same value as dividing it twice.
    return -sum([(p := v / total) * math.log(p) for v in values if v > 0])


_LOG_CAPS, _LOG_24 = math.log(len(CAPABILITIES)), math.log(24)


def day_count(st: AccountState, now: int) -> float:
    """The day-horizon event count at ``now``: the feature ``n_24h``, read alone. Cost: one power.

    >>> st = AccountState(created_ts=None)
    >>> ctx = EventContext(template_accounts=1, exact_accounts=1, model_age_ms=1 << 62)
    >>> update(st, {"ts": 0, "input_tokens": 1, "output_tokens": 1, "status": 200, "response": {}, "client": {},
    ...             "prompt": {"cot": False, "capability": "qa", "script": "latin"}}, ctx)
    >>> day_count(st, DAY_MS) == features(st, DAY_MS)["n_24h"] == 0.5
    True
    """
    # Read more than _RENORM half-lives before the window's reference time t0 (an event years late, which
    # the schema allows), the window is read as of that bound: the same bound keeps the stored sums finite,
    # and 2 ** (years / day) would overflow a float.
    return st[N] * 2.0 ** min(-(now - st.t0) / H_DAY, _RENORM)


def hour_spread(st: AccountState) -> float:
    """The feature ``hour_spread``, read alone: the normalised entropy of the account's hour-of-day traffic
    (day window), 0 for one hour, 1 for traffic spread evenly around the clock. Cost: about 2.5 µs."""
    return spread_over_hours(list(st[HOUR0:N_SLOTS]))


def spread_over_hours(hours: list[float]) -> float:
    """The normalised entropy of 24 hour-of-day counts: 0 for one hour, 1 for all hours alike, 0 for none (an
    account's ``hour_spread``, a cluster's too).

    >>> one, even, none = [5.0] + [0.0] * 23, [2.0] * 24, [0.0] * 24
    >>> spread_over_hours(one) == 0.0, round(spread_over_hours(even), 6), spread_over_hours(none)
    (True, 1.0, 0.0)
    """
    return _entropy(hours) / _LOG_24


def features(st: AccountState, now: int) -> dict[str, float]:
    """The account's feature vector at event time ``now`` (names in :data:`FEATURE_NAMES`).

    Shares are in [0, 1]; counts are decayed event counts. Meaningful after a handful of events: callers
    should weigh features by ``n_24h`` (see ``detector.detection``).
    """
    day = st
    n = day[N] or 1.0
    gaps = day[GAPS]
    gap_mean = day[GAP_LOG] / gaps if gaps else 0.0
    gap_var = max(day[GAP_LOG2] / gaps - gap_mean * gap_mean, 0.0) if gaps else 0.0
    caps = list(day[CAP0:HOUR0])
    age_ms = now - st.created_ts if st.created_ts is not None else now - st.first_ts
    n_10m, n_1h = day[N_10M_AT], day[N_1H_AT]
    net = st.net_bits
    last = st.last_ts
    return {
        "n_10m": n_10m * 2.0 ** (-(now - last) / H_10M) if now >= last else n_10m,
        "n_1h": n_1h * 2.0 ** (-(now - last) / H_1H) if now >= last else n_1h,
        "n_24h": day_count(st, now),
        "in_tokens": day[IN_TOK] / n,
        "out_tokens": day[OUT_TOK] / n,
        "out_in_ratio": day[OUT_TOK] / max(day[IN_TOK], n),
        "max_len_share": day[MAX_LEN] / n,
        "error_share": day[ERR] / n,
        "refusal_share": day[REFUSED] / n,
        "cot_share": day[COT] / n,
        "template_share": day[TEMPLATED] / n,
        "exact_shared_share": day[EXACT_SHARED] / n,
        "self_repeat_share": day[SELF_REPEAT] / n,
        "new_model_share": day[NEW_MODEL] / n,
        "new_model_share_1h": day[NEW_MODEL_1H_AT] / n_1h if n_1h else 0.0,
        "new_model_replay_share": day[NEW_MODEL_REPLAY] / n,
        "non_latin_share": day[NON_LATIN] / n,
        "capability_concentration": 1.0 - _entropy(caps) / _LOG_CAPS,
        "hour_spread": hour_spread(st),
        "gap_log_std": math.sqrt(gap_var),
        "distinct_ips": _linear_count(net & _LANE),
        "distinct_asns": _linear_count(net >> 64 & _LANE),
        "distinct_uas": _linear_count(net >> 128),
        "account_age_days": max(age_ms, 0) / DAY_MS,
    }
