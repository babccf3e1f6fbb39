"""Where the intake starts a partition's offset count after a rebalance (``Intake.start_of``), without a broker:
the committed offset when it can be read, else the first message (logged and counted), and the worker goes on.
Against the real broker: tests/integration/test_offsets.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from detector.detection import Detector
from detector.gateway import make_event
from detector.settings import Settings, TopicSettings
from detector.streaming import app as app_module
from detector.streaming.app import Intake
from detector.streaming.routing import Router


def _message(offset: int, generation: int = 5) -> SimpleNamespace:
    ev = make_event(account_id="acct_1", ts=1775000000000 + offset * 1000, api_key_id="k", model="m",
                    endpoint="/v1/messages", status=200, input_tokens=1, output_tokens=1, latency_ms=5,
                    prompt_text=f"q {offset}", response={"stop_reason": "end_turn"}, fingerprint_key=b"k")
    return SimpleNamespace(tp=("api-calls", 0), topic="api-calls", partition=0, offset=offset, key=b"acct_1",
                           value=orjson.dumps(ev), timestamp=1775000000.0, generation_id=generation)


def _intake() -> Intake:
    return Intake(Router(Detector(), Settings(topics=TopicSettings(partitions=1))), {}, "g")


def test_an_unreadable_committed_offset_falls_back_to_the_first_message(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fails(*args: Any) -> dict[int, int]:
        calls.append(args)
        raise TimeoutError("no answer")

    monkeypatch.setattr(app_module, "committed_offsets", fails)
    intake = _intake()
    outs, last = asyncio.run(intake.route([_message(7), _message(8)]))
    assert last == {("api-calls", 0): 8} and intake.router.detector.stats["events"] == 2  # type: ignore[attr-defined]
    assert len(calls) == 1  # once per generation, not per message
    assert intake.metrics.offset_starts.labels(result="unknown")._value.get() == 1


def test_the_committed_offset_starts_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "committed_offsets", lambda *args: {0: 5})
    refilled: list[range] = []

    async def refill(tp: Any, missing: range) -> list[Any]:
        refilled.append(missing)
        return []

    intake = _intake()
    monkeypatch.setattr(intake, "refill", refill)
    asyncio.run(intake.route([_message(7)]))
    assert refilled == [range(5, 7)]  # 5 and 6 are read back before 7
    assert intake.metrics.offset_starts.labels(result="read")._value.get() == 1


def test_a_read_that_never_returns_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # kafka-python can block without a timeout (a metadata fetch, finding the coordinator): the intake gives up on
    # the thread and counts from the first message, as for a read that failed.
    def hangs(*args: Any) -> dict[int, int]:
        time.sleep(1.5)  # (asyncio.run waits for the thread at its end)
        return {0: 0}

    monkeypatch.setattr(app_module, "committed_offsets", hangs)
    monkeypatch.setattr(app_module, "START_TIMEOUT_S", -4.8)  # given up on after 0.2 s (timeout + 5 s)
    intake = _intake()
    outs, last = asyncio.run(intake.route([_message(7), _message(8)]))
    assert last == {("api-calls", 0): 8} and intake.router.detector.stats["events"] == 2  # type: ignore[attr-defined]
    assert intake.metrics.offset_starts.labels(result="unknown")._value.get() == 1
    assert intake.metrics.offset_starts.labels(result="read")._value.get() == 0  # its late answer is not taken
