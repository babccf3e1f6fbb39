"""Kafka security through the project's settings, against a real secured broker (see ``secured_kafka.py``).

One broker per module, with SCRAM-SHA-512 over TLS, mutual TLS, the KRaft authorizer and the ACLs of
docs/SECURITY.md; every client below is built from a :class:`~detector.settings.KafkaSettings` (in-process) or
from ``DETECTOR_KAFKA__*`` variables (the ``detector worker`` subprocesses), never configured by hand::

    gateway (SASL_SSL and mTLS) ──▶ api-calls ──┬─▶ worker A (SASL_SSL, --debug) ──┬─▶ risk-scores ──▶ rate limiter
    analyst (super user) ──▶ analyst-labels ───┴─▶ worker B (mTLS, own group) ───┴─▶ api-calls.dlq  (SASL_SSL, mTLS)

What it proves:

* the gateway SDK (:class:`~detector.gateway.EventPublisher`) publishes over SASL_SSL and over mTLS, and a
  consumer built from :func:`~detector.streaming.topics.kafka_client_config` reads the events back;
* real ``detector worker`` processes (kafka-python for topic set-up, then Faust on aiokafka with
  ``broker_credentials``), one over SASL_SSL and one over mTLS, each commit every input message and write
  risk-score records and a dead letter; the rate limiter (:class:`~detector.ratelimit.RateLimiterService`)
  reads the decisions back over both;
* a wrong password, a missing client certificate and a certificate from another CA are refused with one
  line naming the cause, within a bounded time, in-process and from the ``detector worker`` CLI;
* no password appears in any worker log, not even at ``--debug``; no prompt text in any topic, log or metric;
  no account id in any metric;
* the ACLs hold: only User:detector may write ``risk-scores``; the gateway, the rate limiter and an
  unauthenticated client are refused; the documented ``kafka-acls.sh`` commands are the ones applied here.

Costs about a minute on two cores: a broker start (two JVMs), one JVM for the ACL commands, two workers at once,
and two refused workers that run in the background for kafka-python's 30 s bootstrap timeout.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector import broker
from detector.gateway import EventPublisher, make_event
from detector.ratelimit import RateLimiterService, _example_record
from detector.settings import KafkaSettings, RateLimitSettings, Settings, TopicSettings
from detector.streaming.topics import (
    KafkaConnectError,
    committed,
    describe_connection,
    ensure_topics,
    kafka_client_config,
)
from tests.integration.secured_kafka import (
    ACLS,
    GROUP,
    TOPICS,
    Acl,
    SecuredBroker,
    acl_commands,
    run_acl_commands,
    start_secured_broker,
)

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 45.0
#: kafka-python's bootstrap timeout in the in-process refusal checks (the worker CLI keeps its 30 s).
REFUSE_TIMEOUT_S = 2.0
TS = 1_775_000_000_000
#: Words of every prompt the gateway is given: they must not leave the gateway.
PROMPT_WORDS = "of the secret distillation proof"
#: The two workers run as two apps (own groups; internal topics under the ``<app id>-`` prefix ACL), so both
#: process every message and each proves its own connection; B's group needs one more ACL.
APP_IDS = {"SASL_SSL": GROUP, "SSL": f"{GROUP}-mtls"}


@dataclass
class Worker:
    """A ``detector worker`` subprocess and its log (stdout and stderr)."""

    proc: subprocess.Popen[bytes]
    log: Path
    terminated: bool = False

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def terminate(self) -> None:
        """SIGTERM, once: a second one, after Faust has restored the default handler, would kill the worker."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout_s: float = 30.0) -> int:
        """:meth:`terminate` and wait; SIGKILL after ``timeout_s``."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@dataclass
class Cluster:
    """The module's broker, its administrator settings (User:broker over mTLS) and the refused workers."""

    sb: SecuredBroker
    admin: KafkaSettings
    work: Path
    refused: dict[str, Worker] = field(default_factory=dict)


def start_worker(sb: SecuredBroker, kafka: KafkaSettings, work: Path, name: str, *args: str,
                 app_id: str = GROUP, metrics_port: int = 0) -> Worker:
    """``detector [args] worker`` configured by ``DETECTOR_*`` variables only: ``kafka``, app id, data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    env.update(sb.env(kafka))
    env.update({"DETECTOR_WORKER__APP_ID": app_id, "DETECTOR_WORKER__DATA_DIR": str(work / f"{name}-data"),
                "DETECTOR_WORKER__WEB_PORT": "0",
                "DETECTOR_WORKER__METRICS_PORT": str(metrics_port), "DETECTOR_TOPICS__PARTITIONS": "1",
                "DETECTOR_WORKER__BATCH_WITHIN_S": "0.05"})
    log = work / f"{name}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "detector.cli", *args, "worker"], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Worker(proc, log)


def publisher(kafka: KafkaSettings, topic: str, **options: Any) -> EventPublisher:
    """The gateway SDK's publisher for ``kafka``, as a gateway configures it from its settings."""
    config = kafka_client_config(kafka)
    del config["bootstrap_servers"]
    return EventPublisher(kafka.bootstrap, topic, **config, **options)


def read(kafka: KafkaSettings, topic: str, want: int | None = None, timeout_s: float = 10.0) -> list[Any]:
    """Records of ``topic`` partition 0 from the start, read as ``kafka``'s principal (no consumer group), up to
    ``want`` records or, by default, to the end offset the topic has now; gives up after ``timeout_s``.
    kafka-python raises some authorization errors and only logs others, so a refused reader gets an error or
    nothing."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, bootstrap_timeout_ms=10_000,
                             **kafka_client_config(kafka))
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp] if want is None else None
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (len(records) >= want) if want is not None else (consumer.position(tp) >= end):
                break
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def end_offset(kafka: KafkaSettings, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(group_id=None, bootstrap_timeout_ms=10_000, **kafka_client_config(kafka))
    try:
        tp = TopicPartition(topic, 0)
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


def committed_offsets(admin: KafkaSettings, group: str) -> dict[str, int]:
    """A worker group's committed offsets on its two input topics."""
    from kafka import KafkaAdminClient

    client = KafkaAdminClient(client_id="security-test", **kafka_client_config(admin))
    try:
        return {topic: committed(client, group, topic) for topic in (TOPICS.api_calls, TOPICS.analyst_labels)}
    finally:
        client.close()


def wait_for(what: str, done: Callable[[], bool], worker: Worker | None = None, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if worker is not None and worker.proc.poll() is not None:
            pytest.fail(f"worker exited ({worker.proc.returncode}) before {what}; log tail:\n{worker.tail()}")
        if time.monotonic() > deadline:
            tail = f"; worker log tail:\n{worker.tail()}" if worker is not None else ""
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")
        time.sleep(0.3)


def wait_committed(admin: KafkaSettings, group: str, topic: str, offset: int, worker: Worker) -> None:
    """Wait until ``group`` has committed ``offset`` on ``topic``: every message before it is processed."""
    wait_for(f"{group} to commit offset {offset} of {topic}",
             lambda: committed_offsets(admin, group)[topic] >= offset, worker)


def event(account: str, i: int) -> dict[str, Any]:
    return make_event(account_id=account, ts=TS + i * 1000, api_key_id=f"key_{account}", model="m-1",
                      endpoint="/v1/messages", status=200, input_tokens=20, output_tokens=200, latency_ms=900,
                      client={"ip": "203.0.113.7", "asn": 64500}, response={"stop_reason": "end_turn"},
                      prompt_text=f"Explain step {i} {PROMPT_WORDS} in detail.", fingerprint_key=b"security-test")


def label(account: str) -> bytes:
    return orjson.dumps({"schema_version": 1, "account_id": account, "label": "attack", "analyst": "kim",
                         "ts": TS + 3_600_000})


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The secured broker with the ACLs (the documented ``kafka-acls.sh`` commands, run by the super user) and the
    four topics (created by the super user), and two workers with bad credentials, started at once because each
    takes kafka-python's 30 s bootstrap timeout to give up."""
    work = tmp_path_factory.mktemp("security")
    broker.ensure_jars()
    sb = start_secured_broker(work)
    c = Cluster(sb, sb.cert("broker"), work)
    try:
        c.refused["wrong password"] = start_worker(sb, sb.scram("detector", password="not-the-password"), work,
                                                   "refused-password")
        c.refused["no client certificate"] = start_worker(sb, sb.cert(None), work, "refused-nocert")
        run_acl_commands(sb, acl_commands([*ACLS, Acl("User:detector", "group", APP_IDS["SSL"], ("Read",))]))
        ensure_topics(dataclasses.replace(Settings(), kafka=c.admin, topics=TopicSettings(partitions=1)))
        yield c
    finally:
        for worker in c.refused.values():
            worker.stop(timeout_s=5)
        broker.stop(sb.handle.data_dir)


@dataclass
class WorkerRuns:
    """What the two workers (A over SASL_SSL, B over mTLS) were given and left behind."""

    accounts: dict[str, str]  # transport of the gateway that published the account's events -> account
    invalid_offset: int  # offset in api-calls of a payload that is not JSON
    returncodes: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # /metrics of each worker, scraped before it stopped

    def summary(self, transport: str) -> dict[str, int]:
        """The counters of the worker's last log line (``worker stopped: events=... records=...``)."""
        line = next(line for line in reversed(self.logs[transport].splitlines()) if "worker stopped:" in line)
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.partition("worker stopped:")[2])}


@pytest.fixture(scope="module")
def runs(cluster: Cluster) -> WorkerRuns:
    """Workers A (SASL_SSL, ``--debug``: the most verbose logs) and B (mTLS) at once, as two apps with their own
    groups. The gateway publishes three events for one account over SASL_SSL, a payload that is not JSON, and
    three events for another account over mTLS; then an analyst labels both accounts as attacks. Waits until
    each group has committed every message, then stops both workers."""
    sb, admin = cluster.sb, cluster.admin
    result = WorkerRuns(accounts={"SASL_SSL": "acct_sec_sasl", "SSL": "acct_sec_mtls"}, invalid_offset=-1)
    ports = {"SASL_SSL": broker.free_port(), "SSL": broker.free_port()}
    workers = {
        "SASL_SSL": start_worker(sb, sb.scram("detector"), cluster.work, "worker-sasl", "--debug",
                                 app_id=APP_IDS["SASL_SSL"], metrics_port=ports["SASL_SSL"]),
        "SSL": start_worker(sb, sb.cert("detector"), cluster.work, "worker-mtls", app_id=APP_IDS["SSL"],
                            metrics_port=ports["SSL"]),
    }
    try:
        for transport, gateway in (("SASL_SSL", sb.scram("gateway")), ("SSL", sb.cert("gateway"))):
            account = result.accounts[transport]
            with publisher(gateway, TOPICS.api_calls) as pub:
                for i in range(3):
                    pub.publish(event(account, i))
                if transport == "SASL_SSL":
                    result.invalid_offset = pub.publish_raw(account, b'{"account_id": ').get(timeout=10).offset
        events = end_offset(admin, TOPICS.api_calls)
        for transport, worker in workers.items():
            wait_committed(admin, APP_IDS[transport], TOPICS.api_calls, events, worker)
        with publisher(admin, TOPICS.analyst_labels, validate=False) as pub:
            offsets = [pub.publish_raw(a, label(a)).get(timeout=10).offset for a in result.accounts.values()]
        for transport, worker in workers.items():
            wait_committed(admin, APP_IDS[transport], TOPICS.analyst_labels, max(offsets) + 1, worker)
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[transport]}/metrics", timeout=5) as resp:
                result.metrics[transport] = resp.read().decode()
    finally:
        for worker in workers.values():  # both stop at once
            worker.terminate()
        for transport, worker in workers.items():
            result.returncodes[transport] = worker.stop()
            result.logs[transport] = worker.text()
    return result


# ------------------------------------------------------------------------------------------------ tests


def test_docs_print_the_acl_commands_this_test_applies() -> None:
    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    for command in acl_commands(ACLS):
        assert command in doc


@pytest.mark.parametrize("transport", ["SASL_SSL", "SSL"])
def test_gateway_publishes_and_detector_reads_back(cluster: Cluster, transport: str) -> None:
    sb = cluster.sb
    gateway, detector = ((sb.scram("gateway"), sb.scram("detector")) if transport == "SASL_SSL"
                         else (sb.cert("gateway"), sb.cert("detector")))
    ev = event(f"acct_roundtrip_{transport.lower()}", 0)
    with publisher(gateway, TOPICS.api_calls) as pub:
        offset = pub.publish(ev).get(timeout=10).offset
    records = read(detector, TOPICS.api_calls, want=offset + 1)
    assert [orjson.loads(r.value)["event_id"] for r in records if r.offset == offset] == [ev["event_id"]]


def test_workers_run_over_sasl_ssl_and_mtls(runs: WorkerRuns) -> None:
    for transport in ("SASL_SSL", "SSL"):
        log = runs.logs[transport]
        assert runs.returncodes[transport] == 0, f"{transport}: exit {runs.returncodes[transport]}:\n{log[-2000:]}"
        assert "[^Worker]: Ready" in log
        assert "AuthorizationFailed" not in log and "Traceback" not in log
        counts = runs.summary(transport)
        assert counts["labels_applied"] >= 2 and counts["records"] >= 2 and counts["dead_letters"] >= 1, counts


def test_workers_write_risk_scores_and_dead_letters(cluster: Cluster, runs: WorkerRuns) -> None:
    """Each worker wrote a block record for both labelled accounts and dead-lettered the invalid payload."""
    scores = [orjson.loads(r.value) for r in read(cluster.admin, TOPICS.risk_scores, want=4)]
    for account in runs.accounts.values():
        assert len([s for s in scores if s["account_id"] == account and s["action"] == "block"]) >= 2
    letters = [orjson.loads(r.value) for r in read(cluster.admin, TOPICS.dead_letters, want=2)]
    events = [(d["source_offset"], d["reason"]) for d in letters if d["source_topic"] == TOPICS.api_calls]
    assert len(events) >= 2 and set(events) == {(runs.invalid_offset, "not_json")}


@pytest.mark.parametrize("transport", ["SASL_SSL", "SSL"])
def test_rate_limiter_reads_the_decisions(cluster: Cluster, runs: WorkerRuns, transport: str) -> None:
    kafka = cluster.sb.scram("ratelimiter") if transport == "SASL_SSL" else cluster.sb.cert("ratelimiter")
    settings = dataclasses.replace(Settings(), kafka=kafka,
                                   ratelimit=RateLimitSettings(host="127.0.0.1", port=0, metrics_port=0))
    svc = RateLimiterService(settings).start()
    try:
        assert svc.wait_ready(WAIT_S)
        assert {a: svc.limiter.decide(a)["action"] for a in runs.accounts.values()} == \
            dict.fromkeys(runs.accounts.values(), "block")
        metrics = svc.metrics.render().decode()
    finally:
        svc.stop()
    assert 'detector_ratelimit_decisions_total{action="block"} 2.0' in metrics
    assert not [a for a in runs.accounts.values() if a in metrics]  # no account id in a metric label


def test_no_prompt_text_anywhere_and_no_account_id_in_metrics(cluster: Cluster, runs: WorkerRuns) -> None:
    """The prompt text the gateway was given is in no topic, worker log (at ``--debug`` too) or metric; the
    accounts the workers blocked are in no metric label."""
    topics = [TOPICS.api_calls, TOPICS.risk_scores, TOPICS.dead_letters, TOPICS.analyst_labels]
    stored = b"".join(r.value or b"" for topic in topics for r in read(cluster.admin, topic))
    assert b'"prompt":{"fp_version":1' in stored  # the events are there, fingerprinted
    for where, text in [("topics", stored.decode()), *runs.logs.items(), *runs.metrics.items()]:
        assert PROMPT_WORDS not in text, where
    for transport, text in runs.metrics.items():
        assert "detector_events_total" in text
        assert not [a for a in runs.accounts.values() if a in text], transport


def test_no_password_in_worker_logs(cluster: Cluster, runs: WorkerRuns) -> None:
    passwords = [*cluster.sb.passwords.values(), "not-the-password"]
    cluster.refused["wrong password"].proc.wait(timeout=WAIT_S + 15)
    logs = {**runs.logs, **{name: w.text() for name, w in cluster.refused.items()}}
    assert "sasl_plain_password': Secret('********')" in runs.logs["SASL_SSL"]  # kafka-python logged its config
    for name, text in logs.items():
        assert text, name
        assert not [p for p in passwords if p in text], f"a password is in the log of {name}"


@pytest.mark.parametrize("case", ["wrong password", "no client certificate"])
def test_worker_refuses_bad_credentials_in_one_line(cluster: Cluster, case: str) -> None:
    worker = cluster.refused[case]
    try:
        returncode = worker.proc.wait(timeout=WAIT_S + 15)  # kafka-python's 30 s, plus the start
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker with a {case} still runs; log tail:\n{worker.tail()}")
    last = worker.text().strip().splitlines()[-1]
    expected = cluster.sb.scram("detector") if case == "wrong password" else cluster.sb.cert(None)
    assert returncode == 2
    # The CLI's error is its last line (kafka-python may log tracebacks of the TLS failures before it).
    assert last.startswith(f"detector: error: cannot connect to Kafka at {describe_connection(expected)}: "), last
    assert ("Authentication failed" in last or "disconnected" in last) if case == "wrong password" else \
        "certificate" in last


@pytest.mark.parametrize("case", ["wrong password", "no client certificate", "certificate of another CA"])
def test_refused_in_process_with_one_line_naming_the_cause(cluster: Cluster, case: str) -> None:
    sb = cluster.sb
    kafka = {"wrong password": sb.scram("gateway", password="not-the-password"),
             "no client certificate": sb.cert(None), "certificate of another CA": sb.cert("outsider")}[case]
    started = time.monotonic()
    with pytest.raises(KafkaConnectError) as refused:
        publisher(kafka, TOPICS.api_calls, bootstrap_timeout_ms=int(REFUSE_TIMEOUT_S * 1000))
    assert time.monotonic() - started < REFUSE_TIMEOUT_S + 5
    message = str(refused.value)
    assert "\n" not in message and "not-the-password" not in message
    assert message.startswith(f"cannot connect to Kafka at {kafka.bootstrap} over {kafka.security_protocol}")
    if case != "wrong password":
        assert "certificate" in message, message


def _write(kafka: KafkaSettings, topic: str, key: str, value: bytes) -> str:
    """Write one record as ``kafka``'s principal: "ok", or the error it ends in (bounded: 5 s + 10 s)."""
    try:
        with publisher(kafka, topic, validate=False, max_block_ms=5000) as pub:
            pub.publish_raw(key, value).get(timeout=10)
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return f"{type(exc).__name__}: {exc}"
    return "ok"


WRITERS = [  # (principal, transport, topic, allowed)
    ("detector", "SASL_SSL", TOPICS.risk_scores, True),
    ("detector", "SSL", TOPICS.risk_scores, True),
    ("gateway", "SASL_SSL", TOPICS.risk_scores, False),
    ("gateway", "SSL", TOPICS.risk_scores, False),
    ("ratelimiter", "SASL_SSL", TOPICS.risk_scores, False),
    ("ratelimiter", "SSL", TOPICS.risk_scores, False),
    ("ANONYMOUS", "PLAINTEXT", TOPICS.risk_scores, False),
    ("detector", "SASL_SSL", TOPICS.api_calls, False),
    ("ratelimiter", "SASL_SSL", TOPICS.api_calls, False),
    ("gateway", "SASL_SSL", TOPICS.dead_letters, False),
]


@pytest.mark.parametrize(("principal", "transport", "topic", "allowed"), WRITERS,
                         ids=[f"{p}-{t}-{topic}" for p, t, topic, _ in WRITERS])
def test_acls_decide_who_writes(cluster: Cluster, principal: str, transport: str, topic: str, allowed: bool) -> None:
    sb = cluster.sb
    kafka = (KafkaSettings(bootstrap=sb.handle.bootstrap) if transport == "PLAINTEXT"
             else sb.scram(principal) if transport == "SASL_SSL" else sb.cert(principal))
    account = f"acct_acl_{principal}_{transport}".lower()
    outcome = _write(kafka, topic, account, _example_record(account, "allow"))
    if allowed:
        assert outcome == "ok"
    else:
        assert "AuthorizationFailed" in outcome, outcome


READERS = [("gateway", "SASL_SSL", TOPICS.api_calls), ("ratelimiter", "SSL", TOPICS.api_calls),
           ("gateway", "SSL", TOPICS.risk_scores)]


@pytest.mark.parametrize(("principal", "transport", "topic"), READERS, ids=["-".join(r) for r in READERS])
def test_acls_decide_who_reads(cluster: Cluster, principal: str, transport: str, topic: str) -> None:
    """Prompt fingerprints (api-calls) are for the detector only, decisions (risk-scores) for the rate limiter."""
    from kafka.errors import AuthorizationError

    sb = cluster.sb
    if end_offset(cluster.admin, topic) == 0:  # something to refuse
        assert _write(cluster.admin, topic, "acct_acl_seed", _example_record("acct_acl_seed", "allow")) == "ok"
    kafka = sb.scram(principal) if transport == "SASL_SSL" else sb.cert(principal)
    try:
        records = read(kafka, topic, timeout_s=2.0)
    except AuthorizationError:
        return
    assert records == []
