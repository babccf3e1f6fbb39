"""Fixtures for integration tests against a real Kafka broker.

``kafka_bootstrap`` starts one single-node KRaft broker per test session (see
``detector/broker.py``) on a free port in a temporary directory, and stops it at the end. Set
``DETECTOR_TEST_BOOTSTRAP=host:port`` to run the tests against a broker you already have instead.

Every test under ``tests/integration`` is marked ``integration``, so ``-m "not integration"``
skips them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detector import broker

_HERE = Path(__file__).resolve().parent

CreateTopic = Callable[..., str]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs a real Kafka broker (started on demand)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a broker that lives for the whole test session."""
    external = os.environ.get("DETECTOR_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    data_dir = tmp_path_factory.mktemp("kafka")
    broker.ensure_jars()
    handle = broker.start(data_dir, port=broker.free_port())
    try:
        yield handle.bootstrap
    finally:
        broker.stop(data_dir)


def create_topic(bootstrap: str, name: str, partitions: int = 1, compacted: bool = False) -> str:
    """Create ``name`` (replication factor 1), wait until every partition has a leader, return it.

    ``compacted=True`` sets ``cleanup.policy=compact``, as Faust does for table changelogs.
    """
    from kafka import KafkaAdminClient

    configs = {"cleanup.policy": "compact"} if compacted else {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="detector-tests")
    try:
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1, "configs": configs}},
            timeout_ms=10_000,
            wait_for_metadata=True,
        )
    finally:
        admin.close()
    return name


@pytest.fixture(name="create_topic")
def create_topic_fixture() -> CreateTopic:
    """:func:`create_topic` as a fixture, so tests need not import from conftest."""
    return create_topic
