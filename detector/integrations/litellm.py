"""LiteLLM adapter: one detector event for every LLM call that passes through LiteLLM (proxy or SDK).

LiteLLM calls a ``CustomLogger``'s hooks after each call; :class:`DetectorCallback` turns the call into an
``api_call_event.v1`` with :func:`detector.gateway.make_event` (the raw prompt is replaced by keyed
fingerprints right there, in the gateway process) and publishes it with :class:`detector.gateway.EventPublisher`.

In the proxy's ``config.yaml`` (see ``deploy/litellm/config.yaml``), with this project installed in LiteLLM's
environment (``pip install --no-deps`` plus kafka-python, orjson, fastjsonschema and numpy is enough: the
adapter needs neither faust nor river)::

    litellm_settings:
      callbacks: detector.integrations.litellm.handler

The proxy imports :data:`handler`, a :class:`DetectorCallback` reading ``DETECTOR_*`` settings
(:func:`detector.settings.load_settings`): ``DETECTOR_KAFKA__*`` for the broker, ``DETECTOR_TOPICS__API_CALLS``
for the topic and ``DETECTOR_FINGERPRINT_KEY``, which every gateway of a deployment must share. With the SDK::

    litellm.callbacks = [DetectorCallback(bootstrap="kafka:9092", topic="api-calls")]

How a call becomes an event (fields of LiteLLM's standard logging payload unless said otherwise)::

    account_id   the virtual key's user (metadata.user_api_key_user_id), else its team (user_api_key_team_id),
                 else the key itself ("key:" + the first 16 hex of user_api_key_hash), else the request's
                 OpenAI ``user`` field, else "anonymous"                        -> account_id=
    org_id       the key's LiteLLM organisation (user_api_key_org_id), else None -> org_id=
    api_key_id   user_api_key_hash (LiteLLM's SHA-256 of the virtual key), else "none" -> api_key_id=
    billing      payment_fp, tier, account_created_ts from the key's metadata (user_api_key_auth_metadata),
                 e.g. ``/key/generate {"metadata": {"tier": "build", "payment_fp": "pm_..."}}``   -> billing=
    client       ip = requester_ip_address (the proxy applies general_settings.use_x_forwarded_for: turn it on
                 behind a trusted load balancer, or every call shows the balancer's address), user_agent =
                 the request's User-Agent, tls_fp = the header named by tls_fp_header (a JA4 fingerprint
                 set by a TLS-terminating front proxy); asn and country None     -> client=
    model        model_group (the proxy's public model name), else the model LiteLLM called
    endpoint     the proxy request's path ("/v1/chat/completions"), else from the call type
    status       200 on success; on failure the exception's status_code (5xx/4xx), else 500
    tokens       prompt_tokens and completion_tokens (LiteLLM's usage)
    ts, latency  start time (epoch ms), end - start (ms)
    response     stop_reason from the first choice's finish_reason: stop -> end_turn, length -> max_tokens,
                 tool_calls/function_call -> tool_use, content_filter -> refusal (refused=True), anything
                 else -> None; "error" on failure
    prompt       prompt_text = the text of the user messages joined with blank lines; system_text = the text
                 of the system and developer messages (None when there are none); image and audio parts
                 are left out

Each ``->`` names the constructor argument that replaces the default: a callable taking the call's
:class:`LiteLLMCall` (``account_id=lambda call: call.metadata.get("user_api_key_team_id")`` makes teams the
accounts). Identifiers outside the schema's ``[A-Za-z0-9_.:@-]{1,128}`` are made safe by :func:`as_id`.

Guarantees toward the gateway:

- **Nothing raises into LiteLLM.** A hook only captures the call into a bounded queue; one daemon thread
  builds the events (fingerprinting costs up to a few ms on long prompts) and publishes them, so neither
  fingerprinting nor a slow or absent broker can stall the proxy's event loop. Every failure is counted in
  :meth:`DetectorCallback.stats` and logged (the 1st, 2nd, 4th, 8th ... of each kind, not every one).
- **No prompt text in logs or on the wire**: logs name only counts, exception types and schema reasons;
  :class:`LiteLLMCall` keeps the texts out of its ``repr``.
- **Lazy**: constructing :data:`handler` at import reads no setting, opens no socket and starts no thread; the
  first event does (and a forked worker process starts its own thread and producer).
- Calls whose messages LiteLLM redacted (``litellm.turn_off_message_logging``, the
  ``"redacted-by-litellm"`` placeholder) are skipped and counted as ``redacted``: the placeholder's
  fingerprint would make every account look like it shares one prompt template.

Not covered: requests the proxy itself rejects before calling a model (bad key, budget, its own rate
limits) reach ``async_post_call_failure_hook``, not the log hooks, and produce no event.

This is the project's only module that imports ``litellm``. It still imports without it (the base class then
is a stand-in with the same hook signatures), so the mapping below runs in doctests and unit tests of an
environment without LiteLLM; installing LiteLLM next to faust is not needed for anything else.

>>> kwargs = {"model": "mock-model", "user": "acct_7", "call_type": "completion",
...           "messages": [{"role": "system", "content": "Be terse."},
...                        {"role": "user", "content": [{"type": "text", "text": "Think step by step: 2+2?"}]}],
...           "standard_logging_object": {"model": "mock-model", "model_group": None, "prompt_tokens": 12,
...                                       "completion_tokens": 3, "startTime": 1775000000.0, "metadata": {}}}
>>> response = {"choices": [{"finish_reason": "length", "message": {"content": "4"}}]}
>>> call = capture_call(kwargs, response, 1775000000.0, 1775000000.25, failed=False)
>>> call
LiteLLMCall(model='mock-model', endpoint='/chat/completions', status=200, input_tokens=12, output_tokens=3, \
ts_ms=1775000000000, latency_ms=250, stop_reason='max_tokens', refused=False, end_user='acct_7')
>>> ev = build_event(call, fingerprint_key=b"k")
>>> ev["account_id"], ev["response"], ev["prompt"]["cot"], ev["prompt"]["system_fp"] is not None
('acct_7', {'stop_reason': 'max_tokens', 'refused': False}, True, True)
>>> "step by step" in str(ev)
False
"""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from detector.gateway import EventPublisher, make_event
from detector.schemas import InvalidEvent
from detector.settings import Settings, load_settings

try:
    from litellm.integrations.custom_logger import CustomLogger
except ImportError:  # LiteLLM absent: doctests and unit tests of the mapping only; see the module docstring

    class CustomLogger:  # type: ignore[no-redef]
        """Stand-in for ``litellm.integrations.custom_logger.CustomLogger`` (same hook signatures)."""

        def __init__(self, **kwargs: Any) -> None:
            self.message_logging = True
            self.turn_off_message_logging = False


log = logging.getLogger(__name__)

__all__ = ["DetectorCallback", "LiteLLMCall", "as_id", "build_event", "capture_call", "handler"]

#: LiteLLM's finish_reason (OpenAI's vocabulary) -> the schema's stop_reason.
STOP_REASONS: Mapping[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
    # Anthropic's own values, when a provider passes them through unmapped
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_use",
    "refusal": "refusal",
}
#: LiteLLM call type -> the OpenAI-style path it serves, when no proxy request path is known (SDK use).
ENDPOINTS: Mapping[str, str] = {
    "completion": "/chat/completions",
    "acompletion": "/chat/completions",
    "text_completion": "/completions",
    "atext_completion": "/completions",
    "embedding": "/embeddings",
    "aembedding": "/embeddings",
    "responses": "/responses",
    "aresponses": "/responses",
    "anthropic_messages": "/v1/messages",
}
REDACTED = "redacted-by-litellm"  # litellm.constants.REDACTED_BY_LITELLM
SYSTEM_ROLES = ("system", "developer")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
_NOT_ID = re.compile(r"[^A-Za-z0-9_.:@-]")
_MAX_LATENCY_MS = 86_400_000
_BILLING_KEYS = ("payment_fp", "tier", "account_created_ts")


# --------------------------------------------------------------------------------------------- the call
@dataclass(frozen=True)
class LiteLLMCall:
    """What the adapter keeps of one LiteLLM call, and what the mapping callables receive.

    ``payload`` is LiteLLM's standard logging payload, ``metadata`` its ``metadata`` (the virtual key's
    ``user_api_key_*`` fields) completed from the request's metadata, ``headers`` the proxy request's headers
    with lower-case names (empty outside the proxy). The texts are kept out of ``repr``.
    """

    model: str
    endpoint: str
    status: int
    input_tokens: int
    output_tokens: int
    ts_ms: int
    latency_ms: int
    stop_reason: str | None
    refused: bool | None
    end_user: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    payload: Mapping[str, Any] = field(default_factory=dict, repr=False)
    prompt_text: str = field(default="", repr=False)
    system_text: str | None = field(default=None, repr=False)

    @property
    def redacted(self) -> bool:
        """LiteLLM replaced the messages with its placeholder before the hook saw them."""
        return self.prompt_text.strip() == REDACTED


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` or ``obj[name]``: LiteLLM hands over pydantic objects, dicts and mixtures of both."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    value = getattr(obj, name, default)
    return default if value is None else value


def _text(content: Any) -> str:
    """The text of one message's ``content``: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif _get(part, "type", "text") in ("text", "input_text") and isinstance(_get(part, "text"), str):
                texts.append(_get(part, "text"))
        return "\n".join(texts)
    return ""


def split_messages(messages: Any) -> tuple[str, str | None]:
    """(user text, system text or None) of a chat ``messages`` list, an input string or a list of strings.

    >>> split_messages([{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Hi"},
    ...                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}])
    ('Hi\\n\\nWhy?', 'Rules.')
    >>> split_messages("just a prompt"), split_messages(["a", "b"])
    (('just a prompt', None), ('a\\n\\nb', None))
    """
    if isinstance(messages, str):
        return messages, None
    if not isinstance(messages, list):
        return "", None
    user: list[str] = []
    system: list[str] = []
    for message in messages:
        if isinstance(message, str):
            user.append(message)
            continue
        role = _get(message, "role", "user")
        text = _text(_get(message, "content"))
        if not text:
            continue
        if role in SYSTEM_ROLES:
            system.append(text)
        elif role == "user":
            user.append(text)
    return "\n\n".join(user), ("\n\n".join(system) if system else None)


def _epoch_s(value: Any) -> float | None:
    if isinstance(value, dt.datetime):
        return value.timestamp()  # LiteLLM's are naive local times, which timestamp() reads as such
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _count(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def _failure_status(kwargs: Mapping[str, Any], payload: Mapping[str, Any]) -> int:
    for candidate in (getattr(kwargs.get("exception"), "status_code", None),
                      _get(payload.get("error_information"), "error_code")):
        try:
            status = int(candidate)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if 400 <= status <= 599:
            return status
    return 500


def _metadata(kwargs: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    params = kwargs.get("litellm_params") or {}
    merged: dict[str, Any] = {}
    for source in (params.get("metadata"), params.get("litellm_metadata"), payload.get("metadata")):
        if isinstance(source, Mapping):
            merged.update({k: v for k, v in source.items() if v is not None})
    return merged


def _headers(kwargs: Mapping[str, Any], metadata: Mapping[str, Any]) -> tuple[dict[str, str], str | None]:
    request = (kwargs.get("litellm_params") or {}).get("proxy_server_request") or {}
    headers: dict[str, str] = {}
    for source in (metadata.get("headers"), _get(request, "headers")):
        if isinstance(source, Mapping):
            headers.update({str(k).lower(): str(v) for k, v in source.items()})
    url = _get(request, "url")
    path = urlsplit(url).path if isinstance(url, str) and url else None
    return headers, path


def capture_call(kwargs: Mapping[str, Any], response_obj: Any, start_time: Any, end_time: Any, *,
                 failed: bool) -> LiteLLMCall:
    """Take what an event needs from one hook invocation (cheap: no hashing, no I/O).

    ``kwargs``, ``response_obj``, ``start_time`` and ``end_time`` are the hook's arguments as LiteLLM passes
    them; ``failed`` says whether it was a failure hook. Raises nothing for missing or odd fields: they
    become zeros, None or defaults.
    """
    payload = kwargs.get("standard_logging_object") or {}
    if not isinstance(payload, Mapping):
        payload = {}
    metadata = _metadata(kwargs, payload)
    headers, path = _headers(kwargs, metadata)

    start = _epoch_s(payload.get("startTime")) or _epoch_s(start_time) or time.time()
    end = _epoch_s(payload.get("endTime")) or _epoch_s(end_time) or start
    if isinstance(start_time, dt.datetime) and isinstance(end_time, dt.datetime):
        latency_s = (end_time - start_time).total_seconds()
    else:
        latency_s = end - start

    call_type = str(payload.get("call_type") or kwargs.get("call_type") or "")
    endpoint = path or ENDPOINTS.get(call_type) or ("litellm:" + call_type if call_type else "litellm")
    model = payload.get("model_group") or payload.get("model") or kwargs.get("model") or "unknown"

    usage = _get(response_obj, "usage")
    input_tokens = _count(payload.get("prompt_tokens")) or _count(_get(usage, "prompt_tokens"))
    output_tokens = _count(payload.get("completion_tokens")) or _count(_get(usage, "completion_tokens"))

    stop_reason: str | None
    refused: bool | None
    if failed:
        status, stop_reason, refused = _failure_status(kwargs, payload), "error", None
    else:
        choices = _get(response_obj, "choices") or []
        first = choices[0] if isinstance(choices, list) and choices else None
        finish = _get(first, "finish_reason")
        stop_reason = STOP_REASONS.get(finish) if isinstance(finish, str) else None
        refused = stop_reason == "refusal" or bool(_get(_get(first, "message"), "refusal"))
        status = 200

    messages = kwargs.get("messages")
    if messages is None:  # text completions, embeddings, the responses API
        messages = kwargs.get("input") if kwargs.get("input") not in (None, "") else kwargs.get("prompt")
    prompt_text, system_text = split_messages(messages)

    end_user = kwargs.get("user") or payload.get("end_user") or metadata.get("user_api_key_end_user_id")
    return LiteLLMCall(
        model=str(model)[:128], endpoint=str(endpoint)[:256], status=status, input_tokens=input_tokens,
        output_tokens=output_tokens, ts_ms=int(start * 1000),
        latency_ms=min(_MAX_LATENCY_MS, max(0, int(latency_s * 1000))), stop_reason=stop_reason, refused=refused,
        end_user=str(end_user) if end_user else None, metadata=metadata, headers=headers, payload=payload,
        prompt_text=prompt_text, system_text=system_text,
    )


# ------------------------------------------------------------------------------------ default mapping
def as_id(value: Any) -> str | None:
    """``value`` as a schema id (``[A-Za-z0-9_.:@-]{1,128}``), or None when empty.

    Valid ids pass unchanged; others keep their safe characters and get a hash suffix, so different
    values do not end up as one id.

    >>> as_id("acct_1"), as_id("ada@example.com"), as_id(""), as_id(None)
    ('acct_1', 'ada@example.com', None, None)
    >>> as_id("Ada Lovelace")
    'Ada_Lovelace:767402161715'
    """
    if value is None:
        return None
    text = str(value)
    if not text:
        return None
    if _ID_RE.match(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{_NOT_ID.sub('_', text)[:100]}:{digest}"


def default_account_id(call: LiteLLMCall) -> str:
    """The key's user, else its team, else the key, else the OpenAI ``user`` field, else ``"anonymous"``."""
    m = call.metadata
    key_hash = m.get("user_api_key_hash")
    for candidate in (m.get("user_api_key_user_id"), m.get("user_api_key_team_id"),
                      f"key:{str(key_hash)[:16]}" if key_hash else None, call.end_user):
        account = as_id(candidate)
        if account:
            return account
    return "anonymous"


def default_org_id(call: LiteLLMCall) -> str | None:
    """The key's LiteLLM organisation, if any."""
    return as_id(call.metadata.get("user_api_key_org_id"))


def default_api_key_id(call: LiteLLMCall) -> str:
    """LiteLLM's SHA-256 of the virtual key (never the key), else ``"none"``."""
    return as_id(call.metadata.get("user_api_key_hash")) or "none"


def default_billing(call: LiteLLMCall) -> dict[str, Any]:
    """``payment_fp``, ``tier`` and ``account_created_ts`` from the virtual key's metadata, when well-typed."""
    key_meta = call.metadata.get("user_api_key_auth_metadata")
    if not isinstance(key_meta, Mapping):
        return {}
    out: dict[str, Any] = {}
    for name in _BILLING_KEYS:
        value = key_meta.get(name)
        if name == "account_created_ts":
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
        elif isinstance(value, str) and value:
            out[name] = value[:128] if name == "payment_fp" else value[:64]
    return out


def _ip(raw: Any) -> str | None:
    if not isinstance(raw, str) or not raw.strip():
        return None
    first = raw.split(",")[0].strip()  # a forwarded-for chain: the client is the first entry
    try:
        return str(ipaddress.ip_address(first))
    except ValueError:
        return None


def default_client(call: LiteLLMCall, tls_fp_header: str | None = None) -> dict[str, Any]:
    """ip, user agent and (with ``tls_fp_header``) TLS fingerprint of the proxy's caller; None when unknown."""
    ua = call.payload.get("user_agent") or call.metadata.get("user_agent") or call.headers.get("user-agent")
    tls = call.headers.get(tls_fp_header.lower()) if tls_fp_header else None
    return {
        "ip": _ip(call.payload.get("requester_ip_address") or call.metadata.get("requester_ip_address")),
        "user_agent": str(ua)[:512] if ua else None,
        "tls_fp": str(tls)[:128] if tls else None,
    }


Resolver = Callable[[LiteLLMCall], Any]


def build_event(
    call: LiteLLMCall,
    *,
    fingerprint_key: bytes | str | None = None,
    account_id: Resolver = default_account_id,
    org_id: Resolver = default_org_id,
    api_key_id: Resolver = default_api_key_id,
    billing: Resolver = default_billing,
    client: Resolver = default_client,
) -> dict[str, Any]:
    """A valid ``api_call_event.v1`` for ``call``, through :func:`detector.gateway.make_event`.

    The resolvers map LiteLLM's identities to ours (defaults: the module docstring's table). Raises
    :class:`detector.schemas.InvalidEvent` when a resolver returns something the schema refuses.
    """
    response: dict[str, Any] = {"stop_reason": call.stop_reason}
    if call.refused is not None:
        response["refused"] = call.refused
    return make_event(
        account_id=account_id(call) or "anonymous",
        org_id=org_id(call),
        api_key_id=api_key_id(call) or "none",
        ts=call.ts_ms,
        model=call.model,
        endpoint=call.endpoint,
        status=call.status,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        latency_ms=call.latency_ms,
        client=client(call) or {},
        billing=billing(call) or {},
        response=response,
        prompt_text=call.prompt_text,
        system_text=call.system_text,
        fingerprint_key=fingerprint_key,
    )


# -------------------------------------------------------------------------------------------- callback
_STOP = object()
_COUNTERS = ("captured", "published", "dropped", "redacted", "invalid", "errors", "send_errors")


class DetectorCallback(CustomLogger):
    """A LiteLLM ``CustomLogger`` publishing one detector event per call; never raises into LiteLLM.

    ``bootstrap``, ``topic`` and ``fingerprint_key`` default to ``DETECTOR_KAFKA__BOOTSTRAP``,
    ``DETECTOR_TOPICS__API_CALLS`` and ``DETECTOR_FINGERPRINT_KEY``, read on the first event when any of the
    three is missing (the Kafka security options then come from ``DETECTOR_KAFKA__*`` too); pass ``settings``
    to read nothing from the environment.
    ``account_id``, ``org_id``, ``api_key_id``, ``billing`` and ``client`` replace the default mapping
    (callables of a :class:`LiteLLMCall`). At most ``max_queue`` calls wait for the publishing thread; more
    are dropped and counted. ``publisher_factory(bootstrap, topic, **kafka_config)`` replaces
    :class:`EventPublisher` (tests).

    Constructing one reads nothing and connects nowhere; see :meth:`stats`, :meth:`flush`, :meth:`close`.
    """

    #: kafka-python options of the adapter's producer: a broker that is down costs the publishing thread 5 s per
    #: connection attempt (kafka-python 3 would wait 30 s) and at most 5 s per send when the buffer is full.
    PRODUCER_CONFIG: Mapping[str, Any] = {"bootstrap_timeout_ms": 5_000, "max_block_ms": 5_000}

    def __init__(
        self,
        *,
        bootstrap: str | None = None,
        topic: str | None = None,
        settings: Settings | None = None,
        fingerprint_key: bytes | str | None = None,
        account_id: Resolver = default_account_id,
        org_id: Resolver = default_org_id,
        api_key_id: Resolver = default_api_key_id,
        billing: Resolver = default_billing,
        client: Resolver | None = None,
        tls_fp_header: str | None = None,
        max_queue: int = 10_000,
        publisher_factory: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()  # message_logging stays on: the fingerprints need the text, which never leaves here
        self.bootstrap = bootstrap
        self.topic = topic
        self.settings = settings
        self.fingerprint_key = fingerprint_key
        self.resolvers: dict[str, Resolver] = {
            "account_id": account_id, "org_id": org_id, "api_key_id": api_key_id, "billing": billing,
            "client": client or (lambda call: default_client(call, tls_fp_header)),
        }
        self.max_queue = max_queue
        self.publisher_factory = publisher_factory
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._publisher: Any = None
        self._pid: int | None = None
        self._connect_after = 0.0
        self._connect_backoff = 1.0
        self._atexit_registered = False

    # ---- LiteLLM's hooks (it passes every argument by keyword, so these names are part of the contract)
    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._capture(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._capture(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._capture(kwargs, response_obj, start_time, end_time, failed=False)  # never blocks: a queue put

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._capture(kwargs, response_obj, start_time, end_time, failed=True)

    # ---- public
    def stats(self) -> dict[str, int]:
        """Counters since construction: captured, published (acknowledged by Kafka), dropped (queue full or
        no broker), redacted, invalid (refused by the schema), errors (anything else), send_errors."""
        with self._lock:
            return dict(self._counts)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every captured call is built and handed to Kafka, then flush the producer.

        Returns False if that did not finish within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        q = self._queue
        if q is not None:
            with q.all_tasks_done:
                while q.unfinished_tasks:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    q.all_tasks_done.wait(remaining)
        publisher = self._publisher
        if publisher is not None:
            try:
                publisher.flush(max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - flush is best effort; the gateway must go on
                self._fail("send_errors", "flush failed: %s", type(exc).__name__)
                return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Flush, stop the publishing thread and close the producer. A later event starts them again."""
        self.flush(timeout)
        with self._lock:
            q, thread, publisher = self._queue, self._thread, self._publisher
            self._queue = self._thread = self._publisher = None
        if q is not None and thread is not None:
            q.put(_STOP)
            thread.join(timeout)
        if publisher is not None:
            try:
                publisher.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("litellm adapter: closing the producer failed: %s", type(exc).__name__)
        if self._atexit_registered:
            atexit.unregister(self._at_exit)
            self._atexit_registered = False

    # ---- internals
    def _bump(self, name: str, n: int = 1) -> int:
        with self._lock:
            self._counts[name] += n
            return self._counts[name]

    def _fail(self, counter: str, message: str, *args: Any) -> None:
        """Count a failure; log the 1st, 2nd, 4th, 8th ... of each kind (a bad deploy must not flood logs)."""
        n = self._bump(counter)
        if n & (n - 1) == 0:
            log.warning("litellm adapter (%s #%d): " + message, counter, n, *args)

    def _capture(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any, *, failed: bool) -> None:
        try:
            call = capture_call(kwargs, response_obj, start_time, end_time, failed=failed)
            if call.redacted:
                self._fail("redacted", "LiteLLM redacted the messages (turn_off_message_logging); call skipped")
                return
            q = self._running_queue()
            try:
                q.put_nowait(call)
            except queue.Full:
                self._fail("dropped", "queue full (%d calls waiting); call dropped", self.max_queue)
                return
            self._bump("captured")
        except Exception as exc:  # noqa: BLE001 - nothing may raise into the gateway
            self._fail("errors", "capturing a call failed: %s", type(exc).__name__)

    def _running_queue(self) -> queue.Queue[Any]:
        pid = os.getpid()
        with self._lock:
            if self._queue is not None and self._pid == pid and self._thread is not None and self._thread.is_alive():
                return self._queue
            # first event, or a forked child (the parent's thread and producer do not exist here)
            self._queue = queue.Queue(self.max_queue)
            self._publisher = None
            self._pid = pid
            self._thread = threading.Thread(target=self._run, args=(self._queue,), name="detector-litellm",
                                            daemon=True)
            self._thread.start()
            if not self._atexit_registered:
                atexit.register(self._at_exit)
                self._atexit_registered = True
            return self._queue

    def _at_exit(self) -> None:
        try:
            self.close(timeout=5.0)
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown; nothing left to tell
            pass

    def _connect(self) -> tuple[Any, bytes | str | None]:
        settings = self.settings
        if settings is None and (self.bootstrap is None or self.topic is None or self.fingerprint_key is None):
            settings = load_settings()  # the proxy's DETECTOR_* environment; unknown DETECTOR_ names fail
        kafka_config: dict[str, Any] = {}
        if settings is not None:
            from detector.streaming.topics import kafka_client_config  # kafka-python options; imports no Faust

            kafka_config = kafka_client_config(settings.kafka)
            kafka_config.pop("bootstrap_servers", None)
        bootstrap = (self.bootstrap or settings.kafka.bootstrap) if settings else self.bootstrap
        topic = (self.topic or settings.topics.api_calls) if settings else self.topic
        assert bootstrap is not None and topic is not None  # settings are loaded whenever either is missing
        key = self.fingerprint_key
        if key is None and settings is not None:
            key = settings.fingerprint_key.reveal()
            if key == Settings().fingerprint_key.reveal():
                log.warning("litellm adapter: DETECTOR_FINGERPRINT_KEY is not set; using the demo key")
        if self.publisher_factory is None:
            from kafka import KafkaProducer

            kafka_config = {**self.PRODUCER_CONFIG, **kafka_config}
            if "bootstrap_timeout_ms" not in KafkaProducer.DEFAULT_CONFIG:  # kafka-python 2 refuses unknown options
                kafka_config.pop("bootstrap_timeout_ms")
        factory = self.publisher_factory or EventPublisher
        publisher = factory(bootstrap, topic, **kafka_config)
        log.info("litellm adapter: publishing to topic %s at %s", topic, bootstrap)
        return publisher, key

    def _run(self, q: queue.Queue[Any]) -> None:
        """The publishing thread: build each captured call's event and hand it to Kafka."""
        key: bytes | str | None = None
        while True:
            call = q.get()
            try:
                if call is _STOP:
                    return
                if self._publisher is None:
                    if time.monotonic() < self._connect_after:
                        self._fail("dropped", "no Kafka producer yet; call dropped")
                        continue
                    try:
                        self._publisher, key = self._connect()
                        self._connect_backoff = 1.0
                    except Exception as exc:  # noqa: BLE001
                        self._connect_after = time.monotonic() + self._connect_backoff
                        self._connect_backoff = min(60.0, self._connect_backoff * 2)
                        self._fail("dropped", "cannot create the Kafka producer (%s: %s); call dropped",
                                   type(exc).__name__, exc)
                        continue
                event = build_event(call, fingerprint_key=key, **self.resolvers)
                future = self._publisher.publish(event)
                if hasattr(future, "add_callback"):
                    future.add_callback(lambda _meta: self._bump("published"))
                    future.add_errback(lambda exc: self._fail("send_errors", "Kafka refused an event: %s",
                                                              type(exc).__name__))
                else:
                    self._bump("published")
            except InvalidEvent as exc:
                self._fail("invalid", "event refused by the schema: %s", exc.detail)
            except Exception as exc:  # noqa: BLE001 - one bad call must not stop the thread
                self._fail("errors", "building or sending an event failed: %s", type(exc).__name__)
            finally:
                q.task_done()


#: What the proxy's config names (``callbacks: detector.integrations.litellm.handler``). Lazy: reads the
#: ``DETECTOR_*`` settings and connects to Kafka on the first event, not at import.
handler = DetectorCallback()
