"""The worker's topics, created up front with kafka-python's admin client (no Faust here).

Faust only creates its own internal topics; a topic it merely consumes or produces to would be
auto-created by the broker with the broker's defaults, and ``risk-scores`` must be *compacted* (the
latest record per account is its current decision). So the worker calls :func:`ensure_topics` before
it starts::

    topic            partitions              cleanup.policy   key
    api-calls        settings.topics.partitions  delete       account_id
    analyst-labels   same as api-calls           delete       account_id  (co-partitioned with api-calls)
    risk-scores      same as api-calls           compact      account_id
    api-calls.dlq    same as api-calls           delete       the original key

Existing topics are left as they are; a mismatch that matters (``risk-scores`` not compacted,
``analyst-labels`` not co-partitioned with ``api-calls``) is logged as a warning.
"""

from __future__ import annotations

import logging
from typing import Any

from detector.settings import KafkaSettings, Settings, SettingsError

log = logging.getLogger(__name__)

_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def kafka_client_config(kafka: KafkaSettings) -> dict[str, Any]:
    """kafka-python client options for ``kafka`` (bootstrap and security); the password is revealed here.

    >>> kafka_client_config(KafkaSettings(bootstrap="k1:9092,k2:9092"))
    {'bootstrap_servers': ['k1:9092', 'k2:9092'], 'security_protocol': 'PLAINTEXT'}
    >>> from detector.settings import Secret
    >>> cfg = kafka_client_config(KafkaSettings(security_protocol="SASL_SSL", sasl_username="u",
    ...                                         sasl_password=Secret("p"), ssl_cafile="/ca.pem"))
    >>> cfg["sasl_mechanism"], cfg["sasl_plain_password"], cfg["ssl_cafile"]
    ('PLAIN', 'p', '/ca.pem')
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
                      sasl_plain_password=kafka.sasl_password.reveal())
    if protocol.endswith("SSL"):
        config.update({name: value for name, value in (("ssl_cafile", kafka.ssl_cafile),
                                                        ("ssl_certfile", kafka.ssl_certfile),
                                                        ("ssl_keyfile", kafka.ssl_keyfile)) if value})
    return config


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
    }


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create the worker's topics that do not exist yet; return the names created.

    Idempotent and safe to race with another worker (an "already exists" answer is fine). Waits until
    every created partition has a leader. Raises kafka-python's errors for anything else (no broker,
    not authorised).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError, for_code

    specs = topic_specs(settings)
    admin = KafkaAdminClient(client_id=f"{settings.worker.app_id}-admin", request_timeout_ms=int(timeout_s * 1000),
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
