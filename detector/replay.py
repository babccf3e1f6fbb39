"""Replay: the detection core over a JSONL file of events, in-process, no Kafka.

Lines are decoded and validated exactly as the worker does (:func:`detector.schemas.decode_event`);
invalid lines are counted by reason and skipped, as the worker dead-letters them. Events are processed
in file order, which is the order the worker sees them on a single-partition topic; pass
``sort_by_time=True`` to process a file whose lines are not in event-time order.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detector.detection import Detector
from detector.schemas import InvalidEvent, decode_event


@dataclass
class ReplayResult:
    events: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    key_blocks: list[dict[str, Any]] = field(default_factory=list)  # for blocked-keys (detector.keyblocks)
    invalid: Counter[str] = field(default_factory=Counter)


def read_events(lines: Iterable[bytes], invalid: Counter[str], max_bytes: int = 64 * 1024) -> Iterator[dict[str, Any]]:
    """Decode and validate lines; count the invalid ones by reason in ``invalid``."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            yield decode_event(line, max_bytes)
        except InvalidEvent as exc:
            invalid[exc.reason] += 1


def replay(
    events: Iterable[dict[str, Any]],
    detector: Detector,
    *,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    emitted_at: int | None = None,
) -> ReplayResult:
    """Run ``detector`` over ``events`` in the given order; collect (or pass on) the records."""
    result = ReplayResult()
    for ev in events:
        rec = detector.process(ev, emitted_at=emitted_at if emitted_at is not None else ev["ts"])
        result.events += 1
        result.key_blocks += detector.drain_key_blocks()
        if rec is not None:
            if on_record is None:
                result.records.append(rec)
            else:
                on_record(rec)
        if progress is not None and result.events % 10_000 == 0:
            progress(result.events)
    return result


def sorted_by_time(events: Iterable[dict[str, Any]], buffer: int = 100_000) -> Iterator[dict[str, Any]]:
    """Event-time order for input that is at most ``buffer`` events out of order (a bounded heap)."""
    heap: list[tuple[int, int, dict[str, Any]]] = []
    for i, ev in enumerate(events):
        heapq.heappush(heap, (ev["ts"], i, ev))
        if len(heap) > buffer:
            yield heapq.heappop(heap)[2]
    while heap:
        yield heapq.heappop(heap)[2]


def replay_file(path: Path, out: Path | None, detector: Detector, *, sort_by_time: bool = False,
                progress: Callable[[int], None] | None = None) -> ReplayResult:
    """Replay ``path`` (JSONL events) and write records as JSONL to ``out`` (if given)."""
    invalid: Counter[str] = Counter()
    with open(path, "rb") as fh:
        events: Iterable[dict[str, Any]] = read_events(fh, invalid)
        if sort_by_time:
            events = sorted_by_time(events)
        if out is None:
            result = replay(events, detector, progress=progress)
        else:
            with open(out, "wb") as sink:
                def write(rec: dict[str, Any]) -> None:
                    sink.write(orjson.dumps(rec) + b"\n")

                result = replay(events, detector, progress=progress, on_record=write)
    result.invalid = invalid
    return result
