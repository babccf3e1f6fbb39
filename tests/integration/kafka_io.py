"""Reading a test topic back from a real broker (kafka-python, no consumer group), a worker's counters, and
waiting on a worker subprocess."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0, linger_s: float = 0.0) -> list[Any]:
    """Every message of ``topic`` (one partition) in offset order, waiting up to ``timeout_s`` for at least
    ``expected``; then ``linger_s`` more, so messages beyond the expected count (duplicates) can show."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        messages: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while True:  # read at least once, so an expected 0 still sees what is there
            messages.extend(consumer)
            if len(messages) >= expected or time.monotonic() >= deadline:
                break
        if linger_s:
            time.sleep(linger_s)
            messages.extend(consumer)
        return messages
    finally:
        consumer.close()


def worker_health(port: int) -> tuple[int, dict[str, Any]] | None:
    """A running worker's ``/healthz`` (``detector.streaming.app.HEALTH_PATH``): (HTTP status, body); None until
    it answers."""
    import urllib.error
    import urllib.request

    import orjson

    from detector.streaming.app import HEALTH_PATH

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PATH}", timeout=2) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())
    except OSError:
        return None


def worker_stats(port: int) -> dict[str, Any] | None:
    """A running worker's counters (``detector.streaming.app.STATS_PATH`` on its web port); None until it answers."""
    import urllib.request

    import orjson

    from detector.streaming.app import STATS_PATH

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{STATS_PATH}", timeout=2) as resp:
            stats: dict[str, Any] = orjson.loads(resp.read())
            return stats
    except OSError:
        return None


def log_tail(log: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a worker's log, for a failure message."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def wait_for_worker(what: str, probe: Callable[[], Any], proc: subprocess.Popen[bytes], log: Path,
                    timeout_s: float, poll_s: float = 0.2, tail_lines: int = 30) -> Any:
    """Poll ``probe`` until it returns something true and return that; fail the test, with the worker's log
    tail, if the worker exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not (got := probe()):
        if proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before {what}; log tail:\n{log_tail(log, tail_lines)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; log tail:\n{log_tail(log, tail_lines)}")
        time.sleep(poll_s)
    return got


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM a worker subprocess (if it still runs) and wait for it; killed if it has not stopped within
    ``timeout_s``. Returns its exit code."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
