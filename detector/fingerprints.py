"""Content fingerprints of a prompt: what the detector may know about the text without the text.

Computed by the gateway SDK from the raw prompt, which never leaves the gateway. All hashes are keyed
(BLAKE2b with the deployment's fingerprint key), so a fingerprint cannot be reversed by hashing guesses
without the key, and fingerprints from different deployments do not match.

- ``exact``: the normalised prompt (case, white space and digits folded). Equal for repeated prompts,
  e.g. an evaluation harness sending a fixed benchmark.
- ``simhash`` (64 bits) and ``bands`` (MinHash LSH, 8 bands of 4 rows over word 3-shingles): prompts made
  from one template with different slot fillers share bands with high probability. Two prompts whose
  shingle sets have Jaccard similarity J share at least one band with probability 1 - (1 - J^4)^8:
  0.06 at J=0.3, 0.40 at J=0.5, 0.89 at J=0.7, 0.99 at J=0.8.
- ``cot``, ``capability``, ``script``: coarse labels from keyword rules, multilingual for chain-of-thought.

>>> fp = fingerprint("Think step by step. Write a Python function that reverses a list.", key=b"k")
>>> fp["cot"], fp["capability"], fp["script"], len(fp["bands"])
(True, 'coding', 'latin', 8)
>>> a = fingerprint("Translate to French: the cat sat on the mat near the door today", key=b"k")
>>> b = fingerprint("Translate to French: the cat sat on the mat near the door tonight", key=b"k")
>>> bool(set(a["bands"]) & set(b["bands"])), a["exact"] == b["exact"]
(True, False)
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import numpy as np

FP_VERSION = 1
N_BANDS = 8
ROWS_PER_BAND = 4
_N_HASHES = N_BANDS * ROWS_PER_BAND
_MASK64 = (1 << 64) - 1

# Token: one CJK/kana/hangul character, or a run of word characters.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|\w+", re.UNICODE)
_DIGITS = re.compile(r"\d+")

_COT = re.compile(
    "|".join(
        [
            r"step[- ]by[- ]step",
            r"chain[- ]of[- ]thought",
            r"show (?:your|all) (?:work|reasoning|steps)",
            r"explain (?:your|the) reasoning",
            r"think (?:carefully|through|out loud|aloud|it through)",
            r"let'?s think",
            r"reason(?:ing)? (?:through|about it) (?:first|before)",
            r"<thinking>|<reasoning>",
            r"rationale",
            # Asking for the reasoning in other words: a paraphrasing harvester still has to ask for it, and
            # the vocabulary of asking is small. On the real prompt sets these add under 0.5 points of
            # ordinary prompts (awesome-chatgpt-prompts 6.3% -> 6.5%, self-instruct 0.4-0.6% -> 0.8-1.1%).
            r"\breason(?:ing)? (?:through|it through|it out|carefully)",
            r"\bthought process\b|\btrain of thought\b|\bline of reasoning\b|\bchain of reasoning\b",
            r"\bintermediate (?:steps?|inferences?|results?|reasoning)\b",
            r"\b(?:every|each) (?:single )?(?:step|stage) of (?:the|your) (?:logic|reasoning|thinking|derivation)",
            r"\b(?:give|show|write|include|provide|start with)\b[^.?!\n]{0,24}\bderivation\b",
            r"\bjustify (?:each|every) (?:step|one|part)\b",
            r"\bhow you (?:arrive|arrived|got|get|reach|reached) (?:at )?(?:the|your|this)\b",
            r"\binternal (?:monologue|deliberation)\b",
            r"逐步|一步一步|一步步|思考过程|推理过程",  # zh
            r"段階的に|ステップバイステップ",  # ja
            r"단계별로",  # ko
            r"paso a paso",  # es
            r"étape par étape",  # fr
            r"schritt für schritt",  # de
            r"passo a passo",  # pt / it
            r"шаг за шагом|пошагово",  # ru
            r"خطوة بخطوة",  # ar
        ]
    ),
    re.IGNORECASE,
)

# Capability rules, checked in order; the first with enough hits wins.
_CAPABILITY_RULES: tuple[tuple[str, re.Pattern[str], int], ...] = (
    (
        "agentic",
        re.compile(
            r"\b(?:thought|action|observation)\s*:|\btool(?:s|_call| call)?\b|\bapi[_ ]call\b|"
            r"\bfunction[_ ]call|\bagent\b|\bplan the steps\b|\bjson schema\b|\binvoke\b",
            re.I,
        ),
        2,
    ),
    (
        "coding",
        re.compile(
            r"```|\bdef |\bclass |\bfunction\b|\bpython\b|\bjavascript\b|\btypescript\b|\bjava\b|\bc\+\+|"
            r"\brust\b|\bsql\b|\bcode\b|\bcompile|\bbug\b|\bregex\b|\bapi\b|\bscript\b|\bimport\b|"
            r"\breturn\b|\balgorithm\b|\bprogram\b|代码|编程|函数",
            re.I,
        ),
        1,
    ),
    (
        "math",
        re.compile(
            r"\d+\s*[-+*/×÷^=]\s*\d+|\bsolve\b|\bequation|\bcalculate\b|\bintegral\b|\bderivative\b|"
            r"\bprobability\b|\bhow many\b|\bhow much\b|\bsum of\b|\bpercent|\bproof\b|\bprove\b|计算|方程",
            re.I,
        ),
        1,
    ),
    (
        "roleplay",
        re.compile(r"\bact as\b|\bpretend\b|\brole[- ]?play|\bi want you to act\b|\byou are a\b|扮演", re.I),
        1,
    ),
    (
        "writing",
        re.compile(
            r"\bwrite (?:a|an|me|the)\b|\bessay\b|\bpoem\b|\bstory\b|\bemail\b|\bletter\b|\bblog\b|"
            r"\brewrite\b|\bsummari[sz]e\b|\bparaphrase\b|\btranslate\b|写一|翻译",
            re.I,
        ),
        1,
    ),
    (
        "reasoning",
        re.compile(
            r"\bwhy\b|\bexplain\b|\blogic|\bpremise\b|\bhypothesis\b|\binfer|\bconclusion\b|\bentail|"
            r"\bcontradict|\bwhich of the following\b|\banswer choices\b|为什么|解释",
            re.I,
        ),
        1,
    ),
    (
        "qa",
        re.compile(r"^\s*(?:what|who|when|where|which|how|is|are|does|do|can)\b|\?\s*$|什么|谁|哪", re.I),
        1,
    ),
)
CAPABILITIES = ("coding", "math", "reasoning", "agentic", "writing", "qa", "roleplay", "other")
SCRIPTS = ("latin", "cjk", "cyrillic", "arabic", "other")

# Fixed odd multipliers for the MinHash family (splitmix64 constants of a seeded generator).
_rng = np.random.default_rng(20260401)
_MULT = (_rng.integers(1, 2**63, size=_N_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)).astype(np.uint64)
_XOR = _rng.integers(0, 2**63, size=_N_HASHES, dtype=np.uint64)
_BITS = np.uint64(1) << np.arange(64, dtype=np.uint64)


def normalise(text: str) -> str:
    """NFKC, lower case, digits folded to ``0``, white space collapsed.

    >>> normalise("  Order #4512 is LATE\\n\\n")
    'order #0 is late'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DIGITS.sub("0", text)
    return " ".join(text.split())


def _h64(data: bytes, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key[:64]).digest(), "big")


def shingles(tokens: list[str], k: int = 3) -> set[str]:
    """Word ``k``-shingles (all tokens when there are fewer than ``k``).

    >>> sorted(shingles(["a", "b", "c", "d"]))
    ['a b c', 'b c d']
    """
    if len(tokens) < k:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}


def script_of(text: str) -> str:
    """The dominant writing system of ``text`` among :data:`SCRIPTS`."""
    counts = dict.fromkeys(SCRIPTS, 0)
    for ch in text[:2000]:
        o = ord(ch)
        if ch.isascii():
            if ch.isalpha():
                counts["latin"] += 1
        elif 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF:
            counts["cjk"] += 1
        elif 0x0400 <= o <= 0x04FF:
            counts["cyrillic"] += 1
        elif 0x0600 <= o <= 0x06FF:
            counts["arabic"] += 1
        elif ch.isalpha():
            if 0x00C0 <= o <= 0x024F:
                counts["latin"] += 1
            else:
                counts["other"] += 1
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] else "other"


def capability_of(text: str) -> str:
    """A coarse category of what the prompt asks for, among :data:`CAPABILITIES`.

    >>> capability_of("Solve for x: 3x + 5 = 20")
    'math'
    """
    head = text[:4000]
    for name, pattern, needed in _CAPABILITY_RULES:
        if len(pattern.findall(head)) >= needed:
            return name
    return "other"


def fingerprint(prompt_text: str, key: bytes, system_text: str | None = None) -> dict[str, Any]:
    """The ``prompt`` object of an API-call event (see ``schemas/api_call_event.v1.json``).

    Cost grows with the prompt: about 0.2 ms for a 300-word prompt. Text beyond 20,000 characters is not
    read for the near-duplicate fingerprints (its length still counts).
    """
    norm = normalise(prompt_text[:20000])
    tokens = _TOKEN.findall(norm)
    hashes = np.fromiter(
        (_h64(s.encode(), key) for s in shingles(tokens)), dtype=np.uint64
    ) if tokens else np.zeros(1, dtype=np.uint64)
    # SimHash: each bit is the majority vote of that bit over the shingle hashes.
    votes = ((hashes[:, None] & _BITS) != 0).sum(axis=0)
    simhash = int(((votes * 2 > len(hashes)) * _BITS).sum())
    # MinHash: min over shingles of (h ^ xor_i) * mult_i mod 2^64, for 32 hash functions.
    with np.errstate(over="ignore"):
        mins = ((hashes[:, None] ^ _XOR) * _MULT).min(axis=0)
    bands = []
    for b in range(N_BANDS):
        row = mins[b * ROWS_PER_BAND : (b + 1) * ROWS_PER_BAND].tobytes()
        bands.append(f"{_h64(bytes([b]) + row, key):016x}")
    return {
        "fp_version": FP_VERSION,
        "exact": f"{_h64(norm.encode(), key):016x}",
        "simhash": f"{simhash & _MASK64:016x}",
        "bands": bands,
        "system_fp": f"{_h64(normalise(system_text).encode(), key):016x}" if system_text else None,
        "chars": len(prompt_text),
        "cot": bool(_COT.search(prompt_text[:20000])) or bool(system_text and _COT.search(system_text[:20000])),
        "capability": capability_of(prompt_text),
        "script": script_of(prompt_text),
    }


def hamming(a_hex: str, b_hex: str) -> int:
    """Bits that differ between two 64-bit hex fingerprints (e.g. simhashes).

    >>> hamming("00000000000000ff", "000000000000000f")
    4
    """
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()
