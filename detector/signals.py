"""Cluster signals: how several workers share one view of the clusters. Plain Python; no Kafka.

Each worker holds the accounts of its partitions of ``api-calls``. Clusters cross partitions: a campaign's
accounts are spread over all of them by the hash of their ids. So each worker also keeps a copy of the
*cross-account* state (the content index, the cluster linker, the cluster windows and their tallies of
caught members) and folds into it what the other workers' events did::

    worker A: its events ─▶ Detector.process ─▶ signals ─┐            ┌─▶ worker B: Detector.apply_signals
                                                          ├─ cluster-signals (one message per batch) ─┤
    worker B: its events ─▶ Detector.process ─▶ signals ─┘            └─▶ worker A: Detector.apply_signals

A signal is what an event of one of the worker's own accounts did to that state, already computed by the
worker that holds the account (it alone has the account's windows and content filter):

* ``("e", account_id, ts, link_keys, sketch_keys, flags, org_id)``: the account's link keys (as the linker
  takes them: payment fingerprint, IP /24, ..., its recurring template), the content-sketch keys it counted
  for the first time (:meth:`detector.content.ContentIndex.added_keys`), and the bits the cluster windows
  take (:data:`ARRIVAL` ...);
* ``("c", account_id, ts, level)``: the account was newly counted as throttled (:data:`THROTTLED`) or
  blocked (:data:`BLOCKED`) in its cluster's tallies, or blocked the cluster (:data:`CLUSTER_BLOCKED`);
* ``("l", account_id, ts, attack, evidence)``: an analyst's verdict on the account (1 attack, 0 benign) and the
  evidence terms the worker's fusion model learned it from, so every worker's model learns every verdict (the
  ``analyst-labels`` topic is partitioned like ``api-calls``: each verdict reaches one worker).

Another worker's detector links the account, counts its templates and adds its traffic to its cluster's
windows, so every worker scores its own accounts against the whole cluster; the prompts of an account a
``c`` signal said was caught go into its filter of caught accounts' prompts (``echoes_caught``). Nothing
per account is kept beyond the linker's entry (evicted when idle, as own accounts are). Signals are best
effort, like all cross-account state (rebuilt from the stream after a restart): a lost batch weakens a
cluster's windows for a day, it never loses or double-counts an event of an account.

>>> batch = encode_batches("w1", [("e", "a1", 5, [("pay", "pm_1"), ("cohort", (7, 64500))], [12], ARRIVAL, None),
...                               ("c", "a1", 6, THROTTLED)])
>>> worker, signals = decode_batch(batch[0])
>>> worker, signals[0][3], signals[1]
('w1', [('pay', 'pm_1'), ('cohort', (7, 64500))], ('c', 'a1', 6, 1))
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from detector.schemas import InvalidEvent, decode

SIGNALS_SCHEMA = "cluster_signals.v1.json"
#: At most this many signals per message: a batch of 4,096 signals is about 1 MB, Kafka's default message limit.
MAX_PER_MESSAGE = 2048
#: A message of ``cluster-signals`` may hold this many bytes.
MAX_MESSAGE_BYTES = 1_000_000

# Bits of an event signal's flags: what the cluster windows (detector.clusters.ClusterState.add) take.
ARRIVAL, TEMPLATED, COT, MAX_LEN, NEW_ACCOUNT, MACHINE, NEW_MODEL = (1 << i for i in range(7))
# Bits of a caught signal's level.
THROTTLED, BLOCKED, CLUSTER_BLOCKED = 1, 2, 4

Signal = tuple[Any, ...]
_KINDS = {"pay": str, "org": str, "ip24": str, "asn": int, "tls": str, "ua": str, "tmpl": int}
_ALL_KINDS = frozenset({*_KINDS, "cohort"})
_CODE = re.compile(r"[a-z_]{1,40}")


def encode_batches(worker: str, signals: Sequence[Signal]) -> list[bytes]:
    """The ``cluster-signals`` messages for ``signals`` (``schemas/cluster_signals.v1.json``), at most
    :data:`MAX_PER_MESSAGE` signals each; none for none."""
    return [orjson.dumps({"schema_version": 1, "worker": worker, "signals": signals[i:i + MAX_PER_MESSAGE]})
            for i in range(0, len(signals), MAX_PER_MESSAGE)]


def decode_batch(raw: bytes) -> tuple[str, list[Signal]]:
    """``(worker, signals)`` from one message, or :class:`~detector.schemas.InvalidEvent` (reason ``schema``
    for a message of the wrong shape, including a link key whose value is not of its kind's type).

    >>> decode_batch(b'{"schema_version": 1, "worker": "w", "signals": [["e", "a", 1, [["asn", "x"]], [], 0, null]]}')
    Traceback (most recent call last):
    ...
    detector.schemas.InvalidEvent: schema: link key asn: expected int, got 'x'
    """
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            batch = orjson.loads(raw)
        except orjson.JSONDecodeError:
            batch = None
        fast = _plainly_valid(batch)
        if fast is not None:
            return batch["worker"], fast
    # Anything the fast path does not take goes through the compiled schema, for its error message.
    batch = decode(SIGNALS_SCHEMA, raw, MAX_MESSAGE_BYTES)
    signals: list[Signal] = []
    for s in batch["signals"]:
        if s[0] == "e":
            s[3] = [_key(kind, value) for kind, value in s[3]]
        signals.append(tuple(s))
    return batch["worker"], signals


_U64 = (1 << 64) - 1


def _plainly_valid(batch: Any) -> list[Signal] | None:
    """The signals of a batch the schema accepts, checked by hand (about 3 µs a signal instead of the compiled
    schema's 45), or None when the batch is not plainly valid (then :func:`decode_batch` asks the schema, which
    says why). Accepts nothing the schema refuses: ``tests/unit/test_signals.py`` checks both on the same
    inputs."""
    if (type(batch) is not dict or batch.keys() != {"schema_version", "worker", "signals"}
            or batch["schema_version"] != 1 or type(batch["schema_version"]) is not int
            or type(batch["worker"]) is not str or not 1 <= len(batch["worker"]) <= 128
            or type(batch["signals"]) is not list or len(batch["signals"]) > 4096):
        return None
    out: list[Signal] = []
    for s in batch["signals"]:
        if (type(s) is not list or len(s) not in (4, 5, 7) or type(s[1]) is not str or not 1 <= len(s[1]) <= 256
                or type(s[2]) is not int or s[2] < 0):
            return None
        if s[0] == "e" and len(s) == 7:
            keys, sketch, flags, org = s[3], s[4], s[5], s[6]
            if (type(keys) is not list or len(keys) > 32 or type(sketch) is not list or len(sketch) > 9
                    or type(flags) is not int or not 0 <= flags <= 127
                    or not (org is None or (type(org) is str and len(org) <= 256))):
                return None
            for k in sketch:
                if type(k) is not int or not 0 <= k <= _U64:
                    return None
            held = []
            for key in keys:
                if type(key) is not list or len(key) != 2 or type(key[0]) is not str or key[0] not in _ALL_KINDS:
                    return None
                try:
                    held.append(_key(key[0], key[1]))
                except InvalidEvent:
                    return None
            out.append(("e", s[1], s[2], held, sketch, flags, org))
        elif s[0] == "c" and len(s) == 4 and type(s[3]) is int and 1 <= s[3] <= 7:
            out.append(("c", s[1], s[2], s[3]))
        elif s[0] == "l" and len(s) == 5 and type(s[3]) is int and s[3] in (0, 1) and type(s[4]) is dict:
            evidence = s[4]
            if len(evidence) > 64 or not all(
                    type(k) is str and _CODE.fullmatch(k) and type(v) in (int, float) and 0 <= v <= 1
                    for k, v in evidence.items()):
                return None
            out.append(("l", s[1], s[2], s[3], evidence))
        else:
            return None
    return out


def _key(kind: str, value: Any) -> tuple[str, object]:
    """A link key as the linker holds it (hashable: the cohort's pair is a tuple)."""
    if kind == "cohort":
        if (type(value) is list and len(value) == 2 and type(value[0]) is int
                and (value[1] is None or type(value[1]) is int)):
            return kind, (value[0], value[1])
        raise InvalidEvent("schema", f"link key cohort: expected [hour, asn or null], got {value!r}"[:200])
    expected = _KINDS[kind]
    if type(value) is not expected:
        raise InvalidEvent("schema", f"link key {kind}: expected {expected.__name__}, got {value!r}"[:200])
    return kind, value


def count(signals: Iterable[Signal]) -> dict[str, int]:
    """Signals by kind, for logs and tests.

    >>> count([("e", "a", 1, [], [], 0, None), ("c", "a", 1, 1)])
    {'e': 1, 'c': 1}
    """
    out: dict[str, int] = {}
    for s in signals:
        out[s[0]] = out.get(s[0], 0) + 1
    return out
