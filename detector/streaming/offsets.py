"""Offset continuity: the worker hands each partition's messages to the detector in offset order, none skipped.

Plain Python; no Faust, no Kafka. Kafka's delivery is at least once only if the consumer processes every
offset it commits past. Faust can lose a fetched message between the fetch and the agent (its fetch loop
drops a record it has already moved its read offset past, and a put cancelled when flow control resumes
drops it too; so did emptying the stream buffers on the resume that ends a recovery, which the worker no
longer does, see ``app._FlowControl``), and its commit then passes over the hole: it treats offsets it
did not see as missing from the log (as a transaction marker is), and it accepts an unacked offset just
at the committed position. ``detector chaos --envelope`` lost one event of 14,517 that way (the commit
stalled at the missing offset, then jumped it). The worker's agent therefore checks each message against
an :class:`OffsetGuard` before it is processed::

    partition 2:  1400  1401  ----  1403  1404      the agent saw 1401, then 1403
                                ▲
                                └─ OffsetGuard.admit(1403) → range(1402, 1403): read offset 1402 from the
                                   broker and process it first, then 1403 (topics.read_range)

A redelivered offset (at or before the last one handed over) is skipped: the detector would skip it by
its position anyway (:meth:`detector.detection.Detector.process`). Refilling is idempotent for the same
reason, so a hole that was not one (a transaction marker has an offset but no record) costs a read.

Where a partition starts in a generation is the group's committed offset (where Faust seeks it), not the
first message the agent gets: after a rebalance that gives a worker back a partition it had, Faust can hand
over a record it fetched before the rebalance (its read offset for the partition was forgotten at the
revocation, so nothing filters it) ahead of the records from the committed offset. ``detector chaos
--envelope`` lost 9 events that way (offsets 924-928 of one partition after 927 and 928 had gone first: the
detector's positions then counted them as seen). The agent therefore starts each partition's count at the
committed offset (:meth:`OffsetGuard.start`), so such a record is preceded by a refill of the offsets before it::

    generation 3, committed 923:   927  928  923  924 ...      the agent got 927 first
                                    ▲
                                    └─ admit(927) → range(923, 927): read 923-926 back and process them
                                       first; the 923-926 that Faust sends after its seek are redeliveries
"""

from __future__ import annotations

from collections.abc import Hashable


class OffsetGuard:
    """The next offset expected per partition, within one consumer-group generation.

    :meth:`admit` is called for every message before it is processed, in the order the agent gets them.
    A partition's count in a generation starts at :meth:`start` (the committed offset), else at its first
    message; a message from an older generation (still in a buffer when the rebalance came) is
    admitted without being counted. Memory: one integer per partition.

    >>> guard = OffsetGuard()
    >>> guard.admit("p0", 10, generation=1), guard.admit("p0", 11, generation=1)
    (range(10, 10), range(11, 11))
    >>> guard.admit("p0", 14, generation=1)  # 12 and 13 never reached the agent
    range(12, 14)
    >>> guard.admit("p0", 14, generation=1) is None  # delivered twice: skip
    True
    >>> guard.admit("p0", 3, generation=2)  # a rebalance: the count starts again
    range(3, 3)
    >>> guard.admit("p0", 40, generation=1), guard.admit("p0", 4, generation=2)  # older: admitted, not counted
    (range(40, 40), range(4, 4))
    """

    def __init__(self) -> None:
        self.generation = -1
        self._next: dict[Hashable, int] = {}

    def started(self, partition: Hashable, generation: int) -> bool:
        """Whether ``partition`` has a count in ``generation`` (or ``generation`` is older, and needs none)."""
        return generation < self.generation or (generation == self.generation and partition in self._next)

    def start(self, partition: Hashable, offset: int, generation: int) -> None:
        """Start ``partition``'s count in ``generation`` at ``offset``: the committed offset the consumer seeks
        to, so a message the agent gets before the ones from there is preceded by a refill.

        >>> guard = OffsetGuard()
        >>> guard.start("p0", 923, generation=3)
        >>> guard.admit("p0", 927, generation=3), guard.admit("p0", 923, generation=3)
        (range(923, 927), None)
        """
        self._enter(generation)
        self._next[partition] = offset

    def admit(self, partition: Hashable, offset: int, generation: int) -> range | None:
        """The offsets missing before ``offset`` (read and process them first; empty if none), or None if
        ``offset`` was already admitted in this generation (skip the message)."""
        if generation < self.generation:
            return range(offset, offset)
        self._enter(generation)
        expected = self._next.get(partition, offset)
        if offset < expected:
            return None
        self._next[partition] = offset + 1
        return range(expected, offset)

    def _enter(self, generation: int) -> None:
        if generation > self.generation:
            self.generation = generation
            self._next.clear()
