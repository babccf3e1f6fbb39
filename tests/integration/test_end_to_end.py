"""End to end: simulator → gateway SDK → Kafka → ``detector worker`` → risk-scores → rate limiter → HTTP.

One run per module (about half a minute), with its own topics and consumer group::

    simulate.build("smoke", seed=1) ─▶ EventPublisher ─▶ <run>.api-calls (1 partition) ─▶ detector worker (subprocess)
                                                                                        │
    GET /v1/decision ◀─ RateLimiterService (in-process, follows <run>.risk-scores) ◀────┘

The account under test is a ``hydra`` campaign account from the simulation's labels that the detector first
*throttles* and later *blocks*. Which accounts do that is known before anything is published: the worker runs
the same :class:`~detector.detection.Detector` over the same events in the same order (one partition; see
``test_worker.py``, which checks the equality), so the test runs it in-process over the events first. With the
smoke scenario at seed 1, 1 of the 40 hydra accounts goes throttle → block; the other 39 are blocked without
being throttled first (from watch, or on their first scored event: a new account linked to a blocked cluster;
since two throttled members of a cluster block it, most hydra accounts never show the throttle step, and at the
default seed 7 none does). The first hydra account, in label order, that is throttled before it is blocked is
the one under test (today ``throttle, block``). If a change to the detector left no such account, the fixture
fails and says so (the throttle step could not be observed).

The events are published in three steps, so that each decision is seen on its own by the limiter:

1. up to and including the event that makes the worker throttle the account; then the test polls
   ``/v1/decision/peek`` until the limiter answers ``throttle`` and spends requests on ``/v1/decision``:
   the first (the burst) are allowed, the next limited with a ``retry_after_s``;
2. up to and including the event that makes the worker block it; the test polls until ``block``, and then
   ``/v1/decision`` refuses it without a retry hint;
3. the rest of the scenario; afterwards the account is still blocked, and the busiest ordinary account of
   the labels (the smoke scenario's enterprise batch account, ~660 calls a day from cloud ASNs: the hardest
   look-alike) is allowed and never had a record other than ``allow``.

Key blocks (``detector/keyblocks.py``): the worker also publishes the keys of the clusters it blocked to
``<run>.blocked-keys``, exactly the records the in-process detector made (``emitted_at`` aside), and the
limiter follows that topic too. An account id it has never seen, asking with the key ids of the blocked hydra
account's last call (``request_key_ids``), is refused as ``block`` with the reason ``key_block`` before it has
made a single call; the ordinary account's own keys do not refuse it.

Each delay is measured from the record's ``emitted_at`` (wall clock of the worker, read back from the
risk-scores topic) to the moment the HTTP answer first reflects it (polled every 20 ms), and must be < 5 s.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector import broker, simulate
from detector.detection import Detector
from detector.gateway import EventPublisher
from detector.keyblocks import request_key_ids
from detector.ratelimit import RateLimiterService
from detector.settings import Settings, load_settings
from detector.streaming.topics import ensure_topics
from tests.integration.kafka_io import wait_for_worker, worker_stats

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VISIBLE_WITHIN_S = 5.0  # from a record's emitted_at to the limiter's HTTP answer
WAIT_S = 60.0
POLL_S = 0.02


@dataclass
class Seen:
    """A decision as the HTTP API first reflected it."""

    action: str
    record: dict[str, Any]  # the risk-scores record that carried it, as read back from the topic
    seen_at: float  # time.time() when /v1/decision/peek first answered it

    @property
    def delay_s(self) -> float:
        return self.seen_at - self.record["emitted_at"] / 1000


@dataclass
class Run:
    account: str  # the hydra account under test
    ordinary: str  # the busiest ordinary account
    predicted: list[str]  # the account's actions, as the in-process detector published them
    burst: int  # requests a throttled account may make at once
    throttle: Seen | None = None
    throttle_answers: list[dict[str, Any]] = field(default_factory=list)  # /v1/decision while throttled
    block: Seen | None = None
    block_answer: dict[str, Any] = field(default_factory=dict)
    final_answer: dict[str, Any] = field(default_factory=dict)  # the account, after the whole scenario
    ordinary_answer: dict[str, Any] = field(default_factory=dict)
    predicted_keys: list[dict[str, Any]] = field(default_factory=list)  # key blocks of the in-process detector
    key_records: list[dict[str, Any]] = field(default_factory=list)  # read back from blocked-keys
    newcomer_answer: dict[str, Any] = field(default_factory=dict)  # a new id with the blocked account's keys
    ordinary_keyed_answer: dict[str, Any] = field(default_factory=dict)  # the ordinary account, with its keys
    records: list[dict[str, Any]] = field(default_factory=list)  # every record of the topic, in order
    review: list[dict[str, Any]] = field(default_factory=list)  # `detector review --json`, at the end
    review_account: list[dict[str, Any]] = field(default_factory=list)  # `detector review --json --account A`
    cluster_refusal: subprocess.CompletedProcess[str] | None = None  # `label attack --cluster C` without --yes
    benign_answer: dict[str, Any] = field(default_factory=dict)  # the account, after `detector label benign`
    timings: dict[str, float] = field(default_factory=dict)


class Api:
    """The limiter's HTTP API over one keep-alive connection."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)

    def decision(self, account_id: str, *, peek: bool = False, keys: Sequence[str] = ()) -> dict[str, Any]:
        query = "".join(f"&key={k}" for k in keys)
        self.conn.request("GET", f"/v1/decision{'/peek' if peek else ''}?account_id={account_id}{query}")
        resp = self.conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        answer: dict[str, Any] = orjson.loads(body)
        return answer

    def close(self) -> None:
        self.conn.close()


class Scores:
    """Follows a topic of JSON records (risk-scores, blocked-keys) from its start (all partitions, no group)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        parts = self.consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.records: list[dict[str, Any]] = []

    def find(self, account: str, action: str, timeout_s: float = 15.0) -> dict[str, Any]:
        """The account's first record with ``action``, reading on until it is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            for rec in self.records:
                if rec["account_id"] == account and rec["action"] == action:
                    return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"no {action} record for {account} on the topic after {timeout_s} s")
            self.read()

    def read(self) -> int:
        """Read what has arrived (waiting at most 0.2 s); return how many records were read so far."""
        for batch in self.consumer.poll(timeout_ms=200).values():
            self.records.extend(orjson.loads(m.value) for m in batch if m.value is not None)
        return len(self.records)

    def close(self) -> None:
        self.consumer.close()


def _predict(sim: simulate.Simulation, events: list[dict[str, Any]],
             settings: Settings) -> tuple[str, list[str], int, int, list[dict[str, Any]]]:
    """(account, its actions, index of the event that throttles it, index of the event that then blocks it, the
    key-block records of the whole run)."""
    det = Detector(settings.detection, key_secret=settings.fingerprint_key.reveal().encode())
    actions: dict[str, list[tuple[int, str]]] = {}
    key_blocks: list[dict[str, Any]] = []
    for i, ev in enumerate(events):
        if (rec := det.process(ev)) is not None:
            actions.setdefault(rec["account_id"], []).append((i, rec["action"]))
        key_blocks += det.drain_key_blocks()
    jumped = []
    for account, label in sim.labels.items():  # label order: deterministic
        if label.campaign != "hydra" or account not in actions:
            continue
        seq = actions[account]
        throttle = next((i for i, a in seq if a == "throttle"), None)
        block = next((i for i, a in seq if a == "block" and throttle is not None and i > throttle), None)
        if throttle is not None and block is not None:
            return account, [a for _, a in seq], throttle, block, key_blocks
        jumped.append(account)
    pytest.fail(f"no hydra account is throttled before it is blocked in this scenario ({len(jumped)} hydra "
                "accounts scored, none throttled first): the throttle step cannot be observed; pick another "
                "scenario or update this test and its docstring")


def _wait(what: str, probe: Callable[[], Any], proc: subprocess.Popen[bytes], log: Path,
          timeout_s: float = WAIT_S) -> Any:
    return wait_for_worker(what, probe, proc, log, timeout_s, poll_s=POLL_S)


def _cli(argv: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "detector.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"detector {' '.join(argv)}: {done.stderr.strip()}"
    return done


def _stats(port: int) -> dict[str, Any]:
    return worker_stats(port) or {}


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    t0 = time.monotonic()
    run_id = f"e2e-{uuid.uuid4().hex[:10]}"
    topics = {"api_calls": f"{run_id}.api-calls", "dead_letters": f"{run_id}.api-calls.dlq",
              "risk_scores": f"{run_id}.risk-scores", "analyst_labels": f"{run_id}.analyst-labels",
              "cluster_signals": f"{run_id}.cluster-signals",
              "blocked_keys": f"{run_id}.blocked-keys"}
    work = tmp_path_factory.mktemp("e2e")
    web_port = broker.free_port()
    settings_env = {"DETECTOR_KAFKA__BOOTSTRAP": kafka_bootstrap, "DETECTOR_WORKER__APP_ID": run_id,
                    "DETECTOR_WORKER__DATA_DIR": str(work / "data"), "DETECTOR_WORKER__WEB_PORT": str(web_port),
                    "DETECTOR_WORKER__METRICS_PORT": "0", "DETECTOR_WORKER__BATCH_WITHIN_S": "0.05",
                    "DETECTOR_TOPICS__PARTITIONS": "1",
                    **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()}}
    settings = load_settings(settings_env)
    ensure_topics(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    log = work / "worker.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "worker"], cwd=ROOT,
                                env={**env, **settings_env}, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    limiter = RateLimiterService(dataclasses.replace(
        settings, ratelimit=dataclasses.replace(settings.ratelimit, host="127.0.0.1", port=0, metrics_port=0)))
    api: Api | None = None
    scores: Scores | None = None
    keys: Scores | None = None
    result: Run | None = None
    try:
        limiter.start()
        # While the worker starts: the scenario, and what the detector will decide for each account.
        sim = simulate.build("smoke", seed=1)
        events = list(sim.events())
        account, predicted, throttle_at, block_at, predicted_keys = _predict(sim, events, settings)
        per_account = Counter(ev["account_id"] for ev in events)
        ordinary = max((a for a, lab in sim.labels.items() if not lab.attack), key=lambda a: (per_account[a], a))
        result = Run(account, ordinary, predicted, settings.ratelimit.throttle_burst, predicted_keys=predicted_keys)
        t = result.timings
        t["predicted_s"] = time.monotonic() - t0

        assert limiter.wait_ready(30), "the rate limiter did not catch up with the (empty) risk-scores topic"
        api, scores = Api(limiter.url), Scores(kafka_bootstrap, topics["risk_scores"])
        _wait("the worker's web server", lambda: _stats(web_port), proc, log)
        t["worker_up_s"] = time.monotonic() - t0
        assert api.decision(account, peek=True)["action"] == "allow"  # no record yet

        def seen(action: str) -> Seen:
            _wait(f"the limiter to answer {action} for {account}",
                  lambda: api.decision(account, peek=True)["action"] == action, proc, log)
            seen_at = time.time()
            return Seen(action, scores.find(account, action), seen_at)

        with EventPublisher(kafka_bootstrap, topics["api_calls"]) as pub:
            for ev in events[:throttle_at + 1]:
                pub.publish(ev)
            pub.flush()
            t["throttle_published_s"] = time.monotonic() - t0
            result.throttle = seen("throttle")
            t["throttle_seen_s"] = time.monotonic() - t0
            result.throttle_answers = [api.decision(account) for _ in range(result.burst + 3)]

            for ev in events[throttle_at + 1:block_at + 1]:
                pub.publish(ev)
            pub.flush()
            t["block_published_s"] = time.monotonic() - t0
            result.block = seen("block")
            t["block_seen_s"] = time.monotonic() - t0
            result.block_answer = api.decision(account)

            for ev in events[block_at + 1:]:
                pub.publish(ev)
        _wait("every event to be processed", lambda: _stats(web_port).get("events") == len(events), proc, log)
        records = _stats(web_port)["records"]
        _wait("every record to be read back", lambda: scores.read() >= records, proc, log)
        t["all_processed_s"] = time.monotonic() - t0
        result.records = list(scores.records)
        _wait("the limiter to read every record", lambda: sum(limiter.book.outcomes.values()) >= records, proc, log)
        result.final_answer = api.decision(account)
        result.ordinary_answer = api.decision(ordinary)
        keys = Scores(kafka_bootstrap, topics["blocked_keys"])
        _wait("every key block to be read back", lambda: keys.read() >= _stats(web_port)["key_blocks"], proc, log)
        result.key_records = list(keys.records)
        _wait("the limiter to read every key block", lambda: limiter.keys.outcomes["applied"] >= len(keys.records),
              proc, log)
        secret = settings.fingerprint_key.reveal().encode()
        last = {ev["account_id"]: ev for ev in events}
        result.newcomer_answer = api.decision(f"newcomer-{run_id}", keys=request_key_ids(last[account], secret))
        result.ordinary_keyed_answer = api.decision(ordinary, keys=request_key_ids(last[ordinary], secret))

        # The SOC's commands, as an analyst runs them: review what is blocked, then undo the block of one account.
        cli_env = {**env, **settings_env}
        review = _cli(["review", "--json"], cli_env)
        result.review = [orjson.loads(line) for line in review.stdout.splitlines()]
        one_account = _cli(["review", "--json", "--account", account], cli_env)
        result.review_account = [orjson.loads(line) for line in one_account.stdout.splitlines()]
        blocked_cluster = next(c["cluster_id"] for c in result.review
                               if any(m["account_id"] == account for m in c["members"]))
        result.cluster_refusal = _cli(["label", "attack", "--cluster", blocked_cluster, "--analyst", "e2e"], cli_env,
                                      check=False)
        _cli(["label", "benign", account, "--analyst", "e2e", "--note", "e2e: undo a block"], cli_env)
        _wait("the limiter to answer allow after the benign label",
              lambda: api.decision(account, peek=True)["action"] == "allow", proc, log)
        result.benign_answer = api.decision(account)
        t["labelled_s"] = time.monotonic() - t0
    finally:
        if keys is not None:
            keys.close()
        if api is not None:
            api.close()
        if scores is not None:
            scores.close()
        limiter.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result.timings["stopped_s"] = time.monotonic() - t0
    yield result
    delays = {s.action: round(s.delay_s, 3) for s in (result.throttle, result.block) if s is not None}
    print(f"\nend-to-end: account {result.account} {result.predicted}; delays (emitted_at -> HTTP) {delays}; "
          f"timings {result.timings}")


def test_attacker_is_throttled_first_and_some_requests_are_limited(run: Run) -> None:
    assert run.throttle is not None
    answers = run.throttle_answers
    assert all(a["action"] == "throttle" for a in answers), answers
    allowed = [a["allowed"] for a in answers]
    # The burst passes, then requests are limited (the next token is seconds away).
    assert allowed == [True] * run.burst + [False] * (len(allowed) - run.burst), allowed
    assert all(a["retry_after_s"] > 0 for a in answers if not a["allowed"]), answers
    assert answers[0]["score"] == run.throttle.record["score"]


def test_attacker_is_then_blocked(run: Run) -> None:
    assert run.block is not None
    answer = run.block_answer
    assert (answer["action"], answer["allowed"], answer["retry_after_s"]) == ("block", False, None)
    assert answer["score"] == run.block.record["score"] and answer["reasons"] == run.block.record["reasons"]
    final = run.final_answer
    assert (final["action"], final["allowed"]) == ("block", False), final


def test_each_decision_reaches_the_limiter_within_seconds_of_its_record(run: Run) -> None:
    assert run.throttle is not None and run.block is not None
    assert run.throttle.record["emitted_at"] < run.block.record["emitted_at"]
    for seen in (run.throttle, run.block):
        assert 0 <= seen.delay_s < VISIBLE_WITHIN_S, f"{seen.action}: {seen.delay_s:.3f} s"


def test_the_worker_published_what_the_detector_decides(run: Run) -> None:
    """The account's records on the topic are the predicted ones: throttle, then block."""
    published = [rec["action"] for rec in run.records if rec["account_id"] == run.account]
    assert published == run.predicted
    assert published.index("throttle") < published.index("block")


def test_ordinary_account_is_allowed(run: Run) -> None:
    answer = run.ordinary_answer
    assert (answer["action"], answer["allowed"], answer["retry_after_s"]) == ("allow", True, None), answer
    assert not any(rec["action"] != "allow" for rec in run.records if rec["account_id"] == run.ordinary)


def test_the_worker_published_the_key_blocks_the_detector_makes(run: Run) -> None:
    assert run.predicted_keys, "the in-process detector blocked no cluster: nothing to check"
    wall = ("emitted_at", "expires_at")  # the worker's clock (expires_at = emitted_at + the time to live)
    strip = [{k: v for k, v in rec.items() if k not in wall} for rec in run.predicted_keys]
    assert [{k: v for k, v in rec.items() if k not in wall} for rec in run.key_records] == strip


def test_a_new_account_on_a_blocked_clusters_keys_is_refused_before_its_first_call(run: Run) -> None:
    answer = run.newcomer_answer
    assert (answer["action"], answer["allowed"], answer["retry_after_s"]) == ("block", False, None), answer
    assert answer["reasons"][0]["code"] == "key_block" and answer["cluster_id"] is not None, answer
    assert answer["cluster_id"] in {rec["cluster_id"] for rec in run.key_records}


def test_the_ordinary_accounts_own_keys_do_not_refuse_it(run: Run) -> None:
    answer = run.ordinary_keyed_answer
    assert (answer["action"], answer["allowed"]) == ("allow", True), answer


def test_review_lists_the_blocked_account_in_its_cluster_and_not_the_ordinary_one(run: Run) -> None:
    members = {m["account_id"]: (c["cluster_id"], m) for c in run.review for m in c["members"]}
    cluster_id, member = members[run.account]
    last = [r for r in run.records if r["account_id"] == run.account][-1]  # before the label
    assert member["action"] == "block" and member["score"] == last["score"] and cluster_id == last["cluster_id"]
    assert member["reasons"] == last["reasons"]
    assert run.ordinary not in members
    blocked = {r["account_id"] for r in run.records if r["action"] in ("throttle", "block")}
    latest = {r["account_id"]: r["action"] for r in run.records}
    assert set(members) == {a for a in blocked if latest[a] in ("throttle", "block")}


def test_review_of_one_account_shows_only_it(run: Run) -> None:
    (cluster,) = run.review_account
    assert [m["account_id"] for m in cluster["members"]] == [run.account]


def test_labelling_a_whole_cluster_needs_yes(run: Run) -> None:
    refusal = run.cluster_refusal
    assert refusal is not None and refusal.returncode == 2
    cluster_id = next(c["cluster_id"] for c in run.review for m in c["members"] if m["account_id"] == run.account)
    latest = {r["account_id"]: r["cluster_id"] for r in run.records}
    members = sum(1 for c in latest.values() if c == cluster_id)
    error = refusal.stderr.splitlines()[-1]  # after the progress line of reading risk-scores
    assert error == (f"detector: error: would label {members} accounts of cluster {cluster_id} as attack; "
                     "add --yes to publish"), refusal.stderr


def test_a_benign_label_from_the_cli_lifts_the_block(run: Run) -> None:
    assert run.benign_answer["action"] == "allow" and run.benign_answer["allowed"] is True
    last = [r for r in run.records if r["account_id"] == run.account][-1]
    assert last["action"] == "block"  # it was blocked until the label
