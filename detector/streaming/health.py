"""Is the worker's commit keeping up? The decision behind its ``/healthz`` and ``detector_commit_stalled_seconds``.

Plain Python; no Faust, no Kafka. A worker can look alive (its process up, its ports open) while one of its
partitions is never committed: Faust's commit position crept one offset at a time in the chaos runs until the
worker's own commit position was fixed (OPERATIONS.md, *The commit does not creep*), and after a broker restart
a worker once committed nothing for 94 s. Kafka then counts the partition's events as unread: a restart or
a rebalance processes them again (harmless: the effect is idempotent), and the consumer lag alert fires without
saying why. A partition is *stalled* when it has events to read (its high-water mark is beyond its committed
offset) and its committed offset has not moved for ``stall_s``; a partition with nothing to read is never
stalled, however long it stays idle::

    every 5 s, per partition held:  observe(partition, committed, highwater)
    GET /healthz  ->  observe again (the consumer's own offsets), then
                      200 {"status": "ok"}
                    | 503 {"status": "stalled", "commit_stall_s": 120.0,
                           "partitions": {"3": {"seconds": 140.0, "committed": 9210, "highwater": 9874}}}

A stalled worker is one Kubernetes should restart (the Helm chart's liveness probe asks ``/healthz``): its
replacement resumes from the last commit, and the changelog makes the events it reads again count once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any


class CommitWatch:
    """Per partition, the last committed offset seen and when it last moved (or the partition had nothing to read).

    >>> now = [0.0]
    >>> watch = CommitWatch(stall_s=60, clock=lambda: now[0])
    >>> watch.observe(3, committed=100, highwater=150)
    >>> now[0] = 59; watch.observe(3, committed=100, highwater=180); watch.stalled()
    {}
    >>> now[0] = 61; watch.observe(3, committed=100, highwater=200); watch.stalled()
    {3: 61.0}
    >>> watch.observe(3, committed=130, highwater=200); watch.stalled()  # the commit moved
    {}
    >>> watch.observe(3, committed=200, highwater=200); now[0] = 500; watch.stalled()  # nothing to read: idle
    {}
    """

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_s <= 0:
            raise ValueError("stall_s must be positive")
        self.stall_s, self.clock = stall_s, clock
        self._seen: dict[Hashable, tuple[int | None, float, bool]] = {}  # partition -> (committed, since, caught up)
        self.highwater: dict[Hashable, int | None] = {}  # partition -> its last high-water mark, for reports

    def observe(self, partition: Hashable, committed: int | None, highwater: int | None) -> None:
        """The partition's committed offset (None: nothing committed yet) and high-water mark (the end offset;
        None: unknown, counted as nothing to read)."""
        now = self.clock()
        held = self._seen.get(partition)
        # Nothing to read (or no fetch has said what there is): idle, not stalled.
        caught_up = highwater is None or (committed is not None and committed >= highwater)
        if held is None or committed != held[0] or caught_up:
            self._seen[partition] = (committed, now, caught_up)
        self.highwater[partition] = highwater

    def keep(self, partitions: Iterable[Hashable]) -> None:
        """Forget the partitions not in ``partitions`` (revoked: another worker commits them now)."""
        held = set(partitions)
        for p in [p for p in self._seen if p not in held]:
            del self._seen[p]
            self.highwater.pop(p, None)

    def report(self) -> dict[str, dict[str, float | int | None]]:
        """The stalled partitions, for ``/healthz``: seconds without commit progress, committed offset, high-water
        mark."""
        return {_name(p): {"seconds": round(s, 1), "committed": self._seen[p][0], "highwater": self.highwater.get(p)}
                for p, s in self.stalled().items()}

    def behind(self) -> dict[Hashable, float]:
        """Seconds since each partition's commit last moved; 0 for one that had nothing to read when last seen."""
        now = self.clock()
        return {p: 0.0 if caught_up else now - since for p, (_, since, caught_up) in self._seen.items()}

    def stalled(self) -> dict[Hashable, float]:
        """The partitions whose commit has not moved for ``stall_s`` or more while they had events to read."""
        return {p: s for p, s in self.behind().items() if s >= self.stall_s}


def _name(partition: Hashable) -> str:
    """A Kafka ``TP``'s partition number, or the key itself."""
    number = getattr(partition, "partition", None)
    return str(number) if isinstance(number, int) else str(partition)


async def positions(partitions: Iterable[Any], committed: Callable[[Any], int | None],
                    highwater: Callable[[Any], int | None],
                    earliest: Callable[..., Awaitable[Mapping[Any, int]]],
                    ends: Callable[..., Awaitable[Mapping[Any, int]]]
                    ) -> dict[Hashable, tuple[int | None, int | None]]:
    """``(committed, highwater)`` of each partition, for :meth:`CommitWatch.observe`, with what the consumer does
    not know asked of the broker. ``committed`` and ``highwater`` are the consumer's own (no round trip);
    ``earliest`` and ``ends`` ask the broker for the partitions' first and end offsets.

    The consumer's high-water mark comes from its fetches: a consumer that never fetched (a Faust fetcher hung
    after a restart, seen in tests/integration/test_envelopes.py) has none, and would look idle for ever. A
    partition with no committed offset (a new group, or one rewound to 0: Faust keeps 0 as none) counts from its
    first offset, so that it is stalled if it has events and none is committed, and idle if it has none (even
    when retention deleted them all). What the broker cannot tell either stays None.

    >>> import asyncio
    >>> async def first(*tps): return {tp: 0 for tp in tps}
    >>> async def end(*tps): return {tp: 1504 for tp in tps}
    >>> asyncio.run(positions(["p0", "p1"], {"p0": 700}.get, {"p0": 900}.get, first, end))
    {'p0': (700, 900), 'p1': (0, 1504)}
    """
    held = list(partitions)
    known_committed = {p: committed(p) for p in held}
    known_highwater = {p: highwater(p) for p in held}
    no_commit = [p for p in held if known_committed[p] is None]
    no_highwater = [p for p in held if known_highwater[p] is None]
    first = dict(await earliest(*no_commit)) if no_commit else {}
    last = dict(await ends(*no_highwater)) if no_highwater else {}
    return {p: (known_committed[p] if known_committed[p] is not None else first.get(p),
                known_highwater[p] if known_highwater[p] is not None else last.get(p)) for p in held}
