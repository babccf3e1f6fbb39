"""The LiteLLM adapter (``detector.integrations.litellm``) inside real LiteLLM, publishing to a real broker.

LiteLLM pins many packages (pydantic, httpx, click, ...) that faust also needs, so it never enters the
project's ``.venv``: a session fixture keeps an isolated venv in ``~/.cache/distill-detector/venv-litellm``
(``DETECTOR_TEST_LITELLM_VENV`` elsewhere; reused while it answers, rebuilt when :data:`LITELLM_VERSION`
changes) holding ``litellm[proxy]`` and this repository installed without dependencies plus only what the
gateway SDK imports — which also checks that the adapter needs neither faust nor river. Cold, that install
takes about 2 min and 0.75 GB (130 s on 2 cores with an empty pip cache); warm, the fixture's check takes
about a second. The whole file: ~3.5 min cold, ~35-55 s warm (the proxy needs 10-20 s to start).

Two tests, each reading its own topic back with kafka-python from the main venv:

- SDK: :data:`HELPER` runs in the isolated venv: a mock OpenAI-compatible backend (stdlib ``http.server``),
  ``litellm.callbacks = [DetectorCallback(...)]``, real ``litellm.completion`` calls (one per finish reason),
  one ``acompletion`` and one call the backend fails with HTTP 500;
- proxy: the real ``litellm`` proxy CLI with ``deploy/litellm/config.yaml`` (its model pointed at the mock,
  and a ``custom_auth`` standing in for the key database, so virtual keys carry a user, team, organisation
  and key metadata without Postgres), and one HTTP request through it.

Both check that every event validates, ids, models, token counts and stop reasons map as documented, and
that no prompt text (the sentinels below) appears anywhere in the bytes on the topic or in the logs. A third
test needs neither LiteLLM nor a broker: hooks must not raise or block when there is no broker to publish to.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from detector.schemas import validate_event
from tests.integration.kafka_io import read_topic

pytestmark = pytest.mark.integration

CreateTopic = Callable[..., str]

#: Newest release installable here; its successors (1.106.3+) require a certifi the index does not have yet.
LITELLM_VERSION = "1.106.2"
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "litellm" / "config.yaml"
VENV = Path(os.environ.get("DETECTOR_TEST_LITELLM_VENV", Path.home() / ".cache" / "distill-detector" / "venv-litellm"))
#: What ``detector.gateway`` imports (numpy comes through river in pyproject.toml, not directly).
GATEWAY_DEPS = ("kafka-python", "orjson", "fastjsonschema", "numpy")
FINGERPRINT_KEY = "litellm-test-key"
PROXY_MASTER_KEY = "sk-detector-test-" + "5e1f0c9a7b3d4e2f8a6c1b0d9e7f3a2c"
PROXY_START_S = 180  # 25 s on a 2-core machine, warm; generous for a cold page cache

#: Environment for everything run in the isolated venv: LiteLLM must not reach for the network.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled price map, not a download at import
    "DISABLE_SCHEMA_UPDATE": "True",
    "LITELLM_LOG": "ERROR",
    "NO_PROXY": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}

#: Runs in the isolated venv. ``mock`` serves the backend until killed (prints its port first);
#: ``sdk SPEC.json`` serves it in a thread and makes the calls the spec lists, then prints the adapter's stats.
HELPER = textwrap.dedent('''
    import asyncio, json, re, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Backend(BaseHTTPRequestHandler):
        """OpenAI's POST [/v1]/chat/completions; the last user message says what to answer:
        [finish=REASON tokens=PROMPT,COMPLETION]. Paths under /fail answer HTTP 500."""

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            path = self.path.split("?")[0].rstrip("/")
            if path.startswith("/fail"):
                return self.reply(500, {"error": {"message": "backend down", "type": "server_error"}})
            if not path.endswith("/chat/completions"):
                return self.reply(404, {"error": {"message": "no such route " + path}})
            last = [m for m in body.get("messages", []) if m.get("role") == "user"][-1]["content"]
            last = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
            m = re.search(r"\\[finish=(\\w+) tokens=(\\d+),(\\d+)\\]", last)
            finish, prompt, completion = (m.group(1), int(m.group(2)), int(m.group(3))) if m else ("stop", 1, 1)
            message = {"role": "assistant", "content": "canned answer"}
            if finish == "tool_calls":
                message = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                           "function": {"name": "lookup", "arguments": "{}"}}]}
            self.reply(200, {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model"), "choices": [{"index": 0, "message": message,
                                                                      "finish_reason": finish}],
                             "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                       "total_tokens": prompt + completion}})

        def reply(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def serve():
        server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return "http://127.0.0.1:%d" % server.server_address[1]

    def run_sdk(spec):
        import litellm
        from detector.integrations.litellm import DetectorCallback

        litellm.suppress_debug_info = True
        base = serve()
        handler = DetectorCallback(bootstrap=spec["bootstrap"], topic=spec["topic"],
                                   fingerprint_key=spec["fingerprint_key"])
        litellm.callbacks = [handler]

        def args(case):
            api_base = base + ("/fail/v1" if case.get("fail") else "/v1")
            return dict(model="openai/mock-model", api_base=api_base, api_key="x", messages=case["messages"],
                        user=case["account"], max_retries=0)

        failures = 0
        for case in spec["cases"]:
            if case.get("async"):
                continue
            try:
                litellm.completion(**args(case))
            except Exception as exc:  # the failing backend
                failures += 1
                print("call failed as planned:", type(exc).__name__, getattr(exc, "status_code", None),
                      file=sys.stderr)

        async def async_calls():
            for case in spec["cases"]:
                if case.get("async"):
                    await litellm.acompletion(**args(case))
            deadline = time.monotonic() + 30  # LiteLLM runs async success hooks as tasks of this loop
            while handler.stats()["captured"] < len(spec["cases"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        asyncio.run(async_calls())
        deadline = time.monotonic() + 30  # sync success hooks run on LiteLLM's logging thread pool
        while handler.stats()["captured"] < len(spec["cases"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        flushed = handler.flush(30)
        deadline = time.monotonic() + 10  # acknowledgements are counted by the producer's I/O thread
        while sum(handler.stats()[k] for k in ("published", "send_errors")) < len(spec["cases"]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        print(json.dumps({"stats": handler.stats(), "flushed": flushed, "failures": failures,
                          "litellm": litellm.__version__ if hasattr(litellm, "__version__") else None}))
        handler.close()

    if __name__ == "__main__":
        if sys.argv[1] == "mock":
            print(serve(), flush=True)
            threading.Event().wait()
        else:
            with open(sys.argv[2]) as f:
                run_sdk(json.load(f))
''')


# ------------------------------------------------------------------------------------------- the venv
def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _venv_works() -> bool:
    probe = ("import importlib.metadata as m, kafka, orjson, fastjsonschema, numpy, uvicorn, fastapi; "
             f"assert m.version('litellm') == {LITELLM_VERSION!r}")
    if not (_venv_python().exists() and (VENV / "bin" / "litellm").exists()):
        return False
    return subprocess.run([str(_venv_python()), "-c", probe], capture_output=True, timeout=120).returncode == 0


def _pip(*args: str) -> None:
    cmd = [str(_venv_python()), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def litellm_python() -> Path:
    """The isolated venv's python, with ``litellm[proxy]=={LITELLM_VERSION}`` and this repository."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / ".venv-litellm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions must not build the same venv at once
        if not _venv_works():
            start = time.monotonic()
            shutil.rmtree(VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
            _pip(f"litellm[proxy]=={LITELLM_VERSION}", *GATEWAY_DEPS)
            # No dependencies: the gateway side must run without faust and river (and their pins stay out).
            _pip("--no-deps", "-e", str(ROOT))
            if not _venv_works():
                pytest.fail(f"{VENV} does not work after a fresh install")
            print(f"\nlitellm venv built in {time.monotonic() - start:.0f} s: {VENV}", file=sys.stderr)
    return _venv_python()


def _venv_env(**extra: str) -> dict[str, str]:
    """The test's environment for the isolated venv: no DETECTOR_* of this session (load_settings refuses
    unknown ones, like DETECTOR_TEST_BOOTSTRAP), no virtualenv of ours, and this checkout's ``detector``
    first on the path whichever checkout last installed itself into the shared venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DETECTOR_") and k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(LITELLM_ENV, PYTHONPATH=str(ROOT), PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


# ------------------------------------------------------------------------------------------- helpers
def _assert_no_text(messages: list[Any], secrets: list[str]) -> None:
    for msg in messages:
        raw = (msg.key or b"") + b"\0" + (msg.value or b"")
        for secret in secrets:
            for form in {secret, secret.lower(), secret.upper()}:
                assert form.encode() not in raw, f"prompt text {secret!r} leaked into the topic"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _by_account(messages: list[Any]) -> dict[str, dict[str, Any]]:
    events = [validate_event(orjson.loads(m.value)) for m in messages]
    for msg, ev in zip(messages, events, strict=True):
        assert msg.key.decode() == ev["account_id"]
    by_account = {ev["account_id"]: ev for ev in events}
    assert len(by_account) == len(events), "one event per call, no duplicates"
    return by_account


# --------------------------------------------------------------------------------------------- SDK test
def test_litellm_sdk_calls_become_events(litellm_python: Path, kafka_bootstrap: str, create_topic: CreateTopic,
                                         tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    topic = create_topic(kafka_bootstrap, f"litellm-sdk-{run}")
    system = f"You are the sentinel system prompt {run}, a terse assistant."
    cases: list[dict[str, Any]] = [
        {"account": f"acct_stop_{run}", "finish": "stop", "tokens": (31, 7), "expect": "end_turn"},
        {"account": f"acct_len_{run}", "finish": "length", "tokens": (45, 256), "expect": "max_tokens"},
        {"account": f"acct_tool_{run}", "finish": "tool_calls", "tokens": (12, 20), "expect": "tool_use"},
        {"account": f"acct_filter_{run}", "finish": "content_filter", "tokens": (9, 0), "expect": "refusal"},
        {"account": f"acct_async_{run}", "finish": "stop", "tokens": (64, 128), "expect": "end_turn", "async": True},
        {"account": f"acct_fail_{run}", "finish": "stop", "tokens": (5, 5), "expect": "error", "fail": True},
    ]
    secrets = [system]
    for i, case in enumerate(cases):
        prompt = f"Sentinel question {run}-{i}: think step by step about the chemistry of candle wax number {i}."
        secrets.append(prompt)
        case["messages"] = [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "text", "text": "[finish={} tokens={},{}]".format(
                                             case["finish"], *case["tokens"])}]},
        ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"bootstrap": kafka_bootstrap, "topic": topic, "fingerprint_key": FINGERPRINT_KEY,
                                "cases": cases}))
    helper = tmp_path / "litellm_helper.py"
    helper.write_text(HELPER)

    proc = subprocess.run([str(litellm_python), str(helper), "sdk", str(spec)], capture_output=True, text=True,
                          timeout=300, env=_venv_env(), cwd=tmp_path)
    assert proc.returncode == 0, f"helper failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == 1 and report["flushed"], report
    stats = report["stats"]
    assert stats["captured"] == stats["published"] == len(cases), stats
    assert stats["dropped"] == stats["invalid"] == stats["errors"] == stats["send_errors"] == 0, stats
    for secret in secrets:  # nor in the gateway's own logs
        assert secret not in proc.stderr and secret not in proc.stdout

    messages = read_topic(kafka_bootstrap, topic, expected=len(cases), timeout_s=60.0, linger_s=0.5)
    assert len(messages) == len(cases)
    events = _by_account(messages)
    _assert_no_text(messages, secrets)
    system_fps = {ev["prompt"]["system_fp"] for ev in events.values()}
    assert len(system_fps) == 1 and None not in system_fps  # one shared system prompt, fingerprinted

    for case in cases:
        ev = events[case["account"]]
        assert ev["model"] == "mock-model"
        assert ev["endpoint"] == "/chat/completions"
        assert ev["api_key_id"] == "none" and ev["org_id"] is None  # no virtual key outside the proxy
        assert ev["response"]["stop_reason"] == case["expect"]
        assert ev["prompt"]["cot"] is True and ev["prompt"]["chars"] > 40
        assert 0 <= ev["latency_ms"] < 60_000 and abs(ev["ts"] - time.time() * 1000) < 600_000
        if case.get("fail"):
            assert ev["status"] == 500
            assert "refused" not in ev["response"]
        else:
            assert ev["status"] == 200
            assert (ev["input_tokens"], ev["output_tokens"]) == case["tokens"]
            assert ev["response"]["refused"] is (case["expect"] == "refusal")


# ------------------------------------------------------------------------------------------- proxy test
AUTH_MODULE = textwrap.dedent('''
    """Stands in for LiteLLM's key database: the bearer token sk-NAME is a virtual key of user_NAME."""
    from litellm.proxy._types import UserAPIKeyAuth

    async def user_api_key_auth(request, api_key: str) -> UserAPIKeyAuth:
        name = api_key.removeprefix("sk-")
        return UserAPIKeyAuth(api_key=api_key, user_id="user_" + name, team_id="team_red", org_id="org_acme",
                              metadata={"tier": "build", "payment_fp": "pm_" + name})
''')


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_http(port: int, path: str, timeout_s: float, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-5000:]}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(0.25)
    pytest.fail(f"nothing answered on :{port}{path} within {timeout_s} s:\n"
                f"{log_path.read_text(errors='replace')[-5000:]}")


def test_litellm_proxy_request_becomes_event(litellm_python: Path, kafka_bootstrap: str,
                                             create_topic: CreateTopic, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    topic = create_topic(kafka_bootstrap, f"litellm-proxy-{run}")
    helper = tmp_path / "litellm_helper.py"
    helper.write_text(HELPER)
    (tmp_path / "detector_test_auth.py").write_text(AUTH_MODULE)

    # The shipped config, with its model pointed at the mock and the key database replaced by custom_auth.
    config = yaml.safe_load(CONFIG.read_text())
    assert config["litellm_settings"]["callbacks"] == "detector.integrations.litellm.handler"
    public_model = config["model_list"][0]["model_name"]

    with _process([str(litellm_python), str(helper), "mock"], tmp_path / "mock.log", env=_venv_env()) as mock:
        deadline = time.monotonic() + 30
        while not (tmp_path / "mock.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        base = (tmp_path / "mock.log").read_text().split()[0]
        assert mock.poll() is None and base.startswith("http://127.0.0.1:")
        config["model_list"][0]["litellm_params"].update(api_base=base + "/v1", api_key="x")
        config["general_settings"].update(master_key=PROXY_MASTER_KEY,
                                          custom_auth="detector_test_auth.user_api_key_auth")
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))

        port = _free_port()
        env = _venv_env(DETECTOR_KAFKA__BOOTSTRAP=kafka_bootstrap, DETECTOR_TOPICS__API_CALLS=topic,
                        DETECTOR_FINGERPRINT_KEY=FINGERPRINT_KEY)
        log_path = tmp_path / "proxy.log"
        cmd = [str(VENV / "bin" / "litellm"), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
        with _process(cmd, log_path, env=env, cwd=tmp_path) as proxy:
            started = time.monotonic()
            _wait_http(port, "/health/liveliness", PROXY_START_S, proxy, log_path)
            print(f"\nlitellm proxy up in {time.monotonic() - started:.1f} s", file=sys.stderr)

            prompt = f"Sentinel proxy question {run}: think step by step and solve x^2 = 2 [finish=length tokens=23,99]"
            system = f"Sentinel proxy system prompt {run}."
            body = {"model": public_model, "user": f"end_user_{run}",
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]}
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Authorization": f"Bearer sk-alice{run}", "Content-Type": "application/json",
                                  "User-Agent": f"detector-test/{run}"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            assert answer["choices"][0]["finish_reason"] == "length"

            messages = read_topic(kafka_bootstrap, topic, expected=1, timeout_s=60.0, linger_s=0.5)
        proxy_log = log_path.read_text(errors="replace")

    assert len(messages) == 1, proxy_log[-5000:]
    ev = _by_account(messages)[f"user_alice{run}"]
    _assert_no_text(messages, [prompt, system])
    assert prompt not in proxy_log and system not in proxy_log
    assert ev["org_id"] == "org_acme"
    assert re.fullmatch(r"[0-9a-f]{64}", ev["api_key_id"])  # LiteLLM's hash of the key, never the key
    assert f"alice{run}" not in ev["api_key_id"]
    assert ev["model"] == public_model
    assert ev["endpoint"] == "/v1/chat/completions"
    assert (ev["status"], ev["input_tokens"], ev["output_tokens"]) == (200, 23, 99)
    assert ev["response"] == {"stop_reason": "max_tokens", "refused": False}
    assert ev["client"]["ip"] == "127.0.0.1" and ev["client"]["user_agent"] == f"detector-test/{run}"
    assert ev["billing"] == {"payment_fp": f"pm_alice{run}", "tier": "build", "account_created_ts": None}
    assert ev["prompt"]["cot"] is True and ev["prompt"]["system_fp"] is not None


# --------------------------------------------------------------------------- without LiteLLM or a broker
class _NullPublisher:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def test_callback_never_raises_nor_blocks_the_gateway(caplog: pytest.LogCaptureFixture) -> None:
    """In the main venv (LiteLLM absent, the module's stand-in base class): a broker that is not there,
    malformed hook arguments and a resolver that throws all end up in counters and rate-limited log lines,
    never in an exception or a stalled hook, and the log holds no prompt text."""
    import threading

    from detector.integrations import litellm as adapter

    assert adapter.handler._thread is None and adapter.handler._queue is None  # importing started nothing
    threads_before = threading.active_count()
    callback = adapter.DetectorCallback(bootstrap=f"127.0.0.1:{_free_port()}", topic="api-calls",
                                        fingerprint_key="k")
    assert threading.active_count() == threads_before  # constructing started nothing either
    secret = "Sentinel never-logged prompt: think step by step"
    kwargs = {"model": "m", "user": "acct_1", "messages": [{"role": "user", "content": secret}],
              "standard_logging_object": {"prompt_tokens": 3, "completion_tokens": 4, "metadata": {}}}
    response = {"choices": [{"finish_reason": "stop"}]}

    slowest = 0.0
    with caplog.at_level("DEBUG", logger="detector.integrations.litellm"):
        for _ in range(50):
            for args in ((kwargs, response, None, None), (None, None, None, None), ({"messages": 42}, "?", "x", 1)):
                start = time.monotonic()
                callback.log_success_event(*args)
                callback.log_failure_event(*args)
                slowest = max(slowest, time.monotonic() - start)
        started = time.monotonic()
        assert callback.flush(30)  # one connection attempt (5 s) fails; calls meanwhile and in its backoff drop
        stats = callback.stats()
        assert slowest < 0.1, f"a hook took {slowest:.3f} s"
        assert time.monotonic() - started < 15
        assert stats["captured"] == stats["dropped"] == 200 and stats["published"] == 0, stats
        assert stats["errors"] == 100, stats  # kwargs=None: counted, not raised; the odd types are tolerated

        throwing = adapter.DetectorCallback(bootstrap="x:1", topic="t", fingerprint_key="k",
                                            account_id=lambda call: 1 / 0, publisher_factory=_NullPublisher)
        throwing.log_success_event(kwargs, response, None, None)
        assert throwing.flush(10) and throwing.stats()["errors"] == 1
        throwing.close()
        callback.close()

    assert all(secret not in record.getMessage() for record in caplog.records)
    assert len(caplog.records) < 40, "failures are logged 1st, 2nd, 4th, 8th ... time, not every time"
