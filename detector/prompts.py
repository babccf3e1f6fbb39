"""Real prompt text for the traffic simulator, read from public prompt sets.

The simulator gives its accounts real prompts so that the content fingerprints of simulated traffic
(near-duplicate bands, chain-of-thought flags, capability and script labels) behave like those of real
traffic. Three kinds:

- ``attack``: prompts that were actually sent to a teacher model to harvest its answers (the ``A_`` files
  of ``shared/datasets/prompts``: code and tool-use self-instruct sets, agent trajectories, CoT distillation).
- ``ordinary``: prompts written by people for their own purposes (the ``B_`` files).
- ``benchmark``: fixed evaluation sets (arena-hard v0.1, NQ-open, the Vicuna 80) that evaluation
  harnesses send identically from many accounts.

Each file has its own format; a reader per file takes the instruction / prompt / question text, plus the
input where there is one. Each file is capped at :data:`CAP_PER_FILE` prompts, sampled with the caller's
``rng`` (benchmarks keep their first prompts instead, so every harness sends the same set).

When the prompt directory is missing, a bundled sample is used instead (``detector/data/sample_prompts.jsonl.gz``:
at most a quarter of each permissively licensed file, attributed in ``detector/data/SAMPLE_SOURCES.md``). It is
rebuilt from the full sets by ``python -m detector.prompts DIR`` (:func:`build_sample`).

>>> import random
>>> sample = load_prompts("benchmark", Path("/nonexistent"), random.Random(0))
>>> len(sample) > 10, all(isinstance(p, str) and p for p in sample)
(True, True)
>>> sets = load_prompt_sets("attack", Path("/nonexistent"), random.Random(0))
>>> "A_gpteacher_codegen_instruct" in sets
True
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import orjson

log = logging.getLogger(__name__)

PromptKind = Literal["attack", "ordinary", "benchmark"]
KINDS: tuple[str, ...] = ("attack", "ordinary", "benchmark")
#: At most this many prompts are taken from one file (keeps loading and the simulator fast).
CAP_PER_FILE = 3000
#: Prompts longer than this are dropped (a few records hold whole documents).
MAX_CHARS = 12000
ENV_VAR = "DETECTOR_PROMPTS_DIR"
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "sample_prompts.jsonl.gz"
_REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- readers: one per file format; each yields prompt strings -----------------------------------------


def _json_array(path: Path) -> list[dict[str, Any]]:
    data = orjson.loads(path.read_bytes())
    return [r for r in data if isinstance(r, dict)]


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    for line in raw.split(b"\n"):  # not splitlines(): some prompts contain U+2028
        if line.strip():
            rec = orjson.loads(line)
            if isinstance(rec, dict):
                yield rec


def _join(instruction: Any, extra: Any) -> str:
    text = str(instruction or "").strip()
    extra = str(extra or "").strip()
    return f"{text}\n\n{extra}" if text and extra else text or extra


def _instruction_input(path: Path) -> Iterator[str]:
    """Alpaca-style JSON arrays: instruction + input."""
    for r in _json_array(path):
        yield _join(r.get("instruction"), r.get("input"))


_GORILLA = re.compile(r"###\s*Instruction:\s*(.*?)\s*(?:###\s*Output|$)|'Instruction':\s*(.*?),\s*'Output'", re.S)


def _gorilla(path: Path) -> Iterator[str]:
    """Gorilla APIBench (JSONL despite the name): the instruction inside the ``code`` field."""
    for r in _jsonl(path):
        m = _GORILLA.search(str(r.get("code", "")))
        if m:
            yield (m.group(1) or m.group(2) or "").strip()


def _fireact(path: Path) -> Iterator[str]:
    """FireAct agent trajectories: the question, or the trajectory up to an assistant turn.

    A distiller harvesting ReAct traces sends the conversation so far and asks for the next step, so a
    third of the prompts carry a partial trajectory (Thought / Action / Observation lines).
    """
    for i, r in enumerate(_jsonl(path)):
        msgs = [m for m in r.get("messages", []) if isinstance(m, dict) and m.get("content")]
        if not msgs:
            continue
        upto = 1 if i % 3 else max(1, min(len(msgs), 2 + 2 * (i % 4)))
        yield "\n".join(str(m["content"]).strip() for m in msgs[:upto])


def _distilling_step_by_step(path: Path) -> Iterator[str]:
    """Distilling step-by-step (CQA, SVAMP, ANLI): the task input, formatted as the paper prompted it."""
    for r in _jsonl(path):
        t = r.get("task_input") or {}
        ds = r.get("dataset")
        if ds == "cqa":
            choices = " ".join(f"({chr(97 + j)}) {c}" for j, c in enumerate(t.get("choices", [])))
            yield f"Q: {t.get('question', '')}\nAnswer Choices: {choices}"
        elif ds == "svamp":
            yield str(t.get("input", ""))
        elif ds and t.get("premise"):
            yield f"Premise: {t['premise']}\nHypothesis: {t.get('hypothesis', '')}\n" \
                  "Does the premise entail the hypothesis, contradict it, or neither?"


def _toolbench(path: Path) -> Iterator[str]:
    """ToolBench example queries, with the names of the APIs offered to the agent."""
    for r in _jsonl(path):
        if r.get("kind") == "query" and r.get("query"):
            apis = ", ".join(f"{a.get('tool_name')}.{a.get('api_name')}" for a in r.get("api_list", [])[:12])
            yield f"{r['query']}\n\nAvailable APIs: {apis}"


def _field(name: str, extra: str | None = None) -> Callable[[Path], Iterator[str]]:
    def read(path: Path) -> Iterator[str]:
        for r in _jsonl(path):
            yield _join(r.get(name), r.get(extra) if extra else None)

    return read


def _self_instruct(path: Path) -> Iterator[str]:
    for r in _jsonl(path):
        inst = r.get("instances") or [{}]
        yield _join(r.get("instruction"), inst[0].get("input") if isinstance(inst[0], dict) else None)


def _hh_rlhf(path: Path) -> Iterator[str]:
    """HH-RLHF transcripts: the first human turn."""
    for r in _jsonl(path):
        text = str(r.get("chosen", ""))
        start = text.find("Human:")
        if start < 0:
            continue
        end = text.find("\n\nAssistant:", start)
        yield text[start + 6 : end if end > 0 else None].strip()


Reader = Callable[[Path], Iterable[str]]

#: kind -> (file name, reader). Sources with no file in the directory are skipped.
FILES: dict[str, tuple[tuple[str, Reader], ...]] = {
    "attack": (
        ("A_code_alpaca_2k.json", _instruction_input),
        ("A_gpteacher_codegen_instruct.json", _instruction_input),
        ("A_gpteacher_toolformer_dedupe.json", _instruction_input),
        ("A_gpteacher_roleplay_instruct.json", _instruction_input),
        ("A_alpaca_5000.json", _instruction_input),
        ("A_fireact_multitask_multimethod_gpt4.jsonl", _fireact),
        ("A_gorilla_apibench_torchhub_train.json", _gorilla),
        ("A_gorilla_apibench_huggingface_eval.json", _gorilla),
        ("A_gorilla_apibench_tensorflow_eval.json", _gorilla),
        ("A_gorilla_apibench_torchhub_eval.json", _gorilla),
        ("A_distilling_step_by_step_palm_cot.jsonl", _distilling_step_by_step),
        ("A_llm_adapters_math_data_cot.json", _instruction_input),
        ("A_toolbench_data_example.jsonl", _toolbench),
    ),
    "ordinary": (
        ("B_databricks_dolly_15k.jsonl", _field("instruction", "context")),
        ("B_lima_1k_train.json", _instruction_input),
        ("B_oasst1_zh_llamafactory_766.json", _instruction_input),
        ("B_arena_hard_v2.0_questions.jsonl", _field("prompt")),
        ("B_awesome_chatgpt_prompts_1529.jsonl", _field("prompt")),
        ("B_self_instruct_user_oriented_252.jsonl", _self_instruct),
        ("B_self_instruct_seed_tasks_175.jsonl", _self_instruct),
        ("B_hh_rlhf_harmless_base_test.jsonl.gz", _hh_rlhf),
    ),
    "benchmark": (
        ("B_arena_hard_v0.1_questions.jsonl", _field("prompt")),
        ("B_nq_open_dev_3610.jsonl", _field("question")),
        ("B_vicuna_questions_80.jsonl", _field("text")),
    ),
}


def source_name(file_name: str) -> str:
    """The source name of a prompt file: its name without extensions.

    >>> source_name("B_hh_rlhf_harmless_base_test.jsonl.gz")
    'B_hh_rlhf_harmless_base_test'
    """
    return file_name.split(".json")[0]


def default_prompts_dir() -> Path | None:
    """``$DETECTOR_PROMPTS_DIR``, else the first existing ``../shared/datasets/prompts`` relative to the
    repository root or the working directory, else None (the bundled sample is then used)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    for base in (_REPO_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "datasets" / "prompts"
        if candidate.is_dir():
            return candidate
    return None


@functools.lru_cache(maxsize=64)
def _read_file(path: Path, mtime_ns: int, reader: Reader) -> tuple[str, ...]:
    del mtime_ns  # part of the cache key only: a changed file is read again
    out = []
    for text in reader(path):
        text = text.strip()
        if text and len(text) <= MAX_CHARS:
            out.append(text)
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _read_sample(path: Path) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(r["kind"]), str(r["source"]), str(r["text"])) for r in _jsonl(path))


def load_prompt_sets(
    kind: str, prompts_dir: Path | None = None, rng: random.Random | None = None, cap: int = CAP_PER_FILE
) -> dict[str, list[str]]:
    """Prompts of one kind, by source (file name without extension), in file order.

    Files with more than ``cap`` prompts are sampled down with ``rng`` (order kept); benchmark files keep
    their first ``cap`` prompts instead, so every caller sees the same benchmark. Falls back to the
    bundled sample when ``prompts_dir`` (default: :func:`default_prompts_dir`) does not exist or holds
    none of the files. Parsed files are cached per process, so building several simulations is cheap.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    rng = rng or random.Random(0)
    directory = prompts_dir if prompts_dir is not None else default_prompts_dir()
    sets: dict[str, list[str]] = {}
    if directory is not None and directory.is_dir():
        for file_name, reader in FILES[kind]:
            path = directory / file_name
            if not path.is_file():
                continue
            prompts = _read_file(path, path.stat().st_mtime_ns, reader)
            if len(prompts) > cap:
                if kind == "benchmark":
                    prompts = prompts[:cap]
                else:
                    keep = sorted(rng.sample(range(len(prompts)), cap))
                    prompts = tuple(prompts[i] for i in keep)
            if prompts:
                sets[source_name(file_name)] = list(prompts)
    if not sets:
        why = (f"prompt directory {directory} not found or empty" if directory is not None
               else f"no prompt directory (${ENV_VAR} unset, no ../shared/datasets/prompts)")
        log.info("%s: using the bundled sample %s (a quarter of the permissive files: README, *Prompt data*)",
                 why, SAMPLE_PATH)
        for k, source, text in _read_sample(SAMPLE_PATH):
            if k == kind:
                sets.setdefault(source, []).append(text)
    return sets


def load_prompts(kind: str, prompts_dir: Path | None = None, rng: random.Random | None = None) -> list[str]:
    """All prompts of one kind (``"attack"``, ``"ordinary"`` or ``"benchmark"``), shuffled with ``rng``.

    See :func:`load_prompt_sets` for the sources, the cap per file and the fallback to the bundled sample.
    Costs about a second the first time in a process (parsing ~60 MB of JSON), little afterwards.
    """
    rng = rng or random.Random(0)
    prompts = [p for texts in load_prompt_sets(kind, prompts_dir, rng).values() for p in texts]
    rng.shuffle(prompts)
    return prompts


# ---- the bundled sample ------------------------------------------------------------------------------

#: The files the bundled sample draws on: licences that allow a sample to be copied with attribution (MIT,
#: Apache-2.0, CC0, CC BY-SA; shared/datasets/prompts/SOURCES.md). Not the non-commercial sets (Alpaca, Code
#: Alpaca, LIMA, Vicuna), the ODC-By math set, the step-by-step distillation set (ANLI is CC BY-NC), nor
#: HH-RLHF's red-team prompts, which are unpleasant to ship.
SAMPLE_FILES: dict[str, tuple[str, str]] = {  # file -> (origin: repository @ commit : path, licence)
    "A_gpteacher_codegen_instruct.json": (
        "teknium1/GPTeacher @ 481075123c29854bddb82655badeef6a438f2436 : Codegen/codegen-instruct.json", "MIT"),
    "A_gpteacher_toolformer_dedupe.json": (
        "teknium1/GPTeacher @ 481075123c29854bddb82655badeef6a438f2436 : "
        "Toolformer/toolformer-dedupe-only-dataset.json", "MIT"),
    "A_gpteacher_roleplay_instruct.json": (
        "teknium1/GPTeacher @ 481075123c29854bddb82655badeef6a438f2436 : "
        "Roleplay/roleplay-simple-deduped-roleplay-instruct.json", "MIT"),
    "A_fireact_multitask_multimethod_gpt4.jsonl": (
        "anchen1011/FireAct @ 94c6189f04b10fccae6bcd97a4632d6119266899 : "
        "data/finetune/gpt_format/multitask_multimethod.jsonl", "MIT"),
    "A_gorilla_apibench_torchhub_train.json": (
        "ShishirPatil/gorilla @ 6ea57973c7a6097fd7c5915698c54c17c5b1b6c8 : data/apibench/torchhub_train.json",
        "Apache-2.0"),
    "A_gorilla_apibench_huggingface_eval.json": (
        "ShishirPatil/gorilla @ 6ea57973c7a6097fd7c5915698c54c17c5b1b6c8 : data/apibench/huggingface_eval.json",
        "Apache-2.0"),
    "A_gorilla_apibench_tensorflow_eval.json": (
        "ShishirPatil/gorilla @ 6ea57973c7a6097fd7c5915698c54c17c5b1b6c8 : data/apibench/tensorflow_eval.json",
        "Apache-2.0"),
    "A_gorilla_apibench_torchhub_eval.json": (
        "ShishirPatil/gorilla @ 6ea57973c7a6097fd7c5915698c54c17c5b1b6c8 : data/apibench/torchhub_eval.json",
        "Apache-2.0"),
    "A_toolbench_data_example.jsonl": (
        "OpenBMB/ToolBench @ d56fdd89faf8c91fa135090b212bb9057ee5cfc2 : data_example/instruction/G{1,2,3}_query.json",
        "Apache-2.0"),
    "B_databricks_dolly_15k.jsonl": (
        "databricks-dolly-15k, reassembled from ZeenathulNizreen/FedAgg @ 59cd0654e15fa1479782e33862bcc4a396147ed7 : "
        "data/10/", "CC BY-SA 3.0"),
    "B_oasst1_zh_llamafactory_766.json": (
        "hiyouga/LLaMA-Factory @ 3154fec979aba48f54b7afde3740c4990d445a41 : data/oaast_sft_zh.json (OASST1, Chinese)",
        "Apache-2.0"),
    "B_arena_hard_v2.0_questions.jsonl": (
        "lmarena/arena-hard-auto @ 196f6b826783b3da7310e361a805fa36f0be83f3 : data/arena-hard-v2.0/question.jsonl",
        "Apache-2.0"),
    "B_awesome_chatgpt_prompts_1529.jsonl": (
        "f/awesome-chatgpt-prompts @ 50a97c072933c93c76cc0714e9dd4c4cf1d80ae7 : prompts.csv (`prompt` column)",
        "CC0-1.0"),
    "B_self_instruct_user_oriented_252.jsonl": (
        "yizhongw/self-instruct @ 0b26ccaa415992100fa32df62d41b994cf928e23 : "
        "human_eval/user_oriented_instructions.jsonl", "Apache-2.0"),
    "B_self_instruct_seed_tasks_175.jsonl": (
        "yizhongw/self-instruct @ 0b26ccaa415992100fa32df62d41b994cf928e23 : data/seed_tasks.jsonl", "Apache-2.0"),
    "B_arena_hard_v0.1_questions.jsonl": (
        "lmarena/arena-hard-auto @ 196f6b826783b3da7310e361a805fa36f0be83f3 : data/arena-hard-v0.1/question.jsonl",
        "Apache-2.0"),
    "B_nq_open_dev_3610.jsonl": (
        "google-research-datasets/natural-questions @ fb26a3073b1fe636c97302890a27b491d6530130 : "
        "nq_open/NQ-open.dev.jsonl", "CC BY-SA 3.0"),
}
#: At most this share of a file's records goes into the sample.
SAMPLE_SHARE = 0.25
#: Sampled prompts are at most this long, and hold no e-mail address, URL or home-directory path.
SAMPLE_MAX_CHARS = 1500
_PERSONAL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|https?://|www\.|/home/|/Users/|C:\\Users", re.I)


def build_sample(source_dir: Path, share: float = SAMPLE_SHARE, files: Iterable[str] = SAMPLE_FILES
                 ) -> tuple[bytes, list[tuple[str, str, int, int]]]:
    """The bundled sample from the full prompt sets: gzipped JSONL (``kind``, ``source``, ``text``), and a
    row per file (kind, file name, records in the file, prompts taken).

    From each of ``files`` (default :data:`SAMPLE_FILES`) it takes ``share`` of the file's records, drawn at
    random with a seed fixed per file from the eligible prompts (benchmarks: the first eligible ones, as
    :func:`load_prompt_sets` keeps a benchmark's first prompts). Same input, same bytes (the gzip header
    carries no time).
    """
    wanted = set(files)
    lines: list[bytes] = []
    rows: list[tuple[str, str, int, int]] = []
    for kind, readers in FILES.items():
        for file_name, reader in readers:
            if file_name not in wanted:
                continue
            path = source_dir / file_name
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the sample is built from the full prompt sets")
            texts = [t.strip() for t in reader(path)]
            ok = [t for t in texts if t and len(t) <= SAMPLE_MAX_CHARS and not _PERSONAL.search(t)]
            n = min(len(ok), max(1, int(share * len(texts))))
            if kind == "benchmark":
                picked = ok[:n]
            else:
                picked = [ok[i] for i in sorted(random.Random(f"sample/{file_name}").sample(range(len(ok)), n))]
            lines += [orjson.dumps({"kind": kind, "source": source_name(file_name), "text": t}) for t in picked]
            rows.append((kind, file_name, len(texts), n))
    return gzip.compress(b"".join(line + b"\n" for line in lines), compresslevel=9, mtime=0), rows


def _sources_table(rows: list[tuple[str, str, int, int]]) -> str:
    out = ["| kind | prompts | of records | source file (repository @ commit : path) | licence |",
           "|---|---|---|---|---|"]
    for kind, file_name, total, n in rows:
        origin, licence = SAMPLE_FILES[file_name]
        out.append(f"| {kind} | {n:,} | {total:,} | {origin} | {licence} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m detector.prompts DIR``: rebuild the bundled sample from the full prompt sets in DIR, and the
    table of its sources in ``SAMPLE_SOURCES.md`` (between the ``<!-- table -->`` markers)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m detector.prompts DIR  (DIR: the full prompt sets, e.g. ../shared/datasets/prompts)",
              file=sys.stderr)
        return 2
    try:
        data, rows = build_sample(Path(args[0]))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    SAMPLE_PATH.write_bytes(data)
    md = SAMPLE_PATH.with_name("SAMPLE_SOURCES.md")
    head, _, rest = md.read_text().partition("<!-- table -->\n")
    _, _, tail = rest.partition("<!-- /table -->\n")
    md.write_text(f"{head}<!-- table -->\n{_sources_table(rows)}<!-- /table -->\n{tail}")
    print(f"wrote {SAMPLE_PATH} ({sum(n for *_, n in rows):,} prompts, {len(data):,} bytes) and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
