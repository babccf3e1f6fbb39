"""The worker's commit watch (``detector.streaming.health.CommitWatch``): stalled only with events to read."""

from __future__ import annotations

import pytest

from detector.streaming.health import CommitWatch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_backlog_whose_commit_does_not_move_is_stalled_after_the_limit_not_before(clock: Clock) -> None:
    watch = CommitWatch(stall_s=120, clock=clock)
    for t in range(0, 125, 5):
        clock.now = t
        watch.observe("p0", committed=500, highwater=900)
        assert (watch.stalled() != {}) == (t >= 120), t
    assert watch.report() == {"p0": {"seconds": 120.0, "committed": 500, "highwater": 900}}


def test_progress_resets_the_clock_even_while_behind(clock: Clock) -> None:
    watch = CommitWatch(stall_s=120, clock=clock)
    for t in range(0, 600, 5):
        clock.now = t
        watch.observe("p0", committed=500 + t, highwater=10_000)  # behind, but committing
        assert watch.stalled() == {}


def test_an_idle_partition_is_never_stalled(clock: Clock) -> None:
    watch = CommitWatch(stall_s=120, clock=clock)
    watch.observe("p0", committed=900, highwater=900)
    watch.observe("p1", committed=None, highwater=None)  # nothing fetched yet: nothing known to read
    clock.now = 3600
    assert watch.stalled() == {} and watch.behind() == {"p0": 0.0, "p1": 0.0}


def test_nothing_committed_yet_with_a_backlog_counts(clock: Clock) -> None:
    watch = CommitWatch(stall_s=120, clock=clock)
    watch.observe("p0", committed=None, highwater=50)
    clock.now = 130
    watch.observe("p0", committed=None, highwater=80)
    assert list(watch.stalled()) == ["p0"]


def test_revoked_partitions_are_forgotten(clock: Clock) -> None:
    watch = CommitWatch(stall_s=120, clock=clock)
    watch.observe("p0", committed=1, highwater=9)
    watch.observe("p1", committed=1, highwater=9)
    clock.now = 200
    watch.keep(["p1"])  # p0 went to another worker, which commits it now
    assert list(watch.stalled()) == ["p1"]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        CommitWatch(stall_s=0)


def _offsets(value: int):
    async def ask(*partitions: str) -> dict[str, int]:
        return {p: value for p in partitions}
    return ask


def test_a_consumer_that_never_fetched_after_a_rewind_is_stalled_not_idle(clock: Clock) -> None:
    # The group was rewound to 0 (Faust keeps 0 as no committed offset) and the fetcher never fetched (no
    # high-water mark): the broker's first and end offsets say there are 1,504 events to read.
    import asyncio

    from detector.streaming.health import positions

    watch = CommitWatch(stall_s=120, clock=clock)
    for t in range(0, 125, 5):
        clock.now = t
        seen = asyncio.run(positions(["p0"], {}.get, {}.get, _offsets(0), _offsets(1504)))
        watch.observe("p0", *seen["p0"])
    assert watch.report() == {"p0": {"seconds": 120.0, "committed": 0, "highwater": 1504}}
    # What the consumer alone knew (None, None) looked idle for ever.
    blind = CommitWatch(stall_s=120, clock=clock)
    for t in range(0, 300, 5):
        clock.now = t
        blind.observe("p0", None, None)
    assert blind.stalled() == {}


def test_a_partition_whose_events_all_expired_is_idle(clock: Clock) -> None:
    import asyncio

    from detector.streaming.health import positions

    watch = CommitWatch(stall_s=120, clock=clock)
    for t in range(0, 300, 5):
        clock.now = t
        seen = asyncio.run(positions(["p0"], {}.get, {"p0": 800}.get, _offsets(800), _offsets(800)))
        watch.observe("p0", *seen["p0"])
    assert watch.stalled() == {}


def test_the_consumer_state_logged_for_a_stalled_commit_names_what_is_wrong() -> None:
    from types import SimpleNamespace

    from faust.types import TP

    from detector.streaming.app import _consumer_state

    tp0, tp1 = TP("api-calls", 0), TP("api-calls", 1)
    consumer = SimpleNamespace(flow_active=False, _paused_partitions={tp1}, _active_partitions={tp0},
                               _read_offset={tp0: 0}, _committed_offset={}, highwater={tp0: 1504}.get)
    assert _consumer_state(consumer, [tp0, tp1]) == (
        "consumer flow off; 0: read 0, committed None, highwater 1504; "
        "1: read None, committed None, highwater None, paused, not active")


def test_the_app_state_logged_beside_it_reads_a_real_faust_app() -> None:
    # A real (unstarted) app: its flow control, producer buffer and one stream buffer. The worker crashed on
    # this line once (the buffer's size is a property), so it is read from Faust's own objects, not a stand-in.
    import faust

    from detector.streaming.app import _app_state

    app = faust.App("state-test", broker="kafka://127.0.0.1:1")
    queue = app.FlowControlQueue(maxsize=8, clear_on_resume=True)  # as Faust makes a stream buffer
    assert _app_state(app) == "app flow control off, producer buffer 0, stream buffers 0/8"  # until the worker starts
    app.flow_control.resume()
    queue.put_nowait(b"one")
    assert _app_state(app) == "app flow control on, producer buffer 0, stream buffers 1/8"


def test_resuming_the_worker_flow_control_keeps_what_the_stream_buffers_hold() -> None:
    # Faust resumes flow control at the end of a recovery, after records of the just-seeked partitions may already
    # be in a stream buffer; mode's resume() emptied it and those records were never processed on a quiet topic.
    # A resume after a suspension still empties it.
    from detector.streaming.app import WorkerApp

    app = WorkerApp("flow-test", broker="kafka://127.0.0.1:1")
    queue = app.FlowControlQueue(maxsize=8, clear_on_resume=True)  # as Faust makes every stream buffer
    app.flow_control.resume()  # a recovery starts
    queue.put_nowait(b"fetched after the seek")
    app.flow_control.resume()  # the recovery ends
    assert queue.qsize() == 1 and app.flow_control.is_active()
    app.flow_control.suspend()  # a rebalance: what is put while suspended is dropped when the flow resumes
    queue.put_nowait(b"fetched before the revocation")
    app.flow_control.resume()
    assert queue.qsize() == 0 and app.flow_control.is_active()


def test_the_commit_watch_looks_at_the_broker_falls_back_on_the_consumer_and_never_raises() -> None:
    # The watch runs in a Faust timer, and a timer that raised would stop the worker over a health check.
    import asyncio
    from types import SimpleNamespace

    from detector.streaming.app import look_at_commits

    async def down(*partitions: str) -> dict[str, int]:
        raise ConnectionError("broker unreachable")

    consumer = SimpleNamespace(_committed_offset={"p0": 700}, highwater={"p0": 900}.get,
                               earliest_offsets=_offsets(0), highwaters=_offsets(1504))
    assert asyncio.run(look_at_commits(consumer, ["p0", "p1"], 5.0)) == {"p0": (700, 900), "p1": (0, 1504)}
    consumer.earliest_offsets = consumer.highwaters = down  # what the consumer knows, the rest unknown
    assert asyncio.run(look_at_commits(consumer, ["p0", "p1"], 5.0)) == {"p0": (700, 900), "p1": (None, None)}
    del consumer._committed_offset  # a Faust release that renamed its private record
    assert asyncio.run(look_at_commits(consumer, ["p0", "p1"], 5.0)) is None
