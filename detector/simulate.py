"""Traffic simulator: API-call events of ordinary accounts and distillation campaigns, with labels.

Drives the demo, the integration tests and the evaluation of the detector (precision / recall, time to
detection). Every event is a valid ``schemas/api_call_event.v1.json`` event carrying fingerprints of real
prompt text (:mod:`detector.prompts`); the raw text never leaves this module. Realism of the *hard* cases
matters more than volume, so the ordinary population includes the legitimate look-alikes of each attack
signal:

=====================  ==========================================  =========================================
ordinary kind          looks like an attack because                 but
=====================  ==========================================  =========================================
``enterprise_batch``   1,000s-10,000s of calls/day, one template,   business-hour or nightly bursts, old
                       cloud ASNs, accounts sharing a payment fp    accounts, classification-size outputs
``eval_harness``       identical prompts from many accounts and     bursty runs, benchmark content, moves to
                       orgs, "Let's think step by step", httpx UA   the new model within hours of release
``agentic_coding``     one long system prompt shared by thousands   diurnal, diverse tasks, tool_use loops,
                       of accounts, same user agent, huge inputs    residential ASNs, own payment each
``corporate_nat``      100+ accounts on one /24, one ASN, one UA,   diverse prompts, business hours, accounts
                       one payment fp, created together              years old
``researcher``         CoT prompts, coding and math, scripts;       moderate volume, varied content
                       labs share one card, half with no org
``agentic_coding``     teams of 3-19 on one card, half with no      (as above)
  (teams)              org (personal accounts, a company card)
``content_pipeline``   long answers pulled around the clock at a    one job per org (articles, product pages,
                       high rate by several accounts of one org on  worked solutions), one capability, no
                       one card, templated; the edtech job asks     new-model jump, no cards or networks
                       for step-by-step solutions                   shared beyond the org
``app_backend``        an app's users' requests through 1-3         diverse prompts (users' own code and
                       accounts of one org on one card: hundreds    notes; a tutoring app's textbook
                       to 1,500 calls a day each, long answers,     exercises are in public datasets),
                       around the clock, moves to the new model     users' day across time zones, no
                       within hours of its release                  replays, no template shared with others
``vendor_tool``        a vendor's frame and user agent filled by    each company's own card, cloud network
  (``vendor_tool``     eight companies' accounts each (three        and inputs (code, records), but for the
  scenario only)       vendors) at a harvest's pace, long answers   tutor's: its learners' public exercises
``early_adopter``      switches to a new model within hours         chat-like volume and content
``vpn_user``           calls from 3-8 networks a day (a VPN or      chat-like content and timing, one user
                       relay picking another exit each time),       agent, own card; one in five is a heavy
                       exits shared with other users                user (40-150 calls a day)
``chat``               (the bulk; mobile CGNAT shares IPs)          diurnal, diverse, low volume
=====================  ==========================================  =========================================

Campaigns are modelled on documented 2026 distillation cases and scaled down (see each scenario's
``description`` for the factors): ``hydra`` (thousands of load-balanced accounts at ~26 calls/day,
templated coding / agentic prompts asking for chain of thought), ``model_hopper`` (high volume, moves to a
newly released model within a day), ``cot_coercion`` (small, multilingual chain-of-thought coercion) and
``reseller`` (proxy accounts mixing hydra's templated traffic with their customers' ordinary traffic).
Adversarial variants (``paraphrase``, ``fast_rotation``, ``slow_ramp``, ``many_asns``) are scenario flags.

Everything is deterministic given the seed: randomness only from ``random.Random`` instances seeded at
build time (one per account), and :meth:`Simulation.events` regenerates the same stream on every call.

>>> sim = build("smoke", scale=0.3)
>>> evs = list(sim.events())
>>> all(sim.start_ts <= e["ts"] <= sim.end_ts for e in evs), evs == sorted(evs, key=lambda e: e["ts"])
(True, True)
>>> sorted({sim.labels[e["account_id"]].campaign or "-" for e in evs})
['-', 'cot_coercion', 'hydra', 'model_hopper', 'reseller']
>>> [e["event_id"] for e in evs[:50]] == [e["event_id"] for e in list(sim.events())[:50]]
True
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from detector.fingerprints import fingerprint
from detector.gateway import SCHEMA_VERSION
from detector.prompts import load_prompt_sets
from detector.schemas import validate_event

log = logging.getLogger(__name__)

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
#: 2026-03-02 00:00 UTC, a Monday: the start of every scenario but ``holdout``.
BASE_TS = 1772409600000
MODEL_CURRENT = "frontier-4"
MODEL_SMALL = "frontier-4-mini"
MODEL_NEW = "frontier-5"
ENDPOINT = "/v1/messages"
DEFAULT_KEY = b"distill-detector-demo-key"
#: Distinct (prompt, system prompt) fingerprints kept per :meth:`Simulation.events` call.
FP_CACHE_SIZE = 1 << 16
# Share of research labs and agentic-coding teams that pay for their members' personal accounts with one card
# without setting up an organisation: the legitimate look-alike of a payment method shared by a campaign.
ORGLESS_TEAMS = 0.5


# ==== public API =========================================================================================


@dataclass(frozen=True)
class AccountLabel:
    """Ground truth for one account."""

    account_id: str
    attack: bool
    campaign: str | None  # "hydra", "model_hopper", "cot_coercion", "reseller"; None for ordinary
    kind: str  # "chat", "enterprise_batch", ..., or the campaign name for attackers


@dataclass
class Simulation:
    """A built scenario: labels now, events lazily (:meth:`events`, regenerated on each call)."""

    name: str
    description: str
    start_ts: int
    end_ts: int
    labels: dict[str, AccountLabel]
    _actors: list[_Actor] = field(default_factory=list, repr=False, compare=False)
    _seed: int = field(default=0, repr=False)
    _key: bytes = field(default=DEFAULT_KEY, repr=False)

    def events(self) -> Iterator[dict[str, Any]]:
        """Valid events in event-time order (ties by account), generated lazily and deterministically.

        Each call starts afresh and yields the very same events (event ids included). Costs ~0.1 ms per
        event (most of it ``validate_event``) plus ~0.7 ms per distinct (prompt, system prompt), whose
        fingerprint is computed once and cached (LRU, :data:`FP_CACHE_SIZE` entries, ~100 MB at most).
        """
        fp = functools.lru_cache(maxsize=FP_CACHE_SIZE)(functools.partial(_fingerprint, key=self._key))
        for event_id, call in self._calls():
            ts, _i, _seq, acct, key, model, req, status, out_tok, latency, stop, refused, in_tok = call
            prompt = fp(req[0], req[1])
            event = {
                "schema_version": SCHEMA_VERSION,
                "event_id": event_id,
                "org_id": acct.org_id,
                "account_id": acct.account_id,
                "ts": ts,
                "api_key_id": key,
                "model": model,
                "endpoint": ENDPOINT,
                "status": status,
                "input_tokens": in_tok,
                "output_tokens": out_tok,
                "latency_ms": latency,
                "response": {"stop_reason": stop, "refused": refused},
                "client": dict(req[2]),
                "billing": dict(acct.billing),
                "prompt": {**prompt, "bands": list(prompt["bands"])},
            }
            yield validate_event(event)

    def _calls(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """(event id, call) in event-time order: the raw material of :meth:`events`, text included."""
        ids = random.Random(f"{self._seed}/{self.name}/event-ids")
        streams = [a.stream(i, self.start_ts, self.end_ts) for i, a in enumerate(self._actors)]
        for call in heapq.merge(*streams):
            yield f"{ids.getrandbits(128):032x}", call

    def count_hint(self) -> int:
        """Approximate number of events (expected values; the real count differs by a few per cent)."""
        return int(sum(a.expected for a in self._actors))


def scenario_names() -> list[str]:
    """Names accepted by :func:`build`.

    >>> scenario_names()[:3]
    ['default', 'demo', 'smoke']
    """
    return list(_SCENARIOS)


def config(scenario: str, *, seed: int = 7, days: int | None = None) -> _Config:
    """The scenario's settings as ``seed`` draws them, over ``days`` if given. Raises ValueError, in one line, for
    an unknown scenario or days that end before the scenario's new model is released (its campaigns' move to it
    would not happen).

    >>> config("default", days=44).days, config("default").days
    (44, 3)
    >>> config("default", days=1)
    Traceback (most recent call last):
    ...
    ValueError: days: 'default' releases its new model 1.7 days in; run at least 2 days
    """
    if scenario not in _SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {scenario_names()}")
    cfg = _SCENARIOS[scenario](random.Random(f"{seed}/{scenario}/config"))
    if days is None:
        return cfg
    if days * DAY <= cfg.release_after:
        raise ValueError(f"days: {scenario!r} releases its new model {cfg.release_after / DAY:.1f} days in; "
                         f"run at least {cfg.release_after // DAY + 1} days")
    return dataclasses.replace(cfg, days=days)


def build(
    scenario: str = "default",
    *,
    seed: int = 7,
    scale: float = 1.0,
    prompts_dir: Path | None = None,
    fingerprint_key: bytes = DEFAULT_KEY,
    days: int | None = None,
) -> Simulation:
    """Build a scenario: accounts, labels and behaviour now; events later, lazily.

    ``scale`` multiplies account counts (each kind keeps at least one account); per-account volumes do
    not change. ``days`` runs the scenario for that many days instead of its own (:func:`config`): as many
    accounts of each kind, most of them the very same (the seed draws by the scenario's name, but some draws
    depend on the window's end), and the new model released where the scenario puts it. ``prompts_dir``
    defaults to :func:`detector.prompts.default_prompts_dir`, falling back to the bundled sample. Building
    ``default`` takes about a second (mostly reading prompt files).
    """
    if scale <= 0:
        raise ValueError("scale must be > 0")
    cfg = config(scenario, seed=seed, days=days)
    builder = _Builder(cfg, seed, scale, prompts_dir)
    builder.populate()
    labels = dict(sorted(builder.labels.items()))
    return Simulation(
        name=scenario,
        description=builder.describe(),
        start_ts=cfg.start_ts,
        end_ts=cfg.start_ts + cfg.days * DAY,
        labels=labels,
        _actors=builder.actors,
        _seed=seed,
        _key=fingerprint_key,
    )


def write_jsonl(
    sim: Simulation,
    path: Path,
    labels_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the events of ``sim`` as JSON lines (and its labels, one account a line); return the count.

    ``progress`` is called with the number of events written so far every 10,000 events and at the end.
    """
    n = 0
    buf: list[bytes] = []
    with open(path, "wb") as f:
        for event in sim.events():
            buf.append(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
            n += 1
            if len(buf) >= 2000:
                f.write(b"".join(buf))
                buf.clear()
            if progress is not None and n % 10_000 == 0:
                progress(n)
        f.write(b"".join(buf))
    if progress is not None:
        progress(n)
    if labels_path is not None:
        with open(labels_path, "wb") as f:
            for label in sim.labels.values():
                f.write(orjson.dumps(dataclasses.asdict(label), option=orjson.OPT_APPEND_NEWLINE))
    return n


# ==== scenarios ==========================================================================================


@dataclass(frozen=True)
class _Config:
    """One scenario. Counts are accounts at scale 1; ``volume`` multiplies per-account rates of the
    high-volume actors (enterprise, eval, model hopper, reseller) so small scenarios stay small."""

    name: str
    start_ts: int = BASE_TS
    days: int = 3
    release_after: int = 41 * HOUR  # frontier-5 released at start + this (day 1, 17:00 UTC)
    volume: float = 1.0
    chat: int = 1900
    early_adopter: int = 100
    researcher: int = 60
    agentic_coding: int = 400
    corporate_nat: tuple[int, ...] = (110, 40)  # accounts per NAT'd org
    eval_harness: int = 16
    enterprise: tuple[int, ...] = (3, 2, 2, 1)  # accounts per enterprise org
    content_pipeline: tuple[int, ...] = (5, 4)  # accounts per content-generation org (publisher, edtech, ...)
    vpn_user: int = 60
    app_backend: tuple[int, ...] = (3, 3, 2, 2, 1)  # accounts per org running an app on the API for its own users
    vendor_tool: tuple[int, ...] = ()  # accounts per company running one vendor's tool with its own API keys
    hydra: int = 600
    model_hopper: int = 16
    cot_coercion: int = 24
    reseller: tuple[int, ...] = (3, 3, 3)  # accounts per reseller business
    hydra_rate: tuple[float, float] = (18.0, 34.0)  # calls/day per hydra account (mean 26)
    templates: str = "main"  # "main" or "holdout"
    eval_suites: tuple[str, ...] = ("arena", "nq", "vicuna")
    paraphrase: bool = False
    fast_rotation: bool = False
    slow_ramp: bool = False
    many_asns: bool = False


def _default(rng: random.Random, **kw: Any) -> _Config:
    return _Config(name=kw.pop("name", "default"), **kw)


def _demo(rng: random.Random) -> _Config:
    return _Config(
        name="demo", days=2, release_after=17 * HOUR, volume=0.45, chat=420, early_adopter=30, researcher=15,
        agentic_coding=80, corporate_nat=(40,), eval_harness=4, enterprise=(1, 1), hydra=150, model_hopper=6,
        cot_coercion=10, reseller=(2, 2), eval_suites=("vicuna", "arena"), vpn_user=12, app_backend=(2,),
    )


def _smoke(rng: random.Random) -> _Config:
    return _Config(
        name="smoke", days=1, release_after=8 * HOUR, volume=0.08, chat=90, early_adopter=10, researcher=3,
        agentic_coding=12, corporate_nat=(10,), eval_harness=1, enterprise=(1,), hydra=40, model_hopper=2,
        cot_coercion=4, reseller=(2,), eval_suites=("vicuna",), vpn_user=3, app_backend=(1,),
    )


def _holdout(rng: random.Random) -> _Config:
    """A different mix drawn from the seed, other templates, other dates: for held-out evaluation."""
    u = rng.uniform
    return _Config(
        name="holdout",
        start_ts=BASE_TS + 17 * DAY,  # Thursday 2026-03-19: the window spans a weekend
        days=4,
        release_after=int(u(30, 60)) * HOUR,
        chat=int(u(1800, 2600)),
        early_adopter=int(u(60, 160)),
        researcher=int(u(40, 100)),
        agentic_coding=int(u(250, 500)),
        corporate_nat=(int(u(80, 160)), int(u(20, 60))),
        eval_harness=int(u(10, 24)),
        enterprise=tuple(int(u(1, 4)) for _ in range(int(u(3, 6)))),
        hydra=int(u(500, 800)),
        model_hopper=int(u(12, 30)),
        cot_coercion=int(u(20, 45)),
        reseller=tuple(int(u(2, 6)) for _ in range(int(u(2, 4)))),
        hydra_rate=(u(14, 20), u(30, 38)),
        templates="holdout",
        volume=0.8,
        vpn_user=int(u(30, 100)),
        app_backend=tuple(int(u(2, 5)) for _ in range(int(u(3, 6)))),
    )


_SCENARIOS: dict[str, Callable[[random.Random], _Config]] = {
    "default": _default,
    "demo": _demo,
    "smoke": _smoke,
    "paraphrase": functools.partial(_default, name="paraphrase", paraphrase=True),
    "fast_rotation": functools.partial(_default, name="fast_rotation", fast_rotation=True),
    "slow_ramp": functools.partial(_default, name="slow_ramp", slow_ramp=True),
    "many_asns": functools.partial(_default, name="many_asns", many_asns=True),
    # Hard ordinary traffic, not an attack variant: 24 companies run three vendors' tools (eight each) with their own
    # keys, so each tool's frame is filled by many organisations at a harvest's pace.
    "vendor_tool": functools.partial(_default, name="vendor_tool",
                                     vendor_tool=(3, 3, 3, 2, 2, 2, 2, 2, 2) + (1,) * 15),
    "holdout": _holdout,
}


# ==== network, client and billing catalogue ==============================================================

# (ASN, country, UTC offset in hours of the users behind it). Real ASNs of the named kind of network.
_RESIDENTIAL: tuple[tuple[int, str, int], ...] = (
    (7922, "US", -5), (701, "US", -5), (20115, "US", -6), (22773, "US", -8), (7018, "US", -6), (20001, "US", -8),
    (2856, "GB", 0), (5089, "GB", 0), (3320, "DE", 1), (3209, "DE", 1), (3215, "FR", 1), (12322, "FR", 1),
    (55836, "IN", 5), (24560, "IN", 5), (4766, "KR", 9), (2516, "JP", 9), (17676, "JP", 9), (18881, "BR", -3),
    (28573, "BR", -3), (8151, "MX", -6), (3352, "ES", 1), (1136, "NL", 1), (812, "CA", -5), (577, "CA", -5),
    (1221, "AU", 10), (9121, "TR", 3), (5610, "CZ", 1), (5432, "BE", 1), (3301, "SE", 1), (6830, "AT", 1),
)
_RESIDENTIAL_WEIGHTS = (9, 7, 5, 5, 4, 4, 4, 3, 4, 2, 3, 2, 6, 4, 3, 3, 2, 3, 2, 3, 2, 2, 3, 1, 3, 2, 1, 1, 1, 1)
_MOBILE: tuple[tuple[int, str, int], ...] = (
    (21928, "US", -5), (22394, "US", -6), (55836, "IN", 5), (45609, "IN", 5), (26615, "BR", -3), (3209, "DE", 1),
)
_ZH: tuple[tuple[int, str, int], ...] = ((9506, "SG", 8), (3462, "TW", 8), (4760, "HK", 8), (4657, "SG", 8))
_CLOUD: tuple[tuple[int, str, int], ...] = (
    (16509, "US", -5), (14618, "US", -5), (396982, "US", -6), (15169, "US", -8), (8075, "US", -6),
    (8075, "IE", 0), (16509, "DE", 1), (31898, "US", -6),
)
_UNIVERSITY: tuple[tuple[int, str, int], ...] = (
    (3, "US", -5), (25, "US", -8), (2152, "US", -8), (786, "GB", 0), (680, "DE", 1), (2200, "FR", 1),
    (7539, "TW", 8), (1103, "NL", 1),
)
_HOSTING: tuple[tuple[int, str, int], ...] = (
    (24940, "DE", 1), (16276, "FR", 1), (20473, "US", -5), (9009, "RO", 2), (51167, "DE", 1), (14061, "SG", 8),
    (212238, "GB", 0), (45102, "SG", 8), (132203, "HK", 8), (63949, "JP", 9),
)
_CORPORATE: tuple[tuple[int, str, int], ...] = ((53813, "US", -5), (3356, "DE", 1))
# Exits of commercial VPNs and privacy relays (a relay's egress is a CDN's network): many users share each.
_VPN: tuple[tuple[int, str, int], ...] = (
    (60068, "GB", 0), (136787, "US", -5), (39351, "SE", 1), (9009, "NL", 1), (13335, "US", -5), (36183, "US", -5),
    (54113, "US", -8), (20940, "DE", 1),
)

_UA_BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/133.0.0.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/133.0.0.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.3 "
    "Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:135.0) Gecko/20100101 Firefox/135.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_3 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.3 "
    "Mobile/15E148 Safari/604.1",
)
_UA_SDK = ("anthropic-python/0.49.0", "anthropic-python/0.47.2", "anthropic-typescript/0.39.0",
           "langchain-anthropic/0.3.10", "python-requests/2.32.3", "curl/8.7.1")
_UA_SCRIPT = ("python-httpx/0.27.0", "python-httpx/0.27.2", "aiohttp/3.9.5", "python-requests/2.31.0",
              "Go-http-client/2.0")
_UA_RESELLER = ("new-api/0.6.11", "one-api/v0.6.10", "new-api/0.6.9")
_UA_AGENT = "claude-code/1.0.{}"  # patch level differs by user (auto-update cadence)
# JA4-style TLS client fingerprints (illustrative values in the JA4 format).
_TLS = {
    "chrome": "t13d1516h2_8daaf6152771_02713d6af862",
    "firefox": "t13d1715h2_5b57614c22b0_3d5424432f57",
    "safari": "t13d2014h2_a09f3c656075_14788d8d241b",
    "python": "t13d1812h1_85036bcba153_b26ce05bbdd6",
    "python_h2": "t13d1812h2_85036bcba153_d41ae481755e",
    "node": "t13d5911h1_a33745022dd6_1f22a2ca17c4",
    "go": "t13d1311h2_f57a46bbacb6_e7c285222651",
    "curl": "t13d3112h2_e8f1e7e78f70_6bebaf5329ac",
    "custom": "t13d1813h2_e8a523a41297_61da8bdc3bd6",  # hydra's tuned client: rare among ordinary users
}
_UA_TLS = {"anthropic-python": "python_h2", "python-httpx": "python", "python-requests": "python",
           "aiohttp": "python", "langchain-anthropic": "python_h2", "anthropic-typescript": "node",
           "curl": "curl", "Go-http-client": "go", "new-api": "go", "one-api": "go"}
_TIERS = ("free", "tier-1", "tier-2", "tier-3", "tier-4", "scale", "enterprise")

_PUBLIC_FIRST_OCTETS = (
    23, 24, 31, 34, 35, 37, 38, 45, 46, 50, 51, 52, 62, 64, 66, 67, 68, 69, 71, 72, 73, 74, 76, 77, 78, 79, 80,
    81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 98, 99, 101, 103, 104, 107, 108, 109, 110, 112,
    114, 116, 118, 121, 124, 128, 130, 131, 134, 136, 137, 138, 139, 141, 142, 143, 144, 145, 146, 147, 148,
    149, 151, 152, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 167, 168, 170, 171, 173, 174,
    175, 176, 177, 178, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 193, 194, 195, 196, 197,
    199, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 216, 217,
)


def _ua_tls(ua: str) -> str:
    if ua.startswith("Mozilla"):
        return _TLS["firefox" if "Firefox" in ua else "safari" if "Version/" in ua else "chrome"]
    if ua.startswith("claude-code"):
        return _TLS["node"]
    return _TLS[_UA_TLS.get(ua.split("/")[0], "python")]


def _prefix16(asn: int, k: int = 0) -> tuple[int, int]:
    """A fixed /16 for an ASN (illustrative, not the real allocation)."""
    h = int.from_bytes(hashlib.blake2b(f"{asn}/{k}".encode(), digest_size=4).digest(), "big")
    return _PUBLIC_FIRST_OCTETS[h % len(_PUBLIC_FIRST_OCTETS)], (h >> 8) % 256


def _ipv4(rng: random.Random, asn: int, subnet: int | None = None, host: int | None = None) -> str:
    a, b = _prefix16(asn, rng.randrange(4) if subnet is None else subnet // 256)
    c = rng.randrange(256) if subnet is None else subnet % 256
    return f"{a}.{b}.{c}.{rng.randrange(1, 255) if host is None else host}"


def _ipv6(rng: random.Random, asn: int) -> str:
    a, b = _prefix16(asn)
    g = [f"{rng.getrandbits(16):x}" for _ in range(3)]
    return f"2a{a % 16:02x}:{b:02x}{asn % 256:02x}:{g[0]}:{g[1]}::{g[2]}"


def _client(ip: str, net: tuple[int, str, int], ua: str, tls: str | None = None) -> dict[str, Any]:
    return {"ip": ip, "asn": net[0], "country": net[1], "user_agent": ua, "tls_fp": tls or _ua_tls(ua)}


# ==== prompt composition =================================================================================

_CHAT_LEADS = (
    "", "", "", "", "", "Quick question: ", "Hi! ", "Hey, ", "Can you help me? ", "Please help: ", "I need help. ",
    "Hello. ", "Question for you: ", "Help me out here. ", "Ok so ", "Honest answer please: ", "Urgent: ",
    "For a school project: ", "For work: ", "Thanks in advance! ", "Random question, ", "I'm curious: ",
    "My boss asked me this: ", "Not sure how to phrase this, but ", "Bit of a beginner here. ",
)
_CHAT_TAILS = (
    "", "", "", "", "", " Thanks!", " Thank you.", " Keep it short.", " Please be concise.", " Explain simply.",
    " Use bullet points.", " In plain English please.", " Be detailed.", " Give examples.", " ty",
    " I'm a beginner.", " No jargon please.", " Answer in a friendly tone.", " Make it fun.",
    " Please double-check.", " Format it as a table if possible.", " Short answer is fine.",
)
_FOLLOW_UPS = (
    "Can you make it shorter?", "Thanks! Can you explain that more simply?", "Now translate it to Spanish.",
    "Make it more formal.", "Can you give me another example?", "That's not quite right, try again.",
    "Why?", "Can you expand on the second point?", "Rewrite it as a bulleted list.", "Thank you!",
    "What are the downsides?", "Can you make it funnier?", "Summarize that in one sentence.",
    "Give me three alternatives.", "What would you recommend?", "continue", "Add a conclusion.",
    "Is that accurate?", "Explain it like I'm five.", "Can you add sources?", "Make it sound less robotic.",
    "ok and what about the cost?", "Can you turn that into an email?", "Shorter please", "Perfect, thanks.",
)
_COT_ASKS = (
    " Think step by step.", " Please explain your reasoning.", " Show your work.", " Let's think step by step.",
    " Explain step by step.", " Walk me through it step by step.", " Reason it out before answering.",
)

_HYDRA_TEMPLATES: dict[str, tuple[tuple[str | None, str], ...]] = {
    "main": (
        ("You are an expert software engineer. Think carefully and explain your reasoning.",
         "Solve the following programming task. Think step by step: first restate the problem, then reason "
         "through the approach in detail, and only then write the complete, runnable code. Do not skip any "
         "steps.\n\n### Task\n{task}\n\n### Response format\n<reasoning>your full step-by-step reasoning"
         "</reasoning>\n<answer>the final solution</answer>"),
        (None,
         "You are an autonomous agent with access to tools. For the task below, plan the steps, then alternate "
         "Thought:, Action: and Observation: lines until the task is done. Explain your reasoning at every step "
         "and finish with a line starting with 'Final Answer:'.\n\nTask: {task}"),
        ("You are a helpful assistant.",
         "{task}\n\nLet's think step by step. Show all of your reasoning before the final answer and be as "
         "detailed as possible."),
        (None,
         "Answer the request below. Return a JSON object with the keys \"chain_of_thought\" (a detailed, "
         "step-by-step derivation of the answer) and \"final_answer\".\n\nRequest:\n{task}"),
    ),
    "holdout": (
        ("You are a senior engineer mentoring a junior colleague.",
         "Task description:\n{task}\n\nWalk through your thinking one decision at a time, explaining why each "
         "choice is made. After the explanation, give the full implementation in a single code block."),
        ("You are ToolAgent, an assistant that solves tasks by calling tools.",
         "{task}\n\nBefore acting, write a numbered plan. Then for each step give your rationale, the tool you "
         "would invoke and the expected result. Conclude with a summary of the outcome."),
        (None, "Q: {task}\nA: Let's work this out in a step-by-step way to be sure we have the right answer."),
        (None,
         "### Instruction\n{task}\n\n### Guidelines\n1. Reason about the problem thoroughly before answering.\n"
         "2. Show every intermediate step.\n3. Provide a complete and correct final answer.\n\n### Response"),
    ),
}
# Paraphrase pools (adversarial variant): a template is assembled per request from these.
_PARA_OPEN = (
    "Solve the following programming task.", "Here is a coding problem I need solved.",
    "Please work through the task below.", "Take a look at the following problem.", "I have a task for you.",
    "Complete the assignment below.", "Your job is to handle this request.", "Consider the following task carefully.",
    "Help me with the following.", "Below is a problem statement.", "Work on this task.",
    "Tackle the following challenge.", "Read the task and respond.", "Here's what I need.",
)
_PARA_REASON = (
    "Think step by step.", "Reason through it carefully before answering.", "Explain your reasoning in detail.",
    "Walk me through every stage of your thinking.", "Lay out each intermediate inference before the conclusion.",
    "Show your work.", "Give a thorough derivation first.", "Break the problem into parts and justify each one.",
    "Narrate your thought process as you go.", "Start with a detailed analysis, then answer.",
    "Make every step of the logic explicit.", "Let's think this through step by step.",
    "Document your full line of reasoning.", "Spell out how you arrive at the answer.",
)
_PARA_FORMAT = (
    "Then give the complete code.", "Finish with the full solution.", "End with the final answer on its own line.",
    "Put the final result in a code block.", "Conclude with a runnable implementation.",
    "Close with a short summary of the answer.", "Provide the final output after the reasoning.",
    "Then write the final version in full.", "Return the finished solution at the end.",
    "Wrap up with the final answer.", "Make sure the last part is the full answer.",
    "Give the final solution without omissions.",
)
_PARA_DETAIL = ("Be as detailed as possible.", "Do not skip anything.", "Length is not a concern.", "Be exhaustive.",
                "", "", "Include edge cases.", "Explain any assumptions.", "Use clear headings.", "Avoid shortcuts.")
_PARA_SYSTEM = (None, None, "You are a helpful assistant.", "You are an expert programmer.",
                "You are a world-class reasoning engine.", "You are a meticulous senior developer.")

# Chain-of-thought coercion, several languages; each contains a phrase fingerprints._COT recognises.
_COT_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "main": (
        ("en", "Before you answer, write out your complete chain of thought: every intermediate step, every "
               "assumption and every check you make. Do not summarize your reasoning; reproduce it in full inside "
               "<thinking> tags, then give the answer.\n\n{task}"),
        ("en", "{task}\n\nShow your work. Explain your reasoning step by step as if teaching a student, and include "
               "all of the internal deliberation that leads to the answer."),
        ("zh", "请一步一步地思考下面的问题。先把你完整的思考过程全部写出来，"
               "包括每一个中间步骤、每一个假设和每一次验证，"
               "不要省略，也不要总结，然后再给出最终答案。请用中文详细回答。\n\n问题：{task}"),
        ("zh", "你是一位严谨的老师。请逐步推理，并将推理过程完整地写在<thinking>标签中，不要跳过任何步骤，"
               "然后给出最终答案。问题如下：\n{task}\n请确保推理过程详细、完整、清晰。"),
        ("ru", "Пожалуйста, решите задачу шаг за шагом. Сначала подробно запишите весь ход своих рассуждений, каждый "
               "промежуточный шаг и каждую проверку, ничего не сокращая, а затем дайте окончательный ответ.\n\n"
               "Задача: {task}"),
        ("es", "Resuelve el siguiente problema paso a paso. Escribe primero todo tu razonamiento completo, incluyendo "
               "cada paso intermedio y cada suposición, sin resumir, y al final da la respuesta definitiva.\n\n"
               "Problema: {task}"),
        ("ja", "次の問題を段階的に考えてください。すべての中間ステップと思考の過程を省略せずに詳しく書き出し、"
               "最後に答えをはっきり示してください。\n\n問題：{task}"),
        ("ko", "다음 문제를 단계별로 풀어 주세요. 모든 중간 단계와 추론 과정을 생략하지 말고 자세히 쓴 다음, "
               "마지막에 최종 답을 제시하세요.\n\n문제: {task}"),
    ),
    "holdout": (
        ("en", "I want to see how you reason. Write your entire internal monologue for this problem, step by step, "
               "including false starts and self-corrections, and only then state the answer.\n\nProblem: {task}"),
        ("en", "Problem: {task}\n\nThink it through out loud. Every inference must be written down before you "
               "commit to an answer."),
        ("zh", "请详细展示你的推理过程：把每一步的思考都写下来，"
               "包括你考虑过又放弃的方案，最后再给出答案。\n题目：{task}"),
        ("zh", "请逐步分析下面的题目，写出完整的思考过程和每一步的依据，最后用一句话给出结论。\n{task}"),
        ("ru", "Покажи пошагово, как ты рассуждаешь: выпиши все промежуточные мысли и проверки, а затем дай ответ.\n"
               "Вопрос: {task}"),
        ("es", "Explica paso a paso todo tu razonamiento interno, sin omitir nada, antes de dar la respuesta final.\n"
               "Pregunta: {task}"),
        ("ja", "この問題についてステップバイステップで考え、思考の過程をすべて書いてから答えてください。\n{task}"),
        ("ko", "단계별로 생각하고 모든 추론 과정을 적은 뒤 답하세요.\n{task}"),
    ),
}
_COT_LANG_WEIGHTS = {"en": 0.4, "zh": 0.3, "ru": 0.12, "es": 0.08, "ja": 0.05, "ko": 0.05}

_HOPPER: dict[str, tuple[str, tuple[str, ...]]] = {
    "main": ("You are a knowledgeable assistant. Give thorough, well-structured answers.",
             ("", "", "", "",
              "\n\nProvide a comprehensive, detailed answer.", "\n\nProvide a comprehensive, detailed answer.",
              "\n\nThink step by step and explain your reasoning.",
              "\n\nThink step by step and explain your reasoning.",
              "\n\nInclude examples.", "\n\nExplain your reasoning, then give the final answer.")),
    "holdout": ("Respond as an expert. Completeness matters more than brevity.",
                ("", "", "", "\n\nCover every aspect of the question.",
                 "\n\nWork through it carefully before answering.",
                 "\n\nGive a long, thorough answer with examples.", "\n\nShow your reasoning step by step.")),
}

_ENTERPRISE_TEMPLATES = (
    ("You are a precise classification engine. Output only the label.",
     "Classify the sentiment of this customer review as positive, negative or neutral. Reply with one word."
     "\n\nReview: {text}"),
    ("You extract structured data. Output valid JSON only.",
     "Extract the fields product, issue, urgency (low/medium/high) and language as JSON from this support "
     "ticket:\n\n{text}"),
    (None,
     "You are a content moderation classifier. Label the following user message with one of: safe, spam, abuse, "
     "self_harm, other. Output JSON {{\"label\": ..., \"confidence\": ...}}.\nMessage: {text}"),
    ("You are a translation service. Preserve formatting.",
     "Translate the following customer message into English. Output only the translation.\n\n{text}"),
    (None, "Summarize the following text in one sentence for our search index.\n\nText: {text}"),
    ("You route search queries to product categories.",
     "Categorize this search query into one of our 40 product categories. Return only the category id.\nQuery: {text}"),
    ("You write metadata for a knowledge base.",
     "Generate 5 SEO keywords and a 20-word description for this article. Output as JSON.\n\nArticle: {text}"),
    ("You are an intent detector for a banking chatbot.",
     "Detect the intent of this message. Intents: balance, transfer, card_lost, dispute, other. Reply with the "
     "intent only.\n\n{text}"),
)

# Content-generation jobs (inputs pool, system prompt, template): the look-alikes of a harvest.
_CONTENT_JOBS = (
    ("topics", "You write long-form articles for a publishing platform. Use a clear, friendly tone.",
     "Write a 1,200-word article with a headline, an introduction, three sections with subheadings and a "
     "conclusion, based on this reader question:\n\n{text}"),
    ("exercises", "You write worked solutions for a study app used by high-school students.",
     "Write a complete worked solution to this exercise. Solve it step by step, explaining each step so a "
     "student can follow it, then state the final answer.\n\nExercise: {text}"),
)

# Apps built on the API (app_backend): (prompt source, system prompt). Their users' questions, not a template.
_APPS = (
    ("coding", "You are the coding assistant of DevPilot, an online IDE. Answer with working code and a short "
     "explanation. Prefer the language and framework of the user's project. Never invent APIs; say when unsure."),
    ("tutor", "You are Ms. Ada, the tutor of a study app for high-school and college students. Explain your "
     "reasoning step by step, check the student's understanding, and do not just give away the final answer."),
    ("writing", "You are the assistant inside Notable, a notes and writing app. Help the user draft, summarise and "
     "rewrite their notes. Match their language and tone; keep answers well structured."),
)

# A code-review customer's own code base: its identifiers, built from these words (vendor_tool).
_CODE_WORDS = ("user", "order", "cache", "queue", "token", "config", "session", "report", "invoice", "price", "stock",
               "ledger", "batch", "event", "route", "schema", "record", "client", "account", "payment", "index",
               "filter", "buffer", "worker", "metric", "alert", "export", "import", "render", "parse", "load", "save",
               "sync", "merge", "split", "retry", "limit", "scope", "field", "table", "query", "model", "state")
_CHANGE_VERBS = ("Refactor", "Fix the bug in", "Add tests for", "Speed up", "Rename", "Remove", "Document",
                 "Handle errors in", "Add caching to", "Split up")
# Vendors' tools that companies run with their own API keys (vendor_tool): (system prompt, the tool's frame around
# each call's input, the tool's user agent, what fills it). Every customer of a vendor sends its frame.
# - a code-review bot: a short frame around the company's own change (its task and code);
# - a document-extraction tool: long instructions in the user turn around a short record of the company's own;
# - an exercise tutor for schools and bootcamps: a frame around textbook exercises, which public datasets hold.
_VENDORS = (
    ("You are CodeScribe, a code-review assistant. Follow the conventions of the repository under review and be "
     "specific: name the function and the line you mean.",
     "Review the change below. Write: a summary of what it does, the public API it touches, the edge cases it misses, "
     "and a test plan with the tests you would add.\n\n{text}",
     "codescribe/2.3.1 anthropic-python/0.49.0", "own_change"),
    (None,
     "You are the extraction engine of Formwise. Read the record at the end and return a JSON object with these "
     "fields: party (the legal name of the counterparty as written), reference (the document's own number or "
     "identifier), issued (the issue date in ISO 8601), due (the due or expiry date in ISO 8601, null if none), "
     "currency (ISO 4217 code), total (the grand total as a decimal string), lines (an array of objects with "
     "description, quantity, unit_price and amount), tax (the total tax as a decimal string, null if none), and "
     "notes (anything a human reviewer should check, as a list of short sentences). Do not guess: when a field is "
     "missing or unreadable, set it to null and say why in notes. Keep the original spelling of names. Then, after "
     "the JSON, write a short paragraph for the reviewer explaining any field you were unsure about and why, and "
     "how the totals reconcile with the lines.\n\nRecord:\n{text}",
     "formwise-worker/5.12 (python-httpx/0.27.0)", "own_record"),
    ("You are the tutor of PrepPal, used by schools and bootcamps. Explain clearly and check the learner's "
     "understanding.",
     "A learner is working on the exercise below. Give a full worked solution with the reasoning behind each "
     "part, then two similar practice exercises with their answers.\n\nExercise: {text}",
     "preppal-server/3.4.0 anthropic-typescript/0.39.0", "public_exercise"),
)

_NOTE_ASKS = ("Summarise my notes below in five bullet points.", "Rewrite these notes as a short email.",
              "Turn my notes into a to-do list.", "Fix the grammar in my notes and keep my wording.",
              "Draft a blog post from these notes.", "What am I missing? Here are my notes:")

_RESELLER_SYSTEMS = (
    None, None, "You are a helpful assistant.", "You are a helpful assistant.", "你是一个乐于助人的助手。",
    "You are a customer support bot for an online store. Be polite and concise.",
    "You are a writing assistant. Improve the user's text.", "You are a study tutor for high school students.",
    "You are a coding assistant inside an IDE.", "你是一名专业的翻译。", "Ты полезный ассистент.",
)

_AGENT_SYSTEM = (
    "You are an interactive command-line coding assistant that helps users with software engineering tasks. "
    "Use the instructions below and the tools available to you to assist the user.\n\n"
    "# Tone and style\nBe concise, direct and to the point. When you run a non-trivial command, explain what it "
    "does and why. Output is displayed in a terminal; use GitHub-flavored markdown for formatting. Only use emojis "
    "if the user explicitly asks for it. Do not add unnecessary preamble or postamble.\n\n"
    "# Proactiveness\nDo what has been asked, nothing more, nothing less. Never create files unless they are "
    "necessary for achieving the goal; prefer editing an existing file to creating a new one. Never proactively "
    "create documentation files unless explicitly requested.\n\n"
    "# Following conventions\nWhen making changes to files, first understand the file's code conventions. Mimic "
    "code style, use existing libraries and utilities, and follow existing patterns. Never assume that a given "
    "library is available: check the manifest first. When you create a new component, look at existing "
    "components first. Always follow security best practices; never introduce code that exposes or logs secrets.\n\n"
    "# Doing tasks\n1. Use the search tools to understand the codebase and the user's query.\n2. Implement the "
    "solution using all tools available to you.\n3. Verify the solution with the project's tests; never assume a "
    "specific test framework or test script.\n4. When you have completed a task, run the lint and typecheck "
    "commands if they were provided to ensure your code is correct.\n\n"
    "# Tool usage policy\nWhen doing file search, prefer the Task tool to reduce context usage. You can call "
    "multiple tools in a single response: batch independent tool calls together for optimal performance. When "
    "running multiple bash commands, make multiple calls in parallel.\n\n"
    "# Code references\nWhen referencing specific functions or pieces of code include the pattern "
    "file_path:line_number so the user can navigate to the source.\n\n"
    "Tools: Bash, Read, Edit, Write, Glob, Grep, Task, TodoWrite, WebFetch.\n"
    "Environment: working directory is the user's repository; platform and OS version are reported at start."
)
_AGENT_SYSTEM_V2 = _AGENT_SYSTEM.replace("Tools: Bash,", "Tools: Bash, NotebookEdit, MultiEdit,") + (
    "\n\n# Plan mode\nWhen the user asks for a plan, outline the steps and wait for approval before editing files."
)
_AGENT_VERBS = (
    "Fix the failing test in {f}", "Add type hints to {f}", "Refactor {fn} in {f} to remove the duplication",
    "Write unit tests for {fn} in {f}", "Explain what {fn} in {f} does",
    "Find out why {fn} returns None for empty input",
    "Add a --dry-run flag to the CLI in {f}", "Migrate {f} from callbacks to async/await",
    "Speed up {fn}, it is slow on large inputs", "Add structured logging to {f}", "Rename {fn} to {fn2} everywhere",
    "Update the README to document {fn}", "Handle the timeout error in {fn}",
    "Bump the dependency and fix the breaking changes in {f}", "Review my staged changes",
    "Why does the build fail after my last commit?", "Implement pagination for the /{res} endpoint",
    "Add input validation to {fn}", "Write a migration that adds a {col} column to the {res} table",
    "Convert {f} to TypeScript", "The CI is red on main, can you look?", "Remove dead code from {f}",
    "Add retries with exponential backoff to {fn}", "Make {fn} thread-safe",
    "Add a docstring to every public function in {f}",
)
_AGENT_MODS = ("api", "core", "utils", "auth", "billing", "cli", "db", "models", "services", "workers", "web", "lib")
_AGENT_NAMES = ("routes", "handlers", "parser", "client", "config", "session", "cache", "schema", "tasks", "views",
                "helpers", "export", "ingest", "scheduler", "payments", "users")
_AGENT_EXT = ("py", "py", "py", "ts", "ts", "tsx", "go", "rs", "java", "rb", "js")
_AGENT_FNS = ("parse_config", "load_user", "handleSubmit", "fetch_orders", "retry_request", "build_index",
              "normalizeInput", "compute_total", "sync_accounts", "render_page", "validate_token", "flush_queue",
              "get_or_create", "resolvePath", "merge_records", "send_invoice", "to_dict", "apply_discount")
_AGENT_RES = ("orders", "users", "invoices", "projects", "reports", "events", "products", "teams")
_AGENT_COLS = ("archived_at", "external_id", "locale", "priority", "deleted", "tenant_id")
_AGENT_ERRORS = ("AssertionError: assert 3 == 4", "KeyError: 'id'",
                 "TypeError: 'NoneType' object is not subscriptable", "TimeoutError: operation timed out after 30s",
                 "AttributeError: 'dict' object has no attribute 'items_'",
                 "ValueError: invalid literal for int() with base 10: ''", "expected 200, got 500",
                 "error[E0502]: cannot borrow `self` as mutable", "TS2345: Argument of type 'string' is not assignable")


def _agent_path(rng: random.Random) -> str:
    return f"src/{rng.choice(_AGENT_MODS)}/{rng.choice(_AGENT_NAMES)}.{rng.choice(_AGENT_EXT)}"


def _agent_task(rng: random.Random) -> str:
    text = rng.choice(_AGENT_VERBS).format(
        f=_agent_path(rng), fn=rng.choice(_AGENT_FNS), fn2=rng.choice(_AGENT_FNS), res=rng.choice(_AGENT_RES),
        col=rng.choice(_AGENT_COLS),
    )
    return text + rng.choice(("", "", ".", ". Keep the public API unchanged.", ", then run the tests.",
                              ". Don't touch the migrations.", " please", ". Use the existing helpers."))


def _code_lines(rng: random.Random) -> list[str]:
    """6-29 lines of someone's Python (an agent's file read, an app user's pasted code)."""
    body = []
    for _ in range(rng.randrange(6, 30)):
        fn = rng.choice(_AGENT_FNS)
        body.append(rng.choice((f"def {fn}(self, {rng.choice(_AGENT_COLS)}):", f"    return {fn}(value)",
                                f"    if not {rng.choice(_AGENT_COLS)}:", f"        raise ValueError('{fn}')",
                                f"    result = self.{fn}({rng.choice(_AGENT_RES)})", "", f"# TODO: {fn}",
                                f"import {rng.choice(_AGENT_MODS)}", f"class {fn.title().replace('_', '')}:")))
    return body


def _agent_tool_result(rng: random.Random) -> str:
    k = rng.random()
    f = _agent_path(rng)
    if k < 0.3:
        fails = rng.randrange(0, 4)
        lines = [f"$ pytest tests/test_{rng.choice(_AGENT_NAMES)}.py -q",
                 f"{rng.randrange(3, 120)} passed, {fails} failed in {rng.uniform(0.2, 40):.2f}s"]
        lines += [f"FAILED tests/test_{rng.choice(_AGENT_NAMES)}.py::test_{rng.choice(_AGENT_FNS)} - "
                  f"{rng.choice(_AGENT_ERRORS)}" for _ in range(fails)]
        return "\n".join(lines)
    if k < 0.6:
        start = rng.randrange(1, 400)
        body = _code_lines(rng)
        return f"Read {f} (lines {start}-{start + len(body)}):\n" + "\n".join(body)
    if k < 0.8:
        a, b = rng.randrange(1, 80), rng.randrange(0, 40)
        return (f"Edited {f}: {a} insertions(+), {b} deletions(-).\n$ git diff --stat\n {f} | {a + b} "
                f"{'+' * min(a, 30)}{'-' * min(b, 20)}\n 1 file changed")
    hits = [f"{_agent_path(rng)}:{rng.randrange(1, 900)}: {rng.choice(_AGENT_FNS)}("
            for _ in range(rng.randrange(1, 12))]
    return f"$ grep -rn \"{rng.choice(_AGENT_FNS)}\" src\n" + "\n".join(hits)


# ==== response model =====================================================================================


@dataclass(frozen=True)
class _Style:
    """How the API answers an account's calls: output length, max_tokens, error and refusal rates."""

    out_median: float = 350.0
    out_sigma: float = 0.8
    max_tokens: tuple[int, ...] = (4096,)
    p429: float = 0.003
    p5xx: float = 0.002
    p400: float = 0.004
    p_refuse: float = 0.005
    p_retry: float = 0.7

    def respond(
        self, rng: random.Random, in_tokens: int, model: str, hint: str | None, p_refuse: float | None
    ) -> tuple[int, int, int, str | None, bool]:
        """(status, output_tokens, latency_ms, stop_reason, refused) for one call."""
        u = rng.random()
        if u < self.p429:
            return 429, 0, rng.randrange(8, 90), None, False
        if u < self.p429 + self.p5xx:
            return (529 if rng.random() < 0.4 else 500), 0, rng.randrange(200, 30_000), "error", False
        if u < self.p429 + self.p5xx + self.p400:
            return 400, 0, rng.randrange(10, 60), None, False
        ms_per_token = 6.0 if model == MODEL_SMALL else 18.0 if model == MODEL_NEW else 13.0
        ttft = rng.lognormvariate(math.log(450.0), 0.4) * (1.0 + in_tokens / 60_000)
        if rng.random() < (self.p_refuse if p_refuse is None else p_refuse):
            out = rng.randrange(15, 160)
            stop: str | None = "refusal" if rng.random() < 0.3 else "end_turn"
            return 200, out, int(ttft + out * ms_per_token), stop, True
        max_tokens = self.max_tokens[0] if len(self.max_tokens) == 1 else rng.choice(self.max_tokens)
        if hint == "tool_use":
            out = min(max_tokens, int(rng.lognormvariate(math.log(220.0), 0.7)) + 20)
            stop = "tool_use"
        else:
            out = int(rng.lognormvariate(math.log(self.out_median), self.out_sigma)) + 1
            if out >= max_tokens:
                out, stop = max_tokens, "max_tokens"
            else:
                stop = "stop_sequence" if rng.random() < 0.01 else "end_turn"
        return 200, out, int(ttft + out * ms_per_token * rng.uniform(0.8, 1.25)), stop, False


_STYLE_CHAT = _Style(max_tokens=(1024, 4096, 4096, 8192))
_STYLE_ENTERPRISE = _Style(out_median=25.0, out_sigma=0.9, max_tokens=(256,), p429=0.03, p5xx=0.003, p400=0.001,
                           p_refuse=0.001, p_retry=0.95)
_STYLE_EVAL = _Style(out_median=450.0, out_sigma=0.9, max_tokens=(2048, 4096), p429=0.02, p400=0.001, p_retry=0.95)
_STYLE_RESEARCH = _Style(out_median=600.0, out_sigma=0.9, max_tokens=(2048, 4096, 8192))
_STYLE_AGENT = _Style(out_median=500.0, out_sigma=0.8, max_tokens=(8192, 16000), p429=0.006, p_refuse=0.001)
_STYLE_HYDRA = _Style(out_median=3600.0, out_sigma=0.6, max_tokens=(4096, 4096, 4096, 8192), p429=0.01, p400=0.001,
                      p_refuse=0.01, p_retry=0.9)
_STYLE_HOPPER = _Style(out_median=2200.0, out_sigma=0.7, max_tokens=(4096, 8192), p429=0.02, p400=0.001,
                       p_refuse=0.008, p_retry=0.9)
_STYLE_COT = _Style(out_median=2800.0, out_sigma=0.6, max_tokens=(4096,), p429=0.01, p400=0.002, p_refuse=0.1,
                    p_retry=0.9)
_STYLE_RESELLER = _Style(out_median=1500.0, out_sigma=0.9, max_tokens=(4096, 8192), p429=0.015, p400=0.003,
                         p_refuse=0.01, p_retry=0.8)
_STYLE_CONTENT = _Style(out_median=1900.0, out_sigma=0.5, max_tokens=(4096, 8192), p429=0.02, p400=0.001,
                        p_refuse=0.002, p_retry=0.9)
_STYLE_APP = _Style(out_median=800.0, out_sigma=0.8, max_tokens=(4096, 8192), p429=0.01, p_refuse=0.004, p_retry=0.9)
_HH_REFUSAL = 0.25  # red-team style prompts (HH-RLHF) are refused far more often


def _tokens(text: str | None) -> int:
    """Rough token count: UTF-8 bytes / 4 (so ~4 characters of English, ~0.75 of a CJK character)."""
    return (len(text.encode()) + 3) // 4 if text else 0


def _fingerprint(prompt_text: str, system_text: str | None, key: bytes) -> dict[str, Any]:
    return fingerprint(prompt_text, key, system_text)


# ==== timing helpers =====================================================================================

_DIURNAL = (0.25, 0.15, 0.1, 0.08, 0.08, 0.12, 0.3, 0.6, 0.9, 1.1, 1.2, 1.2, 1.1, 1.2, 1.2, 1.1, 1.0, 1.0, 1.1,
            1.3, 1.45, 1.4, 1.0, 0.55)  # by local hour: chat users
_BUSINESS = (0.02, 0.01, 0.01, 0.01, 0.01, 0.02, 0.05, 0.3, 0.9, 1.3, 1.4, 1.3, 0.9, 1.2, 1.4, 1.4, 1.3, 1.0,
             0.5, 0.25, 0.2, 0.15, 0.08, 0.04)  # by local hour: work accounts


def _cum(weights: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return [c / total for c in out]


_DIURNAL_CUM = _cum(_DIURNAL)
_DIURNAL_SUM = sum(_DIURNAL)
_BUSINESS_CUM = _cum(_BUSINESS)


def _diurnal(h: int, tz: int) -> float:
    """How busy the UTC hour starting at ``h`` (ms) is for people in UTC offset ``tz``, against the day's average
    (1.0): the hour-of-day curve of chat traffic, for actors that follow their users' day only in part."""
    return 24 * _DIURNAL[((h // HOUR) + tz) % 24] / _DIURNAL_SUM


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 40:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _local_hour_start(rng: random.Random, cum: list[float], day_start: int, tz: int) -> int:
    """A time in the UTC day starting at ``day_start`` whose local hour (UTC + tz) follows ``cum``."""
    local = bisect.bisect_left(cum, rng.random())
    return day_start + ((local - tz) % 24) * HOUR + rng.randrange(HOUR)


def _weekday(ts: int) -> int:
    return ((ts - BASE_TS) // DAY) % 7  # 0 = Monday (BASE_TS is a Monday)


def _uniform_hours(rng: random.Random, lo: int, hi: int, per_hour: Callable[[int], float]) -> list[int]:
    """Poisson arrivals with a rate constant within each hour: sorted times in [lo, hi)."""
    out: list[int] = []
    h = lo - lo % HOUR
    while h < hi:
        a, b = max(lo, h), min(hi, h + HOUR)
        n = _poisson(rng, per_hour(h) * (b - a) / HOUR)
        if n:
            out.extend(sorted(rng.randrange(a, b) for _ in range(n)))
        h += HOUR
    return out


# ==== accounts and actors ================================================================================


@dataclass(frozen=True)
class _Account:
    account_id: str
    org_id: str | None
    billing: dict[str, Any]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class _Models:
    """Which model a call uses: ``base`` until ``switch_ts``, then ``new`` with probability ``p_new``."""

    base: str = MODEL_CURRENT
    switch_ts: int | None = None
    p_new: float = 1.0
    p_small: float = 0.0

    def pick(self, rng: random.Random, ts: int) -> str:
        if self.switch_ts is not None and ts >= self.switch_ts and (self.p_new >= 1.0 or rng.random() < self.p_new):
            return MODEL_NEW
        if self.p_small and rng.random() < self.p_small:
            return MODEL_SMALL
        return self.base


# A planned request: (prompt_text, system_text, client, extra_input_tokens, stop_hint, p_refuse or None).
_Req = tuple[str, str | None, dict[str, Any], int, str | None, float | None]


@dataclass(eq=False)
class _Actor:
    """One account's behaviour. Subclasses implement :meth:`plan` for one UTC day."""

    account: _Account
    seed: int
    active_from: int
    active_to: int
    clients: tuple[dict[str, Any], ...]
    style: _Style
    models: _Models
    expected: float = 0.0

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        raise NotImplementedError

    def _client(self, rng: random.Random) -> dict[str, Any]:
        """The client (address, network, user agent) of one call or session: the account's only one, or one of
        them at random."""
        return self.clients[0] if len(self.clients) == 1 else self.clients[rng.randrange(len(self.clients))]

    def stream(self, idx: int, start: int, end: int) -> Iterator[tuple[Any, ...]]:
        """This account's calls in time order, as tuples ``Simulation.events`` turns into events.

        Failed calls (429 / 5xx) are retried after a back-off with the same prompt, as SDKs do.
        """
        rng = random.Random(self.seed)
        lo, hi = max(start, self.active_from), min(end, self.active_to)
        retries: list[tuple[int, int, _Req]] = []
        state: dict[str, int] = {}  # per-pass state of the planner (e.g. a campaign account's call counter)
        seq = 0
        day = start + (lo - start) // DAY * DAY if lo < hi else hi
        while day < hi:
            for ts, req in self.plan(rng, max(lo, day), min(hi, day + DAY), day, state):
                while retries and retries[0][0] <= ts:
                    rts, _, rreq = heapq.heappop(retries)
                    seq += 1
                    yield self._call(rng, rts, idx, seq, rreq, retries, end)
                seq += 1
                yield self._call(rng, ts, idx, seq, req, retries, end)
            day += DAY
        while retries:
            rts, _, rreq = heapq.heappop(retries)
            seq += 1
            yield self._call(rng, rts, idx, seq, rreq, retries, end)

    def _call(
        self, rng: random.Random, ts: int, idx: int, seq: int, req: _Req, retries: list[Any], end: int
    ) -> tuple[Any, ...]:
        in_tok = _tokens(req[0]) + _tokens(req[1]) + req[3]
        model = self.models.pick(rng, ts)
        keys = self.account.keys
        key = keys[0] if len(keys) == 1 else keys[rng.randrange(len(keys))]
        status, out, latency, stop, refused = self.style.respond(rng, in_tok, model, req[4], req[5])
        if status in (429, 500, 529) and rng.random() < self.style.p_retry:
            wait = rng.randrange(1 * SECOND, 60 * SECOND) if status == 429 else rng.randrange(500, 8 * SECOND)
            if ts + latency + wait < end:
                heapq.heappush(retries, (ts + latency + wait, seq, req))
        return (ts, idx, seq, self.account, key, model, req, status, out, latency, stop, refused, in_tok)


class _Mixture:
    """Draws prompts from weighted sources: ``pick(rng)`` picks a source by weight, then a prompt."""

    def __init__(self, sources: Sequence[tuple[Sequence[str], float]]) -> None:
        kept = [(list(s), w) for s, w in sources if s and w > 0]
        if not kept:
            raise ValueError("no prompts for this mixture")
        self.sources = [s for s, _ in kept]
        self.cum = _cum([w for _, w in kept])

    def pick(self, rng: random.Random) -> str:
        src = self.sources[bisect.bisect_left(self.cum, rng.random() * 0.999999)]
        return src[rng.randrange(len(src))]


@dataclass(frozen=True)
class _ChatTiming:
    rate: float  # calls per day
    tz: int
    cum: list[float]
    weekend: float  # rate multiplier on Saturday / Sunday
    session_mean: float  # calls per session


@dataclass(eq=False)
class _ChatActor(_Actor):
    """Chat users, early adopters, researchers and corporate-NAT employees: sessions in local hours."""

    timing: _ChatTiming = field(default=None)  # type: ignore[assignment]
    prompts: _Mixture = field(default=None)  # type: ignore[assignment]
    cot_share: float = 0.03
    personal: float = 0.08  # share of prompts with a personal lead-in or tail
    system: str | None = None
    hh: frozenset[str] = frozenset()

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        t = self.timing
        n = _poisson(rng, t.rate * (t.weekend if _weekday(day) >= 5 else 1.0))
        out: list[tuple[int, _Req]] = []
        while n > 0:
            size = min(n, 1 + _poisson(rng, t.session_mean - 1))
            n -= size
            ts = _local_hour_start(rng, t.cum, day, t.tz)
            client = self._client(rng)
            history = 0
            for j in range(size):
                if j:
                    ts += int(rng.lognormvariate(math.log(75 * SECOND), 0.9)) + 5 * SECOND
                if ts >= day + DAY:
                    break
                if j and rng.random() < 0.3:
                    prompt, p_ref = rng.choice(_FOLLOW_UPS), None
                else:
                    prompt, p_ref = self._prompt(rng)
                if lo <= ts < hi:
                    out.append((ts, (prompt, self.system, client, history, None, p_ref)))
                history += _tokens(prompt) + 350
        out.sort(key=lambda x: x[0])
        return out

    def _prompt(self, rng: random.Random) -> tuple[str, float | None]:
        base = self.prompts.pick(rng)
        p_ref = _HH_REFUSAL if base in self.hh else None
        if rng.random() < self.personal:
            base = rng.choice(_CHAT_LEADS) + base + rng.choice(_CHAT_TAILS)
        if rng.random() < self.cot_share:
            base += rng.choice(_COT_ASKS)
        return base, p_ref


@dataclass(eq=False)
class _BatchActor(_Actor):
    """Enterprise batch jobs: one template over many inputs, nightly or business-hour bursts."""

    daily: float = 5000.0
    window: tuple[int, int] = (1, 5)  # local hours [from, to) of the job
    tz: int = 0
    weekdays_only: bool = False
    template: tuple[str | None, str] = (None, "{text}")
    inputs: Sequence[str] = ()

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        if self.weekdays_only and _weekday(day) >= 5:
            return []
        volume = self.daily * rng.uniform(0.85, 1.15)
        hours = self.window[1] - self.window[0]
        bursts = [rng.uniform(0.6, 1.4) for _ in range(hours)]
        total = sum(bursts)
        start = day + ((self.window[0] - self.tz) % 24) * HOUR
        system, fmt = self.template
        out: list[tuple[int, _Req]] = []
        for k, w in enumerate(bursts):
            a = start + k * HOUR
            a, b = (a - DAY, a - DAY + HOUR) if a >= day + DAY else (a, a + HOUR)
            n = _poisson(rng, volume * w / total)
            client = self.clients[k % len(self.clients)]
            for ts in sorted(rng.randrange(a, b) for _ in range(n)):
                if lo <= ts < hi:
                    text = self.inputs[rng.randrange(len(self.inputs))]
                    out.append((ts, (fmt.format(text=text), system, client, 0, None, None)))
        out.sort(key=lambda x: x[0])
        return out


@dataclass(eq=False)
class _DayShapedActor(_Actor):
    """Calls Poisson around the clock, busiest in the people's day it serves: a floor of 40% of the mean rate
    at night (an app's users across time zones, a company's nightly jobs)."""

    daily: float = 1000.0
    tz: int = 0

    def _per_hour(self, h: int) -> float:
        return self.daily / 24.0 * (0.4 + 0.6 * _diurnal(h, self.tz))


@dataclass(eq=False)
class _AppActor(_DayShapedActor):
    """An app's backend account: its users' requests, Poisson around the clock with their day."""

    app: str = "writing"  # "coding", "tutor" or "writing" (_APPS)
    asks: tuple[str, ...] = ()  # writing: the app's requests about a user's notes (its buttons)
    system: str | None = None
    prompts: _Mixture = field(default=None)  # type: ignore[assignment]
    hh: frozenset[str] = frozenset()

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        out: list[tuple[int, _Req]] = []
        for ts in _uniform_hours(rng, lo, hi, self._per_hour):
            text = self._prompt(rng)
            client = self._client(rng)
            history = 0 if rng.random() < 0.5 else int(rng.lognormvariate(math.log(900.0), 0.8))  # the chat so far
            out.append((ts, (text, self.system, client, history, None, _HH_REFUSAL if text in self.hh else None)))
        return out

    def _prompt(self, rng: random.Random) -> str:
        """A user's request: a question with their own code (coding), one of the app's requests about their
        notes (writing), or a textbook exercise as it is (tutoring: public datasets hold the same exercises)."""
        ask = self.prompts.pick(rng)
        if self.app == "coding" and rng.random() < 0.7:
            return ask + "\n\nHere is my code:\n```python\n" + "\n".join(_code_lines(rng)) + "\n```"
        if self.app == "writing":
            notes = "\n".join([ask] + [self.prompts.pick(rng) for _ in range(rng.randrange(1, 4))])
            return f"{rng.choice(self.asks)}\n\n{notes}"
        return ask


@dataclass(eq=False)
class _VendorActor(_DayShapedActor):
    """A vendor tool's calls from one customer account: Poisson over the staff's day and a nightly floor, each the
    tool's frame around the company's own change (code review), its own record (extraction) or a textbook
    exercise (the tutor)."""

    template: tuple[str | None, str] = (None, "{text}")
    fill: str = "own_change"  # "own_change", "own_record" or "public_exercise" (_VENDORS)
    inputs: Sequence[str] = ()
    names: tuple[str, ...] = ("value",)  # the company's identifiers (own_change)

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        system, fmt = self.template
        out: list[tuple[int, _Req]] = []
        for ts in _uniform_hours(rng, lo, hi, self._per_hour):
            out.append((ts, (fmt.format(text=self._input(rng)), system, self._client(rng), 0, None, None)))
        return out

    def _input(self, rng: random.Random) -> str:
        if self.fill == "public_exercise":
            return self.inputs[rng.randrange(len(self.inputs))]
        if self.fill == "own_record":  # a short record: the frame is most of the prompt
            amount = rng.randrange(100, 10**6)
            date = f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
            return (f"{rng.choice(_AGENT_RES).title()} {rng.choice(_AGENT_COLS)} no. {rng.randrange(10**6)}, {date}, "
                    f"total {amount // 100}.{amount % 100:02d}")
        names = self.names

        def n() -> str:
            return names[rng.randrange(len(names))]

        lines = [rng.choice((f"def {n()}(self, {n()}, {n()}):", f"    return {n()}({n()}, {n()})",
                             f"    if not {n()}.{n()}:", f"        raise {n().title()}Error('{n()}')",
                             f"    {n()} = self.{n()}({n()}, {n()})", f"# {n()}: {n()} before {n()}",
                             f"from {n()} import {n()}, {n()}", f"class {n().title()}({n().title()}):"))
                 for _ in range(rng.randrange(8, 30))]
        return (f"{rng.choice(_CHANGE_VERBS)} {n()} in {n()}/{n()}.py\n\n```diff\n"
                + "\n".join(f"{rng.choice('+-')}{line}" for line in lines) + "\n```")


@dataclass(eq=False)
class _EvalActor(_Actor):
    """Evaluation harness: runs through a fixed benchmark at some concurrency, 0-3 runs a day."""

    suite: Sequence[str] = ()
    suffix: str = ""
    system: str | None = None
    runs_per_day: float = 1.5
    nightly_hour: int | None = None  # UTC hour of a nightly CI run, if any
    concurrency: int = 8
    samples: int = 1
    extra_run_at: int | None = None  # a run right after the new model's release

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        starts = [] if self.nightly_hour is None else [day + self.nightly_hour * HOUR + rng.randrange(15 * MINUTE)]
        starts += [_local_hour_start(rng, _BUSINESS_CUM, day, -5) for _ in range(_poisson(rng, self.runs_per_day))]
        if self.extra_run_at is not None and day <= self.extra_run_at < day + DAY:
            starts.append(self.extra_run_at)
        out: list[tuple[int, _Req]] = []
        client = self.clients[0]
        for ts in sorted(starts):
            gap = 9 * SECOND / self.concurrency
            for prompt in self.suite:
                for _ in range(self.samples):
                    ts += int(rng.expovariate(1.0 / gap)) + 1
                    if lo <= ts < hi:
                        out.append((ts, (prompt + self.suffix, self.system, client, 0, None, None)))
        out.sort(key=lambda x: x[0])
        return out


@dataclass(eq=False)
class _AgentActor(_Actor):
    """Agentic coding tool users: tasks of several tool-use calls sharing one long system prompt."""

    tasks_per_day: float = 6.0
    tz: int = 0
    system_update_ts: int | None = None  # the tool's update: new system prompt from then on
    asks: _Mixture = field(default=None)  # type: ignore[assignment]
    tool_results: Sequence[str] = ()

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        n = _poisson(rng, self.tasks_per_day * (0.15 if _weekday(day) >= 5 else 1.0))
        out: list[tuple[int, _Req]] = []
        client = self.clients[0]
        for _ in range(n):
            ts = _local_hour_start(rng, _BUSINESS_CUM, day, self.tz)
            updated = self.system_update_ts is not None and ts >= self.system_update_ts
            system = _AGENT_SYSTEM_V2 if updated else _AGENT_SYSTEM
            steps = 1 + min(24, _poisson(rng, 4.5))
            context = rng.randrange(4000, 14000)
            ask = self.asks.pick(rng)
            for j in range(steps):
                prompt = ask if j == 0 else self.tool_results[rng.randrange(len(self.tool_results))]
                hint = "tool_use" if j < steps - 1 else None
                if lo <= ts < hi:
                    out.append((ts, (prompt, system, client, context, hint, None)))
                context += rng.randrange(600, 6000)
                ts += rng.randrange(2 * SECOND, 45 * SECOND)
        out.sort(key=lambda x: x[0])
        return out


class _Campaign:
    """Shared prompt generator of one campaign: pools, templates, and the ordering of base prompts.

    Account ``slot`` sends, as its ``k``-th call, base prompt ``pool[(slot + k * slots) % len(pool)]``, so
    accounts of a campaign do not repeat each other's prompts until the pool wraps around, independently
    of the order in which the simulator interleaves accounts.
    """

    def __init__(self, pool: list[str], templates: Sequence[tuple[str | None, str]], slots: int,
                 paraphrase: bool = False) -> None:
        self.pool = pool
        self.templates = templates
        self.slots = max(1, slots)
        self.paraphrase = paraphrase
        # The template a prompt of this kind gets: the agent template for trajectories and tool specs.
        self.kind_of = [_template_for(p, len(templates)) for p in pool]

    def index(self, slot: int, k: int) -> int:
        return (slot + k * self.slots) % len(self.pool)

    def base(self, slot: int, k: int) -> str:
        return self.pool[self.index(slot, k)]

    def render(self, rng: random.Random, index: int, primary: int) -> tuple[str, str | None]:
        """Base prompt ``index`` wrapped in a template: mostly the one for this kind of prompt (so a prompt
        that comes round again, as in best-of-n resampling, is sent identically), else the account's."""
        task = self.pool[index]
        if self.paraphrase:
            return _paraphrase(rng, task)
        u = rng.random()
        t = self.kind_of[index] if u < 0.75 else primary if u < 0.95 else rng.randrange(len(self.templates))
        system, fmt = self.templates[t % len(self.templates)]
        return fmt.format(task=task), system


def _template_for(task: str, n: int) -> int:
    if n < 2:
        return 0
    agentic = any(w in task[:600] for w in ("Thought:", "Observation:", "toolformer", "Available APIs", "API"))
    h = int.from_bytes(hashlib.blake2b(task.encode(), digest_size=2).digest(), "big")
    return 1 if agentic else (0, 2, 3)[h % 3] % n


def _next(state: dict[str, int], counter: str = "calls") -> int:
    """The next value of a per-pass counter of an account (0, 1, 2, ...)."""
    k = state.get(counter, 0)
    state[counter] = k + 1
    return k


def _paraphrase(rng: random.Random, task: str) -> tuple[str, str | None]:
    o, r, f, d = (rng.choice(_PARA_OPEN), rng.choice(_PARA_REASON), rng.choice(_PARA_FORMAT), rng.choice(_PARA_DETAIL))
    shape = rng.randrange(4)
    if shape == 0:
        text = f"{o}\n\n{task}\n\n{r} {f} {d}"
    elif shape == 1:
        text = f"{task}\n\n{r} {d} {f}"
    elif shape == 2:
        text = f"{o} {r} {f}\n\nTask:\n{task}\n\n{d}"
    else:
        text = f"{r}\n{task}\n{f}"
    return text.strip(), rng.choice(_PARA_SYSTEM)


# (actor, rng, ts, per-pass state) -> (prompt, system prompt, refusal probability or None)
_Render = Callable[["_CampaignActor", random.Random, int, dict[str, int]], tuple[str, str | None, float | None]]


@dataclass(eq=False)
class _CampaignActor(_Actor):
    """An attack account: flat (load-balanced) Poisson arrivals, templated prompts from its campaign."""

    rate: float = 26.0  # calls per day, before ``boost`` and the ramp
    boost_after: int | None = None  # model hopper: the rate rises after the new model's release
    boost: float = 1.0
    ramp: tuple[int, int] | None = None  # slow_ramp: volume grows from 5% to 100% over [from, to)
    diurnal_tz: int | None = None  # mild local rhythm (reseller customers, cot operators), else flat
    render: _Render = None  # type: ignore[assignment]
    slot: int = 0
    primary: int = 0

    def _per_hour(self, h: int) -> float:
        r = self.rate / 24.0
        if self.boost_after is not None and h >= self.boost_after:
            r *= self.boost
        if self.ramp is not None:
            a, b = self.ramp
            r *= 0.05 + 0.95 * min(1.0, max(0.0, (h - a) / (b - a))) ** 1.5
        if self.diurnal_tz is not None:
            r *= 0.5 + 0.5 * _diurnal(h, self.diurnal_tz)
        return r

    def plan(self, rng: random.Random, lo: int, hi: int, day: int, state: dict[str, int]) -> list[tuple[int, _Req]]:
        out: list[tuple[int, _Req]] = []
        for ts in _uniform_hours(rng, lo, hi, self._per_hour):
            prompt, system, p_ref = self.render(self, rng, ts, state)
            client = self._client(rng)
            out.append((ts, (prompt, system, client, 0, None, p_ref)))
        return out


# ==== building a population ==============================================================================


class _Builder:
    """Creates the accounts of a scenario. All randomness from one seeded generator, in a fixed order."""

    def __init__(self, cfg: _Config, seed: int, scale: float, prompts_dir: Path | None) -> None:
        self.cfg = cfg
        self.seed = seed
        self.scale = scale
        self.rng = random.Random(f"{seed}/{cfg.name}/build")
        self.start = cfg.start_ts
        self.end = cfg.start_ts + cfg.days * DAY
        self.release = cfg.start_ts + cfg.release_after
        self.actors: list[_Actor] = []
        self.labels: dict[str, AccountLabel] = {}
        self.counts: dict[str, int] = {}
        self.nat_orgs = 0
        prng = random.Random(f"{seed}/prompts")
        self.attack = load_prompt_sets("attack", prompts_dir, prng)
        self.ordinary = load_prompt_sets("ordinary", prompts_dir, prng)
        self.benchmark = load_prompt_sets("benchmark", prompts_dir, prng)
        self._pools()

    # ---- prompt pools --------------------------------------------------------------------------------

    def _get(self, sets: dict[str, list[str]], *names: str) -> list[str]:
        return [p for n in names for p in sets.get(n, [])]

    def _pools(self) -> None:
        o, a, rng = self.ordinary, self.attack, self.rng
        everything_o = [p for s in o.values() for p in s]
        everything_a = [p for s in a.values() for p in s]
        zh = self._get(o, "B_oasst1_zh_llamafactory_766")
        en = [p for n, s in o.items() if n != "B_oasst1_zh_llamafactory_766" for p in s] or everything_o
        self.hh = frozenset(self._get(o, "B_hh_rlhf_harmless_base_test"))
        w = {"B_databricks_dolly_15k": 0.38, "B_lima_1k_train": 0.1, "B_awesome_chatgpt_prompts_1529": 0.1,
             "B_arena_hard_v2.0_questions": 0.12, "B_self_instruct_user_oriented_252": 0.04,
             "B_self_instruct_seed_tasks_175": 0.02, "B_hh_rlhf_harmless_base_test": 0.06}
        srcs = [(o[n], wt) for n, wt in w.items() if n in o]
        self.chat_en = _Mixture(srcs or [(en, 1.0)])
        self.chat_zh = _Mixture([(zh, 0.85), (en, 0.15)] if zh else [(en, 1.0)])
        coding = self._get(o, "B_arena_hard_v2.0_questions")
        math_q = self._get(a, "A_llm_adapters_math_data_cot", "A_distilling_step_by_step_palm_cot")
        self.research = _Mixture([(en, 0.55), (coding or en, 0.3), (math_q or everything_a, 0.15)])
        # Agent traffic from finite pools, as tool output repeats across users ("3 passed in 0.12s").
        agent_tasks = [_agent_task(rng) for _ in range(1200)]
        self.agent_asks = _Mixture([(agent_tasks, 0.75), (coding or en, 0.25)])
        self.agent_results = [_agent_tool_result(rng) for _ in range(1500)]
        hydra_pool = self._get(
            a, "A_code_alpaca_2k", "A_gpteacher_codegen_instruct", "A_gpteacher_toolformer_dedupe",
            "A_fireact_multitask_multimethod_gpt4", "A_gorilla_apibench_torchhub_train",
            "A_gorilla_apibench_huggingface_eval", "A_gorilla_apibench_tensorflow_eval",
            "A_gorilla_apibench_torchhub_eval", "A_toolbench_data_example",
        ) or everything_a
        rng.shuffle(hydra_pool)
        # A finite prompt set, each prompt sent several times (best-of-n sampling of the teacher's answers):
        # over 3 days hydra and the resellers send each prompt ~4 times, from different accounts.
        self.hydra_pool = hydra_pool[:8000]
        reasoning = self._get(a, "A_distilling_step_by_step_palm_cot", "A_llm_adapters_math_data_cot",
                              "A_alpaca_5000", "A_code_alpaca_2k") or everything_a
        rng.shuffle(reasoning)
        self.cot_pool = reasoning
        # Short tasks for the non-English templates, so the template's language dominates the text (as it
        # would if the operators had translated the task).
        self.cot_short = [p for p in reasoning if len(p) <= 240] or reasoning
        self.cot_tiny = [p for p in reasoning if len(p) <= 150] or reasoning
        self.cot_zh = zh
        hopper_pool = list(everything_a)
        rng.shuffle(hopper_pool)
        self.hopper_pool = hopper_pool[:8000]  # broad capability harvest; prompts resampled (best-of-n)
        self.reseller_ordinary = _Mixture([(en, 0.75), (zh or en, 0.25)])
        b = self.benchmark
        every_b = [p for s in b.values() for p in s]
        self.suites = {
            "arena": b.get("B_arena_hard_v0.1_questions") or every_b,
            "nq": (b.get("B_nq_open_dev_3610") or every_b)[:500],
            "vicuna": b.get("B_vicuna_questions_80") or every_b[:80],
        }
        enterprise_inputs = [p for p in everything_o if len(p) < 700] + self._get(b, "B_nq_open_dev_3610")
        self.enterprise_inputs = enterprise_inputs or everything_o
        self.content_inputs = {"topics": [p for p in en if len(p) < 400] or en, "exercises": math_q or en}
        # An app's users ask what people ask (the public datasets a campaign draws on hold the same questions).
        self.app_coding = _Mixture([(coding or en, 0.45), (agent_tasks, 0.25), (en, 0.3)])
        self.app_tutor = _Mixture([(math_q or en, 0.6), (en, 0.4)])

    # ---- identities ----------------------------------------------------------------------------------

    def _hex(self, n: int = 16) -> str:
        return f"{self.rng.getrandbits(n * 4):0{n}x}"

    def _account(self, kind: str, campaign: str | None, *, org: str | None, payment: str, tier: str,
                 created: int, n_keys: int = 1) -> _Account:
        account_id = f"acct_{self._hex()}"
        keys = tuple(f"key_{self._hex(20)}" for _ in range(n_keys))
        billing = {"payment_fp": payment, "tier": tier, "account_created_ts": created}
        self.labels[account_id] = AccountLabel(account_id, campaign is not None, campaign, kind)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return _Account(account_id, org, billing, keys)

    def _n(self, n: int) -> int:
        return max(1, round(n * self.scale)) if n > 0 else 0

    def _split(self, sizes: Sequence[int]) -> list[int]:
        """Accounts per organisation after scaling; small scales drop organisations, keeping at least one."""
        scaled = [round(s * self.scale) for s in sizes]
        return [x for x in scaled if x > 0] or [1]

    def _seed(self) -> int:
        return self.rng.getrandbits(63)

    def _old(self, min_days: float, max_days: float) -> int:
        return self.start - int(math.exp(self.rng.uniform(math.log(min_days), math.log(max_days))) * DAY)

    def _residential_client(self, zh: bool = False) -> tuple[dict[str, Any], int]:
        rng = self.rng
        if zh:
            net = rng.choice(_ZH)
        elif rng.random() < 0.25:
            net = rng.choice(_MOBILE)  # carrier-grade NAT: a small pool of addresses shared by many users
            ip = _ipv4(rng, net[0], subnet=rng.randrange(4), host=rng.randrange(1, 48))
            return _client(ip, net, rng.choice(_UA_BROWSER[4:] + _UA_SDK[:1])), net[2]
        else:
            net = rng.choices(_RESIDENTIAL, _RESIDENTIAL_WEIGHTS)[0]
        ip = _ipv6(rng, net[0]) if rng.random() < 0.08 else _ipv4(rng, net[0])
        ua = rng.choice(_UA_BROWSER) if rng.random() < 0.55 else rng.choice(_UA_SDK)
        return _client(ip, net, ua), net[2]

    def _tier_for_age(self, created: int) -> str:
        age = (self.start - created) / DAY
        if age < 14:
            return self.rng.choice(("free", "free", "tier-1"))
        if age < 120:
            return self.rng.choice(("free", "tier-1", "tier-1", "tier-2"))
        return self.rng.choice(("tier-1", "tier-2", "tier-2", "tier-3", "tier-4"))

    # ---- ordinary population -------------------------------------------------------------------------

    def populate(self) -> None:
        c = self.cfg
        self._chat(self._n(c.chat), "chat")
        self._chat(self._n(c.early_adopter), "early_adopter")
        self._researchers(self._n(c.researcher))
        self._agentic(self._n(c.agentic_coding))
        for size in self._split(c.corporate_nat):
            self._corporate_nat(size)
        self._eval(self._n(c.eval_harness))
        sizes = self._split(c.enterprise)
        # Daily volumes stratified over [2,000, 12,000) (log scale), so the scenario's total is stable.
        strata = [(i + self.rng.random()) / sum(sizes) for i in range(sum(sizes))]
        self.rng.shuffle(strata)
        for size in sizes:
            self._enterprise_org(size, [strata.pop() for _ in range(size)])
        self._hydra_and_resellers()
        self._model_hopper(self._n(c.model_hopper))
        self._cot(self._n(c.cot_coercion))
        # Last, so that adding them changed no other actor's random draws.
        for i, size in enumerate(self._split(c.content_pipeline)):
            self._content_org(size, _CONTENT_JOBS[i % len(_CONTENT_JOBS)])
        self._vpn_users(self._n(c.vpn_user))
        for i, size in enumerate(self._split(c.app_backend)):
            self._app_org(size, _APPS[i % len(_APPS)])
        # Only in the vendor_tool scenario (_split keeps one organisation of an empty list); last, so no draw moves.
        for i, size in enumerate(self._split(c.vendor_tool) if c.vendor_tool else []):
            self._vendor_customer(size, _VENDORS[i % len(_VENDORS)])

    def _vpn_users(self, n: int) -> None:
        """People behind a VPN or a privacy relay that picks another exit for each connection: their calls
        come from many networks a day, as a campaign rotating residential proxies does. One device each (one
        user agent), chat-like content, most at chat volume and one in five a heavy user."""
        rng = self.rng
        exits = {net[0]: [_ipv4(rng, net[0]) for _ in range(24)] for net in _VPN}  # shared by every user
        for _ in range(n):
            _, tz = self._residential_client()
            ua = rng.choice(_UA_BROWSER)
            nets = rng.sample(_VPN, rng.randrange(3, len(_VPN) + 1))
            clients = tuple(_client(rng.choice(exits[net[0]]), net, ua) for net in nets for _ in range(2))
            created = self._old(14, 1100)
            heavy = rng.random() < 0.2
            rate = math.exp(rng.uniform(math.log(40.0), math.log(150.0)) if heavy
                            else rng.uniform(math.log(2.0), math.log(40.0)))
            acct = self._account("vpn_user", None, org=None, payment=f"pm_{self._hex()}",
                                 tier=self._tier_for_age(created), created=created)
            timing = _ChatTiming(rate=rate, tz=tz, cum=_DIURNAL_CUM, weekend=1.2, session_mean=rng.uniform(2, 6))
            self._add(_ChatActor(
                acct, self._seed(), self.start, self.end, clients, _STYLE_CHAT, self._adoption(False),
                expected=rate * self._days_from(created), timing=timing, prompts=self.chat_en, hh=self.hh,
            ))

    def _adoption(self, early: bool) -> _Models:
        rng = self.rng
        if early:
            return _Models(switch_ts=self.release + int(rng.expovariate(1 / (2.5 * HOUR))), p_new=0.9, p_small=0.1)
        if rng.random() < 0.5:
            return _Models(switch_ts=self.release + int(rng.expovariate(1 / (4 * DAY))), p_new=0.7, p_small=0.15)
        return _Models(p_small=0.2)

    def _chat(self, n: int, kind: str) -> None:
        rng = self.rng
        for _ in range(n):
            zh = rng.random() < 0.06
            clients_tz = [self._residential_client(zh) for _ in range(1 if rng.random() < 0.6 else 2)]
            tz = clients_tz[0][1]
            new = rng.random() < 0.03  # signs up during the window
            young = rng.random() < 0.05
            created = (rng.randrange(self.start, self.end - 6 * HOUR) if new
                       else self._old(1, 14) if young else self._old(14, 1100))
            rate = math.exp(rng.uniform(math.log(2.0), math.log(40.0))) * (1.5 if kind == "early_adopter" else 1.0)
            acct = self._account(kind, None, org=None, payment=f"pm_{self._hex()}", tier=self._tier_for_age(created),
                                 created=created)
            timing = _ChatTiming(rate=rate, tz=tz, cum=_DIURNAL_CUM, weekend=1.2, session_mean=rng.uniform(2, 6))
            self._add(_ChatActor(
                acct, self._seed(), max(self.start, created + rng.randrange(60 * SECOND, 20 * MINUTE)), self.end,
                tuple(cl for cl, _ in clients_tz), _STYLE_CHAT, self._adoption(kind == "early_adopter"),
                expected=rate * self._days_from(created), timing=timing,
                prompts=self.chat_zh if zh else self.chat_en, hh=self.hh,
            ))

    def _days_from(self, created: int, weekend: float = 1.2) -> float:
        lo = max(self.start, created)
        days = 0.0
        for d in range(self.start, self.end, DAY):
            part = max(0, min(d + DAY, self.end) - max(d, lo)) / DAY
            days += part * (weekend if _weekday(d) >= 5 else 1.0)
        return days

    def _researchers(self, n: int) -> None:
        rng = self.rng
        lab_org, lab_pm, lab_left = None, None, 0
        for _ in range(n):
            if lab_left == 0 and rng.random() < 0.4:  # a lab: several accounts on one card, half of them in an org
                lab_org, lab_pm, lab_left = f"org_{self._hex(12)}", f"pm_{self._hex()}", rng.randrange(3, 8)
                if rng.random() < ORGLESS_TEAMS:
                    lab_org = None
            net = rng.choice(_UNIVERSITY) if rng.random() < 0.6 else rng.choices(_RESIDENTIAL, _RESIDENTIAL_WEIGHTS)[0]
            ua = rng.choice(("anthropic-python/0.49.0", "python-requests/2.32.3", "python-httpx/0.27.0",
                             "anthropic-python/0.45.0", "langchain-anthropic/0.3.10"))
            created = self._old(20, 900)
            if lab_left:
                org, pm = lab_org, lab_pm
                lab_left -= 1
            else:
                org, pm = None, f"pm_{self._hex()}"
            acct = self._account("researcher", None, org=org, payment=pm or f"pm_{self._hex()}",
                                 tier=self._tier_for_age(created), created=created, n_keys=rng.randrange(1, 4))
            rate = math.exp(rng.uniform(math.log(20), math.log(150)))
            timing = _ChatTiming(rate=rate, tz=net[2], cum=_cum([0.5 * a + 0.5 * b for a, b in zip(_BUSINESS, _DIURNAL,
                                 strict=True)]), weekend=0.5, session_mean=rng.uniform(4, 15))
            self._add(_ChatActor(
                acct, self._seed(), self.start, self.end, (_client(_ipv4(rng, net[0]), net, ua),), _STYLE_RESEARCH,
                self._adoption(rng.random() < 0.3), expected=rate * self._days_from(self.start, 0.5), timing=timing,
                prompts=self.research, cot_share=0.3, personal=0.1,
            ))

    def _agentic(self, n: int) -> None:
        rng = self.rng
        update = self.release + 20 * HOUR + rng.randrange(2 * HOUR)  # the tool ships frontier-5 as default
        team_org, team_pm, team_left = None, None, 0
        for _ in range(n):
            if team_left == 0 and rng.random() < 0.15:  # a team on one card, half of them in an org
                team_org, team_pm, team_left = f"org_{self._hex(12)}", f"pm_{self._hex()}", rng.randrange(3, 20)
                if rng.random() < ORGLESS_TEAMS:
                    team_org = None
            client, tz = self._residential_client()
            client["user_agent"] = _UA_AGENT.format(rng.choice((61, 62, 62, 63, 63, 63, 64)))
            client["tls_fp"] = _TLS["node"]
            created = self._old(3, 700)
            if team_left:
                org, pm = team_org, team_pm
                team_left -= 1
            else:
                org, pm = None, f"pm_{self._hex()}"
            acct = self._account("agentic_coding", None, org=org, payment=pm or f"pm_{self._hex()}",
                                 tier=self._tier_for_age(created), created=created)
            auto = rng.random() < 0.7
            tasks = math.exp(rng.uniform(math.log(2), math.log(12)))
            self._add(_AgentActor(
                acct, self._seed(), self.start, self.end, (client,), _STYLE_AGENT,
                _Models(switch_ts=update if auto else None, p_new=0.95, p_small=0.12),
                expected=tasks * 5.5 * self._days_from(self.start, 0.15),
                tasks_per_day=tasks, tz=tz, system_update_ts=update if auto else None, asks=self.agent_asks,
                tool_results=self.agent_results,
            ))

    def _corporate_nat(self, n: int) -> None:
        rng = self.rng
        net = _CORPORATE[self.nat_orgs % len(_CORPORATE)]
        self.nat_orgs += 1
        org, pm = f"org_{self._hex(12)}", f"pm_{self._hex()}"
        subnet = rng.randrange(1024)
        nat_ips = [_ipv4(rng, net[0], subnet=subnet, host=h) for h in rng.sample(range(2, 250), 4)]
        ua = _UA_BROWSER[0]
        provisioned = self._old(150, 700)  # bulk-provisioned by IT, all on one day
        for _ in range(n):
            acct = self._account("corporate_nat", None, org=org, payment=pm, tier="enterprise",
                                 created=provisioned + rng.randrange(2 * HOUR))
            rate = math.exp(rng.uniform(math.log(4), math.log(40)))
            timing = _ChatTiming(rate=rate, tz=net[2], cum=_BUSINESS_CUM, weekend=0.1, session_mean=rng.uniform(2, 6))
            clients = tuple(_client(ip, net, ua) for ip in nat_ips)
            self._add(_ChatActor(
                acct, self._seed(), self.start, self.end, clients, _STYLE_CHAT, self._adoption(False),
                expected=rate * self._days_from(self.start, 0.1), timing=timing, prompts=self.chat_en,
            ))

    def _eval(self, n: int) -> None:
        rng = self.rng
        org, left = None, 0
        suites = list(self.cfg.eval_suites)
        for i in range(n):
            if left == 0:
                org, left = f"org_{self._hex(12)}", rng.randrange(1, 3)
            left -= 1
            net = rng.choice(_CLOUD)
            ua = rng.choice(("python-httpx/0.27.0", "python-httpx/0.27.0", "anthropic-python/0.49.0", "aiohttp/3.9.5"))
            created = self._old(60, 900)
            acct = self._account("eval_harness", None, org=org, payment=f"pm_{self._hex()}",
                                 tier=rng.choice(_TIERS[3:6]), created=created)
            full = self.suites[suites[i % len(suites)]]
            suite = full[: max(40, int(len(full) * min(1.0, self.cfg.volume)))]  # same prefix for every harness
            cot = rng.random() < 0.4
            samples = rng.choice((1, 1, 1, 2)) if len(suite) > 100 else rng.choice((1, 3, 5))
            runs = rng.uniform(0.4, 1.6)
            nightly = rng.randrange(24) if rng.random() < 0.5 else None
            switches = rng.random() < 0.7
            switch = self.release + rng.randrange(30 * MINUTE, 6 * HOUR) if switches else None
            per_run = len(suite) * samples
            self._add(_EvalActor(
                acct, self._seed(), self.start, self.end, (_client(_ipv4(rng, net[0]), net, ua),), _STYLE_EVAL,
                _Models(switch_ts=switch, p_new=0.6),
                expected=per_run * (runs + (nightly is not None)) * self.cfg.days + (per_run if switches else 0),
                suite=suite, suffix=rng.choice(("\n\nLet's think step by step.", " Let's think step by step."))
                if cot else "", system=rng.choice((None, None, "You are a helpful assistant.")), runs_per_day=runs,
                nightly_hour=nightly,
                concurrency=rng.choice((4, 8, 16, 32)), samples=samples, extra_run_at=switch,
            ))

    def _enterprise_org(self, n: int, strata: list[float]) -> None:
        rng = self.rng
        org, pm = f"org_{self._hex(12)}", f"pm_{self._hex()}"
        net = rng.choice(_CLOUD)
        subnet = rng.randrange(1024)
        ua = rng.choice(("anthropic-python/0.49.0", "anthropic-typescript/0.39.0", "Go-http-client/2.0"))
        clients = tuple(_client(_ipv4(rng, net[0], subnet=subnet), net, ua) for _ in range(rng.randrange(2, 8)))
        for q in strata:
            created = self._old(300, 1100)
            acct = self._account("enterprise_batch", None, org=org, payment=pm, tier="enterprise", created=created,
                                 n_keys=rng.randrange(1, 4))
            daily = math.exp(math.log(2000) + q * (math.log(12000) - math.log(2000))) * self.cfg.volume
            nightly = rng.random() < 0.5
            start_h = rng.randrange(0, 3) if nightly else 9
            window = (start_h, start_h + rng.randrange(2, 6)) if nightly else (9, 18)
            inputs = rng.sample(self.enterprise_inputs, min(len(self.enterprise_inputs), 1000))
            self._add(_BatchActor(
                acct, self._seed(), self.start, self.end, clients, _STYLE_ENTERPRISE,
                _Models(base=rng.choice((MODEL_CURRENT, MODEL_SMALL, MODEL_SMALL))),
                expected=daily * self._days_from(self.start, 1.0 if nightly else 0.0),
                daily=daily, window=window, tz=net[2], weekdays_only=not nightly,
                template=rng.choice(_ENTERPRISE_TEMPLATES), inputs=inputs,
            ))

    def _company(self, ua: str | tuple[str, ...], n_clients: tuple[int, int]
                 ) -> tuple[str, str, tuple[int, str, int], tuple[dict[str, Any], ...]]:
        """A company's org, card, cloud network and its ``n_clients`` (a randrange) clients in one /24 of it, with
        the user agent ``ua`` (or one of them, drawn)."""
        rng = self.rng
        org, pm = f"org_{self._hex(12)}", f"pm_{self._hex()}"
        net = rng.choice(_CLOUD)
        subnet = rng.randrange(1024)
        if not isinstance(ua, str):
            ua = rng.choice(ua)
        clients = tuple(_client(_ipv4(rng, net[0], subnet=subnet), net, ua) for _ in range(rng.randrange(*n_clients)))
        return org, pm, net, clients

    def _content_org(self, n: int, job: tuple[str, str | None, str]) -> None:
        """A business generating long content around the clock through several accounts of one org on one
        card (one account per product line or worker pool): the legitimate look-alike of a harvest. One
        template, filled with a topic or an exercise per call; the edtech job asks for step-by-step
        solutions, as a distiller harvesting reasoning would."""
        rng = self.rng
        inputs_name, system, fmt = job
        org, pm, net, clients = self._company(("anthropic-python/0.49.0", "anthropic-typescript/0.39.0"), (1, 4))
        pool = self.content_inputs[inputs_name]
        for _ in range(n):
            created = self._old(90, 900)
            acct = self._account("content_pipeline", None, org=org, payment=pm, tier=rng.choice(("tier-4", "scale")),
                                 created=created, n_keys=rng.randrange(1, 3))
            daily = rng.uniform(300, 900) * self.cfg.volume
            inputs = rng.sample(pool, min(len(pool), 3000))
            self._add(_BatchActor(
                acct, self._seed(), self.start, self.end, clients, _STYLE_CONTENT, _Models(base=MODEL_CURRENT),
                expected=daily * self._days_from(self.start, 1.0), daily=daily, window=(0, 24), tz=net[2],
                template=(system, fmt), inputs=inputs,
            ))

    def _app_org(self, n: int, app: tuple[str, str]) -> None:
        """A company whose product runs on the API (a coding assistant, a tutoring app, a writing app): its
        users' questions, sent by its backend through a few accounts of one org on one card (production, a
        second region, staging). The look-alike of a harvest that no template gives away: many calls a day of
        diverse prompts with long answers, around the clock (its users' day, across time zones), coding and
        step-by-step reasoning, and the move to a new model within hours of its release (the product team
        ships the upgrade on launch day)."""
        rng = self.rng
        source, system = app
        org, pm, net, clients = self._company(
            ("anthropic-typescript/0.39.0", "anthropic-python/0.49.0", "node-fetch/3.3.2"), (2, 5))
        prompts = {"coding": self.app_coding, "tutor": self.app_tutor}.get(source, self.chat_en)
        switch = self.release + rng.randrange(HOUR, 8 * HOUR)
        asks = tuple(rng.sample(_NOTE_ASKS, 3))
        for _ in range(n):
            created = self._old(60, 700)
            acct = self._account("app_backend", None, org=org, payment=pm, tier=rng.choice(("tier-4", "scale")),
                                 created=created, n_keys=rng.randrange(1, 4))
            daily = math.exp(rng.uniform(math.log(300.0), math.log(1500.0))) * self.cfg.volume
            self._add(_AppActor(
                acct, self._seed(), self.start, self.end, clients, _STYLE_APP, _Models(switch_ts=switch, p_new=0.95),
                expected=daily * self.cfg.days, daily=daily, tz=net[2], app=source, asks=asks, system=system,
                prompts=prompts, hh=self.hh,
            ))

    def _vendor_customer(self, n: int, vendor: tuple[str | None, str, str, str]) -> None:
        """A company running a vendor's tool with its own API keys (bring your own key): the tool's frame around
        the company's inputs, long answers, 200-700 calls a day per account over its staff's day and nightly
        jobs, from its own cloud network on its own card, with the tool's user agent. Many organisations fill the
        vendor's frame at a harvest's pace, as one operation split over organisations of its own would; what
        differs is that each company's card and network are its own, and so are its inputs, but for the tutor's
        customers: their learners send textbook exercises, which public datasets (and campaigns) hold too."""
        rng = self.rng
        system, fmt, ua, fill = vendor
        org, pm, net, clients = self._company(ua, (1, 3))
        inputs = self.content_inputs["exercises"] if fill == "public_exercise" else ()
        # The company's own code base: identifiers of its own (another company's code shares its syntax, not them).
        prefix = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randrange(3, 6)))
        names = tuple(f"{prefix}_{w}" if rng.random() < 0.5 else f"{w}_{prefix}" for w in rng.sample(_CODE_WORDS, 30))
        for _ in range(n):
            created = self._old(60, 900)
            acct = self._account("vendor_tool", None, org=org, payment=pm, tier=rng.choice(("tier-3", "tier-4")),
                                 created=created, n_keys=rng.randrange(1, 3))
            daily = rng.uniform(200, 700) * self.cfg.volume
            self._add(_VendorActor(
                acct, self._seed(), self.start, self.end, clients, _STYLE_CONTENT, _Models(base=MODEL_CURRENT),
                expected=daily * self.cfg.days, daily=daily, tz=net[2], template=(system, fmt), fill=fill,
                inputs=inputs, names=names,
            ))

    # ---- campaigns -----------------------------------------------------------------------------------

    def _campaign_infra(self, groups: int, nets: Sequence[tuple[int, str, int]], n_subnets: int,
                        uas: Sequence[str], tls: str | None) -> list[list[dict[str, Any]]]:
        """Client pools per group: a /24 each (from ``n_subnets``), a scripted UA, a shared TLS fp.

        With ``many_asns`` every group instead gets addresses spread over residential-proxy ASNs.
        """
        rng = self.rng
        subnets = [(rng.choice(nets), rng.randrange(1024)) for _ in range(n_subnets)]
        out = []
        for _ in range(groups):
            if self.cfg.many_asns:
                pool = []
                for _ in range(rng.randrange(8, 20)):
                    net = rng.choices(_RESIDENTIAL + _MOBILE, list(_RESIDENTIAL_WEIGHTS) + [3] * len(_MOBILE))[0]
                    ua = rng.choice(_UA_BROWSER + _UA_SDK + tuple(uas))
                    pool.append(_client(_ipv4(rng, net[0]), net, ua))
                out.append(pool)
                continue
            net, subnet = rng.choice(subnets)
            ua = rng.choice(uas)
            fp = tls if tls and rng.random() < 0.8 else None
            out.append([_client(_ipv4(rng, net[0], subnet=subnet), net, ua, fp) for _ in range(rng.randrange(4, 24))])
        return out

    def _windows(self, n: int, cohort: tuple[int, int] = (20, 60)) -> list[tuple[int, int, int]]:
        """(active_from, active_to, created) per account slot of a campaign.

        Default: 70% active from the start (created in sign-up cohorts days before), 30% coming online in
        cohorts during the window, 10% retired (banned or abandoned) before the end. ``fast_rotation``:
        each slot is a chain of accounts used for ~1 day each. ``slow_ramp``: activations spread late.
        """
        rng, start, end = self.rng, self.start, self.end
        out: list[tuple[int, int, int]] = []
        cohort_at, cohort_left = 0, 0
        for i in range(n):
            if cohort_left == 0:
                cohort_left = rng.randint(*cohort)
                if self.cfg.slow_ramp:
                    cohort_at = start + int((end - start) * 0.8 * rng.random() ** 2)
                elif i == 0 or rng.random() < 0.7:  # the first cohort is always already at work
                    cohort_at = start - rng.randrange(HOUR, 10 * DAY)
                else:
                    cohort_at = rng.randrange(start, end - 6 * HOUR)
                cohort_created = cohort_at - rng.randrange(HOUR, 5 * DAY)
            cohort_left -= 1
            if self.cfg.fast_rotation:
                t = start - rng.randrange(DAY)
                while t < end:
                    life = rng.randrange(18 * HOUR, 30 * HOUR)
                    if t + life > start:
                        out.append((t, t + life, t - rng.randrange(HOUR, 12 * HOUR)))
                    t += life + rng.randrange(MINUTE, 30 * MINUTE)
                continue
            a = cohort_at + rng.randrange(-HOUR, HOUR)
            b = end + DAY if rng.random() > 0.1 else rng.randrange(max(a, start) + 2 * HOUR, end + 2 * HOUR)
            out.append((a, b, cohort_created + rng.randrange(-HOUR, HOUR)))
        return out

    def _ramp(self) -> tuple[int, int] | None:
        return (self.start, self.end) if self.cfg.slow_ramp else None

    def _hydra_and_resellers(self) -> None:
        c, rng = self.cfg, self.rng
        slots = self._n(c.hydra)  # accounts at work at once; fast_rotation burns through more
        windows = self._windows(slots)
        resellers = self._split(c.reseller)
        n_res = sum(resellers)
        templates = _HYDRA_TEMPLATES[c.templates]
        camp = _Campaign(self.hydra_pool, templates, len(windows) + n_res, paraphrase=c.paraphrase)
        # A handful of hosting ASNs and /24s (one per ~50 accounts at work), shared by groups of ~30.
        infra = self._campaign_infra(max(1, slots // 30), _HOSTING[:5] + (_CLOUD[0],), max(2, slots // 50),
                                     _UA_SCRIPT[:3], _TLS["custom"])
        group_of, payments, primary = [], [], []
        g, left = -1, 0
        for _ in windows:
            if left == 0:
                g, left = g + 1, rng.randrange(10, 51)  # accounts per payment fingerprint
                payments.append(f"pm_{self._hex()}")
                primary.append(rng.randrange(len(templates)))
            left -= 1
            group_of.append(g)

        def render(actor: _CampaignActor, r: random.Random, ts: int, state: dict[str, int]
                   ) -> tuple[str, str | None, float | None]:
            prompt, system = camp.render(r, camp.index(actor.slot, _next(state)), actor.primary)
            return prompt, system, None

        lo_rate, hi_rate = c.hydra_rate
        for slot, (a, b, created) in enumerate(windows):
            grp = group_of[slot]
            acct = self._account("hydra", "hydra", org=None, payment=payments[grp],
                                 tier=rng.choice(("free", "tier-1", "tier-1", "tier-2")), created=created)
            rate = rng.uniform(lo_rate, hi_rate)
            clients = tuple(infra[grp % len(infra)])
            span = max(0, min(b, self.end) - max(a, self.start)) / DAY
            self._add(_CampaignActor(
                acct, self._seed(), a, b, clients, _STYLE_HYDRA, _Models(),
                expected=rate * span * (0.6 if c.slow_ramp else 1.0), rate=rate, ramp=self._ramp(), render=render,
                slot=slot, primary=primary[grp],
            ))
        # Reseller proxies: old, high-tier accounts that forward hydra's traffic mixed with real customers'.
        slot = len(windows)
        for size in resellers:
            org, pm = f"org_{self._hex(12)}", f"pm_{self._hex()}"
            net = rng.choice(_HOSTING[5:])
            subnet = rng.randrange(1024)
            ua = rng.choice(_UA_RESELLER)
            clients = tuple(_client(_ipv4(rng, net[0], subnet=subnet), net, ua) for _ in range(rng.randrange(1, 4)))
            share = rng.uniform(0.4, 0.7)
            for _ in range(size):
                created = self._old(200, 800)
                acct = self._account("reseller", "reseller", org=org, payment=pm, tier=rng.choice(("tier-4", "scale")),
                                     created=created, n_keys=rng.randrange(2, 6))
                rate = rng.uniform(300, 800) * c.volume
                apps = rng.sample(_RESELLER_SYSTEMS, 3)  # the customer apps behind this account

                def render_r(actor: _CampaignActor, r: random.Random, ts: int, state: dict[str, int],
                             share: float = share, apps: list[str | None] = apps
                             ) -> tuple[str, str | None, float | None]:
                    if r.random() < share:
                        prompt, system = camp.render(r, camp.index(actor.slot, _next(state)), actor.primary)
                        return prompt, system, None
                    text = self.reseller_ordinary.pick(r)
                    app = apps[0] if r.random() < 0.7 else r.choice(apps)  # mostly one big customer app
                    return text, app, (_HH_REFUSAL if text in self.hh else None)

                self._add(_CampaignActor(
                    acct, self._seed(), self.start, self.end + DAY, clients, _STYLE_RESELLER,
                    _Models(switch_ts=self.release + rng.randrange(2 * HOUR, 6 * HOUR), p_new=0.4, p_small=0.1),
                    expected=rate * c.days * (0.6 if c.slow_ramp else 1.0), rate=rate, ramp=self._ramp(),
                    diurnal_tz=8, render=render_r, slot=slot, primary=rng.randrange(len(templates)),
                ))
                slot += 1

    def _model_hopper(self, n: int) -> None:
        c, rng = self.cfg, self.rng
        system, suffixes = _HOPPER[c.templates]
        camp = _Campaign(self.hopper_pool, [(system, "{task}")], n, paraphrase=c.paraphrase)
        orgs = [f"org_{self._hex(12)}" for _ in range(2)]
        pms = [f"pm_{self._hex()}" for _ in range(max(1, n // 8))]
        infra = self._campaign_infra(max(1, n // 6), (_CLOUD[0], _CLOUD[2]), 2,
                                     ("anthropic-python/0.49.0", "anthropic-python/0.47.2"), None)
        switch = self.release + rng.randrange(HOUR, 10 * HOUR)  # one orchestrator moves every account

        def render(actor: _CampaignActor, r: random.Random, ts: int, state: dict[str, int]
                   ) -> tuple[str, str | None, float | None]:
            # After the release the hopper replays its prompt list against the new model, latest first, so
            # the same prompts (same suffix: it depends on the prompt) come back, now on frontier-5.
            if actor.boost_after is not None and ts >= actor.boost_after:
                before, j = state.get("calls", 0), _next(state, "replay")
                k = before - 1 - j if j < before else j
            else:
                k = _next(state)
            i = camp.index(actor.slot, k)
            task = camp.pool[i]
            if camp.paraphrase and r.random() < 0.5:
                prompt, sys_ = _paraphrase(r, task)
                return prompt, sys_, None
            return task + suffixes[i % len(suffixes)], system, None

        for slot in range(n):
            created = self._old(20, 60)
            acct = self._account("model_hopper", "model_hopper", org=orgs[slot % 2], payment=pms[slot % len(pms)],
                                 tier=rng.choice(("tier-4", "scale")), created=created, n_keys=rng.randrange(1, 4))
            rate = rng.uniform(300, 700) * c.volume
            boost = 1.6
            after = self.end - max(self.start, switch)
            self._add(_CampaignActor(
                acct, self._seed(), self.start, self.end + DAY, tuple(infra[slot % len(infra)]), _STYLE_HOPPER,
                _Models(switch_ts=switch + rng.randrange(30 * MINUTE), p_new=0.92),
                expected=rate * (c.days + max(0.0, after / DAY) * (boost - 1)) * (0.6 if c.slow_ramp else 1.0),
                rate=rate, boost_after=switch, boost=boost, ramp=self._ramp(), render=render, slot=slot,
            ))

    def _cot(self, n: int) -> None:
        c, rng = self.cfg, self.rng
        templates = _COT_TEMPLATES[c.templates]
        by_lang: dict[str, list[str]] = {}
        for lang, fmt in templates:
            by_lang.setdefault(lang, []).append(fmt)
        langs = list(_COT_LANG_WEIGHTS)
        cum = _cum([_COT_LANG_WEIGHTS[x] for x in langs])
        windows = self._windows(n, cohort=(3, 8))
        camp = _Campaign(self.cot_pool, [(None, "{task}")], len(windows))
        short = _Campaign(self.cot_short, [(None, "{task}")], len(windows))
        tiny = _Campaign(self.cot_tiny, [(None, "{task}")], len(windows))
        pms = [f"pm_{self._hex()}" for _ in range(max(1, len(windows) // 5))]
        infra = self._campaign_infra(max(1, n // 8), _HOSTING[7:9] + _ZH[:1], 3,
                                     ("python-requests/2.31.0", _UA_BROWSER[0], "python-httpx/0.27.0"), None)

        def render(actor: _CampaignActor, r: random.Random, ts: int, state: dict[str, int]
                   ) -> tuple[str, str | None, float | None]:
            k = _next(state)
            lang = langs[bisect.bisect_left(cum, r.random() * 0.999999)]
            fmt = r.choice(by_lang[lang])
            if lang == "en":
                task = camp.base(actor.slot, k)
            elif lang == "zh" and self.cot_zh and r.random() < 0.6:
                task = self.cot_zh[(actor.slot + k * camp.slots) % len(self.cot_zh)]
            elif lang in ("ru", "es"):
                task = short.base(actor.slot, k)
            else:
                task = tiny.base(actor.slot, k)
            return fmt.format(task=task), None, None

        for slot, (a, b, created) in enumerate(windows):
            acct = self._account("cot_coercion", "cot_coercion", org=None, payment=pms[slot % len(pms)],
                                 tier=rng.choice(("free", "tier-1", "tier-2")), created=created)
            rate = rng.uniform(80, 200)
            span = max(0, min(b, self.end) - max(a, self.start)) / DAY
            self._add(_CampaignActor(
                acct, self._seed(), a, b, tuple(infra[slot % len(infra)]), _STYLE_COT, _Models(),
                expected=rate * span * (0.6 if c.slow_ramp else 1.0), rate=rate, ramp=self._ramp(), diurnal_tz=8,
                render=render, slot=slot,
            ))

    def _add(self, actor: _Actor) -> None:
        self.actors.append(actor)

    # ---- description ---------------------------------------------------------------------------------

    def describe(self) -> str:
        c, k = self.cfg, self.counts
        fmt = "%Y-%m-%d %H:%M UTC"
        start = datetime.fromtimestamp(self.start / 1000, UTC).strftime(fmt)
        release = datetime.fromtimestamp(self.release / 1000, UTC).strftime(fmt)
        expected: dict[str, float] = {}
        for a in self.actors:
            kind = self.labels[a.account.account_id].kind
            expected[kind] = expected.get(kind, 0.0) + a.expected
        ordinary_kinds = ("chat", "early_adopter", "researcher", "agentic_coding", "corporate_nat", "eval_harness",
                          "enterprise_batch", "content_pipeline", "vpn_user", "app_backend", "vendor_tool")
        ordinary = ", ".join(f"{k[x]} {x}" for x in ordinary_kinds if x in k)
        flags = [f for f in ("paraphrase", "fast_rotation", "slow_ramp", "many_asns") if getattr(c, f)]
        hydra, hydra_ev = k.get("hydra", 0), expected.get("hydra", 0.0)
        cot, cot_ev = k.get("cot_coercion", 0), expected.get("cot_coercion", 0.0)
        hopper = k.get("model_hopper", 0)
        return (
            f"Scenario {c.name!r}: {c.days} simulated days from {start} (seed {self.seed}, scale {self.scale:g}, "
            f"{c.templates} template set); ~{sum(expected.values()):,.0f} events. A new model {MODEL_NEW} is "
            f"released at {release}.\n"
            f"Ordinary accounts ({sum(1 for x in self.labels.values() if not x.attack)}): {ordinary}.\n"
            f"Campaigns, scaled down from documented 2026 cases. hydra: {hydra} accounts at "
            f"~{sum(c.hydra_rate) / 2:.0f} calls/day each, load-balanced over 24 h, ~{hydra_ev:,.0f} exchanges "
            f"(real case: ~25,000 accounts, 28.8M exchanges over 44 days; accounts scaled "
            f"1:{25_000 / max(1, hydra):.0f}, exchanges per day 1:{28.8e6 / 44 / max(1.0, hydra_ev / c.days):,.0f}). "
            f"model_hopper: {hopper} accounts, ~{expected.get('model_hopper', 0.0) / max(1, hopper * c.days):,.0f} "
            f"calls/day each, moving to {MODEL_NEW} within hours of its release. cot_coercion: {cot} accounts, "
            f"~{cot_ev:,.0f} chain-of-thought coercion prompts, ~60% non-English (real case: ~100k prompts; "
            f"1:{100_000 / max(1.0, cot_ev):.0f}). reseller: {k.get('reseller', 0)} proxy accounts mixing hydra's "
            f"templated traffic (40-70%) with their customers' ordinary prompts, "
            f"~{expected.get('reseller', 0.0):,.0f} calls.\n"
            f"Adversarial variants: {', '.join(flags) if flags else 'none'}."
        )
