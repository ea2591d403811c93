"""Static typing of the public API: mypy checks ``tests/typing/typed_usage.py`` (Task[P, R] is precise)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USAGE = ROOT / "tests" / "typing" / "typed_usage.py"
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<msg>.*?)(?:  \[(?P<code>[a-z-]+)\])?$")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")


@pytest.fixture(scope="module")
def cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("natask-mypy")) if cache is not None else tmp_path_factory.mktemp("mypy")


def run_mypy(path: Path, cache_dir: Path) -> tuple[int, list[dict[str, str]]]:
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--follow-imports=silent",  # natask's own errors are not what this test is about
            "--show-error-codes", "--no-error-summary", "--no-color-output", "--hide-error-context",
            "--cache-dir", str(cache_dir),
            str(path),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 2 = mypy itself failed
    found = []
    for raw in proc.stdout.splitlines():
        m = LINE.match(raw)
        assert m is not None, f"unexpected mypy output: {raw!r}\n{proc.stdout}{proc.stderr}"
        found.append(m.groupdict())
    return proc.returncode, found


def test_typed_usage_flags_only_the_bad_call(cache_dir: Path) -> None:
    lines = USAGE.read_text().splitlines()
    marked = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith("# expect error")]
    assert len(marked) == 1 and 'add.delay("x", 1)' in lines[marked[0] - 1]
    rc, found = run_mypy(USAGE, cache_dir)
    errors = [(int(f["line"]), f["code"]) for f in found if f["kind"] == "error"]
    assert errors == [(marked[0], "arg-type")], found
    assert '"str"' in found[0]["msg"] and '"int"' in found[0]["msg"]
    assert rc == 1


REVEAL = """
from natask import Natask

app = Natask("typed", servers="nats://127.0.0.1:1")

@app.task(name="typed.add")
def add(x: int, y: int) -> int:
    return x + y

@app.task(name="typed.double")
async def double(x: int) -> str:
    return str(2 * x)

reveal_type(add.delay(1, 2))
reveal_type(add(1, 2))

async def main() -> None:
    reveal_type(await double.adelay(1))
    coro = double(1)
    _ = reveal_type(coro)
    coro.close()
    reveal_type(await (await double.adelay(1)).aget())

wrong: str = add.delay(1, 2).get()
add.delay(1)
add.delay(1, 2, 3)
add.delay(1, z=2)
double.adelay("x")
"""


def test_revealed_types_are_precise(tmp_path: Path, cache_dir: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(REVEAL)
    _, found = run_mypy(probe, cache_dir)
    revealed = [
        f["msg"].replace("builtins.", "")  # mypy >= 2 prints short builtin names
        for f in found
        if f["kind"] == "note" and f["msg"].startswith("Revealed type")
    ]
    assert revealed == [
        'Revealed type is "natask.result.AsyncResult[int]"',
        'Revealed type is "int"',
        'Revealed type is "natask.result.AsyncResult[str]"',
        'Revealed type is "typing.Coroutine[Any, Any, str]"',
        'Revealed type is "str"',
    ], found
    lines = REVEAL.splitlines()
    error_lines = sorted({int(f["line"]) for f in found if f["kind"] == "error"})
    expected = [i + 1 for i, text in enumerate(lines) if text.startswith(("wrong:", "add.delay(", "double.adelay("))]
    assert error_lines == expected, found
