"""The deployment files agree with the code.

``docker-compose.yml``, the Dockerfile, the Helm chart's values, the Prometheus alert rules and the Grafana
dashboards may name only settings (``detector.settings.env_names()``), CLI commands
(``detector.cli.build_parser()``) and metrics (``detector.metrics.Metrics``) that exist, and every file
they mount must be in the repository. Fast and offline: YAML and JSON only; rendering the chart with the
real ``helm`` is ``tests/integration/test_helm.py``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector.cli import build_parser
from detector.metrics import Metrics
from detector.settings import PREFIX, Settings, SettingsError, WorkerSettings, env_names, load_settings
from detector.streaming.topics import topic_specs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "distill-detector"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

#: Not a setting, but read by the local broker (detector/broker.py) and accepted by load_settings.
EXTRA_ENV = {"DETECTOR_KAFKA_HOME"}
#: Metrics of `detector ratelimit` (its own registry, detector.ratelimit.RateLimitMetrics) that dashboards and
#: alerts use; test_ratelimit_metrics_exist checks them against the limiter.
RATELIMIT_METRICS = {
    "detector_ratelimit_decisions_total": {"action"},
    "detector_ratelimit_requests_total": {"verdict"},
    "detector_ratelimit_ready": set(),
}
#: Series Prometheus adds itself, and the labels every scraped series has.
BUILTIN_METRICS: dict[str, set[str]] = {"up": set()}
TARGET_LABELS = {"job", "instance"}
#: Settings whose chart default differs from the code's on purpose (in a cluster, not on a laptop).
CHART_OVERRIDES = {"DETECTOR_KAFKA__BOOTSTRAP", "DETECTOR_WORKER__DATA_DIR"}


# ------------------------------------------------------------------------------------------------ helpers
@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the <<: merge keys


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def detector_services() -> list[str]:
    """Services running the detector image (built from this repository's Dockerfile)."""
    return sorted(name for name, svc in services().items() if "build" in svc)


def interpolate(value: Any) -> str:
    """Compose's variable syntax as it resolves with an empty shell environment: ${X:-default} -> default."""
    text = str(value).replace("$$", "\0")
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    return text.replace("\0", "$")


def service_env(name: str) -> dict[str, str]:
    env = services()[name].get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(value) for key, value in env.items()}


def mounts(name: str) -> dict[str, str]:
    """Container path -> source of a service's volumes (short syntax)."""
    out = {}
    for volume in services()[name].get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        out[target] = source
    return out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@cache
def series() -> dict[str, set[str]]:
    """Every series name the detector exports -> its label names (histograms and counters expanded)."""
    metrics = Metrics()
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        names = {
            "counter": [f"{family.name}_total"],
            "histogram": [f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"],
        }.get(family.type, [family.name])
        own = labels.get(family.name, labels.get(f"{family.name}_total", set()))
        for name in names:
            out[name] = own | ({"le"} if name.endswith("_bucket") else set())
    return out


def known_series() -> dict[str, set[str]]:
    return {**series(), **RATELIMIT_METRICS, **BUILTIN_METRICS}


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan"}


def promql_series(expr: str) -> set[str]:
    """Series names a PromQL expression reads (functions, keywords, labels, Grafana variables left out).

    >>> sorted(promql_series('sum by (le) (rate(a_bucket{job="x"}[$__rate_interval])) / on(i) b offset 5m > bool 1e3'))
    ['a_bucket', 'b']
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)  # label matchers, ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[match.end():].lstrip().startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue  # a function or an aggregation
        names.add(match.group(0))
    return names


def promql_labels(expr: str) -> Iterator[tuple[str | None, str]]:
    """(series or None, label) for labels in matchers (``x{a="1"}``) and in by/without/on/ignoring lists."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for match in re.finditer(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", s):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2)):
            yield match.group(1), label
    for match in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        for label in re.findall(r"\w+", match.group(1)):
            yield None, label


@cache
def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", []) if "expr" in t]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"\s*label_values\((?:\s*(.+?)\s*,)?\s*\w+\s*\)\s*", query)
        if match and match.group(1):
            exprs.append(match.group(1))
        elif query and var.get("type") == "query":
            exprs.append(query)
    return exprs


@cache
def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    out = [(f"alerts.yml:{rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in alert_rules()]
    for name, board in dashboards().items():
        out += [(name, expr) for expr in dashboard_exprs(board)]
    return out


@cache
def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def values_env(env: dict[str, Any]) -> dict[str, str]:
    """The chart's `env:` section as the variables its _helpers.tpl renders (same rules, in Python)."""

    def text(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        if value is None:
            return ""
        return str(value)

    out = {}
    for key, value in env.items():
        if isinstance(value, dict):
            out.update({f"{PREFIX}{key.upper()}__{field.upper()}": text(v) for field, v in value.items()})
        else:
            out[f"{PREFIX}{key.upper()}"] = text(value)
    return out


def chart_secret_env() -> set[str]:
    """The settings the chart takes from its Secret: the literal names in _helpers.tpl."""
    return set(re.findall(r"- name: (DETECTOR_\w+)", (CHART / "templates" / "_helpers.tpl").read_text()))


# ------------------------------------------------------------------------------------------------ compose
def test_compose_has_the_services() -> None:
    assert {"kafka", "topic-init", "worker-1", "worker-2", "simulator", "ratelimit", "prometheus",
            "grafana"} <= set(services())
    kafka = services()["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.1"
    assert "healthcheck" in kafka
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_compose_mounts_and_builds_only_files_in_the_repo() -> None:
    for name, svc in services().items():
        for target, source in mounts(name).items():
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: mounts {source} at {target}, not in the repo"
        if "build" in svc:
            context = svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", ".")
            dockerfile = "Dockerfile" if isinstance(svc["build"], str) else svc["build"].get("dockerfile", "Dockerfile")
            assert (COMPOSE.parent / context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
    named = {source for name in services() for source in mounts(name).values() if not source.startswith((".", "/"))}
    assert named <= set(compose().get("volumes") or {}), "a named volume is used but not declared"


@pytest.mark.parametrize("name", detector_services())
def test_compose_detector_commands_parse(name: str) -> None:
    svc = services()[name]
    assert "entrypoint" not in svc, f"{name}: the image's entrypoint is `detector`; give only its arguments"
    command = svc["command"]
    assert isinstance(command, list), f"{name}: write the command as a list"
    if command[0] not in subcommands() and command[0] == "ratelimit":
        pytest.skip("`detector ratelimit` is not in the CLI yet")
    try:
        build_parser().parse_args([str(arg) for arg in command])
    except SystemExit:
        pytest.fail(f"{name}: `detector {' '.join(map(str, command))}` does not parse")


def test_compose_runs_the_demo_simulation_into_kafka() -> None:
    args = build_parser().parse_args(services()["simulator"]["command"])
    assert (args.command, args.scenario, args.kafka, args.rate) == ("simulate", "demo", "kafka:9092", 500.0)


@pytest.mark.parametrize("name", detector_services())
def test_compose_sets_only_known_settings(name: str) -> None:
    env = service_env(name)
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in set(env_names()) | EXTRA_ENV)
    assert not unknown, f"{name}: {unknown} are not settings (see detector/settings.py)"
    assert all(k.startswith(PREFIX) for k in env), f"{name}: configure the detector with DETECTOR_* only"
    load_settings(env)  # values of the right type and in range


def test_compose_workers_share_a_group_and_not_their_state() -> None:
    workers = [n for n in detector_services() if services()[n]["command"][0] == "worker"]
    assert len(workers) >= 2
    settings = {n: load_settings(service_env(n)) for n in workers}
    assert len({s.worker.app_id for s in settings.values()}) == 1, "one app id = one consumer group"
    state = [(n, mounts(n).get(s.worker.data_dir)) for n, s in settings.items()]
    assert all(volume for _, volume in state), f"DETECTOR_WORKER__DATA_DIR is not on a volume: {state}"
    assert len({volume for _, volume in state}) == len(workers), f"workers share a state volume: {state}"
    for n in workers:
        assert services()[n]["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"


def test_compose_creates_the_worker_topics() -> None:
    script = "\n".join(map(str, services()["topic-init"]["command"]))
    created: dict[str, tuple[int, dict[str, str]]] = {}
    for line in script.splitlines():
        topic = re.search(r"--topic\s+(\S+)", line)
        if topic and "create" in line.split()[0]:
            partitions = int(re.search(r"--partitions\s+(\d+)", line).group(1))  # type: ignore[union-attr]
            configs = dict(c.split("=", 1) for c in re.findall(r"--config\s+(\S+)", line))
            created[topic.group(1)] = (partitions, configs)
    settings = load_settings(service_env("worker-1"))
    for name, spec in topic_specs(settings).items():
        assert name in created, f"topic-init does not create {name}"
        assert created[name] == (spec["num_partitions"], spec["configs"]), name


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["detector"\]', text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    env = set(re.findall(r"\b(DETECTOR_\w+)=", text))
    assert env <= set(env_names()), f"{env - set(env_names())} are not settings"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


# ------------------------------------------------------------------------------------- prometheus, alerts
def test_prometheus_config_matches_compose() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    prometheus = mounts("prometheus")
    assert prometheus.get("/etc/prometheus/prometheus.yml") == "./deploy/prometheus/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert rule_file in prometheus, f"rule file {rule_file} is not mounted into the prometheus service"
        assert (ROOT / prometheus[rule_file]).resolve() == ALERTS.resolve()
    jobs = {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}
    workers = [n for n in detector_services() if services()[n]["command"][0] == "worker"]
    expected = {f"{n}:{load_settings(service_env(n)).worker.metrics_port}" for n in workers}
    assert set(jobs["detector-worker"]) == expected
    ratelimit = [n for n in detector_services() if services()[n]["command"][0] == "ratelimit"]
    assert {t.split(":")[0] for t in jobs["detector-ratelimit"]} == set(ratelimit)
    for job in re.findall(r'job="([^"]+)"', ALERTS.read_text() + "".join(map(json.dumps, dashboards().values()))):
        assert job in jobs, f"job {job!r} is referenced but not scraped"


def test_alert_rules() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    wanted = {"NewClusterBlocked", "DeadLetterSpike", "InvalidRatioHigh", "ConsumerLagGrowing", "WorkerDown"}
    assert wanted <= set(rules), f"missing alert rules {sorted(wanted - set(rules))}"
    for name, rule in rules.items():
        assert rule["expr"].strip() and rule["labels"]["severity"] and rule["annotations"]["summary"], name
    assert "increase(detector_clusters_blocked_total[10m])" in rules["NewClusterBlocked"]["expr"]
    assert "absent(detector_worker_up)" in rules["WorkerDown"]["expr"]
    assert re.search(r"\bup\{[^}]*\} == 0", rules["WorkerDown"]["expr"])
    match = re.search(r"detector_invalid_ratio\)?\s*>\s*([0-9.]+)", rules["InvalidRatioHigh"]["expr"])
    assert match, "InvalidRatioHigh should compare detector_invalid_ratio with a threshold"
    assert float(match[1]) == WorkerSettings().invalid_ratio_limit, "InvalidRatioHigh and the worker's limit disagree"


# ----------------------------------------------------------------------------------------------- metrics
def test_ratelimit_metrics_exist() -> None:
    ratelimit = pytest.importorskip("detector.ratelimit")
    exported: dict[str, set[str]] = {}
    for family in ratelimit.RateLimitMetrics(ratelimit.DecisionBook()).registry.collect():
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in RATELIMIT_METRICS.items():
        assert name in exported, f"the rate limiter does not export {name}"
        assert labels <= exported[name], f"{name} has labels {exported[name]}, not {labels}"


def test_promql_parser_is_not_vacuous() -> None:
    names = set().union(*(promql_series(expr) for _, expr in all_exprs()))
    assert {"detector_score_value_bucket", "detector_event_to_score_latency_seconds_bucket",
            "detector_consumer_lag_events", "detector_clusters_blocked_total", "up"} <= names


@pytest.mark.parametrize("where,expr", all_exprs())
def test_promql_names_only_declared_metrics(where: str, expr: str) -> None:
    known = known_series()
    unknown = sorted(promql_series(expr) - set(known))
    assert not unknown, f"{where}: {unknown} are not declared in detector/metrics.py: {expr}"
    all_labels = set().union(*known.values()) | TARGET_LABELS
    for name, label in promql_labels(expr):
        allowed = known[name] | TARGET_LABELS if name in known else all_labels
        assert label in allowed, f"{where}: label {label!r} is not a label of {name or 'any metric'}: {expr}"


# ------------------------------------------------------------------------------------------------ grafana
def test_grafana_provisioning_matches_compose() -> None:
    grafana = mounts("grafana")
    provisioning = GRAFANA / "provisioning"
    assert (ROOT / grafana["/etc/grafana/provisioning"]).resolve() == provisioning.resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in grafana and (ROOT / grafana[path]).resolve() == (GRAFANA / "dashboards").resolve()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].split("//")[1].split(":")[0] in services()


@pytest.mark.parametrize("name", [p.name for p in DASHBOARDS])
def test_dashboard_is_valid(name: str) -> None:
    board = dashboards()[name]
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert board["uid"] and board["title"] and 36 <= board["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(pos["x"] + i, pos["y"] + j) for i in range(pos["w"]) for j in range(pos["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == uid, panel["title"]


def test_dashboards_are_distinct_and_cover_the_brief() -> None:
    assert len({b["uid"] for b in dashboards().values()}) == len(dashboards())
    wanted = {
        "soc-overview.json": {"detector_score_value_bucket", "detector_scores_total", "detector_accounts_by_action",
                              "detector_clusters_blocked_total", "detector_reasons_total",
                              "detector_analyst_labels_total"},
        "pipeline-health.json": {"detector_events_total", "detector_events_scored_total",
                                 "detector_dead_letters_total", "detector_invalid_ratio",
                                 "detector_consumer_lag_events", "detector_event_to_score_latency_seconds_bucket",
                                 "detector_batch_duration_seconds_bucket", "detector_model_warm",
                                 "detector_model_tail_share", "detector_rebalances_total", "detector_worker_up"},
    }
    for name, metrics in wanted.items():
        used = set().union(*(promql_series(e) for e in dashboard_exprs(dashboards()[name])))
        assert metrics <= used, f"{name} does not show {sorted(metrics - used)}"


# --------------------------------------------------------------------------------------------------- helm
def test_chart_env_maps_one_to_one_to_the_settings() -> None:
    plain = set(values_env(chart_values()["env"]))
    secret = chart_secret_env()
    assert secret == {"DETECTOR_KAFKA__SASL_PASSWORD", "DETECTOR_FINGERPRINT_KEY"}
    assert not plain & secret, f"{sorted(plain & secret)} are secrets: set them under `secrets:`, not `env:`"
    missing = sorted(set(env_names()) - plain - secret)
    extra = sorted(plain - set(env_names()))
    assert not missing, f"values.yaml env: has no key for {missing} (env.<section>.<field> = DETECTOR_<S>__<F>)"
    assert not extra, f"values.yaml env: names {extra}, which are not settings"


def test_chart_env_defaults_are_the_settings_defaults() -> None:
    env = values_env(chart_values()["env"])
    try:
        load_settings(env)
    except SettingsError as exc:
        pytest.fail(f"values.yaml env: does not parse as settings: {exc}")
    defaults = load_settings({k: v for k, v in env.items() if k not in CHART_OVERRIDES})
    assert defaults == Settings(), "values.yaml env: differs from detector/settings.py's defaults"


def test_chart_files() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == CHART.name
    templates = {p.name for p in (CHART / "templates").iterdir()}
    assert {"_helpers.tpl", "NOTES.txt", "worker-statefulset.yaml", "worker-service.yaml", "ratelimit-deployment.yaml",
            "ratelimit-service.yaml", "servicemonitor.yaml", "secret.yaml"} <= templates
    values = chart_values()
    assert values["serviceMonitor"]["enabled"] is False and "existingSecret" in values["secrets"]
    assert (DEPLOY / "helm" / "install-helm.sh").stat().st_mode & 0o111, "install-helm.sh must be executable"


def test_an_unknown_anomaly_model_is_one_clear_error() -> None:
    assert load_settings({"DETECTOR_DETECTION__ANOMALY_MODEL": "loda"}).detection.anomaly_model == "loda"
    with pytest.raises(SettingsError, match="DETECTION__ANOMALY_MODEL must be population, hst or loda, not 'iforest'"):
        load_settings({"DETECTOR_DETECTION__ANOMALY_MODEL": "iforest"})
