"""How many accounts share a prompt template: a windowed count-min sketch over fingerprint keys.

Every event brings 8 template-band keys and one exact-prompt key (see :mod:`detector.fingerprints`).
Keeping a dict entry per key would grow with every distinct prompt, so keys are counted in a count-min
sketch (``depth`` rows of ``width`` counters): memory is fixed (``2 * depth * width * 4`` bytes, 64 MiB at
the defaults) whatever the traffic, and estimates can only over-count. Each account counts once per key:
a per-account Bloom filter (:class:`SeenFilter`) remembers the keys it has already contributed.

Two generations give the sketch a window: counts move to the old generation every ``window_ms`` of event
time and are dropped one window later, so a template counts the accounts that used it in the last one to
two windows.

>>> idx = ContentIndex(width=1 << 12, depth=3)
>>> seen = [SeenFilter() for _ in range(4)]
>>> [idx.observe(seen[a], [0xABC], 0xF00 + a, ts=0)[0] for a in range(4)]
[1, 2, 3, 4]
>>> idx.observe(seen[0], [0xABC], 0xF00, ts=1)  # same account again: not counted twice
(4, 1, True, 2748, True)
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from detector.features import DAY_MS

_M1 = 0x9E3779B97F4A7C15
_M2 = 0xC2B2AE3D27D4EB4F
_MASK = (1 << 64) - 1
#: ContentIndex.add_many counts this many keys or more with numpy.
VECTOR_FROM = 64


class SeenBits(Protocol):
    """Anything holding a :class:`SeenFilter`'s bits in ``bits``: a filter, or an object that keeps them
    itself (the detector's per-account object does, packed in its array, where each read or write of
    ``bits`` costs about 300 ns: :meth:`ContentIndex.observe` reads them once and writes them once)."""

    bits: int


def seen_add(seen: SeenBits, key: int) -> bool:
    """Add ``key`` to the filter bits of ``seen``; return True if it was (probably) present already.

    >>> f = SeenFilter()
    >>> seen_add(f, 42), seen_add(f, 42), f.bits.bit_count()
    (False, True, 2)
    """
    bits, was_seen = _bloom_add(seen.bits, (key * _M1) & _MASK)
    if not was_seen:
        seen.bits = bits
    return was_seen


def _bloom_add(bits: int, h1: int) -> tuple[int, bool]:
    """A :class:`SeenFilter`'s ``bits`` with the key whose first hash is ``h1`` added (cleared first if over
    half full), and whether the key was (probably) present already. On the int, so that a caller holding
    the bits of a :class:`SeenBits` whose reads cost (the detector's account) reads and writes them once."""
    m = (1 << (h1 & 1023)) | (1 << ((h1 >> 10) & 1023))
    if bits & m == m:
        return bits, True
    if bits.bit_count() > SeenFilter.SIZE // 2:
        bits = 0
    return bits | m, False


class SeenFilter:
    """A 1024-bit Bloom filter of keys one account has contributed; cleared when half full.

    Clearing (a new generation) bounds both memory and false positives for heavy accounts. The filter is
    its ``bits`` (a Python int); :class:`ContentIndex` reads and writes them in any :class:`SeenBits`.
    """

    __slots__ = ("bits",)
    SIZE = 1024

    def __init__(self) -> None:
        self.bits = 0

    def add(self, key: int) -> bool:
        """Add ``key``; return True if it was (probably) present already (see :func:`seen_add`)."""
        return seen_add(self, key)


_Store = TypeVar("_Store", array, bytearray)


class _TwoGenerations(Generic[_Store]):
    """An event-time window kept in two generations, ``_new`` and ``_old`` (each what :meth:`_fresh` makes):
    every ``window_ms`` of event time the new one becomes the old one and the old one is dropped, so what was
    added counts for one to two windows. Subclasses set ``window_ms``, ``_new``, ``_old`` and
    ``_window_start`` (None until the first event)."""

    window_ms: int
    _new: _Store
    _old: _Store
    _window_start: int | None

    def _fresh(self) -> _Store:
        raise NotImplementedError

    def _rotate(self, ts: int) -> None:
        if self._window_start is None:
            self._window_start = ts
        elif ts - self._window_start >= self.window_ms:
            self._old = self._new if ts - self._window_start < 2 * self.window_ms else self._fresh()
            self._new = self._fresh()
            self._window_start = ts


class ContentIndex:
    """Distinct accounts per template band and per exact prompt, over a sliding event-time window.

    The window's two generations (as :class:`_TwoGenerations` keeps them) share one array, interleaved: a
    cell's count in the new generation, then in the old one, side by side. A key's estimate reads both, and
    the sketch (64 MiB) is far larger than any cache: side by side they take one memory access, in two arrays
    they took two (replay 4% faster, measured). Rotating moves every new count into its old place and clears
    the new ones, in place (about 30 ms once per window, with numpy).
    """

    def __init__(self, width: int = 1 << 22, depth: int = 2, window_ms: int = DAY_MS) -> None:
        if width & (width - 1):
            raise ValueError("width must be a power of two")
        self.width = width
        self.depth = depth
        self._rows = tuple(2 * r * width for r in range(depth))  # where each row starts in ``_cells``
        self.window_ms = window_ms
        # One flat array of rows (row r starts at 2 * r * width; cell c's new count at 2 * c, its old one at
        # 2 * c + 1): indexing a stdlib array from Python is several times cheaper than indexing a numpy
        # array one scalar at a time.
        self._cells = array("I", bytes(8 * self.depth * self.width))
        self._window_start: int | None = None
        # Which keys the last observe() counted (bit i: band i; bit 8: the exact prompt): what another worker
        # must add to its copy of the index (detector.signals).
        self.last_added = 0

    @property
    def _new(self) -> array:
        """The new generation's counts, as a flat array of rows (a copy)."""
        return self._cells[0::2]

    @property
    def _old(self) -> array:
        """The old generation's counts, as a flat array of rows (a copy)."""
        return self._cells[1::2]

    def _rotate(self, ts: int) -> None:
        if self._window_start is None:
            self._window_start = ts
        elif ts - self._window_start >= self.window_ms:
            import numpy as np

            pairs = np.frombuffer(self._cells, dtype=np.uint32).reshape(-1, 2)  # the array itself, not a copy
            # The new generation becomes the old one; after two windows or more, both are empty.
            pairs[:, 1] = pairs[:, 0] if ts - self._window_start < 2 * self.window_ms else 0
            pairs[:, 0] = 0
            self._window_start = ts

    def _estimate_and_add(self, key: int, add: bool) -> int:
        # Double hashing into ``depth`` rows; runs for every band of every event (about 9 per event).
        h1 = (key * _M1) & _MASK
        h2 = ((key ^ (key >> 29)) * _M2) & _MASK | 1
        w = self.width
        cells = self._cells
        best = 1 << 32
        for r in range(self.depth):
            c = 2 * (r * w + ((h1 + r * h2) & _MASK) % w)
            if add:
                cells[c] += 1
            v = cells[c] + cells[c + 1]
            if v < best:
                best = v
        return best

    def observe(self, seen: SeenBits, bands: list[int], exact: int, ts: int) -> tuple[int, int, bool, int, bool]:
        """Count this account under the event's keys; return ``(template_accounts, exact_accounts,
        self_repeat, top_band, self_exact)``: the most accounts sharing any one band, the accounts that
        sent this exact prompt (both including this one), whether this account used one of the bands
        before, the band shared by the most accounts (0 without bands), and whether this account sent
        this exact prompt before.

        The hot loop of the detector (9 keys per event): the filter's bits are read once and written once
        (each band added as :func:`_bloom_add` adds a key, written out), and :meth:`_estimate_and_add` is
        written out inline, with the same cells (``% width`` as a mask, the width being a power of two).
        """
        self._rotate(ts)
        template_accounts, top_band = 0, 0
        self_repeat = False
        added, bit = 0, 1
        bits = seen.bits
        wmask2, half = 2 * (self.width - 1), SeenFilter.SIZE // 2
        cells, rows = self._cells, self._rows
        for band in bands:
            h1 = (band * _M1) & _MASK  # the Bloom filter's hash is the sketch's first hash
            # _bloom_add, written out (a call per band is a tenth of this loop)
            m = (1 << (h1 & 1023)) | (1 << ((h1 >> 10) & 1023))
            count = 1 << 32
            # Row r's cell is 2 * ((h1 + r * h2) & wmask) after the row's start: ``h`` steps through twice the
            # row hashes, masked with twice the mask (the same cells; one multiplication less per row). The loop
            # is written twice, reading (a band this account used before) and counting, to test once per band.
            h, h2 = h1 << 1, ((((band ^ (band >> 29)) * _M2) & _MASK) | 1) << 1
            if bits & m == m:
                self_repeat = True
                for row in rows:
                    c = row + (h & wmask2)
                    v = cells[c] + cells[c + 1]
                    if v < count:
                        count = v
                    h += h2
            else:
                if bits.bit_count() > half:
                    bits = 0
                bits |= m
                added |= bit
                for row in rows:
                    c = row + (h & wmask2)
                    v = cells[c] + 1
                    cells[c] = v
                    v += cells[c + 1]
                    if v < count:
                        count = v
                    h += h2
            bit <<= 1
            if count > template_accounts:
                template_accounts, top_band = count, band
        exact_key = exact ^ 0x5EED
        seen.bits, self_exact = _bloom_add(bits, (exact_key * _M1) & _MASK)  # seen_add, on the bits read once
        exact_accounts = self._estimate_and_add(exact_key, not self_exact)
        self.last_added = added if self_exact else added | 1 << 8
        return template_accounts, exact_accounts, self_repeat, top_band, self_exact

    def added_keys(self, bands: list[int], exact: int) -> list[int]:
        """The sketch keys the last :meth:`observe` (of ``bands`` and ``exact``) counted: what :meth:`add`
        takes on another worker's copy of the index, which holds no filter for this account.

        >>> a, b, seen = ContentIndex(width=1 << 10), ContentIndex(width=1 << 10), SeenFilter()
        >>> _ = a.observe(seen, [0xABC, 0xDEF], 0xF00, ts=0)
        >>> b.add(a.added_keys([0xABC, 0xDEF], 0xF00), ts=0)
        >>> _ = a.observe(seen, [0xABC], 0xF01, ts=1)  # band seen before: only the new exact prompt is added
        >>> a.added_keys([0xABC], 0xF01) == [0xF01 ^ 0x5EED]
        True
        >>> b.add(a.added_keys([0xABC], 0xF01), ts=1)
        >>> b.observe(SeenFilter(), [0xABC], 0xF00, ts=2)[:2] == a.observe(SeenFilter(), [0xABC], 0xF00, ts=2)[:2]
        True
        """
        mask = self.last_added
        keys = [band for i, band in enumerate(bands) if mask >> i & 1]
        if mask >> 8 & 1:
            keys.append(exact ^ 0x5EED)
        return keys

    def add(self, keys: Sequence[int], ts: int) -> None:
        """Count one more account under each of ``keys`` (band values, or an exact prompt's key as
        :meth:`added_keys` gives it): another worker's account that contributed them for the first time."""
        self._rotate(ts)
        self.add_many(keys)

    def rotates_at(self, ts: int) -> bool:
        """Whether an event at ``ts`` starts a new window (so keys counted before it belong to the old one)."""
        return self._window_start is not None and ts - self._window_start >= self.window_ms

    def advance(self, ts: int) -> None:
        """Move the window to ``ts`` without counting anything (as :meth:`observe` and :meth:`add` do first)."""
        self._rotate(ts)

    def add_many(self, keys: Sequence[int]) -> None:
        """Count one more account under each of ``keys`` in the current window: :meth:`add` without moving it,
        for many keys at once. From :data:`VECTOR_FROM` keys on with numpy (about 0.1 µs a key instead of 1.3:
        the hashes over an array, then one increment per distinct cell), below that in plain Python.

        >>> a, b = ContentIndex(width=1 << 10), ContentIndex(width=1 << 10)
        >>> keys = [k * 0x9E3779B97F4A7C15 % 2**64 for k in range(500)] * 2
        >>> a.add_many(keys); b.add_many(keys[:VECTOR_FROM - 1]); b.add_many(keys[VECTOR_FROM - 1:])
        >>> a._new == b._new, sum(a._new) == 2 * len(keys)
        (True, True)
        """
        if len(keys) >= VECTOR_FROM:
            import numpy as np

            k = np.fromiter(keys, dtype=np.uint64, count=len(keys))
            with np.errstate(over="ignore"):  # the hashes wrap around 2**64, as _MASK does in Python
                h1 = k * np.uint64(_M1)
                h2 = ((k ^ (k >> np.uint64(29))) * np.uint64(_M2)) | np.uint64(1)
                wmask = np.uint64(self.width - 1)
                cells = np.concatenate([np.uint64(r * self.width) + ((h1 + np.uint64(r) * h2) & wmask)
                                        for r in range(self.depth)]).astype(np.intp)
            where, count = np.unique(cells, return_counts=True)
            view = np.frombuffer(self._cells, dtype=np.uint32)  # the array itself, not a copy
            view[2 * where] += count.astype(np.uint32)  # the new generation's counts
            return
        w, wmask_, counts = self.width, self.width - 1, self._cells
        for key in keys:  # _estimate_and_add's increments, without the estimate (half the cost)
            h1_ = (key * _M1) & _MASK
            h2_ = ((key ^ (key >> 29)) * _M2) & _MASK | 1
            for r in range(self.depth):
                counts[2 * (r * w + ((h1_ + r * h2_) & wmask_))] += 1

    @property
    def nbytes(self) -> int:
        return 2 * 4 * self.depth * self.width


class CaughtContent(_TwoGenerations[bytearray]):
    """Template bands of the prompts caught accounts sent over the last one to two windows: a Bloom filter
    in two generations (as :class:`ContentIndex` keeps its counts), ``2 * bits / 8`` bytes whatever the
    traffic.

    A campaign re-sends its prompt set from account after account (best-of-n sampling of the teacher's
    answers); reworded, the prompts keep most of their text and so some of their bands. An account whose
    prompts keep matching what caught accounts sent is drawing on the same prompt set.

    >>> cc = CaughtContent(bits=1 << 12)
    >>> cc.add([11, 22, 33], ts=0)
    >>> cc.hits([11, 22, 44], ts=1), cc.hits([55], ts=1)
    (2, 0)
    >>> cc.hits([11], ts=3 * DAY_MS)  # two windows later: gone
    0
    """

    def __init__(self, bits: int = 1 << 24, window_ms: int = DAY_MS) -> None:
        if bits & (bits - 1) or bits < 8:
            raise ValueError("bits must be a power of two, at least 8")
        self._mask = bits - 1
        self.window_ms = window_ms
        self._new = self._fresh()
        self._old = self._fresh()
        self._window_start = None

    def _fresh(self) -> bytearray:
        return bytearray((self._mask + 1) // 8)

    def add(self, bands: Sequence[int], ts: int) -> None:
        """Remember the bands of one prompt a caught account sent at ``ts``."""
        self._rotate(ts)
        new, mask = self._new, self._mask
        for band in bands:
            h = (band * _M2) & _MASK
            a, b = h & mask, (h >> 32) & mask
            new[a >> 3] |= 1 << (a & 7)
            new[b >> 3] |= 1 << (b & 7)

    def hits(self, bands: Sequence[int], ts: int) -> int:
        """How many of ``bands`` caught accounts sent (probably: a Bloom filter over-counts, rarely)."""
        self._rotate(ts)
        new, old, mask = self._new, self._old, self._mask
        n = 0
        for band in bands:
            h = (band * _M2) & _MASK
            a, b = h & mask, (h >> 32) & mask
            ia, ma, ib, mb = a >> 3, 1 << (a & 7), b >> 3, 1 << (b & 7)
            if (new[ia] & ma and new[ib] & mb) or (old[ia] & ma and old[ib] & mb):
                n += 1
        return n

    @property
    def nbytes(self) -> int:
        return len(self._new) + len(self._old)
