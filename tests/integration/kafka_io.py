"""Reading a test topic back from a real broker (kafka-python, no consumer group), and a worker's counters."""

from __future__ import annotations

import time
from typing import Any


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
