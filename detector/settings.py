"""Settings: one frozen, typed object read from ``DETECTOR_*`` environment variables.

Nested sections map to double underscores: ``Settings().kafka.bootstrap`` is ``DETECTOR_KAFKA__BOOTSTRAP``.
Only the CLI calls :func:`load_settings`; library code receives a ``Settings`` and never reads the
environment itself.

>>> s = load_settings({"DETECTOR_KAFKA__BOOTSTRAP": "k1:9092", "DETECTOR_DETECTION__BLOCK_AT": "0.9"})
>>> s.kafka.bootstrap, s.detection.block_at
('k1:9092', 0.9)
>>> "hunter2" in repr(load_settings({"DETECTOR_KAFKA__SASL_PASSWORD": "hunter2"}))
False
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "DETECTOR_"
#: Variables read by tools rather than by the detector's settings: the local broker's jar cache and the
#: simulator's prompt datasets. ``DETECTOR_TEST_*`` variables belong to the test suite.
TOOL_VARIABLES = frozenset({"DETECTOR_KAFKA_HOME", "DETECTOR_PROMPTS_DIR"})


class SettingsError(ValueError):
    """A setting has a value of the wrong type or out of range."""


class Secret(str):
    """A string that does not show itself in ``repr`` or logs."""

    def __repr__(self) -> str:
        return "Secret('********')" if self else "Secret('')"

    def __str__(self) -> str:  # str() is used by logging's %s
        return "********" if self else ""

    def reveal(self) -> str:
        """The secret value, for the one place that needs it (a client's config)."""
        return str.__str__(self)


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: Secret = Secret("")
    ssl_cafile: str = ""
    ssl_certfile: str = ""  # client certificate, for mTLS
    ssl_keyfile: str = ""


@dataclass(frozen=True)
class TopicSettings:
    api_calls: str = "api-calls"
    dead_letters: str = "api-calls.dlq"
    risk_scores: str = "risk-scores"
    analyst_labels: str = "analyst-labels"
    blocked_keys: str = "blocked-keys"  # compacted; key blocks for the rate limiter (detector.keyblocks)
    cluster_signals: str = "cluster-signals"  # between workers: their shares of the clusters (detector.signals)
    partitions: int = 4


@dataclass(frozen=True)
class DetectionSettings:
    """Thresholds of the fusion step (see :mod:`detector.fusion`)."""

    watch_at: float = 0.5
    throttle_at: float = 0.7
    block_at: float = 0.85
    hysteresis: float = 0.1  # a level is left only when the score falls this far below its threshold
    min_score_change: float = 0.05  # smaller moves are not re-published
    allowlist: tuple[str, ...] = ()  # account ids or org ids of known-good heavy users
    idle_evict_s: int = 3 * 24 * 3600  # account state idle this long (event time) is dropped
    max_accounts: int = 2_000_000  # hard bound on tracked accounts (oldest evicted first)
    # Scoring on change: an allowed account scoring below quiet_score is re-scored at most once per rescore_ms
    # of event time (its windows, links and cluster take every event). 0 scores every event.
    rescore_ms: int = 60_000
    quiet_score: float = 0.25
    # The anomaly model (population, hst or loda): the one `detector evaluate` chose (EVALUATION.md; on 2026-12-04
    # population: served 2.19% against hst 1.97%, within the 0.5-point tie, then first detection 1.78% vs 1.79%).
    anomaly_model: str = "population"
    # Key blocks (detector.keyblocks): a blocked cluster's cards, networks and devices are published to
    # blocked-keys, valid this long from when they are published, so the gateway refuses new accounts on them
    # before their first call. 0 publishes none.
    key_block_ttl_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class WorkerSettings:
    app_id: str = "distill-detector"
    data_dir: str = ".detector-data"
    web_port: int = 6066
    metrics_port: int = 9464
    batch_size: int = 2000  # messages per batch at most (a single event is one message)
    # A batch also ends once its messages hold this many bytes (envelopes). 1 MiB rather than 2: the same drain
    # rate, and p99 latency at 80% load 0.66-0.68 s instead of 0.95-1.05 s (BENCHMARKS.md, run Q).
    batch_max_bytes: int = 1024 * 1024
    batch_within_s: float = 0.2
    max_event_bytes: int = 64 * 1024
    invalid_ratio_limit: float = 0.05  # alert (and log) when more than this share of a window is invalid
    session_timeout_s: float = 10.0  # a worker silent this long is out of the group; its partitions move
    fetch_max_wait_ms: int = 100  # longest a fetch waits for data (Faust hard-codes 1500: a latency floor)
    # Publish what this worker's events did to the clusters and fold in the other workers' (detector.signals), so
    # that clusters spanning partitions held by different workers are seen whole. Off: each links only its own.
    share_clusters: bool = True
    # A partition with events to read whose commit has not moved this long is stalled: /healthz answers 503 and
    # detector_commit_stalled_seconds shows it (detector.streaming.health). Rebalances and recoveries pause commits
    # for seconds to tens of seconds (a broker restart: up to 21 s in the chaos runs).
    commit_stall_s: float = 120.0
    # Warm start (share_clusters): before it joins the group, a starting worker folds in the last
    # signals_lookback_s of cluster-signals, its own previous run's signals included, so the cross-account state
    # (content index, clusters, blocked clusters, caught prompts, verdicts) survives a restart; cluster-signals
    # is kept that long plus an hour. It waits at most signals_warmup_max_s for this and folds in the rest while
    # it runs. A lookback under a minute may miss what other workers published while this one started.
    signals_lookback_s: float = 86_400.0
    signals_warmup_max_s: float = 45.0


@dataclass(frozen=True)
class RateLimitSettings:
    """The reference rate limiter, ``detector ratelimit`` (:mod:`detector.ratelimit`).

    ``*_per_minute`` of 0 means unlimited for ``allow`` and ``watch``; ``throttle`` always has a limit and
    ``block`` always refuses. No consumer group is used (the limiter rebuilds from the start of the compacted
    topic every time), so ``client_id`` only names the consumer in broker logs and quotas.
    """

    host: str = "0.0.0.0"
    port: int = 8088
    metrics_port: int = 9465  # a second listener for /metrics only (it is also on `port`); 0 = none
    client_id: str = "distill-detector-ratelimit"
    allow_per_minute: int = 0  # 0 = unlimited; otherwise burst = one minute's worth
    watch_per_minute: int = 0  # 0 = unlimited (counted in metrics); otherwise burst = one minute's worth
    throttle_per_minute: int = 10
    throttle_burst: int = 5
    max_buckets: int = 1_000_000  # token buckets held at most (least recently used evicted first)
    max_clock_skew_s: float = 300.0  # records emitted further in the future than this are rejected
    rebuild_invalid_action: str = "throttle"  # for an account whose only record read at start is invalid

    def __post_init__(self) -> None:
        if self.allow_per_minute < 0 or self.watch_per_minute < 0:
            raise SettingsError("RATELIMIT__ALLOW_PER_MINUTE and __WATCH_PER_MINUTE must be >= 0 (0 = unlimited)")
        if self.throttle_per_minute <= 0 or self.throttle_burst < 1:
            raise SettingsError("need RATELIMIT__THROTTLE_PER_MINUTE > 0 and RATELIMIT__THROTTLE_BURST >= 1")
        if self.max_buckets < 1 or self.max_clock_skew_s < 0:
            raise SettingsError("need RATELIMIT__MAX_BUCKETS >= 1 and RATELIMIT__MAX_CLOCK_SKEW_S >= 0")
        if self.rebuild_invalid_action not in ("allow", "watch", "throttle", "block"):
            raise SettingsError("RATELIMIT__REBUILD_INVALID_ACTION must be allow, watch, throttle or block")


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    detection: DetectionSettings = field(default_factory=DetectionSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    fingerprint_key: Secret = Secret("distill-detector-demo-key")  # set per deployment; shared by all gateways
    log_level: str = "INFO"


def _convert(raw: str, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is Secret:
            return Secret(raw)
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if origin is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if hint is str or isinstance(hint, types.UnionType):
            return raw
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    raise SettingsError(f"{name}: unsupported setting type {hint!r}")


def _build(cls: type, env: Mapping[str, str], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, env, name + "__")  # type: ignore[arg-type]
        elif name in env:
            values[f.name] = _convert(env[name], hint, name)
    return cls(**values)


def env_names(cls: type = Settings, prefix: str = PREFIX) -> list[str]:
    """Every environment variable the settings read, for docs, compose and Helm checks.

    >>> "DETECTOR_KAFKA__BOOTSTRAP" in env_names()
    True
    """
    hints = typing.get_type_hints(cls)
    names: list[str] = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(hints[f.name]):
            names.extend(env_names(hints[f.name], name + "__"))
        else:
            names.append(name)
    return names


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (the process environment by default); unknown DETECTOR_ names fail."""
    import os

    env = os.environ if env is None else env
    known = set(env_names())
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known and k not in TOOL_VARIABLES
                     and not k.startswith("DETECTOR_TEST_"))
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]} (known: see README, Configuration)")
    settings: Settings = _build(Settings, env, PREFIX)
    d = settings.detection
    if not 0 < d.watch_at < d.throttle_at < d.block_at <= 1:
        raise SettingsError("need 0 < DETECTION__WATCH_AT < THROTTLE_AT < BLOCK_AT <= 1")
    w = settings.worker
    if w.signals_lookback_s < 0 or w.signals_warmup_max_s < 0:
        raise SettingsError("WORKER__SIGNALS_LOOKBACK_S and __SIGNALS_WARMUP_MAX_S must be >= 0")
    if d.anomaly_model not in ("population", "hst", "loda"):
        raise SettingsError(f"DETECTION__ANOMALY_MODEL must be population, hst or loda, not {d.anomaly_model!r}")
    return settings
