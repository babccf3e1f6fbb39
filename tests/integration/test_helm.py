"""The Helm chart, rendered by the real ``helm``: ``helm lint`` passes and the rendered workloads carry the
settings' environment.

``deploy/helm/install-helm.sh`` provides helm: built once from the Go module proxy into
``~/.cache/distill-detector/bin`` (about two minutes the first time), reused afterwards. Skipped when neither
Go nor a cached helm is available. No Kubernetes cluster is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector.settings import env_names, load_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "distill-detector"
INSTALL_HELM = ROOT / "deploy" / "helm" / "install-helm.sh"
SECRET_ENV = {"DETECTOR_KAFKA__SASL_PASSWORD", "DETECTOR_FINGERPRINT_KEY"}


@pytest.fixture(scope="module")
def helm() -> str:
    cached = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill-detector" / "bin" / "helm"
    if shutil.which("go") is None and not cached.exists():
        pytest.skip("building helm needs Go (or a helm binary at ~/.cache/distill-detector/bin/helm)")
    done = subprocess.run([str(INSTALL_HELM)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"install-helm.sh failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


def run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    extra: list[str] = []
    if values:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        extra = ["-f", str(path)]
    done = run(helm, "template", "dd", str(CHART), "--namespace", "detection", *extra)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container_env(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item for item in container["env"]}


def test_helm_lint(helm: str, tmp_path: Path) -> None:
    done = run(helm, "lint", "--strict", str(CHART))
    assert done.returncode == 0, done.stdout + done.stderr
    values = tmp_path / "full.yaml"
    values.write_text(yaml.safe_dump({"serviceMonitor": {"enabled": True},
                                      "secrets": {"fingerprintKey": "k", "kafkaSaslPassword": "p"}}))
    done = run(helm, "lint", "--strict", str(CHART), "-f", str(values))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rendered_env_is_exactly_the_settings(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    for kind in ("StatefulSet", "Deployment"):
        env = container_env(one(docs, kind))
        assert set(env) == set(env_names()) - SECRET_ENV, kind  # no key given: the secrets stay unset
        assert env["DETECTOR_KAFKA__BOOTSTRAP"]["value"] == "kafka:9092"
        settings = load_settings({name: item["value"] for name, item in env.items()})  # e.g. no "2e+06"
        assert settings.detection.max_accounts == 2_000_000 and settings.worker.data_dir == "/data"


def test_values_reach_the_workloads(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {
        "env": {"kafka": {"bootstrap": "b1:9093,b2:9093", "security_protocol": "SASL_SSL"},
                "detection": {"allowlist": ["org_1", "acct_2"], "block_at": 0.9},
                "worker": {"data_dir": "/var/lib/detector"}},
        "secrets": {"fingerprintKey": "fp-key", "kafkaSaslPassword": "pw"},
        "worker": {"replicas": 3},
    })
    sts = one(docs, "StatefulSet")
    env = container_env(sts)
    assert set(env) == set(env_names())
    settings = load_settings({n: i["value"] for n, i in env.items() if "value" in i})
    assert settings.kafka.bootstrap == "b1:9093,b2:9093" and settings.detection.allowlist == ("org_1", "acct_2")
    assert settings.detection.block_at == 0.9
    secret = one(docs, "Secret")
    for name, key in (("DETECTOR_FINGERPRINT_KEY", "fingerprint-key"), ("DETECTOR_KAFKA__SASL_PASSWORD",
                                                                          "kafka-sasl-password")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key)
        assert key in secret["data"]
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    (claim,) = spec["volumeClaimTemplates"]
    (container,) = spec["template"]["spec"]["containers"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mount[claim["metadata"]["name"]] == "/var/lib/detector" == env["DETECTOR_WORKER__DATA_DIR"]["value"]
    assert container["args"] == ["worker"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None"
    (ratelimit,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert ratelimit["args"] == ["ratelimit"]
    assert {p["name"]: p["containerPort"] for p in ratelimit["ports"]} == {"http": 8088, "metrics": 9465}


def test_existing_secret_and_service_monitor(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    assert not [d for d in docs if d["kind"] in ("Secret", "ServiceMonitor")]
    docs = render(helm, tmp_path, {"secrets": {"existingSecret": "detector-keys"}, "serviceMonitor": {"enabled": True}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = container_env(one(docs, "StatefulSet"))
    assert env["DETECTOR_FINGERPRINT_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "detector-keys"
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {m["apiVersion"] for m in monitors} == {"monitoring.coreos.com/v1"}
    jobs = {e["relabelings"][0]["replacement"] for m in monitors for e in m["spec"]["endpoints"]}
    assert jobs == {"detector-worker", "detector-ratelimit"}  # the job names the alert rules use


def test_relative_data_dir_is_refused(helm: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"env": {"worker": {"data_dir": ".detector-data"}}}))
    done = run(helm, "template", "dd", str(CHART), "-f", str(path))
    assert done.returncode != 0 and "absolute path" in done.stderr
