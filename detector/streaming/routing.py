"""Routing: one consumed message in, the messages to publish out. Plain Python; no Faust, no Kafka.

The worker's agents (:mod:`detector.streaming.app`) only move bytes between Kafka and a :class:`Router`;
every decision is made here or in the :class:`~detector.detection.Detector`::

    api-calls ──▶ decode_message ─┬─ event ──────────────────▶ Detector.process ──record──▶ risk-scores
                      │           └─ envelope ─▶ each event ──▲       │ raised, or an invalid record
                      │ invalid                  │ invalid, or        ▼          (key = account_id)
                      ▼                          ▼ wrong partition  api-calls.dlq ("internal")
                 api-calls.dlq (reason)   api-calls.dlq (reason, envelope_index)

    analyst-labels ──▶ decode_label ──valid──▶ Detector.apply_label ──record──▶ risk-scores
                           │ invalid / raised
                           ▼
                      api-calls.dlq

    Detector.drain_signals ──▶ cluster-signals ──▶ (every other worker) decode_batch ──▶ Detector.apply_signals
                                                          │ invalid / raised
                                                          ▼
                                                     api-calls.dlq

Nothing is ever dropped silently: each input is either handed to the detector or dead-lettered with a
reason from a closed set (``schemas/dead_letter.v1.json``), and :attr:`Router.stats` counts both. The
original bytes travel to the dead-letter queue base64-encoded and truncated to
:data:`MAX_PAYLOAD_B64` characters; events carry fingerprints, never prompt text.

A message is a single event or an envelope of events (:mod:`detector.envelope`): each event of an envelope is
checked, dead-lettered or processed on its own, and counted like a single event.

>>> from detector.detection import Detector
>>> from detector.settings import Settings
>>> router = Router(Detector(), Settings(), clock=lambda: 1775000000.0)
>>> [out] = router.on_message(b'{"ts": 1', key=b"acct_1", source=Source("api-calls", 0, 7))
>>> out.topic, out.key, orjson.loads(out.value)["reason"], orjson.loads(out.value)["source_offset"]
('api-calls.dlq', b'acct_1', 'not_json', 7)
>>> router.stats["events_invalid"], router.stats["dead_letters"], router.invalid_by_reason
(1, 1, {'not_json': 1})
"""

from __future__ import annotations

import base64
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from detector.envelope import Envelope, InvalidEnvelope, account_partition, decode_message, position
from detector.metrics import Metrics
from detector.schemas import KEY_BLOCK_SCHEMA, LABEL_SCHEMA, SCORE_SCHEMA, InvalidEvent, decode, validate
from detector.settings import Settings
from detector.signals import decode_batch, encode_batches

log = logging.getLogger(__name__)

#: Dead-letter reason for a valid input the detector could not handle (a bug, not bad input).
INTERNAL = "internal"
#: At most this many base64 characters of the original payload go to the dead-letter queue (6 KiB).
MAX_PAYLOAD_B64 = 6 * 1024
_MAX_PAYLOAD_RAW = MAX_PAYLOAD_B64 // 4 * 3  # 4608 raw bytes encode to exactly 6144 characters
_MAX_DETAIL = 512
#: The invalid share is judged over windows of this many inputs (smaller windows would alert on noise).
INVALID_RATIO_WINDOW = 1000


class DetectorLike(Protocol):
    """What the router needs from :class:`detector.detection.Detector`."""

    def process(self, event: dict[str, Any], emitted_at: int | None = None,
                position: tuple[int, int] | None = None) -> dict[str, Any] | None: ...

    def apply_label(self, label: dict[str, Any], emitted_at: int | None = None) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Source:
    """Where a consumed message came from (recorded in its dead letter)."""

    topic: str | None
    partition: int | None
    offset: int | None
    published_at: float | None = None  # the message's Kafka timestamp (epoch seconds), when known


@dataclass(frozen=True)
class Output:
    """A message to publish: ``topic`` is a topic *name* from :class:`~detector.settings.TopicSettings`."""

    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone (an evicted account's changelog entry)
    partition: int | None = None  # None: by key, as the producer's partitioner decides


def decode_label(raw: bytes, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """Bytes to a valid analyst label (``schemas/analyst_label.v1.json``), or :class:`InvalidEvent`.

    >>> decode_label(b'{"schema_version": 1, "account_id": "a1", "label": "attack", "analyst": "kim",'
    ...              b' "ts": 1775000000000}')["label"]
    'attack'
    >>> decode_label(b'{"schema_version": 1, "account_id": "a1", "label": "maybe", "analyst": "kim",'
    ...              b' "ts": 1775000000000}')
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: data.label must be one of ['attack', 'benign']
    """
    return decode(LABEL_SCHEMA, raw, max_bytes)


def dead_letter(reason: str, detail: str, raw: bytes, source: Source, received_at: int,
                envelope_index: int | None = None) -> dict[str, Any]:
    """The dead-letter record (``schemas/dead_letter.v1.json``) for ``raw``; the payload is truncated.
    ``envelope_index``: the place of the rejected event in its envelope (``raw`` is then that event alone).

    >>> rec = dead_letter("too_large", "70000 bytes", b"x" * 70_000, Source("api-calls", 2, 9), 1775000000000)
    >>> len(rec["payload_b64"]), rec["payload_bytes"], rec["source_partition"], "envelope_index" in rec
    (6144, 70000, 2, False)
    """
    rec = {
        "schema_version": 1,
        "reason": reason,
        "detail": detail[:_MAX_DETAIL],
        "source_topic": source.topic,
        "source_partition": source.partition,
        "source_offset": source.offset,
        "received_at": received_at,
        "payload_b64": base64.b64encode(raw[:_MAX_PAYLOAD_RAW]).decode("ascii"),
        "payload_bytes": len(raw),
    }
    if envelope_index is not None:
        rec["envelope_index"] = envelope_index
    return rec


class Router:
    """Decodes each consumed message, hands valid ones to the detector and says where the result goes.

    One instance per worker, called from one event loop (never concurrently). ``clock`` (seconds since
    the epoch) stamps ``received_at`` on dead letters. Costs one decode and, for records, one schema
    check of the outgoing record (a few microseconds) on top of the detector's own work. Counts go to
    :attr:`stats` (served as JSON by the worker) and to ``metrics`` (:class:`detector.metrics.Metrics`,
    a private registry unless one is given).

    The share of invalid inputs is judged over windows of :data:`INVALID_RATIO_WINDOW` inputs; above
    ``settings.worker.invalid_ratio_limit`` a warning is logged and ``stats["invalid_ratio_alerts"]``
    counted, so a producer shipping garbage is noticed instead of quietly filling the dead-letter queue.

    A detector that raises on a valid event costs that one event (dead-lettered as ``internal``, with the
    exception logged), never the stream:

    >>> class Broken:
    ...     def process(self, event, emitted_at=None, position=None): raise KeyError("billing")
    ...     def apply_label(self, label, emitted_at=None): return None
    >>> from detector.gateway import make_event
    >>> ev = make_event(account_id="a1", ts=1775000000000, api_key_id="k", model="m", endpoint="/v1/messages",
    ...                 status=200, input_tokens=1, output_tokens=1, latency_ms=1, prompt_text="hi",
    ...                 response={"stop_reason": "end_turn"}, fingerprint_key=b"k")
    >>> router = Router(Broken(), Settings())
    >>> dl = orjson.loads(router.on_message(orjson.dumps(ev), b"a1", Source("api-calls", 0, 8))[0].value)
    >>> dl["reason"], dl["detail"], router.stats["events_internal"]
    ('internal', "KeyError: 'billing'", 1)

    Positions. The detector skips a redelivered event by its position (``(partition, seq)``, see
    :func:`detector.envelope.position`): ``offset * 4096 + i`` for event ``i`` of an envelope, ``offset * 4096``
    for a single event. ``settings.topics.partitions`` must be the partition count of ``api-calls`` (it
    already must, for the account-state changelog): an envelope's event whose account belongs to another
    partition is dead-lettered as ``wrong_partition``, never counted by a worker that may not hold its
    account. Single events are not checked: each account's single events are on one partition whatever the
    producer's partitioner, which is all the worker needs of them.
    """

    def __init__(self, detector: DetectorLike, settings: Settings, *,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 worker_id: str = "worker") -> None:
        self.detector = detector
        self.worker_id = worker_id  # stamped on this worker's cluster signals, so it skips its own
        self._worker_key = worker_id.encode()
        self.signals_topic = settings.topics.cluster_signals
        self.dead_letters_topic = settings.topics.dead_letters
        self.risk_scores_topic = settings.topics.risk_scores
        self.blocked_keys_topic = settings.topics.blocked_keys
        self.max_bytes = settings.worker.max_event_bytes
        self.partitions = settings.topics.partitions
        self.invalid_ratio_limit = settings.worker.invalid_ratio_limit
        self.clock = clock
        self.stats = {
            "messages": 0,  # read from api-calls: single events and envelopes
            "envelopes": 0,  # of them envelopes, well-formed or not
            "envelopes_invalid": 0,  # envelopes refused whole (each counted as one invalid event too)
            "events": 0,  # single events, events in envelopes, and envelopes refused whole
            "events_processed": 0,  # valid and handled by the detector
            "events_invalid": 0,  # rejected by decode_message, or on the wrong partition
            "events_internal": 0,  # valid, but the detector raised (dead-lettered as "internal")
            "labels": 0,
            "labels_applied": 0,
            "labels_invalid": 0,  # invalid, or the detector raised on it
            "records": 0,  # published to risk-scores
            "key_blocks": 0,  # published to blocked-keys
            "dead_letters": 0,
            "invalid_ratio_alerts": 0,
            "signals_published": 0,  # cluster signals of this worker's events (detector.signals)
            "signals_applied": 0,  # other workers' cluster signals folded in (the warm start's included)
            "warmup_signals": 0,  # of them, folded in by the warm start (detector.streaming.app.warm_up)
            "signal_batches_invalid": 0,  # cluster-signals messages dead-lettered
        }
        self.invalid_by_reason: dict[str, int] = {}
        self._window_seen = 0
        self._window_bad = 0
        self._blocked_seen = 0
        self._learned_seen = 0
        self._detector_seen: dict[str, int] = {}
        m = self.metrics = metrics if metrics is not None else Metrics()
        self._m_valid, self._m_invalid = m.events.labels(result="valid"), m.events.labels(result="invalid")
        self._m_envelopes = {ok: m.envelopes.labels(result="valid" if ok else "invalid") for ok in (True, False)}

    # ----------------------------------------------------------------------------------------------
    def on_message(self, raw: bytes | None, key: bytes | None, source: Source) -> list[Output]:
        """Route one message of ``api-calls``, a single event or an envelope: its risk scores and dead letters.

        Counts each event of an envelope as one event (an envelope refused whole as one invalid event)."""
        raw = raw or b""  # a null value (tombstone) is not JSON, and is dead-lettered as such
        self.stats["messages"] += 1
        try:
            message = decode_message(raw, self.max_bytes)
        except InvalidEvent as exc:
            if isinstance(exc, InvalidEnvelope):
                self._count_envelope(ok=False)
            return [self._invalid(exc.reason, exc.detail, raw, key, source)]
        if isinstance(message, Envelope):
            self._count_envelope(ok=True)
            return self._on_envelope(message, raw, key, source)
        pos = None if source.partition is None or source.offset is None else position(source.partition, source.offset)
        out = self._process(message, pos, lambda: raw, key, source)
        return [] if out is None else [out]

    def _on_envelope(self, envelope: Envelope, raw: bytes, key: bytes | None, source: Source) -> list[Output]:
        outs = []
        partition, offset = source.partition, source.offset
        for i, item in enumerate(envelope.events):
            error = envelope.invalid.get(i)
            if error is None and partition is not None:
                home = account_partition(item["account_id"], self.partitions)
                if home != partition:
                    error = InvalidEvent("wrong_partition", f"account {item['account_id']} belongs to partition "
                                         f"{home} of {self.partitions} (murmur2 of account_id); the envelope is on "
                                         f"{partition}")
            if error is not None:
                outs.append(self._invalid(error.reason, error.detail, _item_bytes(item, raw), key, source, i))
                continue
            pos = None if partition is None or offset is None else position(partition, offset, i)
            out = self._process(item, pos, functools.partial(_item_bytes, item, raw), key, source, i)
            if out is not None:
                outs.append(out)
        return outs

    def _process(self, event: dict[str, Any], pos: tuple[int, int] | None, payload: Callable[[], bytes],
                 key: bytes | None, source: Source, index: int | None = None) -> Output | None:
        """Hand a valid event to the detector; its record, or a dead letter if the detector raised."""
        self.stats["events"] += 1
        self._m_valid.inc()
        try:
            record = self.detector.process(event, position=pos)
            if record is not None:
                validate(SCORE_SCHEMA, record)
        except Exception as exc:  # noqa: BLE001 - one event must not stop the stream; see the log
            self.stats["events_internal"] += 1
            self._window(bad=True)
            log.exception("detector failed on event %s of account %s at %s[%s]@%s%s; dead-lettered as %r",
                          event.get("event_id"), event.get("account_id"), source.topic, source.partition,
                          source.offset, "" if index is None else f" #{index}", INTERNAL)
            return self._dead(INTERNAL, _describe(exc), payload(), key, source, index)
        self.stats["events_processed"] += 1
        self.metrics.events_scored.inc()
        self._window(bad=False)
        return self._score(record, source.published_at)

    def _invalid(self, reason: str, detail: str, raw: bytes, key: bytes | None, source: Source,
                 index: int | None = None) -> Output:
        self.stats["events"] += 1
        self.stats["events_invalid"] += 1
        self._m_invalid.inc()
        self._window(bad=True)
        return self._dead(reason, detail, raw, key, source, index)

    def _count_envelope(self, *, ok: bool) -> None:
        self.stats["envelopes"] += 1
        self.stats["envelopes_invalid"] += not ok
        self._m_envelopes[ok].inc()

    def on_label(self, raw: bytes | None, key: bytes | None, source: Source) -> Output | None:
        """Route one message of ``analyst-labels``: the account's new score, a dead letter, or nothing."""
        raw = raw or b""
        self.stats["labels"] += 1
        try:
            label = decode_label(raw, self.max_bytes)
        except InvalidEvent as exc:
            self.stats["labels_invalid"] += 1
            return self._dead(exc.reason, exc.detail, raw, key, source)
        try:
            record = self.detector.apply_label(label)
            if record is not None:
                validate(SCORE_SCHEMA, record)
        except Exception as exc:  # noqa: BLE001 - as in _process
            self.stats["labels_invalid"] += 1
            log.exception("detector failed on a label for account %s at %s[%s]@%s; dead-lettered as %r",
                          label.get("account_id"), source.topic, source.partition, source.offset, INTERNAL)
            return self._dead(INTERNAL, _describe(exc), raw, key, source)
        self.stats["labels_applied"] += 1
        self.metrics.labels.labels(label=label["label"]).inc()
        log.info("applied label %r for account %s from %s", label["label"], label["account_id"], label["analyst"])
        return self._score(record)

    def refresh_gauges(self) -> None:
        """Set the state gauges from the detector: accounts by action, clusters blocked, model warm-up.

        Walks every tracked account and cluster once (about 0.1 s per million accounts), so the worker
        calls it on a timer, not per event. Reads only what the detector has; a fake without those
        attributes leaves the gauges alone. ``detector_clusters_blocked_total`` counts rises of the
        blocked count between refreshes, so it misses a cluster blocked and merged away within one period.
        """
        det: Any = self.detector
        m = self.metrics
        if hasattr(det, "action_counts"):
            for action, n in det.action_counts().items():
                m.accounts.labels(action=action).set(n)
        if hasattr(det, "accounts"):
            m.accounts_tracked.set(len(det.accounts))
        if hasattr(det, "clusters"):
            blocked = sum(1 for c in det.clusters.values() if getattr(c, "blocked", False))
            m.clusters_blocked.set(blocked)
            if blocked > self._blocked_seen:
                m.clusters_newly_blocked.inc(blocked - self._blocked_seen)
            self._blocked_seen = blocked
        model = getattr(det, "model", None)
        if model is not None and hasattr(model, "learned"):
            m.model_warm.set(1.0 if model.warm else 0.0)
            if model.learned > self._learned_seen:
                m.model_learned.inc(model.learned - self._learned_seen)
            self._learned_seen = model.learned
            m.model_drift.set(getattr(model, "tail_share", 0.0))
        counts = getattr(det, "stats", {})
        for key, counter in (("duplicates", m.duplicates), ("restored", m.restored)):
            if counts.get(key, 0) > self._detector_seen.get(key, 0):
                counter.inc(counts[key] - self._detector_seen.get(key, 0))
                self._detector_seen[key] = counts[key]

    def take_key_blocks(self) -> list[Output]:
        """The key-block records the detector made since the last call (``blocked-keys``, key = ``key_id``),
        each checked against ``schemas/key_block.v1.json``; none from a detector that makes none."""
        drain = getattr(self.detector, "drain_key_blocks", None)
        if drain is None:
            return []
        outs = []
        for rec in drain():
            validate(KEY_BLOCK_SCHEMA, rec)
            self.stats["key_blocks"] += 1
            self.metrics.key_blocks.labels(kind=rec["kind"]).inc()
            outs.append(Output(self.blocked_keys_topic, rec["key_id"].encode(), orjson.dumps(rec)))
        return outs

    def take_signals(self) -> list[Output]:
        """The ``cluster-signals`` messages for what the detector's events did to the clusters since the last call
        (:mod:`detector.signals`; key = this worker's id); none from a detector that shares nothing."""
        drain = getattr(self.detector, "drain_signals", None)
        signals = drain() if drain is not None else []
        if not signals:
            return []
        self.stats["signals_published"] += len(signals)
        self.metrics.cluster_signals.labels(result="published").inc(len(signals))
        return [Output(self.signals_topic, self._worker_key, raw) for raw in encode_batches(self.worker_id, signals)]

    def on_signals(self, raw: bytes | None, key: bytes | None, source: Source) -> Output | None:
        """Fold one ``cluster-signals`` message of another worker into the detector; skip this worker's own.
        A message that does not decode, or that the detector raised on, is dead-lettered (a worker of another
        version, or a bug): the clusters miss it, nothing else does.

        >>> from detector.detection import Detector
        >>> from detector.signals import encode_batches
        >>> router = Router(Detector(share_clusters=True), Settings(), worker_id="w1")
        >>> signals = [("e", f"x{i}", 1775000000000, [("pay", "pm_9")], [], 0, None) for i in (1, 2)]
        >>> [raw] = encode_batches("w2", signals)
        >>> router.on_signals(raw, b"w2", Source("cluster-signals", 0, 0)), router.stats["signals_applied"]
        (None, 2)
        >>> orjson.loads(router.on_signals(b"[]", b"w2", Source("cluster-signals", 0, 1)).value)["reason"]
        'not_object'
        """
        if key is not None and key == self._worker_key:
            return None  # this worker's own batch (keyed by its id): nothing to decode
        raw = raw or b""
        try:
            worker, signals = decode_batch(raw)
        except InvalidEvent as exc:
            self.stats["signal_batches_invalid"] += 1
            self.metrics.cluster_signals.labels(result="invalid").inc()
            return self._dead(exc.reason, f"cluster-signals: {exc.detail}", raw, key, source)
        if worker == self.worker_id:
            return None
        apply = getattr(self.detector, "apply_signals", None)
        if apply is None:
            return None
        try:
            apply(signals)
        except Exception as exc:  # noqa: BLE001 - as in _process: one message must not stop the worker
            self.stats["signal_batches_invalid"] += 1
            self.metrics.cluster_signals.labels(result="invalid").inc(len(signals))
            log.exception("detector failed on cluster signals from worker %s at %s[%s]@%s; dead-lettered as %r",
                          worker, source.topic, source.partition, source.offset, INTERNAL)
            return self._dead(INTERNAL, _describe(exc), raw, key, source)
        self.stats["signals_applied"] += len(signals)
        self.metrics.cluster_signals.labels(result="applied").inc(len(signals))
        if source.published_at:
            self.metrics.signals_behind.set(max(0.0, self.clock() - source.published_at))
        return None

    def summary(self) -> str:
        """One line of counters for the log."""
        return " ".join(f"{k}={v}" for k, v in self.stats.items())

    # ----------------------------------------------------------------------------------------------
    def _score(self, record: dict[str, Any] | None, published_at: float | None = None) -> Output | None:
        if record is None:
            return None
        self.stats["records"] += 1
        m = self.metrics
        m.scores.labels(action=record["action"]).inc()
        m.score_values.observe(record["score"])
        if record["reasons"]:
            m.reasons.labels(code=record["reasons"][0]["code"]).inc()
        # From the gateway's publish (the Kafka timestamp) to this score; replayed or simulated traffic has
        # old event times, so event_ts is only the fallback when the broker gave no timestamp.
        start = published_at if published_at else record["event_ts"] / 1000
        m.latency.observe(max(0.0, self.clock() - start))
        return Output(self.risk_scores_topic, record["account_id"].encode(), orjson.dumps(record))

    def _dead(self, reason: str, detail: str, raw: bytes, key: bytes | None, source: Source,
              index: int | None = None) -> Output:
        self.stats["dead_letters"] += 1
        self.invalid_by_reason[reason] = self.invalid_by_reason.get(reason, 0) + 1
        self.metrics.dead_letters.labels(reason=reason).inc()
        rec = dead_letter(reason, detail, raw, source, int(self.clock() * 1000), index)
        return Output(self.dead_letters_topic, key, orjson.dumps(rec))

    def _window(self, *, bad: bool) -> None:
        self._window_seen += 1
        self._window_bad += bad
        if self._window_seen < INVALID_RATIO_WINDOW:
            return
        share = self._window_bad / self._window_seen
        self.metrics.invalid_ratio.set(share)
        if share > self.invalid_ratio_limit:
            self.stats["invalid_ratio_alerts"] += 1
            log.warning("%d of the last %d events were dead-lettered (%.1f%% > limit %.1f%%): check the producers",
                        self._window_bad, self._window_seen, 100 * share, 100 * self.invalid_ratio_limit)
        self._window_seen = self._window_bad = 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL]


def _item_bytes(item: Any, envelope: bytes) -> bytes:
    """An envelope's item as compact JSON for its dead letter; the envelope itself if orjson cannot write it
    back (nested deeper than orjson writes, which is deeper than any event)."""
    try:
        return orjson.dumps(item)
    except TypeError:
        return envelope
