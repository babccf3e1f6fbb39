"""A real, single-node Apache Kafka broker (KRaft mode) for tests, the demo and CI.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` and are cached outside the
repository, so a fresh clone installs the broker by itself::

    ensure_jars()                 # mvn dependency:copy-dependencies, only when the jars are missing
    handle = start(data_dir)      # format storage, launch `java kafka.Kafka`, wait for a real answer
    handle.bootstrap              # "127.0.0.1:9092"
    stop(data_dir)                # SIGTERM, then SIGKILL after a grace period; idempotent

One process runs both roles (``process.roles=broker,controller``, ``node.id=1``) with a static
one-voter quorum, replication factor 1 everywhere and auto topic creation on. A ``PLAINTEXT``
listener on ``port`` is always there (the readiness probe uses it); ``start(..., listeners=,
properties=, add_scram=)`` adds TLS and SASL listeners, an authorizer and SCRAM users for tests of
a secured broker (``tests/integration/test_security.py``). Everything the broker
owns lives under ``data_dir``::

    data_dir/
      server.properties   written by start()
      log4j.properties    broker logs go to stdout at INFO for lifecycle classes, WARN elsewhere
      broker.log          the JVM's stdout and stderr
      broker.pid          pid of the running broker
      broker.json         pid, ports and bootstrap, read by status() and stop()
      kraft-logs/         topic partitions and the __cluster_metadata log

Kafka stays on the 3.9 line: 4.x removed old protocol versions that aiokafka (under
faust-streaming) and kafka-python still send.

Costs: the first ``ensure_jars`` downloads about 46 MB; ``start`` takes a few seconds (two JVM
launches: the storage formatter, then the broker) and the broker holds a 256-512 MB heap.

This module uses the standard library only and touches nothing at import time. It is POSIX-only
(process groups, signals); pid checks use ``/proc`` where it exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
"""Must match ``kafka.version`` in ``deploy/kafka/pom.xml``."""

DEFAULT_PORT = 9092

POM_PATH = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"

_KAFKA_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
_JVM_OPTS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
_MAVEN_TIMEOUT_S = 900.0
_FORMAT_TIMEOUT_S = 120.0
_PROBE_INTERVAL_S = 0.25
_KILL_WAIT_S = 5.0
_LOG_TAIL_LINES = 25

_LOG4J_PROPERTIES = """\
# Written by detector/broker.py. Everything goes to stdout, which start() sends to broker.log.
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n

# Lifecycle lines (starting, started, shutting down) at INFO; per-request chatter stays at WARN.
log4j.logger.kafka.Kafka$=INFO
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
log4j.logger.kafka.server.SharedServer=INFO
log4j.logger.kafka.log.LogCleaner=INFO
log4j.logger.kafka.tools.StorageTool$=INFO
"""


class BrokerError(RuntimeError):
    """The broker could not be installed, started or stopped; the message is one line."""


@dataclass(frozen=True)
class BrokerHandle:
    """A running broker started by :func:`start`.

    ``bootstrap`` is what clients take as ``bootstrap_servers`` (the ``PLAINTEXT`` listener);
    ``listeners`` holds the same for each extra listener; ``log_path`` is the JVM's stdout and
    stderr.
    """

    bootstrap: str
    pid: int
    data_dir: Path
    log_path: Path
    port: int
    controller_port: int
    listeners: Mapping[str, str] = field(default_factory=dict)
    """Extra listeners (:class:`Listener`) by name, each as ``host:port``."""


@dataclass(frozen=True)
class Listener:
    """An extra client listener on 127.0.0.1, beside the ``PLAINTEXT`` one on ``port``.

    ``name`` is the listener's name in ``listeners`` and in listener-prefixed properties
    (``listener.name.<name lower-cased>.*``); ``protocol`` is its security protocol (``SSL``,
    ``SASL_SSL``, ``SASL_PLAINTEXT``), by default the name itself.

    >>> Listener("SASL_SSL", 9094).protocol
    'SASL_SSL'
    """

    name: str
    port: int
    protocol: str = ""

    def __post_init__(self) -> None:
        if not self.protocol:
            object.__setattr__(self, "protocol", self.name)


# --------------------------------------------------------------------------- paths


def default_kafka_home() -> Path:
    """Where the Kafka jars are cached: ``$DETECTOR_KAFKA_HOME``, else the user cache dir.

    Read at call time, never at import. The version is part of the default path, so bumping
    ``KAFKA_VERSION`` downloads afresh instead of mixing jars.

    >>> default_kafka_home().name == f"kafka-{KAFKA_VERSION}" or "DETECTOR_KAFKA_HOME" in os.environ
    True
    """
    override = os.environ.get("DETECTOR_KAFKA_HOME")
    if override:
        return Path(override).expanduser()
    return _cache_root() / f"kafka-{KAFKA_VERSION}"


def default_data_dir() -> Path:
    """Default broker data dir: ``${XDG_CACHE_HOME:-~/.cache}/distill-detector/broker-data``.

    >>> default_data_dir().name
    'broker-data'
    """
    return _cache_root() / "broker-data"


def _cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "distill-detector"


# --------------------------------------------------------------------------- jars


def ensure_jars(kafka_home: Path | None = None) -> Path:
    """Make sure the Kafka jars are in ``<kafka_home>/libs`` and return that directory.

    Runs Maven only when the jars are missing. Maven writes into a temporary directory beside
    ``libs`` which is then renamed into place, so an interrupted download never leaves a
    half-filled ``libs``. Costs about 5 s and 46 MB the first time with a fast link and an
    empty ``~/.m2``; nothing afterwards.

    Raises :class:`BrokerError` when ``mvn`` or ``java`` is missing or the download fails.

    >>> libs = ensure_jars()  # doctest: +SKIP
    >>> (libs / "kafka_2.13-3.9.1.jar").exists()  # doctest: +SKIP
    True
    """
    home = (kafka_home if kafka_home is not None else default_kafka_home()).expanduser()
    libs = home / "libs"
    _java()  # fail early and clearly: jars are useless without a JVM
    if (libs / _KAFKA_JAR).is_file():
        return libs

    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("mvn not found on PATH: install Maven 3.6+ to fetch the Kafka jars")
    if not POM_PATH.is_file():
        raise BrokerError(f"Kafka pom not found at {POM_PATH}")

    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="libs.download-", dir=home))
    command = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM_PATH),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}",
    ]
    logger.info("fetching Kafka %s jars into %s", KAFKA_VERSION, libs)
    started = time.monotonic()
    try:
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=_MAVEN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"mvn did not finish fetching Kafka jars in {exc.timeout:.0f} s") from exc
        if result.returncode != 0:
            raise BrokerError(
                f"mvn failed to fetch Kafka {KAFKA_VERSION} jars (exit {result.returncode}): "
                f"{_first_maven_error(result.stdout)}"
            )
        if not (tmp / _KAFKA_JAR).is_file():
            raise BrokerError(f"mvn finished but {_KAFKA_JAR} is not among the fetched jars")
        if libs.exists() and not (libs / _KAFKA_JAR).is_file():
            shutil.rmtree(libs)  # a broken earlier install, not ours to keep
        try:
            tmp.rename(libs)
        except OSError:
            if not (libs / _KAFKA_JAR).is_file():
                raise
            logger.info("another process installed the Kafka jars first; using those")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched Kafka jars in %.1f s", time.monotonic() - started)
    return libs


def _first_maven_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("[ERROR]")]
    chosen = errors[0] if errors else (lines[-1] if lines else "no output")
    return chosen.removeprefix("[ERROR]").strip()


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise BrokerError("java not found on PATH or in JAVA_HOME: install a JDK 17+")
    return found


# --------------------------------------------------------------------------- configuration


def render_server_properties(
    data_dir: Path,
    port: int,
    controller_port: int,
    *,
    listeners: Sequence[Listener] = (),
    controller_protocol: str = "PLAINTEXT",
    properties: Mapping[str, str] | None = None,
) -> str:
    """The ``server.properties`` of a combined broker+controller listening on 127.0.0.1.

    Pure: it only formats text. ``listeners`` are added beside ``PLAINTEXT`` on ``port`` (which
    the readiness probe uses); ``controller_protocol`` is the security protocol of the
    ``CONTROLLER`` listener (``SSL`` needs ``listener.name.controller.ssl.*`` in ``properties``).
    Each of ``properties`` replaces the line of the same key, or is appended: security settings,
    an authorizer, listener-prefixed settings.

    >>> text = render_server_properties(Path("/d"), 9092, 9093)
    >>> "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093" in text
    True
    >>> "controller.quorum.voters=1@127.0.0.1:9093" in text
    True
    >>> text = render_server_properties(Path("/d"), 9092, 9093, listeners=[Listener("SASL_SSL", 9094)],
    ...                                 properties={"num.partitions": "3", "super.users": "User:broker"})
    >>> for line in text.splitlines():
    ...     if line.startswith(("advertised.", "listener.security", "num.partitions", "super")):
    ...         print(line)
    advertised.listeners=PLAINTEXT://127.0.0.1:9092,SASL_SSL://127.0.0.1:9094
    listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
    num.partitions=3
    super.users=User:broker
    """
    names = [listener.name.upper() for listener in listeners]
    if len(set(names)) != len(names) or {"PLAINTEXT", "CONTROLLER"} & set(names):
        raise BrokerError(f"listener names must be unique and not PLAINTEXT or CONTROLLER: {names}")
    extra = "".join(f",{listener.name.upper()}://127.0.0.1:{listener.port}" for listener in listeners)
    protocols = "".join(f",{listener.name.upper()}:{listener.protocol.upper()}" for listener in listeners)
    log_dirs = data_dir / "kraft-logs"
    text = f"""\
# Written by detector/broker.py: a single-node KRaft broker for tests and the demo.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}{extra}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}{extra}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:{controller_protocol.upper()},PLAINTEXT:PLAINTEXT{protocols}
log.dirs={log_dirs}

# One node: replication factor 1 everywhere.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# Fewer internal partitions than the default 50: quicker first consumer group, same semantics.
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true

# Compacted topics (Faust changelogs) need the cleaner; a small dedupe buffer fits the 512 MB heap.
log.cleaner.enable=true
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.backoff.ms=5000
log.segment.bytes=16777216
log.retention.hours=168
log.retention.check.interval.ms=60000

# A 2-core machine: few threads.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
"""
    return _override(text, properties or {})


def _override(text: str, properties: Mapping[str, str]) -> str:
    """``text`` with each of ``properties`` replacing the line of its key, or appended under a header.

    >>> print(_override("a=1\\nb=2\\n", {"b": "3", "c": "4"}), end="")
    a=1
    b=3
    <BLANKLINE>
    # Given to start().
    c=4
    """
    remaining = dict(properties)
    lines = []
    for line in text.splitlines():
        key = line.partition("=")[0]
        if not line.startswith("#") and key in remaining:
            line = f"{key}={remaining.pop(key)}"
        lines.append(line)
    if remaining:
        lines += ["", "# Given to start()."] + [f"{key}={value}" for key, value in remaining.items()]
    return "\n".join(lines) + "\n"


def _cluster_id() -> str:
    """A random Kafka cluster id: 16 bytes, URL-safe base64 without padding (22 chars).

    Never starts with ``-``: kafka-storage would read such an id as an option (``-t -Xy...``).

    >>> all(not _cluster_id().startswith("-") for _ in range(500))
    True
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


# --------------------------------------------------------------------------- lifecycle


def start(
    data_dir: Path,
    port: int = DEFAULT_PORT,
    controller_port: int | None = None,
    wait_s: float = 60,
    *,
    kafka_home: Path | None = None,
    listeners: Sequence[Listener] = (),
    controller_protocol: str = "PLAINTEXT",
    properties: Mapping[str, str] | None = None,
    add_scram: Sequence[str] = (),
) -> BrokerHandle:
    """Start a broker whose files live in ``data_dir`` and wait until it serves requests.

    Fetches the jars if needed (:func:`ensure_jars`), writes ``server.properties`` and
    ``log4j.properties``, formats the storage the first time, launches ``java kafka.Kafka``
    detached from this process (its own session and process group; it outlives the caller), and
    returns once the broker answers an ApiVersions and a Metadata request listing itself.
    ``controller_port`` defaults to a free port. Data in ``data_dir`` survives a restart.

    A secured broker takes extra ``listeners``, ``controller_protocol`` and ``properties`` (see
    :func:`render_server_properties`) and SCRAM credentials to format the storage with, each as
    ``kafka-storage format --add-scram`` takes it, e.g. ``SCRAM-SHA-512=[name=u,password=p]``
    (used only on the first start of ``data_dir``; they pass through the formatter's command line).
    Readiness is still probed on the ``PLAINTEXT`` listener on ``port``.

    If a broker started from the same ``data_dir`` is already running, returns its handle (and
    raises if it listens on another port). Raises :class:`BrokerError` with the tail of
    ``broker.log`` when the JVM exits early or is not ready within ``wait_s`` seconds (it is then
    killed), or when ``port`` is taken.

    >>> handle = start(Path("/tmp/broker-data"), port=19092)  # doctest: +SKIP
    >>> handle.bootstrap  # doctest: +SKIP
    '127.0.0.1:19092'
    """
    data_dir = Path(data_dir).expanduser().resolve()
    existing = _running_state(data_dir)
    if existing is not None:
        if existing["port"] != port:
            raise BrokerError(
                f"a broker from {data_dir} is already running on port {existing['port']} "
                f"(pid {existing['pid']}); stop it first"
            )
        logger.info("broker already running (pid %s) at %s", existing["pid"], existing["bootstrap"])
        _wait_ready(data_dir, existing["pid"], port, wait_s)
        return _handle_from_state(data_dir, existing)

    libs = ensure_jars(kafka_home)
    java = _java()
    for taken in (port, *(listener.port for listener in listeners)):
        if not _port_is_free(taken):
            raise BrokerError(f"port {taken} on 127.0.0.1 is already in use")
    if controller_port is None:
        controller_port = _free_port(avoid=port)
    elif controller_port == port or not _port_is_free(controller_port):
        raise BrokerError(f"controller port {controller_port} on 127.0.0.1 is not available")

    data_dir.mkdir(parents=True, exist_ok=True)
    paths = _Paths(data_dir)
    paths.properties.write_text(
        render_server_properties(
            data_dir,
            port,
            controller_port,
            listeners=listeners,
            controller_protocol=controller_protocol,
            properties=properties,
        )
    )
    paths.log4j.write_text(_LOG4J_PROPERTIES)
    classpath = f"{libs}{os.sep}*"
    jvm = [java, *_JVM_OPTS, f"-Dlog4j.configuration={paths.log4j.as_uri()}", "-cp", classpath]

    began = time.monotonic()
    _format_storage(jvm, paths, add_scram)
    pid = _launch(jvm, paths)
    state = {
        "pid": pid,
        "port": port,
        "controller_port": controller_port,
        "bootstrap": f"127.0.0.1:{port}",
        "listeners": {listener.name.upper(): f"127.0.0.1:{listener.port}" for listener in listeners},
        "kafka_version": KAFKA_VERSION,
        "started_at": time.time(),
    }
    paths.state.write_text(json.dumps(state, indent=2) + "\n")
    paths.pid.write_text(f"{pid}\n")
    try:
        _wait_ready(data_dir, pid, port, wait_s)
    except BrokerError:
        _terminate(pid, paths.properties, grace_s=2.0)
        _remove_run_files(paths)
        raise
    logger.info(
        "Kafka %s ready at 127.0.0.1:%d in %.1f s (pid %d, log %s)",
        KAFKA_VERSION,
        port,
        time.monotonic() - began,
        pid,
        paths.log,
    )
    return _handle_from_state(data_dir, state)


def stop(data_dir: Path, timeout_s: float = 15.0) -> bool:
    """Stop the broker started from ``data_dir``: SIGTERM, then SIGKILL after ``timeout_s``.

    Idempotent: returns ``False`` when no broker from ``data_dir`` was running (stale pid files
    are removed), ``True`` when one was stopped. Never signals a process that is not this
    broker (the pid's command line is checked where ``/proc`` exists).

    >>> stop(Path("/nonexistent/broker-data"))
    False
    """
    data_dir = Path(data_dir).expanduser().resolve()
    paths = _Paths(data_dir)
    state = _running_state(data_dir)
    if state is None:
        _remove_run_files(paths)
        return False
    pid = int(state["pid"])
    began = time.monotonic()
    _terminate(pid, paths.properties, grace_s=timeout_s)
    _remove_run_files(paths)
    logger.info("stopped broker pid %d in %.1f s", pid, time.monotonic() - began)
    return True


def status(data_dir: Path) -> dict[str, Any] | None:
    """Describe the broker started from ``data_dir``, or ``None`` when none is running.

    The dict holds ``pid``, ``port``, ``controller_port``, ``bootstrap``, ``listeners`` (extra
    listeners by name, as ``host:port``), ``kafka_version``, ``started_at`` (epoch seconds),
    ``data_dir``, ``log`` and ``ready`` (whether it answers a Kafka request right now).

    >>> status(Path("/nonexistent/broker-data")) is None
    True
    """
    data_dir = Path(data_dir).expanduser().resolve()
    state = _running_state(data_dir)
    if state is None:
        return None
    paths = _Paths(data_dir)
    return {
        **state,
        "data_dir": str(data_dir),
        "log": str(paths.log),
        "ready": _probe(int(state["port"]), timeout_s=2.0),
    }


@dataclass(frozen=True)
class _Paths:
    data_dir: Path

    @property
    def properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.data_dir / "log4j.properties"

    @property
    def log(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def state(self) -> Path:
        return self.data_dir / "broker.json"

    @property
    def meta(self) -> Path:
        return self.data_dir / "kraft-logs" / "meta.properties"


def _handle_from_state(data_dir: Path, state: dict[str, Any]) -> BrokerHandle:
    return BrokerHandle(
        bootstrap=str(state["bootstrap"]),
        pid=int(state["pid"]),
        data_dir=data_dir,
        log_path=_Paths(data_dir).log,
        port=int(state["port"]),
        controller_port=int(state["controller_port"]),
        listeners=dict(state.get("listeners", {})),
    )


def _format_storage(jvm: list[str], paths: _Paths, add_scram: Sequence[str] = ()) -> None:
    if paths.meta.is_file():
        logger.debug("storage in %s already formatted", paths.meta.parent)
        return
    command = [
        *jvm,
        "kafka.tools.StorageTool",
        "format",
        "-t",
        _cluster_id(),
        "-c",
        str(paths.properties),
        "--ignore-formatted",
        *(arg for credential in add_scram for arg in ("--add-scram", credential)),
    ]
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=_FORMAT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"kafka storage format did not finish in {exc.timeout:.0f} s") from exc
    with paths.log.open("a") as log:
        log.write(result.stdout)
    if result.returncode != 0:
        last = result.stdout.strip().splitlines()[-1:] or ["no output"]
        raise BrokerError(f"kafka storage format failed (exit {result.returncode}): {last[0]}")


def _launch(jvm: list[str], paths: _Paths) -> int:
    """Launch the broker JVM detached and return its pid.

    A throwaway ``sh`` starts java in the background and exits at once, so the JVM is not our
    child: nothing here has to reap it, and it survives the Python process that started it.
    """
    script = 'exec "$@" </dev/null >>"$BROKER_LOG" 2>&1 &\necho $!'
    env = {**os.environ, "BROKER_LOG": str(paths.log)}
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *jvm, "kafka.Kafka", str(paths.properties)],
        cwd=paths.data_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip().isdigit():
        raise BrokerError(
            f"could not launch the broker JVM: {result.stderr.strip() or result.stdout.strip()}"
        )
    return int(result.stdout.strip())


def _wait_ready(data_dir: Path, pid: int, port: int, wait_s: float) -> None:
    paths = _Paths(data_dir)
    deadline = time.monotonic() + wait_s
    while True:
        # Checked twice: while the JVM starts (the java launcher may exec again) its /proc entry can
        # briefly read as another program, and a busy machine has been seen to hit that window.
        if not _is_broker_process(pid, paths.properties):
            time.sleep(0.5)
            if not _is_broker_process(pid, paths.properties):
                raise BrokerError(f"broker exited during startup; {_log_tail(paths.log)}")
        if _probe(port, timeout_s=1.0):
            return
        if time.monotonic() >= deadline:
            raise BrokerError(f"broker not ready after {wait_s:.0f} s; {_log_tail(paths.log)}")
        time.sleep(_PROBE_INTERVAL_S)


def _terminate(pid: int, properties: Path, grace_s: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, _KILL_WAIT_S)):
        if not _is_broker_process(pid, properties):
            return
        logger.debug("sending %s to broker pid %d", sig.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _is_broker_process(pid, properties):
                return
            time.sleep(0.1)
        if sig is signal.SIGTERM:
            logger.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", pid, grace_s)
    raise BrokerError(f"broker pid {pid} survived SIGKILL")


def _remove_run_files(paths: _Paths) -> None:
    for path in (paths.pid, paths.state):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _running_state(data_dir: Path) -> dict[str, Any] | None:
    paths = _Paths(data_dir)
    try:
        state: dict[str, Any] = json.loads(paths.state.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _is_broker_process(pid, paths.properties):
        return None
    return state


def _is_broker_process(pid: int, properties: Path) -> bool:
    """Whether ``pid`` is alive (not a zombie) and, where /proc tells, runs this broker."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else; /proc below decides whether it is ours
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        return True
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"]):
        return False
    return b"kafka.Kafka" in cmdline and os.fsencode(str(properties)) in cmdline


def _log_tail(log: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return f"no log at {log}"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return f"last lines of {log}: " + " | ".join(tail) if tail else f"{log} is empty"


# --------------------------------------------------------------------------- ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port(avoid: int = 0) -> int:
    """A port the OS considers free on 127.0.0.1 now (another process may still take it)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != avoid:
            return port
    raise BrokerError("could not find a free TCP port on 127.0.0.1")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now, for tests that start their own broker.

    >>> 0 < free_port() < 65536
    True
    """
    return _free_port()


# --------------------------------------------------------------------------- readiness probe

_API_VERSIONS = 18
_METADATA = 3


def _probe(port: int, timeout_s: float) -> bool:
    """Whether a Kafka broker on 127.0.0.1:``port`` serves requests and lists a live broker.

    Sends ApiVersions v0 and then Metadata v1 (no topics) over a raw socket: the data-plane
    listener only accepts requests once the broker has caught up with the metadata log, and the
    broker list is empty until the node is unfenced, so a non-empty list means clients can work.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            body = _request(sock, _API_VERSIONS, 0, 1, b"")
            (error_code,) = struct.unpack_from(">h", body, 0)
            if error_code != 0:
                return False
            body = _request(sock, _METADATA, 1, 2, struct.pack(">i", 0))
            (broker_count,) = struct.unpack_from(">i", body, 0)
            return bool(broker_count > 0)
    except (OSError, struct.error, ValueError):
        return False


def _request(sock: socket.socket, api_key: int, api_version: int, correlation_id: int, body: bytes) -> bytes:
    client_id = b"detector-broker-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _read_exactly(sock, 4))
    response = _read_exactly(sock, size)
    (got_id,) = struct.unpack_from(">i", response, 0)
    if got_id != correlation_id:
        raise ValueError(f"correlation id {got_id} != {correlation_id}")
    return response[4:]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise ValueError("connection closed mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- CLI


def add_broker_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker start|stop|status`` to the CLI's subparsers.

    Each handler is stored as ``func`` on the parsed namespace, takes that namespace, prints
    one line and returns an exit code (``status`` returns 1 when no broker runs). Errors raise
    :class:`BrokerError`.

    >>> parser = argparse.ArgumentParser(prog="detector")
    >>> add_broker_commands(parser.add_subparsers(dest="command", required=True))
    >>> args = parser.parse_args(["broker", "start", "--port", "19092"])
    >>> args.port, args.func.__name__
    (19092, '_cli_start')
    """
    broker = subparsers.add_parser(
        "broker",
        help=f"run a local single-node Kafka {KAFKA_VERSION} broker (KRaft)",
        description=(
            f"Run a local single-node Kafka {KAFKA_VERSION} broker (KRaft), jars fetched from Maven "
            "Central on first use and cached in $DETECTOR_KAFKA_HOME or the user cache dir."
        ),
    )
    commands = broker.add_subparsers(dest="broker_command", required=True, metavar="{start,stop,status}")

    def data_dir_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="broker files and topic data "
            "(default: ${XDG_CACHE_HOME:-~/.cache}/distill-detector/broker-data)",
        )

    start_parser = commands.add_parser("start", help="start the broker and wait until it is ready")
    data_dir_option(start_parser)
    start_parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="client port (default: %(default)s)"
    )
    start_parser.add_argument(
        "--controller-port", type=int, default=None, help="KRaft controller port (default: free)"
    )
    start_parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for readiness (default: %(default)s)"
    )
    start_parser.set_defaults(func=_cli_start)

    stop_parser = commands.add_parser("stop", help="stop the broker (no-op when not running)")
    data_dir_option(stop_parser)
    stop_parser.set_defaults(func=_cli_stop)

    status_parser = commands.add_parser("status", help="show whether the broker runs; exit 1 if not")
    data_dir_option(status_parser)
    status_parser.set_defaults(func=_cli_status)


def _cli_data_dir(args: argparse.Namespace) -> Path:
    data_dir: Path | None = args.data_dir
    return data_dir if data_dir is not None else default_data_dir()


def _cli_start(args: argparse.Namespace) -> int:
    handle = start(
        _cli_data_dir(args), port=args.port, controller_port=args.controller_port, wait_s=args.wait
    )
    print(f"broker ready at {handle.bootstrap} (pid {handle.pid}, log {handle.log_path})")
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    data_dir = _cli_data_dir(args)
    stopped = stop(data_dir)
    print(f"broker stopped ({data_dir})" if stopped else f"broker not running ({data_dir})")
    return 0


def _cli_status(args: argparse.Namespace) -> int:
    data_dir = _cli_data_dir(args)
    info = status(data_dir)
    if info is None:
        print(f"broker not running ({data_dir})")
        return 1
    readiness = "ready" if info["ready"] else "not answering"
    print(f"broker {readiness} at {info['bootstrap']} (pid {info['pid']}, log {info['log']})")
    return 0
