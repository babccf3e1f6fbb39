"""Every Prometheus metric of the detector, declared once.

Names follow ``detector_<noun>_<unit>[_total]``. Labels are closed sets (actions, reason codes, DLQ
reasons, partitions) — never an account id, cluster id or anything derived from prompt content.
Metrics live in a :class:`Metrics` object with its own registry (no import-time global state), so
tests and several apps in one process do not collide; ``serve`` exposes it on ``/metrics``.

>>> m = Metrics()
>>> m.events.labels(result="valid").inc()
>>> b"detector_events_total" in m.render()
True
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from detector.fusion import ACTIONS, DETAILS
from detector.schemas import REASONS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SCORE_BUCKETS = tuple(i / 10 for i in range(1, 11))
# Every 50 ms up to 2 s, where the latency target (p99 <= 1 s) is read, then coarse.
MESSAGE_LATENCY_BUCKETS = tuple(round(i * 0.05, 2) for i in range(1, 41)) + (2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The detector's metrics in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events = Counter("detector_events_total", "Events read from api-calls (single or in envelopes), by "
                              "validation result",
                              ["result"], registry=r)
        self.envelopes = Counter("detector_envelopes_total", "Envelopes read from api-calls (each event in one is "
                                 "counted in detector_events_total too), by result: valid, or refused whole",
                                 ["result"], registry=r)
        self.events_scored = Counter("detector_events_scored_total", "Valid events run through the detector",
                                     registry=r)
        self.dead_letters = Counter("detector_dead_letters_total", "Inputs sent to the dead-letter topic, by reason",
                                    ["reason"], registry=r)
        self.invalid_ratio = Gauge("detector_invalid_ratio", "Share of invalid inputs over the last 1,000 inputs",
                                   registry=r)
        self.consumer_lag = Gauge("detector_consumer_lag_events", "Events behind the end of api-calls, per partition",
                                  ["partition"], registry=r)
        self.commit_stalled = Gauge("detector_commit_stalled_seconds",
                                    "Longest time a held partition of api-calls has had events to read while its "
                                    "committed offset did not move (a few seconds while every partition is caught up "
                                    "or committing); /healthz answers 503 from DETECTOR_WORKER__COMMIT_STALL_S",
                                    registry=r)
        self.offset_starts = Counter("detector_offset_starts_total",
                                     "Reads of the group's committed offsets after a rebalance, where each partition's "
                                     "offset count starts: read, or unknown (timed out or failed: counted from the "
                                     "first message instead)", ["result"], registry=r)
        self.latency = Histogram("detector_event_to_score_latency_seconds",
                                 "Time from an event's publication to Kafka (its message timestamp) to its score "
                                 "being published",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.message_latency = Histogram(
            "detector_message_latency_seconds",
            "Time from a message's timestamp (its publication to Kafka; an envelope's: when the gateway buffered its "
            "first event) to the end of the batch that processed it, its records and changelog writes delivered. "
            "Observed for every message: each event's event-to-score latency is at most its message's",
            buckets=MESSAGE_LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("detector_batch_duration_seconds", "Time to process one batch of events",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.scores = Counter("detector_scores_total", "Risk-score records published, by action", ["action"],
                              registry=r)
        self.score_values = Histogram("detector_score_value", "Scores of published risk-score records",
                                      buckets=SCORE_BUCKETS, registry=r)
        self.key_blocks = Counter("detector_key_blocks_total", "Key-block records published to blocked-keys (keys of "
                                  "blocked clusters), by key kind", ["kind"], registry=r)
        self.reasons = Counter("detector_reasons_total", "Top reason of published records, by reason code",
                               ["code"], registry=r)
        self.accounts = Gauge("detector_accounts_by_action", "Tracked accounts by current action", ["action"],
                              registry=r)
        self.accounts_tracked = Gauge("detector_accounts_tracked", "Accounts held in state", registry=r)
        self.clusters_blocked = Gauge("detector_clusters_blocked_current", "Clusters currently marked blocked",
                                      registry=r)
        self.clusters_newly_blocked = Counter("detector_clusters_blocked_total", "Clusters that became blocked",
                                              registry=r)
        self.model_warm = Gauge("detector_model_warm", "1 once the anomaly model has learned its warm-up points",
                                registry=r)
        self.model_learned = Counter("detector_model_learned_total", "Points the anomaly model learned from",
                                     registry=r)
        self.model_drift = Gauge("detector_model_tail_share",
                                 "Share of recent events the anomaly model ranks above 0.95 (about 0.05 when the "
                                 "baseline fits; drift moves it)", registry=r)
        self.duplicates = Counter("detector_events_duplicate_total", "Valid events skipped as already applied "
                                  "(redelivered after a crash or rebalance, or sent twice by the gateway)", registry=r)
        self.offset_holes = Counter("detector_offset_holes_total",
                                    "Offsets that never reached the worker's agent and were read back from the broker "
                                    "(refilled), or turned out to hold no record (empty: e.g. a transaction marker)",
                                    ["result"], registry=r)
        self.redeliveries = Counter("detector_messages_redelivered_total",
                                    "Messages the consumer delivered twice to the agent (skipped the second time)",
                                    registry=r)
        self.restored = Counter("detector_accounts_restored_total",
                                "Accounts restored from the account-state changelog (at start and on rebalance)",
                                registry=r)
        self.labels = Counter("detector_analyst_labels_total", "Analyst verdicts applied, by label", ["label"],
                              registry=r)
        self.rebalances = Counter("detector_rebalances_total", "Consumer group rebalances seen by this worker",
                                  registry=r)
        self.cluster_signals = Counter("detector_cluster_signals_total",
                                       "Cluster signals (detector.signals) by result: published by this worker, "
                                       "applied from another worker, or invalid (in a dead-lettered message)",
                                       ["result"], registry=r)
        self.signals_behind = Gauge("detector_cluster_signals_behind_seconds",
                                    "Age of the newest cluster-signals message applied when it was applied: how far "
                                    "this worker's copy of the clusters runs behind the other workers", registry=r)
        self.up = Gauge("detector_worker_up", "1 while the worker is running", registry=r)
        # Pre-create the closed label sets so dashboards show zeros instead of "no data".
        for result in ("valid", "invalid"):
            self.events.labels(result=result)
            self.envelopes.labels(result=result)
        for result in ("published", "applied", "invalid"):
            self.cluster_signals.labels(result=result)
        for result in ("refilled", "empty"):
            self.offset_holes.labels(result=result)
        for reason in (*REASONS, "internal"):
            self.dead_letters.labels(reason=reason)
        for action in ACTIONS:
            self.scores.labels(action=action)
            self.accounts.labels(action=action)
        for code in DETAILS:
            self.reasons.labels(code=code)
        for label in ("attack", "benign"):
            self.labels.labels(label=label)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` (a daemon thread)."""
        start_http_server(port, addr=addr, registry=self.registry)
