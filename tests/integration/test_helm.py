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
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"  # Kubernetes would keep the last
    return {item["name"]: item for item in container["env"]}


def kafka_identity(env: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Who a workload connects to Kafka as: user, the Secret key of its password, client certificate and key."""
    ref = env.get("DETECTOR_KAFKA__SASL_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return {"user": env["DETECTOR_KAFKA__SASL_USERNAME"]["value"], "password": (ref.get("name"), ref.get("key")),
            "cert": env["DETECTOR_KAFKA__SSL_CERTFILE"]["value"], "key": env["DETECTOR_KAFKA__SSL_KEYFILE"]["value"]}


def mount_paths(workload: dict[str, Any]) -> dict[str, str]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


#: The worker (User:detector) and the rate limiter (User:ratelimiter) as docs/SECURITY.md's ACLs want them.
SEPARATE_IDENTITIES: dict[str, Any] = {
    "env": {"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "detector",
                      "ssl_cafile": "/etc/kafka-ca/ca.pem", "ssl_certfile": "/etc/kafka-tls/detector.pem",
                      "ssl_keyfile": "/etc/kafka-tls/detector.key"}},
    "secrets": {"kafkaSaslPassword": "detector-pw", "rateLimiterKafkaSaslPassword": "ratelimiter-pw"},
    "extraVolumes": [{"name": "kafka-ca", "secret": {"secretName": "kafka-ca"}}],
    "extraVolumeMounts": [{"name": "kafka-ca", "mountPath": "/etc/kafka-ca", "readOnly": True}],
    "worker": {"extraVolumes": [{"name": "kafka-tls", "secret": {"secretName": "detector-tls"}}],
               "extraVolumeMounts": [{"name": "kafka-tls", "mountPath": "/etc/kafka-tls", "readOnly": True}]},
    "rateLimiter": {
        "kafka": {"sasl_username": "ratelimiter", "ssl_certfile": "/etc/ratelimiter-tls/tls.crt",
                  "ssl_keyfile": "/etc/ratelimiter-tls/tls.key"},
        "extraVolumes": [{"name": "ratelimiter-tls", "secret": {"secretName": "ratelimiter-tls"}}],
        "extraVolumeMounts": [{"name": "ratelimiter-tls", "mountPath": "/etc/ratelimiter-tls", "readOnly": True}],
    },
}


def test_helm_lint(helm: str, tmp_path: Path) -> None:
    done = run(helm, "lint", "--strict", str(CHART))
    assert done.returncode == 0, done.stdout + done.stderr
    values = tmp_path / "full.yaml"
    values.write_text(yaml.safe_dump({"serviceMonitor": {"enabled": True},
                                      "secrets": {"fingerprintKey": "k", "kafkaSaslPassword": "p"}}))
    done = run(helm, "lint", "--strict", str(CHART), "-f", str(values))
    assert done.returncode == 0, done.stdout + done.stderr
    values.write_text(yaml.safe_dump(SEPARATE_IDENTITIES))
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


def test_the_worker_is_probed_on_healthz_and_a_probe_of_a_missing_web_port_is_refused(helm: str,
                                                                                      tmp_path: Path) -> None:
    (container,) = one(render(helm, tmp_path), "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "web"}
    assert "web" in {p["name"] for p in container["ports"]}
    path = tmp_path / "no-web.yaml"
    path.write_text(yaml.safe_dump({"env": {"worker": {"web_port": 0}}}))
    done = run(helm, "template", "dd", str(CHART), "-f", str(path))
    assert done.returncode != 0 and "worker.livenessProbe asks the web port" in done.stderr, done.stderr
    path.write_text(yaml.safe_dump({"env": {"worker": {"web_port": 0}},
                                    "worker": {"livenessProbe": {"httpGet": None, "tcpSocket": {"port": "metrics"}}}}))
    done = run(helm, "template", "dd", str(CHART), "-f", str(path))
    assert done.returncode == 0, done.stderr
    sts = one([d for d in yaml.safe_load_all(done.stdout) if d], "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    probe = container["livenessProbe"]
    assert "httpGet" not in probe and probe["tcpSocket"] == {"port": "metrics"}


def test_rate_limiter_has_its_own_kafka_identity(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, SEPARATE_IDENTITIES)
    secret = one(docs, "Secret")
    name = secret["metadata"]["name"]
    assert {"kafka-sasl-password", "ratelimit-kafka-sasl-password"} <= set(secret["data"])
    worker, ratelimit = one(docs, "StatefulSet"), one(docs, "Deployment")
    assert kafka_identity(container_env(worker)) == {
        "user": "detector", "password": (name, "kafka-sasl-password"),
        "cert": "/etc/kafka-tls/detector.pem", "key": "/etc/kafka-tls/detector.key"}
    env = container_env(ratelimit)
    assert kafka_identity(env) == {
        "user": "ratelimiter", "password": (name, "ratelimit-kafka-sasl-password"),
        "cert": "/etc/ratelimiter-tls/tls.crt", "key": "/etc/ratelimiter-tls/tls.key"}
    assert set(env) == set(env_names()) - {"DETECTOR_FINGERPRINT_KEY"}  # each once, overrides included
    settings = load_settings({n: i["value"] for n, i in env.items() if "value" in i})
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.ssl_cafile == "/etc/kafka-ca/ca.pem"
    # each pod mounts the shared CA and its own client key only
    assert mount_paths(worker).items() >= {"kafka-ca": "/etc/kafka-ca", "kafka-tls": "/etc/kafka-tls"}.items()
    assert "ratelimiter-tls" not in mount_paths(worker)
    assert mount_paths(ratelimit).items() >= {"kafka-ca": "/etc/kafka-ca",
                                              "ratelimiter-tls": "/etc/ratelimiter-tls"}.items()
    assert "kafka-tls" not in mount_paths(ratelimit)

    # from an existing Secret; a certificate alone (mutual TLS) never gets the workers' password
    docs = render(helm, tmp_path, {"secrets": {"existingSecret": "detector-keys"},
                                   "rateLimiter": {"kafka": {"sasl_username": "ratelimiter"}}})
    ref = container_env(one(docs, "Deployment"))["DETECTOR_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "detector-keys", "key": "ratelimit-kafka-sasl-password", "optional": True}
    docs = render(helm, tmp_path, {"env": {"kafka": {"security_protocol": "SSL"}},
                                   "secrets": {"existingSecret": "detector-keys"},
                                   "rateLimiter": {"kafka": {"ssl_certfile": "/t/rl.crt", "ssl_keyfile": "/t/rl.key"}}})
    worker_env, env = container_env(one(docs, "StatefulSet")), container_env(one(docs, "Deployment"))
    assert "DETECTOR_KAFKA__SASL_PASSWORD" in worker_env and "DETECTOR_KAFKA__SASL_PASSWORD" not in env
    assert (env["DETECTOR_KAFKA__SSL_CERTFILE"]["value"], env["DETECTOR_KAFKA__SSL_KEYFILE"]["value"]) == (
        "/t/rl.crt", "/t/rl.key")


@pytest.mark.parametrize("values", [
    {},
    {"rateLimiter": {"kafka": {"sasl_username": "", "ssl_certfile": "", "ssl_keyfile": ""}}},
    {"env": {"kafka": {"security_protocol": "SASL_SSL", "sasl_username": "detector",
                       "ssl_certfile": "/etc/kafka-tls/tls.crt", "ssl_keyfile": "/etc/kafka-tls/tls.key"}},
     "secrets": {"kafkaSaslPassword": "pw"}},
    {"secrets": {"existingSecret": "detector-keys"}},
], ids=["defaults", "empty-overrides", "sasl", "existing-secret"])
def test_by_default_the_rate_limiter_connects_as_the_workers(helm: str, tmp_path: Path, values: dict[str, Any]) -> None:
    docs = render(helm, tmp_path, values)
    envs = [one(docs, kind)["spec"]["template"]["spec"]["containers"][0]["env"]
            for kind in ("StatefulSet", "Deployment")]
    assert envs[0] == envs[1]  # the very same entries, in the same order, as before rateLimiter.kafka existed
    password = container_env(one(docs, "Deployment")).get("DETECTOR_KAFKA__SASL_PASSWORD")
    if values.get("secrets"):
        assert password is not None and password["valueFrom"]["secretKeyRef"]["key"] == "kafka-sasl-password"


@pytest.mark.parametrize("values,message", [
    ({"rateLimiter": {"kafka": {"sasl_user": "ratelimiter"}}}, "only sasl_username, ssl_certfile and ssl_keyfile"),
    ({"secrets": {"rateLimiterKafkaSaslPassword": "pw"}}, "rateLimiter.kafka.sasl_username is not"),
])
def test_rate_limiter_identity_mistakes_are_refused(helm: str, tmp_path: Path, values: dict[str, Any],
                                                   message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    done = run(helm, "template", "dd", str(CHART), "-f", str(path))
    assert done.returncode != 0 and message in done.stderr
