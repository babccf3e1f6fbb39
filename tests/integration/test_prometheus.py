"""The dashboards and alert rules against a real Prometheus scraping a real worker and rate limiter.

One run per module (about a minute), with its own topics, consumer group and ports::

    publish_simulation("smoke") ─┐
    publish_raw(invalid payloads)┴▶ <run>.api-calls ──▶ detector worker ──▶ <run>.risk-scores ──▶ detector ratelimit
                                                        (subprocess)   └──▶ <run>.api-calls.dlq   (subprocess)
                                                         /metrics ◀──┐                    ┌──▶ /metrics
                                                                  prometheus (1 s scrape and rule evaluation,
                                                                  deploy/prometheus/alerts.yml)

Prometheus is Debian's ``prometheus`` package, installed by ``deploy/prometheus/install-prometheus.sh`` when the
binary is missing (skipped only when it is missing and we are neither root nor have passwordless sudo); the test
runs its own process on a free port with a generated configuration: the ``scrape_configs`` of
``deploy/prometheus/prometheus.yml`` (so the job names are the ones the alerts and dashboards use) with local
targets, and a copy of ``alerts.yml`` as its rule file. Prometheus starts scraping *before* the traffic is
published, so counters are seen rising from zero, as in production.

What is asserted, for every expression (read from the files at collection time, so a new panel or rule is
covered without touching this test):

* **Dashboard targets** (``panels[].targets[].expr``, rows' nested panels included), with Grafana's variables
  substituted (``$__rate_interval`` → ``1m``, ``$__interval`` → ``15s``, ``$__range`` → ``5m``, a multi-value
  variable → its "All" value, ``.*``): the query succeeds, the result is not empty, and at least one sample is a
  number, not NaN (a panel of NaN draws nothing). The ``label_values(metric, label)`` of a template variable:
  the metric's series carry that label.
* **Alert rules** (``groups[].rules[].expr``):

  - the rule is loaded and evaluated without error (``/api/v1/rules``: ``health == "ok"``, evaluated at least
    once);
  - the whole expression is non-empty for the alerts the run *should* raise (:data:`EXPECTED_ACTIVE`:
    ``NewClusterBlocked``, as the smoke scenario's campaigns get clusters blocked), and empty for every other
    alert (a healthy pipeline must not page anyone); ``/api/v1/alerts`` lists exactly the expected ones;
  - the expression is split at its top-level ``and`` / ``or`` / ``unless``, and each operand, with a trailing
    comparison against a number stripped, is non-empty, except ``absent(...)`` operands, which must be empty
    (the metric is there). That is, for the rules of ``alerts.yml`` today:

    =====================  =========================================================================
    rule                   operands queried (→ expected)
    =====================  =========================================================================
    NewClusterBlocked      ``sum(increase(detector_clusters_blocked_total[10m]))`` → non-empty
    InvalidRatioHigh       ``max by (instance) (detector_invalid_ratio)`` → non-empty
    DeadLetterSpike        ``sum by (reason) (rate(detector_dead_letters_total[5m]))`` → non-empty
    ConsumerLagGrowing     ``deriv(detector_consumer_lag_events[10m])``, ``detector_consumer_lag_events``
                           → non-empty
    WorkerDown             ``up{job="detector-worker"}``, ``detector_worker_up`` → non-empty;
                           ``absent(detector_worker_up)`` → empty
    RateLimiterDown        ``up{job="detector-ratelimit"}`` → non-empty
    =====================  =========================================================================
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from detector import broker, simulate
from detector.cli import publish_simulation
from detector.gateway import EventPublisher
from detector.settings import load_settings
from detector.streaming.app import STATS_PATH
from detector.streaming.topics import ensure_topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_PROMETHEUS = DEPLOY / "prometheus" / "install-prometheus.sh"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

#: Grafana's built-in interval variables, as Grafana would fill them for a recent time range (the data source
#: declares a 15 s scrape interval, so ``$__rate_interval`` is at least 4 × 15 s).
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
#: Alerts the run must raise: the smoke scenario's campaigns get clusters blocked. All others stay inactive.
EXPECTED_ACTIVE = {"NewClusterBlocked"}
WAIT_S = 60.0


# ------------------------------------------------------------------------------------------------ expressions
def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _substitute(expr: str, variables: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name``, ``${name}``, ``${name:fmt}`` and ``[[name]]`` replaced."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in variables:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def dashboard_cases() -> list[Any]:
    """(query, kind) per dashboard target and template variable, with a readable id."""
    cases = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = dict(GRAFANA_INTERVALS)
        for var in board.get("templating", {}).get("list", []):
            variables[var["name"]] = (var.get("allValue") or ".*") if var.get("includeAll") else ".+"
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else str(query or "")
            if match := re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", query):
                cases.append(pytest.param((match.group(1), match.group(2)), "label_values",
                                          id=f"{path.stem}:${var['name']}"))
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    cases.append(pytest.param(_substitute(target["expr"], variables), "expr",
                                              id=f"{path.stem}:{panel.get('title')}:{target.get('refId', '')}"))
    return cases


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]]


_SET_OPERATOR = re.compile(r"\s+(and|or|unless)\s+")
_MODIFIER = re.compile(r"^(?:on|ignoring)\s*\([^)]*\)\s*")
_TRAILING_COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")


def operands(expr: str) -> list[str]:
    """The operands of ``expr``'s top-level ``and`` / ``or`` / ``unless``, each without a trailing comparison
    against a number (``x > 0.05`` → ``x``).

    >>> operands('up{job="w"} == 0\\nor absent(w_up)\\nor w_up == 0')
    ['up{job="w"}', 'absent(w_up)', 'w_up']
    >>> operands("deriv(lag[10m]) > 0 and on (p) lag > 10000")
    ['deriv(lag[10m])', 'lag']
    >>> operands('max by (i) (r{x="a or b"}) > 0.05')
    ['max by (i) (r{x="a or b"})']
    """
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (m := _SET_OPERATOR.match(expr, i)):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    return [_TRAILING_COMPARISON.sub("", _MODIFIER.sub("", p.strip())).strip() for p in parts]


# ------------------------------------------------------------------------------------------------ processes
@dataclass
class Process:
    """A subprocess whose output goes to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
        with open(log, "wb") as sink:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        return cls(name, proc, log)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited ({self.proc.returncode}); log tail:\n{self.tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _wait(what: str, done: Callable[[], bool], procs: list[Process], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        for p in procs:
            p.check()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.tail(15)}" for p in procs)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.25)


def _env(bootstrap: str, **settings: str) -> dict[str, str]:
    """This process's environment without its DETECTOR_* settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_") or k == "DETECTOR_KAFKA_HOME"}
    env["DETECTOR_KAFKA__BOOTSTRAP"] = bootstrap
    env.update(settings)
    return env


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The ``prometheus`` binary, installed from Debian's package by ``install-prometheus.sh`` if missing."""
    found = shutil.which("prometheus")
    if found:
        return found
    can_sudo = shutil.which("sudo") is not None and subprocess.run(
        ["sudo", "-n", "true"], capture_output=True).returncode == 0
    if os.geteuid() != 0 and not can_sudo:
        pytest.skip("prometheus is not installed and installing it needs root: run "
                    "deploy/prometheus/install-prometheus.sh as root (or apt-get install prometheus)")
    done = subprocess.run([str(INSTALL_PROMETHEUS)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"install-prometheus.sh failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    url: str  # Prometheus
    valid: int
    invalid: int
    timings: dict[str, float] = field(default_factory=dict)

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` at the current time; the whole JSON answer."""
        status, body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        answer: dict[str, Any] = orjson.loads(body) if body else {"status": f"HTTP {status}"}
        return answer

    def result(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def has_data(self, expr: str) -> bool:
        return bool(self.result(expr))

    def api(self, path: str) -> Any:
        status, body = _get(f"{self.url}{path}")
        assert status == 200, f"{path}: HTTP {status} {body[:300]!r}"
        return orjson.loads(body)["data"]


def _invalid_payloads() -> list[bytes]:
    return [b'{"account_id": "acct_broken", "ts": ', b"[1, 2, 3]", b'{"schema_version": 1}',
            b'{"pad": "' + b"x" * 100_000 + b'"}']


@pytest.fixture(scope="module")
def stack(prometheus_binary: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    run_id = f"pt-{uuid.uuid4().hex[:10]}"
    topics = {"api_calls": f"{run_id}.api-calls", "dead_letters": f"{run_id}.api-calls.dlq",
              "risk_scores": f"{run_id}.risk-scores", "analyst_labels": f"{run_id}.analyst-labels",
              "cluster_signals": f"{run_id}.cluster-signals"}
    work = tmp_path_factory.mktemp("prometheus")
    web_port, worker_metrics, rl_port, rl_metrics, prom_port = (broker.free_port() for _ in range(5))
    env = _env(kafka_bootstrap, DETECTOR_WORKER__APP_ID=run_id, DETECTOR_WORKER__DATA_DIR=str(work / "data"),
               DETECTOR_WORKER__WEB_PORT=str(web_port), DETECTOR_WORKER__METRICS_PORT=str(worker_metrics),
               DETECTOR_WORKER__BATCH_WITHIN_S="0.05", DETECTOR_TOPICS__PARTITIONS="1",
               DETECTOR_RATELIMIT__HOST="127.0.0.1", DETECTOR_RATELIMIT__PORT=str(rl_port),
               DETECTOR_RATELIMIT__METRICS_PORT=str(rl_metrics),
               **{f"DETECTOR_TOPICS__{k.upper()}": v for k, v in topics.items()})
    ensure_topics(load_settings({k: v for k, v in env.items() if k.startswith("DETECTOR_")}))

    # Prometheus: the repository's scrape jobs, pointed at this run's processes; alerts.yml as the rule file.
    base = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {"detector-worker": f"127.0.0.1:{worker_metrics}", "detector-ratelimit": f"127.0.0.1:{rl_metrics}",
               "prometheus": f"127.0.0.1:{prom_port}"}
    jobs = [{**job, "static_configs": [{"targets": [targets[job["job_name"]]]}]} for job in base["scrape_configs"]]
    assert {"detector-worker", "detector-ratelimit"} <= {job["job_name"] for job in jobs}
    shutil.copy(ALERTS_YML, work / "alerts.yml")
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": ["alerts.yml"], "scrape_configs": jobs}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    procs: list[Process] = []
    try:
        procs.append(Process.start("worker", [sys.executable, "-m", "detector.cli", "worker"], work / "worker.log",
                                   env))
        procs.append(Process.start("ratelimit", [sys.executable, "-m", "detector.cli", "ratelimit"],
                                   work / "ratelimit.log", env))
        procs.append(Process.start("prometheus", [
            prometheus_binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}"], work / "prometheus.log"))
        s = Stack(f"http://127.0.0.1:{prom_port}", valid=0, invalid=0, timings=timings)
        sim = simulate.build("smoke")  # while they start

        _wait("the worker's web server", lambda: _get(f"http://127.0.0.1:{web_port}{STATS_PATH}")[0] == 200, procs)
        _wait("the rate limiter to be ready", lambda: _get(f"http://127.0.0.1:{rl_port}/healthz")[0] == 200, procs)
        _wait("prometheus to be ready", lambda: _get(f"{s.url}/-/ready")[0] == 200, procs)

        def scraped() -> bool:
            active = s.api("/api/v1/targets?state=active")["activeTargets"]
            return len(active) == len(jobs) and all(t["health"] == "up" for t in active)

        _wait("every target to be scraped", scraped, procs)
        timings["up_s"] = time.monotonic() - t0

        s.valid = publish_simulation(sim, kafka_bootstrap, topics["api_calls"])
        with EventPublisher(kafka_bootstrap, topics["api_calls"]) as pub:
            for i, payload in enumerate(_invalid_payloads()):
                pub.publish_raw(f"acct_bad{i}", payload)
                s.invalid += 1
        timings["published_s"] = time.monotonic() - t0

        def stats() -> dict[str, Any]:
            status, body = _get(f"http://127.0.0.1:{web_port}{STATS_PATH}")
            return orjson.loads(body) if status == 200 else {}

        _wait("the worker to process every event", lambda: stats().get("events") == s.valid + s.invalid, procs)
        timings["processed_s"] = time.monotonic() - t0
        _wait("the rate limiter to hold blocked accounts",
              functools.partial(s.has_data, 'detector_ratelimit_accounts{action="block"} > 0'), procs)

        # Requests to the limiter, so its request counters move: every campaign account (some are blocked) and
        # a few ordinary ones (allowed).
        attackers = sorted(a for a, lab in sim.labels.items() if lab.attack)
        ordinary = sorted(a for a, lab in sim.labels.items() if not lab.attack)[:10]
        verdicts = {True: 0, False: 0}
        for account in attackers + ordinary:
            status, body = _get(f"http://127.0.0.1:{rl_port}/v1/decision?account_id={account}")
            assert status == 200, body
            verdicts[orjson.loads(body)["allowed"]] += 1
        assert verdicts[True] and verdicts[False], verdicts

        # Prometheus has scraped the final counters, the worker has refreshed its state gauges, and rules ran.
        for expr in (f'detector_events_total{{result="valid"}} == {s.valid}',
                     f'detector_events_total{{result="invalid"}} == {s.invalid}',
                     "detector_clusters_blocked_total > 0",
                     f'detector_ratelimit_requests_total{{verdict="limited"}} == {verdicts[False]}',
                     'ALERTS{alertname="NewClusterBlocked", alertstate="firing"}'):
            _wait(f"prometheus to see {expr}", functools.partial(s.has_data, expr), procs)
        timings["scraped_s"] = time.monotonic() - t0
        yield s
    finally:
        for p in reversed(procs):
            p.stop()
        timings["stopped_s"] = time.monotonic() - t0
        print(f"\nprometheus run timings: {timings}")


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("query", "kind"), dashboard_cases())
def test_dashboard_query_has_data(stack: Stack, query: Any, kind: str) -> None:
    if kind == "label_values":
        metric, label = query
        series = stack.api("/api/v1/series?" + urllib.parse.urlencode({"match[]": metric}))
        assert series and all(label in s for s in series), f"{metric} series without {label!r}: {series}"
        return
    result = stack.result(query)
    assert result, f"no data for {query}"
    values = [float(r["value"][1]) for r in result]
    assert not all(math.isnan(v) for v in values), f"only NaN for {query}: {result}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_alert_rule_is_evaluated_and_its_parts_have_data(stack: Stack, rule: dict[str, Any]) -> None:
    name = rule["alert"]
    loaded = {r["name"]: r for g in stack.api("/api/v1/rules")["groups"] for r in g["rules"]}
    assert loaded[name]["health"] == "ok", loaded[name]
    assert not loaded[name].get("lastError"), loaded[name]
    assert not loaded[name]["lastEvaluation"].startswith("0001-"), f"{name} never evaluated"

    whole = stack.result(rule["expr"])
    if name in EXPECTED_ACTIVE:
        assert whole, f"{name} should be active in this run: {rule['expr']}"
    else:
        assert not whole, f"{name} is active in a healthy run: {whole}"
    for part in operands(rule["expr"]):
        result = stack.result(part)
        if part.startswith(("absent(", "absent_over_time(")):
            assert not result, f"{name}: {part} is not empty: the metric is missing"
        else:
            assert result, f"{name}: no data for {part}"


def test_only_the_expected_alerts_are_active(stack: Stack) -> None:
    active = {a["labels"]["alertname"]: a["state"] for a in stack.api("/api/v1/alerts")["alerts"]}
    assert active == dict.fromkeys(EXPECTED_ACTIVE, "firing")
