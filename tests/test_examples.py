"""Every ``examples/*.py`` runs by itself against a real server, exits 0 and prints what it should.

All examples share one server (the ``nats_server`` fixture, passed as ``$NATS_URL``); each uses its
own subject prefix. The examples that start the bundled server themselves when ``$NATS_URL`` is
unset run that way too. A new example must be added to ``EXPECTED`` with a line it prints, or
``test_every_example_has_an_expected_line`` fails.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from natask.server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

EXPECTED: dict[str, str] = {
    "quickstart.py": "add(2, 3) = 5",
    "queue_groups.py": "12 tasks, each run by exactly one worker",
    "request_reply.py": "20 concurrent calls answered, load-balanced",
    "audit_subscriber.py": "audit saw all 5 calls (1 delayed)",
    "retries_dlq.py": "gateway fixed, replayed",
    "persistence.py": "all 6 tasks enqueued before the worker existed ran; nothing was lost",
    "monitoring.py": "task-failed=1",
    "health_checks.py": "GET /health -> 503  healthy=False",
    "wildcard_routing.py": "saw 2: routing.default.ops.alert, routing.urgent.ops.alert",
    "periodic.py": "ticks run twice: 0",
    "canvas.py": "chord  prices -> total: 2.5",
    "fastapi_app.py": "GET /quote?items=1,2,3 -> 200",
    "flask_app.py": "GET /quote/<id> -> 200 {'items': 3, 'total': 59.94}",
    "django_style.py": "none of them with an event loop",
    "dashboard_mount.py": "search 'A-17' -> shop.checkout SUCCESS args=('A-17', card_number='***')",
    "tracing.py": "        process tracing.invoice  [consumer, OK]",
}
"""Example file -> a substring of its standard output."""

STANDALONE = ("quickstart.py", "persistence.py")
"""Also run without ``$NATS_URL`` (they start the bundled server; persistence.py then restarts it)."""

NEEDS: dict[str, tuple[str, ...]] = {"fastapi_app.py": ("fastapi", "httpx"), "flask_app.py": ("flask",),
                                     "dashboard_mount.py": ("fastapi", "httpx", "starlette", "uvicorn")}
"""Modules an example imports beyond natask's test extra (``pip install "natask[examples]"``)."""

TIMEOUT = 60.0
"""Seconds one example may take (they finish in a few)."""


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def missing_modules(name: str) -> list[str]:
    return [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]


def run_example(name: str, nats_url: str | None) -> str | None:
    """Run one example; ``None`` if it passed, else what went wrong with its output."""
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if nats_url is not None:
        env["NATS_URL"] = nats_url
    # Own session: on a timeout the whole group goes, worker processes an example started included.
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
        problem = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        problem = f"did not finish within {TIMEOUT:g}s"
    if problem is None and proc.returncode != 0:
        problem = f"exited with {proc.returncode}"
    if problem is None and EXPECTED[name] not in out:
        problem = f"did not print {EXPECTED[name]!r}"
    if problem is None:
        return None
    where = "against the shared server" if nats_url else "without $NATS_URL"
    return f"{name} ({where}) {problem}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"


def test_every_example_has_an_expected_line() -> None:
    files = example_files()
    assert files, f"no examples found in {EXAMPLES}"
    unlisted = sorted(set(files) - set(EXPECTED))
    stale = sorted(set(EXPECTED) - set(files))
    assert not unlisted, f"examples without an expected output line in EXPECTED: {unlisted}"
    assert not stale, f"EXPECTED names examples that do not exist: {stale}"


@pytest.mark.timeout(20 * TIMEOUT)
def test_examples_run_against_one_server(nats_server: NatsServer) -> None:
    runnable = [name for name in example_files() if name in EXPECTED and not missing_modules(name)]
    failures = [problem for name in runnable if (problem := run_example(name, nats_server.url))]
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_example_starts_its_own_server(name: str) -> None:
    problem = run_example(name, None)
    assert problem is None, problem


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_optional_example_dependencies(name: str) -> None:
    """Reports, as a skip, an example the run above left out for want of its extra modules."""
    missing = missing_modules(name)
    if missing:
        pytest.skip(f"{name} not run: {', '.join(missing)} missing (pip install \"natask[examples]\")")
