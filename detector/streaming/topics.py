"""The worker's topics, created up front with kafka-python's admin client (no Faust here).

Faust only creates its own internal topics; a topic it merely consumes or produces to would be
auto-created by the broker with the broker's defaults, and ``risk-scores`` must be *compacted* (the
latest record per account is its current decision). So the worker calls :func:`ensure_topics` before
it starts::

    topic            partitions              cleanup.policy   key
    api-calls        settings.topics.partitions  delete       account_id
    analyst-labels   same as api-calls           delete       account_id  (co-partitioned with api-calls)
    risk-scores      same as api-calls           compact      account_id
    blocked-keys     same as api-calls           compact      key_id (detector.keyblocks)
    cluster-signals  1                           delete (1 h) worker instance id (detector.signals)
    api-calls.dlq    same as api-calls           delete       the original key

Existing topics are left as they are; a mismatch that matters (``risk-scores`` not compacted,
``analyst-labels`` not co-partitioned with ``api-calls``) is logged as a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from detector.settings import KafkaSettings, Settings, SettingsError

log = logging.getLogger(__name__)

_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def signals_retention_ms(settings: Settings) -> int:
    """How long ``cluster-signals`` keeps messages: a starting worker reads back ``signals_lookback_s`` of it (its
    warm start), plus an hour for workers running behind.

    >>> signals_retention_ms(Settings())  # 25 h
    90000000
    """
    return int((settings.worker.signals_lookback_s + 3600) * 1000)


def kafka_client_config(kafka: KafkaSettings) -> dict[str, Any]:
    """kafka-python client options for ``kafka`` (bootstrap and security).

    The password stays a :class:`~detector.settings.Secret`: a ``str`` that kafka-python's SASL code uses as it
    is, and that shows as ``********`` wherever the options are logged (kafka-python's admin client logs all of
    them at DEBUG).

    >>> kafka_client_config(KafkaSettings(bootstrap="k1:9092,k2:9092"))
    {'bootstrap_servers': ['k1:9092', 'k2:9092'], 'security_protocol': 'PLAINTEXT'}
    >>> from detector.settings import Secret
    >>> cfg = kafka_client_config(KafkaSettings(security_protocol="SASL_SSL", sasl_username="u",
    ...                                         sasl_password=Secret("p"), ssl_cafile="/ca.pem"))
    >>> cfg["sasl_mechanism"], cfg["sasl_plain_password"], cfg["ssl_cafile"]
    ('PLAIN', Secret('********'), '/ca.pem')
    >>> cfg["sasl_plain_password"] == "p", cfg["sasl_plain_password"].encode(), "'p'" in str(cfg)
    (True, b'p', False)
    """
    protocol = kafka.security_protocol.upper()
    if protocol not in _PROTOCOLS:
        raise SettingsError(f"DETECTOR_KAFKA__SECURITY_PROTOCOL={kafka.security_protocol!r}: "
                            f"use one of {', '.join(_PROTOCOLS)}")
    config: dict[str, Any] = {
        "bootstrap_servers": [h.strip() for h in kafka.bootstrap.split(",") if h.strip()],
        "security_protocol": protocol,
    }
    if protocol.startswith("SASL"):
        config.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                      sasl_plain_password=kafka.sasl_password)
    if protocol.endswith("SSL"):
        config.update({name: value for name, value in (("ssl_cafile", kafka.ssl_cafile),
                                                        ("ssl_certfile", kafka.ssl_certfile),
                                                        ("ssl_keyfile", kafka.ssl_keyfile)) if value})
    return config


class KafkaConnectError(ConnectionError):
    """A kafka-python client found no broker it could talk to in time. The message is one line and names the
    most telling connection error the client logged meanwhile (a refused password or certificate, a refused
    connection), which kafka-python's own timeout error does not."""


def describe_connection(kafka: KafkaSettings) -> str:
    """Where and as whom a client connects, for error messages (never the password).

    >>> describe_connection(KafkaSettings(bootstrap="k1:9093", security_protocol="SASL_SSL", sasl_username="det",
    ...                                   sasl_mechanism="SCRAM-SHA-512"))
    'k1:9093 over SASL_SSL as det (SCRAM-SHA-512)'
    >>> describe_connection(KafkaSettings(bootstrap="k1:9094", security_protocol="SSL", ssl_certfile="/tls/det.pem"))
    'k1:9094 over SSL with client certificate /tls/det.pem'
    """
    protocol = kafka.security_protocol.upper()
    who = ""
    if protocol.startswith("SASL"):
        who = f" as {kafka.sasl_username or '(no user name)'} ({kafka.sasl_mechanism})"
    if protocol.endswith("SSL"):
        who += f" with client certificate {kafka.ssl_certfile}" if kafka.ssl_certfile else ""
    return f"{kafka.bootstrap} over {protocol}{who}"


@contextlib.contextmanager
def explain_connect_errors(target: str) -> Iterator[None]:
    """Turn kafka-python's bootstrap timeout inside the block into :class:`KafkaConnectError` saying why.

    kafka-python retries a refused SASL password or client certificate like any lost connection, until its
    bootstrap timeout, and then raises ``KafkaTimeoutError: Unable to bootstrap``; the reason is only in its
    log. While the block runs, the connection errors logged under ``kafka`` are kept (an authentication or TLS
    error is preferred over a bare disconnect) and the timeout is re-raised naming it. A broker often answers a
    wrong SCRAM password by closing the connection, which kafka-python logs as "socket disconnected" only; the
    message then says so. Errors logged by other kafka-python clients of the process at the same time may be
    picked up too. Costs nothing when no error is logged.

    >>> import logging
    >>> from kafka.errors import KafkaTimeoutError, SaslAuthenticationFailedError
    >>> try:
    ...     with explain_connect_errors("k1:9093 over SASL_SSL as det"):
    ...         logging.getLogger("kafka.net").warning("failed: %s", SaslAuthenticationFailedError("bad"))
    ...         raise KafkaTimeoutError("Unable to bootstrap from ['k1:9093']")
    ... except KafkaConnectError as exc:
    ...     print(exc)
    cannot connect to Kafka at k1:9093 over SASL_SSL as det: [Error 58] SaslAuthenticationFailedError: bad
    """
    from kafka import errors

    timeouts = tuple(getattr(errors, name) for name in ("KafkaTimeoutError", "NoBrokersAvailable")  # 3.x, 2.x
                     if hasattr(errors, name))
    recorder = _ConnectErrors(ignore=timeouts)
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(recorder)
    try:
        yield
    except timeouts as exc:
        cause = recorder.cause or f"{exc} (no connection error was logged)"
        if not recorder.telling and "disconnected" in cause:
            cause += " (the broker closed the connection: a refused SASL password shows like this too)"
        raise KafkaConnectError(f"cannot connect to Kafka at {target}: {cause}") from exc
    finally:
        kafka_log.removeHandler(recorder)


class _ConnectErrors(logging.Handler):
    """Keeps the most telling exception among the arguments of kafka-python's warnings and errors.

    A request timeout says least: the bootstrap deadline cuts the last attempt short ("Request timed out after
    41 ms"), so it never replaces a cause already kept, such as the disconnects of a refused password.

    >>> from kafka.errors import KafkaConnectionError, RequestTimedOutError
    >>> kept = _ConnectErrors()
    >>> for exc in (KafkaConnectionError("socket disconnected"), RequestTimedOutError("after 41 ms")):
    ...     kept.emit(logging.LogRecord("kafka", logging.WARNING, "", 0, "failed: %s", (exc,), None))
    >>> kept.cause
    'KafkaConnectionError: socket disconnected'
    """

    _TELLING = ("Authentication", "Authorization", "SSL", "certificate", "Connection refused")
    _WEAK = ("RequestTimedOutError", "timed out")

    def __init__(self, ignore: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__(logging.WARNING)
        self.ignore = ignore  # the timeout itself, logged once more as it is raised
        self.cause = ""
        self.telling = False

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        for exc in (arg for arg in args if isinstance(arg, BaseException) and not isinstance(arg, self.ignore)):
            text = " ".join(str(exc).split())
            telling = any(word in text for word in self._TELLING)
            weak = any(word in text for word in self._WEAK)
            if telling or not (self.telling or (weak and self.cause)):
                self.cause, self.telling = text, telling


def topic_specs(settings: Settings) -> dict[str, dict[str, Any]]:
    """What :func:`ensure_topics` creates, in kafka-python's ``create_topics`` form (replication: the
    broker's ``default.replication.factor``).

    >>> specs = topic_specs(Settings())
    >>> specs["risk-scores"]["configs"], specs["api-calls"]["num_partitions"]
    ({'cleanup.policy': 'compact'}, 4)
    """
    t = settings.topics
    plain: dict[str, Any] = {"num_partitions": t.partitions, "replication_factor": -1, "configs": {}}
    return {
        t.api_calls: plain,
        t.analyst_labels: plain,
        t.dead_letters: plain,
        t.risk_scores: {**plain, "configs": {"cleanup.policy": "compact"}},
        t.blocked_keys: {**plain, "configs": {"cleanup.policy": "compact"}},
        # Read whole by every worker, the last signals_lookback_s of it when the worker starts: one partition.
        t.cluster_signals: {"num_partitions": 1, "replication_factor": -1,
                            "configs": {"retention.ms": str(signals_retention_ms(settings))}},
    }


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create the worker's topics that do not exist yet; return the names created.

    Idempotent and safe to race with another worker (an "already exists" answer is fine). Waits until
    every created partition has a leader. Raises :class:`KafkaConnectError` when no broker answers within
    ``timeout_s`` (a refused password or client certificate included), and kafka-python's errors for anything
    else (not authorised to create or describe a topic).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError, for_code

    specs = topic_specs(settings)
    timeouts = {"request_timeout_ms": int(timeout_s * 1000)}
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python 3; 2.x refuses unknown options
        timeouts["bootstrap_timeout_ms"] = int(timeout_s * 1000)
    with explain_connect_errors(describe_connection(settings.kafka)):
        admin = KafkaAdminClient(client_id=f"{settings.worker.app_id}-admin", **timeouts,
                                 **kafka_client_config(settings.kafka))
    try:
        existing = set(admin.list_topics())
        missing = {name: spec for name, spec in specs.items() if name not in existing}
        created: list[str] = []
        if missing:
            result = admin.create_topics(missing, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in result["topics"]:
                error = for_code(topic["error_code"])
                if topic["error_code"] == 0:
                    created.append(topic["name"])
                elif error is not TopicAlreadyExistsError:
                    raise error(f"creating topic {topic['name']}: {topic.get('error_message') or error.__name__}")
            if created:
                admin.wait_for_topics(created, timeout_ms=int(timeout_s * 1000))
                log.info("created topics %s", ", ".join(sorted(created)))
        _check(admin, settings)
        return created
    finally:
        admin.close()


def _check(admin: Any, settings: Settings) -> None:
    """Warn about existing topics that break the worker's assumptions (never fails the start)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    t = settings.topics
    try:
        partitions = {d["name"]: len(d["partitions"])
                      for d in admin.describe_topics([t.api_calls, t.analyst_labels, t.risk_scores])}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.risk_scores, ["cleanup.policy"])],
                                         config_filter="all")
        policy = configs["topic"][t.risk_scores]["cleanup.policy"]["value"]
    except Exception as exc:  # noqa: BLE001 - a check, not a requirement (the ACL may forbid describe)
        log.warning("could not check the worker's topics: %s", exc)
        return
    if "compact" not in policy:
        log.warning("topic %s has cleanup.policy=%s, not compact: old scores are deleted by time, not "
                    "superseded by account", t.risk_scores, policy)
    if partitions.get(t.api_calls, t.partitions) != t.partitions:
        log.warning("topic %s has %s partitions but DETECTOR_TOPICS__PARTITIONS is %d: the account-state changelog "
                    "is not co-partitioned with it, and envelope events are checked against the wrong count "
                    "(dead-lettered as wrong_partition)", t.api_calls, partitions.get(t.api_calls), t.partitions)
    if partitions.get(t.api_calls) != partitions.get(t.analyst_labels):
        log.warning("topics %s (%s partitions) and %s (%s partitions) are not co-partitioned: a label may be "
                    "applied by a worker that does not hold the account", t.api_calls,
                    partitions.get(t.api_calls), t.analyst_labels, partitions.get(t.analyst_labels))


def committed(admin: Any, group: str, topic: str) -> int:
    """Events a consumer group has processed on ``topic``: the sum of its committed offsets (0 before its
    first commit). ``admin`` is a kafka-python ``KafkaAdminClient``."""
    try:
        offsets = admin.list_group_offsets([group]).get(group, {})
    except Exception:  # noqa: BLE001 - the group does not exist until the worker joins
        return 0
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` (all partitions, each in offset order) up to the end offsets it has when
    called, or what arrived within ``timeout_s``. No consumer group; kafka-python's ``ConsumerRecord``s."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def read_range(config: dict[str, Any], topic: str, partition: int, offsets: range,
               timeout_s: float = 30.0) -> list[Any]:
    """The records of ``topic``'s ``partition`` whose offsets are in ``offsets`` (a ``range`` with step 1), in
    order; offsets without a record (a transaction marker, a compacted or expired record) are simply absent.
    ``config``: kafka-python client options (:func:`kafka_client_config`). No consumer group, nothing
    committed. Raises :class:`TimeoutError` if the partition could not be read that far within ``timeout_s``.
    """
    import time

    from kafka import KafkaConsumer, TopicPartition

    if not offsets:
        return []
    tp = TopicPartition(topic, partition)
    # kafka-python waits up to 305 s for a request by default; it must exceed the session timeout (10 s).
    consumer = KafkaConsumer(**config, enable_auto_commit=False, auto_offset_reset="earliest",
                             request_timeout_ms=max(11_000, int(timeout_s * 1000)))
    try:
        consumer.assign([tp])
        consumer.seek(tp, offsets.start)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < offsets.stop:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: could not read offsets {offsets.start}..{offsets.stop - 1} "
                                   f"within {timeout_s:.0f} s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(r for r in batch if r.offset in offsets)
        return records
    finally:
        quiet_close(consumer)


def committed_offsets(config: dict[str, Any], group: str, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """Where consumer group ``group`` resumes each partition of ``topic``: its committed offset, or the partition's
    first offset where it has none (the worker reads from the earliest). ``config``: kafka-python client options
    (:func:`kafka_client_config`). Reads offsets only: it does not join the group. Raises :class:`TimeoutError` if
    the topic's partitions are not known within ``timeout_s``, and kafka-python's ``KafkaTimeoutError`` if the
    offsets are not read within it."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**config, group_id=group, enable_auto_commit=False,
                             request_timeout_ms=max(11_000, int(timeout_s * 1000)))
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(topic)
        while not partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic}: no partitions known within {timeout_s:.0f} s")
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        # kafka-python retries a retriable error for ever without a timeout: bound each call by what is left.
        first = consumer.beginning_offsets(tps, timeout_ms=_left_ms(deadline))
        out = {}
        for tp in tps:
            committed = consumer.committed(tp, timeout_ms=_left_ms(deadline))
            out[tp.partition] = committed if committed is not None else first[tp]
        return out
    finally:
        quiet_close(consumer)


def _left_ms(deadline: float) -> int:
    import time

    return max(1, int((deadline - time.monotonic()) * 1000))


def quiet_close(client: Any) -> None:
    """Close a kafka-python client with ``kafka.net`` kept out of the log meanwhile.

    kafka-python 3 reads sockets on a network thread of its own, which can race the close and log a traceback for
    a socket the close has just released: "Error receiving network data" (kafka.net.transport), or "Unhandled
    exception in task" from re-registering the closed socket (kafka.net.selector; seen once in CI). Harmless, and
    not an error of the worker's, whose log is expected to hold no traceback. The worker closes such clients after
    reading ``cluster-signals`` (:class:`Follower`), a hole (:func:`read_range`) and the group's offsets after a
    rebalance (:func:`committed_offsets`)."""
    loggers = [logging.getLogger("kafka.net"), logging.getLogger("kafka.net.transport")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        client.close()
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class Follower:
    """Reads every partition of ``topic`` from ``lookback_s`` seconds before :meth:`open` runs, with no consumer
    group and nothing committed: how each worker follows ``cluster-signals`` (:mod:`detector.signals`), so the
    messages published while it was starting or rebalancing are not missed, and a starting worker can fold in
    the last day (:func:`detector.streaming.app.warm_up`). kafka-python is not thread-safe: call its methods from
    one thread at a time (the worker runs them on one executor thread, after the warm start on the main one).
    """

    def __init__(self, config: dict[str, Any], topic: str, timeout_s: float = 30.0, lookback_s: float = 60.0) -> None:
        self.config, self.topic, self.timeout_s, self.lookback_s = config, topic, timeout_s, lookback_s
        self._consumer: Any = None
        self._ends: dict[Any, int] = {}

    @property
    def is_open(self) -> bool:
        return self._consumer is not None

    def left(self) -> int:
        """How many messages lie between the read position and the end the topic had at :meth:`open`."""
        consumer = self._consumer
        return sum(max(0, end - consumer.position(tp)) for tp, end in self._ends.items())

    def open(self, lookback_s: float | None = None) -> None:
        """Connect, take every partition, and go to the first message of the last ``lookback_s`` seconds
        (default: the follower's; the end if none). Raises :class:`TimeoutError` if the topic's partitions are not
        known within ``timeout_s``."""
        import time

        lookback_s = self.lookback_s if lookback_s is None else lookback_s

        from kafka import KafkaConsumer, TopicPartition

        # check_crcs=False: kafka-python checks record batches with a pure-Python CRC-32C (about 9 MB/s, holding the
        # GIL the agents need); the broker checked each batch's CRC when it was produced, and TCP checksums the rest.
        consumer = KafkaConsumer(**self.config, enable_auto_commit=False, auto_offset_reset="latest",
                                 check_crcs=False, request_timeout_ms=max(11_000, int(self.timeout_s * 1000)))
        deadline = time.monotonic() + self.timeout_s
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            if time.monotonic() > deadline:
                consumer.close()
                raise TimeoutError(f"topic {self.topic}: no partitions known within {self.timeout_s:.0f} s")
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        since = consumer.offsets_for_times({tp: int((time.time() - lookback_s) * 1000) for tp in tps})
        for tp in tps:
            if since.get(tp) is not None:
                consumer.seek(tp, since[tp].offset)
            else:
                consumer.seek_to_end(tp)
                consumer.position(tp)  # resolve "the end" now, not at the first poll
        self._ends = consumer.end_offsets(tps)
        self._consumer = consumer

    def poll(self, timeout_ms: int = 500) -> list[Any]:
        """The records that arrived since the last call, in offset order per partition (waits up to
        ``timeout_ms`` for the first)."""
        return [r for batch in self._consumer.poll(timeout_ms=timeout_ms).values() for r in batch]

    def close(self) -> None:
        if self._consumer is None:
            return
        try:
            quiet_close(self._consumer)
        finally:
            self._consumer = None
