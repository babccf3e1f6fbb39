"""The wheel carries what the installed package reads: the JSON Schemas, every module, the data files.

``schemas/`` stays at the repository's top level (one copy in git); pyproject.toml maps it into the wheel
as ``detector/schema_files/`` and :func:`detector.schemas.schema_dir` finds it there with
:mod:`importlib.resources`.

Offline and about 1 s: setuptools' ``build_py`` (the installed setuptools, no build isolation, so no
network) lays out the files a wheel holds, from a copy of the sources so the checkout gets no ``build/``
directory; the package is then imported from that tree, where no ``schemas/`` of the checkout can help.
``build_py`` rather than a whole wheel because ``bdist_wheel`` needs the ``wheel`` package with
setuptools < 70.1, and the wheel's ``detector/`` is exactly this tree, zipped. The real thing, by hand::

    pip wheel --no-deps . -w /tmp/whl && python3 -m venv /tmp/v && /tmp/v/bin/pip install /tmp/whl/*.whl
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "schemas", "detector")


@pytest.fixture(scope="module")
def wheel_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree a wheel of this checkout holds (what lands in site-packages), built from a copy."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "lib"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-c", "from setuptools import setup; setup()", "build_py", "--build-lib", str(out)], src)
    return out


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_carries_the_schemas(wheel_tree: Path) -> None:
    names = _files(wheel_tree)
    schemas = sorted((ROOT / "schemas").glob("*.json"))
    assert schemas
    for schema in schemas:
        packed = f"detector/schema_files/{schema.name}"
        assert packed in names, f"{schema.name} is not in the wheel"
        assert (wheel_tree / packed).read_bytes() == schema.read_bytes()
    assert not any(n.startswith("schemas/") for n in names), "the wheel must not install a top-level schemas/"


def test_the_wheel_carries_every_module_and_data_file(wheel_tree: Path) -> None:
    """pyproject.toml lists the packages by hand (a mapped package cannot be discovered): a new
    sub-package missing from the list fails here, not in production."""
    names = _files(wheel_tree)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "detector").rglob("*.py")}
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "detector" / "data").iterdir() if p.is_file()}
    assert modules and data
    assert (modules | data) - names == set()


def test_the_installed_package_loads_its_schemas(wheel_tree: Path, tmp_path: Path) -> None:
    """Imported from the wheel's tree: the schemas come from inside the package, and work."""
    check = f"""
import sys
sys.path.insert(0, {str(wheel_tree)!r})
import orjson
from detector import schemas
from detector.gateway import make_event
assert schemas.__file__.startswith({str(wheel_tree)!r}), schemas.__file__
assert str(schemas.schema_dir()).startswith({str(wheel_tree)!r}), schemas.schema_dir()
ev = make_event(account_id="acct_1", ts=1775000000000, api_key_id="k", model="m-1", endpoint="/v1/messages",
                status=200, input_tokens=1, output_tokens=1, latency_ms=1, response={{"stop_reason": None}},
                prompt_text="hi", fingerprint_key=b"k")
assert schemas.decode_event(orjson.dumps(ev)) == ev
for name in (schemas.SCORE_SCHEMA, schemas.DEAD_LETTER_SCHEMA, schemas.LABEL_SCHEMA):
    schemas.validator(name)
"""
    _run([sys.executable, "-c", check], tmp_path)
