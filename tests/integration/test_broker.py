"""The local KRaft broker from ``detector/broker.py`` against both Python Kafka clients we use.

kafka-python drives the admin API and a plain produce/consume round trip; aiokafka (the client
under faust-streaming) proves that this broker version still speaks the protocol versions it
sends. The lifecycle tests start a second broker of their own in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from detector import broker

pytestmark = pytest.mark.integration

CreateTopic = Callable[..., str]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


Record = tuple[bytes | None, bytes | None]


def _consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Record]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=_unique("test-group"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[Record] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(received) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend((record.key, record.value) for record in records)
        consumer.commit()
    finally:
        consumer.close()
    return received


def test_kafka_python_round_trip(kafka_bootstrap: str, create_topic: CreateTopic) -> None:
    from kafka import KafkaProducer

    topic = create_topic(kafka_bootstrap, _unique("round-trip"), partitions=3)
    sent = [(f"k{i % 17}".encode(), f"v{i}".encode()) for i in range(500)]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in sent:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()

    received = _consume_all(kafka_bootstrap, topic, expected=len(sent))

    assert sorted(received) == sorted(sent)
    # Per key, order is kept (one key always lands in the same partition).
    for key in {k for k, _ in sent}:
        assert [v for k, v in received if k == key] == [v for k, v in sent if k == key]


def test_auto_created_topic_has_one_partition(kafka_bootstrap: str) -> None:
    from kafka import KafkaAdminClient, KafkaProducer

    topic = _unique("auto-created")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        producer.send(topic, b"hello").get(timeout=30)
    finally:
        producer.close()

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        (description,) = admin.describe_topics([topic])
    finally:
        admin.close()
    assert len(description["partitions"]) == 1
    assert _consume_all(kafka_bootstrap, topic, expected=1) == [(None, b"hello")]


def test_compacted_topic_config(kafka_bootstrap: str, create_topic: CreateTopic) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    compacted = create_topic(kafka_bootstrap, _unique("changelog"), partitions=2, compacted=True)
    plain = create_topic(kafka_bootstrap, _unique("plain"))

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        configs = admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, compacted, ["cleanup.policy"]),
                ConfigResource(ConfigResourceType.TOPIC, plain, ["cleanup.policy"]),
            ],
            config_filter="all",
        )
        (description,) = admin.describe_topics([compacted])
    finally:
        admin.close()

    topics = configs["topic"]
    assert topics[compacted]["cleanup.policy"]["value"] == "compact"
    assert topics[plain]["cleanup.policy"]["value"] == "delete"
    assert len(description["partitions"]) == 2


def test_aiokafka_round_trip(kafka_bootstrap: str, create_topic: CreateTopic) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = create_topic(kafka_bootstrap, _unique("aiokafka"), partitions=2)
    sent = [(f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(200)]

    async def round_trip() -> list[tuple[bytes | None, bytes | None]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            batch = [await producer.send(topic, key=key, value=value) for key, value in sent]
            await asyncio.gather(*batch)
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=_unique("aiokafka-group"),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        received: list[tuple[bytes | None, bytes | None]] = []
        try:
            deadline = time.monotonic() + 30
            while len(received) < len(sent) and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    received.extend((record.key, record.value) for record in records)
            await consumer.commit()
        finally:
            await consumer.stop()
        return received

    received = asyncio.run(round_trip())

    assert sorted(received) == sorted(sent)


def test_lifecycle_is_idempotent_and_keeps_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kafka import KafkaProducer

    data_dir = tmp_path / "broker"
    port = broker.free_port()
    assert broker.status(data_dir) is None
    assert broker.stop(data_dir) is False

    handle = broker.start(data_dir, port=port)
    try:
        assert handle.bootstrap == f"127.0.0.1:{port}"
        assert handle.log_path.is_file()
        info = broker.status(data_dir)
        assert info is not None
        assert info["ready"] is True
        assert info["pid"] == handle.pid
        assert broker.start(data_dir, port=port).pid == handle.pid  # already running: same broker
        with pytest.raises(broker.BrokerError, match="already running"):
            broker.start(data_dir, port=broker.free_port())

        topic = _unique("survives-restart")
        producer = KafkaProducer(bootstrap_servers=handle.bootstrap, acks="all")
        try:
            producer.send(topic, key=b"k", value=b"kept").get(timeout=30)
        finally:
            producer.close()
    finally:
        assert broker.stop(data_dir) is True
    assert broker.stop(data_dir) is False
    assert broker.status(data_dir) is None
    assert not (data_dir / "broker.pid").exists()

    # Restart through the CLI handlers the `detector broker ...` subcommands run.
    parser = argparse.ArgumentParser(prog="detector")
    broker.add_broker_commands(parser.add_subparsers(dest="command", required=True))

    def cli(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(["broker", *argv, "--data-dir", str(data_dir)])
        code = args.func(args)
        return code, capsys.readouterr().out

    code, out = cli("start", "--port", str(port))
    assert (code, out.startswith(f"broker ready at 127.0.0.1:{port} ")) == (0, True)
    try:
        restarted = broker.status(data_dir)
        assert restarted is not None and restarted["pid"] != handle.pid
        assert _consume_all(handle.bootstrap, topic, expected=1) == [(b"k", b"kept")]
        code, out = cli("status")
        assert (code, out.startswith(f"broker ready at 127.0.0.1:{port} ")) == (0, True)
    finally:
        assert cli("stop") == (0, f"broker stopped ({data_dir})\n")
    assert cli("stop") == (0, f"broker not running ({data_dir})\n")
    assert cli("status") == (1, f"broker not running ({data_dir})\n")


def test_start_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        with pytest.raises(broker.BrokerError, match=f"port {taken} .* already in use"):
            broker.start(tmp_path / "broker", port=taken)
    assert broker.status(tmp_path / "broker") is None


def test_missing_tools_give_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = shutil.which("java")
    assert java is not None
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(broker.BrokerError, match="java not found") as no_java:
        broker.ensure_jars(tmp_path / "kafka-home")
    assert "\n" not in str(no_java.value)

    (empty_bin / "java").symlink_to(Path(java).resolve())
    with pytest.raises(broker.BrokerError, match="mvn not found") as no_mvn:
        broker.ensure_jars(tmp_path / "kafka-home")
    assert "\n" not in str(no_mvn.value)
    assert not (tmp_path / "kafka-home" / "libs").exists()

    failing_mvn = empty_bin / "mvn"
    failing_mvn.write_text(
        "#!/bin/sh\n"
        "echo '[ERROR] Failed to execute goal on project kafka-broker-runtime: Could not resolve'\n"
        "echo '[ERROR] more detail'\n"
        "exit 1\n"
    )
    failing_mvn.chmod(0o755)
    with pytest.raises(broker.BrokerError, match=r"\(exit 1\): Failed to execute goal") as failed:
        broker.ensure_jars(tmp_path / "kafka-home")
    assert "\n" not in str(failed.value)
    assert not (tmp_path / "kafka-home" / "libs").exists()
    assert list((tmp_path / "kafka-home").iterdir()) == []  # the temporary download dir is gone
