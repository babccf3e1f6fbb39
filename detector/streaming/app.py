"""The Faust worker: a thin shell that moves bytes between Kafka and a :class:`~detector.streaming.routing.Router`.

This is the only module that imports Faust. :func:`create_app` builds an app from settings (no module-level
app, nothing happens at import); :func:`run_worker` runs it until SIGTERM or SIGINT::

    api-calls       ──▶ agent route_events  (batches: noack_take) ──▶ Router.on_message ─▶ risk-scores
    analyst-labels  ──▶ agent apply_labels  (one by one)          ──▶ Router.on_label ──▶ or api-calls.dlq
                                              └─ each batch's cluster signals ─▶ cluster-signals
    cluster-signals ──▶ task follow_signals (every partition, no group) ─▶ Router.on_signals

All decisions live in the :class:`~detector.detection.Detector` and the router; the agents decode nothing
and decide nothing. Delivery is at least once: the input messages of a batch are acknowledged (so their
offsets may be committed) only after every record and dead letter they produced is on the broker. A
publish that still fails after the producer's retries crashes the worker (``CrashingSupervisor``), so
the batch is read again after a restart instead of being skipped. Each partition's messages reach the
router in offset order with none skipped: :class:`Intake` reads back from the broker any offsets Faust
lost between its fetch and the agent (:mod:`detector.streaming.offsets`).

Ordering and replay. With ``api-calls`` on ONE partition the agent hands events to the detector in offset
order, which is the order ``detector replay`` reads the same events from a file; both run the same
``Detector`` with the same settings, so they produce the same records (``emitted_at`` aside). With more
partitions that guarantee weakens:

* order holds within a partition (so per account, as events are keyed by account), but the worker
  interleaves partitions in fetch order, which depends on timing; cross-account state (the content
  index, the cluster linker) sees a different interleaving than a file, and scores can differ slightly;
* with several workers each holds its own in-memory ``Detector`` for its partitions' accounts; the clusters
  are shared (``settings.worker.share_clusters``): each batch's cluster signals (:mod:`detector.signals`) go to
  ``cluster-signals``, and every worker folds in the other workers' as they arrive, so accounts on partitions
  held by different workers are linked into one cluster, a fraction of a second later than on one worker;
* analyst labels are applied when they arrive, wherever the events agent yields (while a batch's
  records are being sent); they are outside the replay guarantee (replay does not read labels);
* cross-account state (content index, linker, cluster windows, anomaly model, label-trained fusion
  weights) lives in each worker's memory and is rebuilt from the stream after a restart.

Durable account state. Each account's state (windows, decision, last offset and event ids) is a snapshot
(:func:`detector.detection.dump_account`) in the ``account-state`` table, co-partitioned with
``api-calls``; its compacted changelog ``<app id>-account-state-changelog`` gets one write per changed
account per batch, whose delivery is awaited before the batch is acknowledged, so a batch's effects are
in the changelog before it counts as consumed. After a crash
or a rebalance the worker restores the snapshots of the partitions it is assigned (before their streams
resume) and is redelivered the events after the last commit: the detector skips those already folded in
(each snapshot keeps the offset of its account's last event, and its last event ids), so no event is
lost or counted twice. ``make chaos`` checks exactly that against a real broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.auth import CredentialsT
from faust.utils.functional import consecutive_numbers
from mode import CrashingSupervisor
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from detector.detection import Detector
from detector.metrics import Metrics
from detector.settings import KafkaSettings, Settings
from detector.streaming.health import CommitWatch, positions
from detector.streaming.offsets import OffsetGuard
from detector.streaming.routing import DetectorLike, Output, Router, Source
from detector.streaming.topics import Follower, committed_offsets, ensure_topics, kafka_client_config, read_range

log = logging.getLogger(__name__)

#: Path of the worker's counters on its web server (``settings.worker.web_port``).
STATS_PATH = "/detector/stats/"
#: Path of the worker's health on its web server: 503 while a partition's commit is stalled (detector.streaming.health).
HEALTH_PATH = "/healthz"
HEALTH_INTERVAL_S = 5.0
#: A partition's commit behind this long with events to read logs the consumer's state (then once per this long).
CONSUMER_STATE_LOG_S = 30.0
STATS_LOG_INTERVAL_S = 30.0
#: How often the state gauges (accounts by action, clusters blocked, model warm-up) are refreshed; each
#: refresh walks every tracked account once.
GAUGE_INTERVAL_S = 10.0
#: The table of account snapshots; its changelog topic is ``<app id>-account-state-changelog``.
ACCOUNT_TABLE = "account-state"
#: Bytes fetched per partition and request (Faust's default is 1 MiB: about 1,000 events).
CONSUMER_MAX_FETCH_BYTES = 8 * 1024 * 1024
#: In the stream buffers, a message weighs one slot per this many bytes (at least one): a single event is
#: about one slot, a full envelope about a thousand (:class:`_WeightedQueue`).
SLOT_BYTES = 1024
#: How long the worker waits before trying again to follow cluster-signals (e.g. the topic is missing, or an ACL).
SIGNALS_RETRY_S = 10.0
#: How often the warm start (:func:`warm_up`) logs its progress.
WARMUP_PROGRESS_S = 5.0
#: How long reading back the offsets of a hole may take before the worker gives up (and stops, unacked).
REFILL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 10.0  # reading the group's committed offsets after a rebalance (Intake.start_of)


class _WeightedQueue(ThrowableQueue):  # type: ignore[type-arg]
    """Faust's stream buffer, in which a message of many bytes (an envelope) weighs as many messages.

    Faust bounds each buffer in messages (``stream_buffer_maxsize``) and stops fetching a partition when its
    buffer is about full. A single event is about a KiB; an envelope up to 1 MB: counted in messages, a
    backlog of envelopes would fill a buffer with gigabytes. Here a message weighs ``ceil(bytes /``
    :data:`SLOT_BYTES` ``)`` slots, so a buffer holds about ``stream_buffer_maxsize`` KiB whatever the mix
    (single events weigh one slot each, as before). It overrides asyncio.Queue's subclass hooks (``_put``,
    ``_get``) and ``qsize``, which both asyncio (``full``) and mode's flow control (pressure) read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._weight = 0
        super().__init__(*args, **kwargs)

    @staticmethod
    def weigh(item: Any) -> int:
        value = getattr(getattr(item, "message", None), "value", None)
        return max(1, -(-len(value) // SLOT_BYTES)) if isinstance(value, bytes | bytearray) else 1

    def _put(self, item: Any) -> None:
        self._weight += self.weigh(item)
        super()._put(item)  # type: ignore[misc]

    def _get(self) -> Any:
        item = super()._get()  # type: ignore[misc]
        self._weight -= self.weigh(item)
        return item

    def qsize(self) -> int:
        return self._weight

    def clear(self) -> None:
        super().clear()
        self._weight = 0


class _TakeBound(int):
    """The ``max_`` of ``Stream.noack_take``: ``batch_size`` messages, or fewer once they hold ``max_bytes``.

    A batch is the unit of acknowledgement (its scores and changelog writes are awaited before it is acked,
    and a rebalance waits for the batch in hand), so it should hold about as many events whether they come
    one per message or 4,096 per envelope. Faust ends a take when ``len(buffer) >= max_``, a count of
    messages. Python asks the right operand's reflected method first when its type subclasses the left's, so
    that comparison calls :meth:`__le__` here, which also says "full" once the messages taken weigh
    ``max_bytes``. :meth:`count`, a stream processor placed before Faust's take buffer, weighs each message
    just before the take adds it; a take's first message (``taken == 1``) starts the count again.

    >>> bound = _TakeBound(3, max_bytes=100)
    >>> [bound.count(b"x" * 40) and 1 >= bound, bound.count(b"x" * 40) and 2 >= bound,
    ...  bound.count(b"x" * 40) and 3 >= bound, bound.count(b"x") and 1 >= bound]
    [False, False, True, False]
    """

    max_bytes: int
    _bytes: int
    _last: int

    def __new__(cls, messages: int, max_bytes: int) -> _TakeBound:
        bound = super().__new__(cls, messages)
        bound.max_bytes, bound._bytes, bound._last = max_bytes, 0, 0
        return bound

    def count(self, value: Any) -> Any:
        self._last = len(value) if isinstance(value, bytes | bytearray) else 0
        self._bytes += self._last
        return value

    def __le__(self, taken: object) -> bool:  # ``taken >= self``
        if not isinstance(taken, int):
            return NotImplemented
        if taken <= 1:
            self._bytes = self._last
        return taken >= int(self) or self._bytes >= self.max_bytes


class _FetchWaitThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with the fetch wait from ``settings.worker.fetch_max_wait_ms``.

    Faust builds its aiokafka consumer with a hard-coded ``fetch_max_wait_ms=1500``: a fetch on a quiet
    partition can hold events for 1.5 s before the agent sees them, a latency floor at any load
    (BENCHMARKS.md). aiokafka reads the value when the consumer starts, so it is set just after Faust
    creates the consumer and before it starts."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.app.conf.detector_fetch_max_wait_ms  # type: ignore[attr-defined]
        return consumer


def next_commit(acked: list[int], acked_index: set[int], gap: Any, committed: int | None) -> int | None:
    """The offset to commit for one partition, or None: Faust's ``Consumer._new_offset`` with its acked list
    kept free of duplicates and of offsets below ``committed`` (the next offset to read, Kafka's meaning).

    Faust moves the gaps it knows of (offsets its fetch loop never saw, and those the intake read back) into
    the acked list without asking whether they were acked as well; they are when the consumer seeks back after
    a rebalance and delivers them after all. Its next step takes the first run of consecutive numbers, and a
    duplicate ends a run: ``[7, 7, 8, 8, 9]`` commits 8, then 9, one offset a commit. In ``detector chaos`` one
    partition's commit crept about one offset per commit interval (2.8 s) with 1,658 acked entries for 1,091
    offsets, 350-400 offsets behind for minutes. ``acked`` (sorted, in place), ``acked_index`` and ``gap`` (an
    ``intervaltree.IntervalTree``) are the consumer's own; one offset just at ``committed`` may be missing, as
    in Faust.

    >>> from intervaltree import IntervalTree
    >>> gap = IntervalTree.from_tuples([(5, 8)])  # 5, 6, 7: seen missing, then delivered and acked after all
    >>> acked = [4, 5, 6, 7, 8, 9]
    >>> next_commit(acked, set(acked), gap, committed=4), acked, len(gap)
    (10, [], 0)
    >>> next_commit([12, 13], {12, 13}, IntervalTree(), committed=10)  # 10 and 11 missing: wait
    """
    if not acked:
        return None
    offsets = set(acked)
    if gap:
        max_offset = max(offsets)
        last = max_offset + 1
        for interval in gap.overlap(0, max_offset):
            offsets.update(range(interval.begin, interval.end))
            last = max(last, interval.end - 1)
        gap.chop(0, last)
    acked[:] = sorted(o for o in offsets if committed is None or o >= committed)
    if not acked or (committed and acked[0] - committed > 1):
        return None
    batch = next(consecutive_numbers(acked))
    del acked[:len(batch)]
    acked_index.difference_update(batch)
    return batch[-1] + 1


class _FetchWaitConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _FetchWaitThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: Any) -> int | None:
        return next_commit(self._acked[tp], self._acked_index[tp], self._gap[tp], self._committed_offset[tp])


class _FetchWaitTransport(faust_aiokafka.Transport):
    Consumer = _FetchWaitConsumer


class _FlowControl(FlowControlEvent):
    """Faust's flow control, except that resuming it empties the stream buffers only if it was suspended.

    mode's ``FlowControlEvent.resume()`` always empties every stream buffer, to drop what was put while the flow
    was suspended (a rebalance). Faust resumes it twice: when a recovery starts (suspended since the rebalance:
    that clear is kept) and when it ends, by which time it has resumed and seeked the stream partitions with its
    fetcher already running (it runs through the changelog recovery). Records fetched in that window were
    emptied out of the buffer with the consumer's read offset already past them, so nothing fetched them again
    (faust-streaming#596). With traffic flowing, the intake saw the hole at the next record and read it back;
    on a quiet topic there was no next record, and a restarted worker sat on events it never processed
    (``tests/integration/test_envelopes.py``, about 1 run in 15, before this class). Faust still empties the
    buffers itself when partitions are revoked (``flow_control.clear()``)."""

    def resume(self) -> None:
        suspended = self._suspend.is_set()
        self._suspend.clear()
        self._resume.set()
        if suspended:
            self.clear()


class WorkerApp(faust.App):
    """The worker's Faust app: its flow control (a resume empties the stream buffers only after a suspension),
    stream buffers bounded by weight (an envelope counts as many messages) and its consumer's fetch wait
    (``detector_fetch_max_wait_ms``). ``bench/groupby.py`` measures in it too, so that its numbers are the worker's."""

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return _FlowControl(loop=self.loop)

    def _new_transport(self) -> Any:
        return _FetchWaitTransport(self.conf.broker_consumer, self)

    def FlowControlQueue(self, maxsize: int | None = None, *, clear_on_resume: bool = False) -> ThrowableQueue:  # type: ignore[type-arg]  # noqa: N802 - Faust's name
        return _WeightedQueue(maxsize=maxsize, flow_control=self.flow_control, clear_on_resume=clear_on_resume)


class Intake:
    """A batch of ``api-calls`` messages to the outputs to publish, each partition in offset order, none lost.

    Each message is checked by an :class:`~detector.streaming.offsets.OffsetGuard` before the router gets it:
    one delivered twice is skipped, and the offsets of a hole (messages Faust fetched but lost before the agent
    got them) are read back from the broker (:func:`~detector.streaming.topics.read_range`) and routed first.
    ``messages``: Faust ``Message`` objects, or anything with their ``tp``, ``topic``, ``partition``,
    ``offset``, ``key``, ``value``, ``timestamp`` (seconds) and ``generation_id``.

    ``on_refilled(tp, offsets)`` is awaited after a hole's offsets were routed. The worker tells Faust's consumer
    they are done (:func:`_faust_gap`): Faust commits a partition only up to its first offset that was neither
    acked nor seen skipped, and a record read back is not a Faust message, so without it the partition's commit
    could stop at the hole for good.
    """

    def __init__(self, router: Router, kafka_config: dict[str, Any], group: str,
                 on_refilled: Callable[[Any, range], Awaitable[None]] | None = None) -> None:
        self.router, self.kafka_config, self.group = router, kafka_config, group
        self.on_refilled = on_refilled
        self.guard = OffsetGuard()
        self.metrics = router.metrics
        self._starts: tuple[int, dict[str, dict[int, int]]] = (-1, {})  # generation, topic -> partition -> offset

    async def route(self, messages: list[Any]) -> tuple[list[Output], dict[Any, int]]:
        """The outputs of ``messages`` and the last offset routed per partition. Awaits only to refill a hole,
        and once per generation to read where the group resumes (:meth:`start_of`)."""
        outs: list[Output] = []
        last_offsets: dict[Any, int] = {}
        for m in messages:
            generation = m.generation_id or 0
            if not self.guard.started(m.tp, generation):
                start = await self.start_of(m.topic, m.partition, generation)
                if start is not None:  # else: counted from this message, as before the committed offsets were read
                    self.guard.start(m.tp, start, generation)
            missing = self.guard.admit(m.tp, m.offset, generation)
            if missing is None:  # delivered twice in this generation
                self.metrics.redeliveries.inc()
                continue
            if missing:
                outs += await self.refill(m.tp, missing)
            outs += self.router.on_message(m.value, m.key, Source(m.topic, m.partition, m.offset, m.timestamp))
            last_offsets[m.tp] = m.offset
        return outs, last_offsets

    async def start_of(self, topic: str, partition: int, generation: int) -> int | None:
        """Where the group resumes ``partition`` in ``generation``: its committed offset, read from the broker once
        per generation and topic (see :mod:`detector.streaming.offsets`). None if it could not be read within
        :data:`START_TIMEOUT_S` (logged, counted in ``detector_offset_starts_total{result="unknown"}``): the
        partition is then counted from its first message, as it was before, and this generation does not ask
        again. The worker goes on either way: a broker that answers nothing would stop the batch anyway."""
        if self._starts[0] != generation:
            self._starts = (generation, {})
        starts = self._starts[1]
        known = starts.get(topic)
        if known is None or (known and partition not in known):  # a partition added since: read again
            try:
                starts[topic] = await _in_thread(START_TIMEOUT_S, committed_offsets, self.kafka_config, self.group,
                                                 topic, START_TIMEOUT_S)
                self.metrics.offset_starts.labels(result="read").inc()
            except Exception as exc:  # noqa: BLE001 - any failure: fall back to the first message, and say so
                starts[topic] = {}
                self.metrics.offset_starts.labels(result="unknown").inc()
                log.warning("%s: could not read group %s's committed offsets within %.0f s (%s); partitions start "
                            "at their first message in generation %d", topic, self.group, START_TIMEOUT_S,
                            _describe_error(exc), generation)
        return starts[topic].get(partition)

    async def refill(self, tp: Any, missing: range) -> list[Output]:
        """Read ``missing`` offsets of ``tp`` from the broker and route them. Raises if the broker cannot be read
        within :data:`REFILL_TIMEOUT_S`: the worker then stops before acking the batch, and its replacement
        reads from the last commit, which is before the hole (nothing after it was acked)."""
        records = await _in_thread(REFILL_TIMEOUT_S, read_range, self.kafka_config, tp.topic, tp.partition, missing,
                                   REFILL_TIMEOUT_S)
        self.metrics.offset_holes.labels(result="refilled" if records else "empty").inc()
        log.warning("%s[%d]: offsets %d..%d never reached the agent; read %d record(s) back from the broker",
                    tp.topic, tp.partition, missing.start, missing.stop - 1, len(records))
        outs: list[Output] = []
        for r in records:
            outs += self.router.on_message(r.value, r.key, Source(r.topic, r.partition, r.offset, r.timestamp / 1000))
        if self.on_refilled is not None:
            await self.on_refilled(tp, missing)
        return outs


def _app_state(app: Any) -> str:
    """The app-wide gates every fetched message passes (Faust's ``Conductor.on_message``): its flow control and
    its producer buffer, and the agents' stream buffers (messages waiting for an agent)."""
    flow = getattr(app, "flow_control", None)
    buffer = getattr(getattr(app, "producer", None), "buffer", None)
    queues = [f"{q.qsize()}/{q.maxsize}" for q in getattr(flow, "_queues", ())]
    return (f"app flow control {'on' if flow is not None and flow.is_active() else 'off'}, producer buffer "
            f"{buffer.size if buffer is not None else None}, stream buffers {', '.join(queues) or 'none'}")


def _consumer_state(consumer: Any, held: list[Any]) -> str:
    """What Faust's consumer says of the partitions it holds, for a log line when their commit does not move: is
    its flow on, which partitions are paused or not active, and per partition the read and committed offsets and
    the high-water mark of its last fetch (None: it never fetched). Private attributes, read defensively."""
    paused: set[Any] = getattr(consumer, "_paused_partitions", set())
    active = getattr(consumer, "_active_partitions", None)
    read = getattr(consumer, "_read_offset", {})
    committed = getattr(consumer, "_committed_offset", {})
    parts = [f"{tp.partition}: read {read.get(tp)}, committed {committed.get(tp)}, highwater {consumer.highwater(tp)}"
             f"{', paused' if tp in paused else ''}{', not active' if active is not None and tp not in active else ''}"
             for tp in held]
    return f"consumer flow {'on' if getattr(consumer, 'flow_active', None) else 'off'}; " + "; ".join(parts)


async def _in_thread(timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a thread, given up on (:class:`TimeoutError`) 5 s after ``timeout_s``. The kafka-python
    calls the intake makes take a timeout, but some of its blocking steps (a metadata fetch, finding the group
    coordinator) wait without one; the worker must not wait with them. A thread given up on is left to finish
    on its own."""
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    done, _ = await asyncio.wait({call}, timeout=timeout_s + 5)
    if not done:
        call.cancel()
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout_s + 5:.0f} s")
    return call.result()


def _faust_gap(app: faust.App) -> Callable[[Any, range], Awaitable[None]]:
    """Record refilled offsets in the Faust consumer's gaps (what its fetch loop does for offsets it never sees),
    so its commit passes them once the batch that routed them is acked. Faust's ``_add_gap`` is private; it
    takes the last offset inclusive."""
    async def add(tp: Any, offsets: range) -> None:
        await app.consumer._add_gap(tp, offsets.start, offsets.stop - 1)  # type: ignore[attr-defined]
    return add


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def own_offsets(consumer: Any, held: list[Any]) -> dict[Any, tuple[int | None, int | None]]:
    """Faust's own record of what the consumer committed on each of ``held`` and the last fetch's high-water mark
    (no round trip). The record is private to Faust: a release that renamed it makes this raise."""
    return {tp: (consumer._committed_offset.get(tp), consumer.highwater(tp)) for tp in held}


async def look_at_commits(consumer: Any, held: list[Any], timeout_s: float
                          ) -> dict[Any, tuple[int | None, int | None]] | None:
    """Where the commit and the end of each of ``held`` are, for the commit watch: the consumer's own offsets, and
    the broker's first and end offsets where it knows none (:func:`health.positions`); only the consumer's own if
    the broker does not answer within ``timeout_s``; None if even those cannot be read. It never raises: a timer
    that raised would stop the worker, over a health check."""
    try:
        return await asyncio.wait_for(positions(
            held, consumer._committed_offset.get, consumer.highwater, consumer.earliest_offsets, consumer.highwaters),
            timeout_s)
    except Exception as exc:  # noqa: BLE001 - the broker did not answer: what the consumer knows
        log.debug("commit watch: broker offsets unknown (%s)", _describe_error(exc))
    try:
        return own_offsets(consumer, held)
    except Exception as exc:  # noqa: BLE001
        log.debug("commit watch: the consumer's own offsets unreadable (%s)", _describe_error(exc))
        return None


class WorkerError(RuntimeError):
    """The worker stopped because of an error (see its log); the message is one line."""


def broker_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """Faust credentials for ``kafka.security_protocol`` (None for PLAINTEXT). Never logs the password.

    >>> broker_credentials(KafkaSettings()) is None
    True
    >>> from detector.settings import Secret
    >>> broker_credentials(KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
    ...                                  sasl_username="det", sasl_password=Secret("hunter2")))
    <SASLCredentials: username=det>
    """
    protocol = kafka_client_config(kafka)["security_protocol"]  # validates the protocol name
    if protocol == "PLAINTEXT":
        return None
    context = _ssl_context(kafka) if protocol.endswith("SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password.reveal(),
                                 ssl_context=context, mechanism=kafka.sasl_mechanism)


def _ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_cafile or None)
    if kafka.ssl_certfile:  # mutual TLS
        context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile or None)
    return context


def create_app(settings: Settings, detector: DetectorLike | None = None) -> faust.App:
    """A Faust app for ``settings`` around ``detector`` (default: ``Detector(settings.detection)``).

    Opens no connection: that happens when a worker starts the app. The worker's counters are served as
    JSON at :data:`STATS_PATH` on ``settings.worker.web_port`` (0 disables the web server); its Prometheus
    metrics (:mod:`detector.metrics`) are served by :func:`run_worker` on ``settings.worker.metrics_port``.

    >>> app = create_app(Settings())
    >>> app.conf.id, sorted(app.agents)[0].rsplit(".", 1)[-1]
    ('distill-detector', 'apply_labels')
    """
    return _build(settings, detector)[0]


def warm_up(follower: Follower, router: Router, lookback_s: float, max_s: float, dead: list[Output],
            clock: Callable[[], float] = time.monotonic) -> dict[str, int]:
    """The warm start: fold the last ``lookback_s`` of ``cluster-signals`` into the router's detector before the
    worker joins its group, its own previous run's signals included (a new run has a new worker id).

    Account state comes back from the changelog, but the cross-account state lives only in memory: the content
    index, the cluster links and windows, the blocked clusters, the caught accounts' prompts, the verdicts the
    fusion model learned. ``cluster-signals`` holds what every event did to it. Folding it in before the
    partitions are assigned treats every account as another worker's, as on a worker that takes over partitions
    (:meth:`~detector.detection.Detector.apply_signals`); restored accounts then count their own events again.
    The events after the last commit were signalled by the old run and are read again, so they count twice in
    the clusters' windows (seconds of traffic).

    Stops after ``max_s`` seconds; the follower then goes on from where it stopped while the worker runs. Never
    raises: if the topic cannot be read, the worker starts as before, cold, and follows from a minute before.
    The dead letters of messages that do not decode go to ``dead``, for the worker to send once it runs. Logs
    its progress every :data:`WARMUP_PROGRESS_S`; returns ``messages``, ``signals``, ``invalid`` and ``left``.
    """
    start = clock()
    applied, out = router.stats["signals_applied"], {"messages": 0, "signals": 0, "invalid": 0, "left": 0}
    try:
        follower.open(lookback_s)
        total = left = follower.left()
        log.info("warm start: folding in %d messages of %s (the last %g s)", total, follower.topic, lookback_s)
        shown = start
        while left > 0 and clock() - start < max_s:
            for r in follower.poll(timeout_ms=200):
                out["messages"] += 1
                letter = router.on_signals(r.value, r.key, Source(r.topic, r.partition, r.offset))
                if letter is not None:
                    out["invalid"] += 1
                    dead.append(letter)
            left = follower.left()
            if clock() - shown >= WARMUP_PROGRESS_S:
                shown = clock()
                log.info("warm start: %d of %d messages, %d signals folded in (%.0f s)", total - left, total,
                         router.stats["signals_applied"] - applied, shown - start)
    except Exception as exc:  # noqa: BLE001 - a cold start is what the worker did before the warm start
        log.error("warm start: cannot read %s (%s); starting cold: the clusters are rebuilt from the stream",
                  follower.topic, _describe_error(exc))
        follower.close()
        return out
    out["signals"], out["left"] = router.stats["signals_applied"] - applied, left
    router.stats["warmup_signals"] = out["signals"]
    if out["invalid"]:
        log.warning("warm start: %d messages of %s did not decode; dead-lettered once the worker runs",
                    out["invalid"], follower.topic)
    if left:
        log.warning("warm start: stopped after %.0f s (DETECTOR_WORKER__SIGNALS_WARMUP_MAX_S) with %d messages "
                    "left; they are folded in while the worker runs", max_s, left)
    log.info("warm start: %d signals from %d messages folded in, in %.1f s", out["signals"], out["messages"],
             clock() - start)
    return out


def _build(settings: Settings, detector: DetectorLike | None
           ) -> tuple[faust.App, Router, Callable[[], dict[str, int]] | None]:
    w, t = settings.worker, settings.topics
    det = detector if detector is not None else Detector(settings.detection, track_changes=True,
                                                         key_secret=settings.fingerprint_key.reveal().encode(),
                                                         share_clusters=w.share_clusters)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    router = Router(det, settings, worker_id=worker_id)
    # Account state survives restarts only with the real detector (a test double has no snapshots).
    durable = det if isinstance(det, Detector) else None
    metrics = router.metrics
    app = WorkerApp(
        w.app_id,
        broker=[f"kafka://{host}" for host in kafka_client_config(settings.kafka)["bootstrap_servers"]],
        broker_credentials=broker_credentials(settings.kafka),
        store="memory://",
        # No standby copies: after recovery the table then holds exactly the assigned partitions, which is
        # what restore_accounts() takes in (the memory store reads the changelog from its start anyway).
        table_standby_replicas=0,
        broker_session_timeout=w.session_timeout_s,
        broker_heartbeat_interval=max(0.5, w.session_timeout_s / 5),
        datadir=w.data_dir,
        web_enabled=w.web_port != 0,
        web_port=w.web_port or 6066,
        topic_partitions=t.partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        autodiscover=False,
        # Faust's defaults (1 MiB per partition and fetch, a 4096-event stream buffer) starve a take() of
        # 2,000: the buffer hits "high pressure", the partition is paused, and the fetcher then long-polls
        # only idle partitions for up to a second. With these a 16k-event backlog drains about twice as fast.
        consumer_max_fetch_size=CONSUMER_MAX_FETCH_BYTES,
        stream_buffer_maxsize=max(4096, 4 * w.batch_size),
    )
    app.conf.detector_fetch_max_wait_ms = w.fetch_max_wait_ms  # type: ignore[attr-defined]  # _FetchWaitThread
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}  # bytes in, bytes out
    events_topic = app.topic(t.api_calls, **raw)
    labels_topic = app.topic(t.analyst_labels, **raw)
    destinations = {
        t.risk_scores: app.topic(t.risk_scores, partitions=t.partitions, compacting=True, **raw),
        t.dead_letters: app.topic(t.dead_letters, **raw),
        t.blocked_keys: app.topic(t.blocked_keys, partitions=t.partitions, compacting=True, **raw),
        t.cluster_signals: app.topic(t.cluster_signals, partitions=1, **raw),
    }

    # Account state, keyed by account id, co-partitioned with api-calls: its changelog is what a restarted
    # (or newly assigned) worker recovers from. Written once per changed account per batch.
    accounts = app.Table(ACCOUNT_TABLE, partitions=t.partitions, key_type=bytes, value_type=bytes)
    # Faust derives a table's codecs from its types ("json" for bytes) and uses them when it recovers; the
    # snapshots are raw bytes (detection.dump_account). Set before the changelog topic is first built.
    accounts.key_serializer = accounts.value_serializer = "raw"  # type: ignore[attr-defined]
    changelog = accounts.changelog_topic
    destinations[changelog.get_topic_name()] = changelog

    async def send(out: Output) -> Awaitable[Any]:
        # Topic.send returns once the message is in the producer's buffer; the awaitable is its delivery.
        return await destinations[out.topic].send(key=out.key, value=out.value, partition=out.partition)

    def take_changes() -> list[Output]:
        """The changelog messages for the accounts the detector changed since the last call (synchronous:
        call it right after the events that made the changes, before any await).

        Only for partitions this worker holds now: an account whose partition was revoked mid-batch is
        dropped instead (its new owner recovers it from the changelog and is redelivered the events).
        The caller sends them like risk-score records and awaits their delivery before acknowledging the
        batch, so the changelog holds a batch's effects before the batch counts as consumed. (Not through
        Table.send_changelog: Faust's send buffer may still hold messages when its commit has flushed.)"""
        if durable is None:
            return []
        held = {tp.partition for tp in app.consumer.assignment() if tp.topic == t.api_calls}
        lost, changes = set(), []
        for aid, shard, blob in durable.drain_changes():
            key = aid.encode()
            if shard < 0:  # known only from an analyst label: goes where its events would go
                shard = app.producer.key_partition(t.api_calls, key).partition
            if shard in held:
                changes.append(Output(changelog.get_topic_name(), key, blob, shard))
            else:
                lost.add(shard)
        if lost:
            durable.drop_shards(lost)
        return changes

    @accounts.on_recover
    async def restore_accounts() -> None:
        # Called when recovery has filled the table with the assigned partitions, before their streams resume.
        if durable is None:
            return
        restored = durable.restore((k.decode(), v) for k, v in accounts.data.items())
        log.info("restored %d accounts from the %s changelog", restored, ACCOUNT_TABLE)
        # The table keeps its copy of every snapshot (memory per account counts it twice): Faust resumes
        # reading a partition it keeps across a rebalance where it stopped, so an emptied table would
        # miss the accounts of that partition at the next restore (make chaos lost events that way).

    def drop_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Revoked partitions may go to another worker: forget their accounts, and those known only from
        # a label (shard -1); whatever comes back is restored from the changelog after the rebalance.
        revoked = args[0] if args else kwargs.get("revoked", ())
        if durable is not None:
            durable.drop_shards({tp.partition for tp in revoked if tp.topic == t.api_calls} | {-1})

    app.on_partitions_revoked.connect(drop_revoked)

    intake = Intake(router, kafka_client_config(settings.kafka), w.app_id, on_refilled=_faust_gap(app))

    @app.agent(events_topic, supervisor_strategy=CrashingSupervisor)
    async def route_events(stream: faust.StreamT[bytes]) -> None:
        # noack_take yields *events* (partition and offset included) and leaves acking to us: take() and
        # take_events() ack the whole batch in a ``finally``, even when publishing it failed.
        # A batch ends at batch_size messages or once its messages weigh batch_max_bytes (envelopes).
        bound = _TakeBound(w.batch_size, w.batch_max_bytes)
        stream.add_processor(bound.count)  # before noack_take adds its own: runs first
        batches = cast(faust.Stream[bytes], stream).noack_take(bound, within=w.batch_within_s)
        async for batch in batches:
            started = time.perf_counter()
            # A rebalance (which drops and restores accounts) waits for the batch in hand to be acked, so it
            # never runs between a batch's effects and their changelog writes, even across a refill's await.
            outs, last_offsets = await intake.route([event.message for event in batch])  # type: ignore[attr-defined]
            outs += router.take_key_blocks()
            outs += take_changes()
            outs += router.take_signals()
            deliveries = [await send(out) for out in outs]
            await asyncio.gather(*deliveries)
            done = time.time()
            for event in batch:
                await stream.ack(event)  # type: ignore[arg-type]
                metrics.message_latency.observe(max(0.0, done - event.message.timestamp))  # type: ignore[attr-defined]
            metrics.batch_seconds.observe(time.perf_counter() - started)
            _record_lag(app, metrics, last_offsets)

    @app.agent(labels_topic, supervisor_strategy=CrashingSupervisor)
    async def apply_labels(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():  # acked when the next one is taken, after its delivery
            m = event.message
            out = router.on_label(m.value, m.key, Source(m.topic, m.partition, m.offset))
            outs = (([out] if out is not None else []) + router.take_key_blocks() + take_changes()
                    + router.take_signals())
            await asyncio.gather(*[await send(o) for o in outs])

    warm: Callable[[], dict[str, int]] | None = None
    if w.share_clusters and durable is not None:
        signals = Follower(kafka_client_config(settings.kafka), t.cluster_signals)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-signals")  # one thread: kafka-python
        held: list[Output] = []  # the warm start's dead letters, sent once the worker runs

        def warm() -> dict[str, int]:
            return warm_up(signals, router, w.signals_lookback_s, w.signals_warmup_max_s, held)

        @app.task
        async def follow_signals() -> None:
            # The other workers' cluster signals, from where the warm start (warm_up) left off, else from a minute
            # before. Runs on the agents' event loop, between their awaits, so the detector is never used by two
            # coroutines at once.
            loop = asyncio.get_running_loop()
            for letter in held:
                await send(letter)
            held.clear()
            try:
                while True:
                    try:
                        if not signals.is_open:
                            await loop.run_in_executor(reader, signals.open)
                        log.info("following %s as worker %s", t.cluster_signals, worker_id)
                        while True:
                            records = await loop.run_in_executor(reader, signals.poll)
                            outs = [out for r in records if (out := router.on_signals(
                                r.value, r.key, Source(r.topic, r.partition, r.offset, r.timestamp / 1000)))
                                is not None]
                            for out in outs:
                                await send(out)
                    except Exception as exc:  # noqa: BLE001 - the worker goes on with the clusters of its own accounts
                        log.error("cannot follow %s (%s); retrying in %.0f s: until then this worker's clusters miss "
                                  "the other workers' events", t.cluster_signals, _describe_error(exc), SIGNALS_RETRY_S)
                        await loop.run_in_executor(reader, signals.close)
                        await asyncio.sleep(SIGNALS_RETRY_S)
            finally:
                reader.submit(signals.close)
                reader.shutdown(wait=False)

    watch = CommitWatch(w.commit_stall_s)
    state_logged = [0.0]  # when the consumer's state was last logged (monotonic)
    unreadable_logged = [0.0]  # when unreadable offsets were last logged (monotonic)

    def held_api_calls(consumer: Any) -> list[Any]:
        """The ``api-calls`` partitions the consumer holds; the watch forgets the others (revoked)."""
        held = [tp for tp in consumer.assignment() if tp.topic == t.api_calls]
        watch.keep(held)
        return held

    @app.timer(HEALTH_INTERVAL_S)
    async def watch_commits() -> None:
        # The consumer's own offsets; the broker's first and end offsets where it knows none (health.positions).
        consumer = app.consumer
        held = held_api_calls(consumer)
        seen = await look_at_commits(consumer, held, HEALTH_INTERVAL_S)
        if seen is None:
            if time.monotonic() - unreadable_logged[0] >= CONSUMER_STATE_LOG_S:
                unreadable_logged[0] = time.monotonic()
                log.warning("commit watch: the consumer's offsets are unreadable (a Faust upgrade?); /healthz cannot "
                            "see a stalled commit until they are")
            return
        for tp, (committed, highwater) in seen.items():
            watch.observe(tp, committed, highwater)
        behind = max(watch.behind().values(), default=0.0)
        if behind >= CONSUMER_STATE_LOG_S and time.monotonic() - state_logged[0] >= CONSUMER_STATE_LOG_S:
            state_logged[0] = time.monotonic()
            try:  # private attributes of Faust's: a change there must not stop the worker
                state = f"{_consumer_state(consumer, held)}; {_app_state(app)}"
            except Exception as exc:  # noqa: BLE001
                state = f"consumer state unreadable ({_describe_error(exc)})"
            log.warning("commit watch: a partition with events to read has not been committed for %.0f s; %s",
                        behind, state)
        metrics.commit_stalled.set(behind)

    @app.page(HEALTH_PATH)
    async def health(web: Any, request: Any) -> Any:
        # The timer's last look can be up to HEALTH_INTERVAL_S old: a commit made since would count as none (a
        # caught-up worker once answered 503 with its commit 1,584 offsets behind what the broker held). So look
        # again at what the consumer itself knows (no round trip), where it knows both offsets.
        # (Faust's private record: should a Faust release change it, the answer is the timer's last look, not a 500
        # that a liveness probe would take for a dead worker.)
        try:
            consumer = app.consumer
            for tp, (committed, highwater) in own_offsets(consumer, held_api_calls(consumer)).items():
                if committed is not None and highwater is not None:
                    watch.observe(tp, committed, highwater)
        except Exception as exc:  # noqa: BLE001
            log.debug("health: consumer offsets unreadable (%s); answering from the last look", _describe_error(exc))
        stalled = watch.report()
        if stalled:
            return web.json({"status": "stalled", "commit_stall_s": w.commit_stall_s, "partitions": stalled},
                            status=503)
        return web.json({"status": "ok"})

    @app.page(STATS_PATH)
    async def stats(web: Any, request: Any) -> Any:
        return web.json({**router.stats, "invalid_by_reason": router.invalid_by_reason,
                         "detector": dict(getattr(det, "stats", {}))})

    last: dict[str, int] = {}

    @app.timer(STATS_LOG_INTERVAL_S)
    async def log_stats() -> None:
        if router.stats != last:
            last.update(router.stats)
            log.info("worker: %s", router.summary())

    @app.timer(GAUGE_INTERVAL_S)
    async def refresh_gauges() -> None:
        router.refresh_gauges()

    def count_rebalance(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        metrics.rebalances.inc()

    app.on_partitions_assigned.connect(count_rebalance)

    return app, router, warm


def _record_lag(app: faust.App, metrics: Metrics, last_offsets: dict[Any, int]) -> None:
    """Set the lag gauge of each partition in a batch: its high-water mark minus the next offset to read."""
    for tp, offset in last_offsets.items():
        try:
            highwater = app.consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - a gauge; not worth failing a batch over
            continue
        if highwater is not None:
            metrics.consumer_lag.labels(partition=str(tp.partition)).set(max(0, highwater - offset - 1))


def run_worker(settings: Settings, detector: DetectorLike | None = None) -> None:
    """Create the topics if needed, then run the worker until SIGTERM or SIGINT (a clean stop returns).

    Runs Faust's worker programmatically (``faust.Worker``, not ``app.main()``, which would parse
    ``sys.argv``) on a fresh event loop, and leaves logging to the caller (the CLI configures it). Serves
    ``/metrics`` on ``settings.worker.metrics_port`` (0: not served). Raises :class:`WorkerError` when
    the worker stops because of an error.
    """
    ensure_topics(settings)
    Path(settings.worker.data_dir).mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app, router, warm = _build(settings, detector)
    if settings.worker.metrics_port:
        router.metrics.serve(settings.worker.metrics_port)
    router.metrics.up.set(1)
    if warm is not None and settings.worker.signals_lookback_s > 0:
        warm()  # before the worker joins its group (OPERATIONS.md, What is durable)
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, quiet=True, override_logging=False,
                          redirect_stdouts=False)
    worker.spinner = None  # logs "Ready" instead of drawing on the terminal
    log.info("worker %s: %s -> %s (partitions %d, batch %d/%.2fs, web port %s)", settings.worker.app_id,
             settings.topics.api_calls, settings.topics.risk_scores, settings.topics.partitions,
             settings.worker.batch_size, settings.worker.batch_within_s, settings.worker.web_port or "off")
    try:
        worker.execute_from_commandline()  # always ends in SystemExit
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise WorkerError(f"the worker stopped with exit code {exc.code}; see the log above") from None
    finally:
        router.metrics.up.set(0)
        log.info("worker stopped: %s", router.summary())
