"""The streaming side: the Faust worker around the detection core. The only package that imports Faust.

* :mod:`detector.streaming.routing` decides where each consumed message goes (plain Python, no Kafka);
* :mod:`detector.streaming.topics` creates the topics with kafka-python's admin client;
* :mod:`detector.streaming.app` builds the Faust app (:func:`create_app`) and runs it (:func:`run_worker`).

Importing this package imports neither Faust nor Kafka; ``create_app`` and ``run_worker`` load
:mod:`detector.streaming.app` on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "run_worker"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from detector.streaming import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
