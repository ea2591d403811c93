"""The natask command line against a real server (each command in its own process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natask import Natask, TaskFailed, TaskRevoked
from natask.dlq import DeadLetters
from natask.server import NatsServer

from .helpers import ROOT, WorkerProcess

APP = "tests.integration.workerapp:app"


async def natask_cli(url: str, *args: str, prefix: str = "cli") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": url, "NATASK_TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "natask", *args], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )


@pytest.fixture
async def cli_app(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[tuple[Natask, WorkerProcess]]:
    app = Natask("cli-test", servers=[nats_server.url], subject_prefix="cli")
    w = await WorkerProcess(nats_server.url, "cli", tmp_path / "log", extra=["--unknown-grace", "0"]).ready()
    try:
        yield app, w
    finally:
        w.signal(signal.SIGTERM)
        await w.wait()
        await app.aclose()


async def test_dlq_list_show_replay_purge(nats_server: NatsServer, cli_app: tuple[Natask, WorkerProcess]) -> None:
    app, _ = cli_app
    lost = await app.asend_task("it.missing", [1])
    with pytest.raises(TaskFailed):
        await lost.aget(timeout=20)

    listed = await natask_cli(nats_server.url, "dlq", "list", "-A", APP)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()  # entry lines only, no header
    assert line.startswith(f"{lost.id}  unknown task")

    as_json = await natask_cli(nats_server.url, "dlq", "list", "-A", APP, "--json")
    [entry] = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert entry["id"] == lost.id and entry["task"] == "it.missing" and entry["attempts"] == 1

    shown = await natask_cli(nats_server.url, "dlq", "show", lost.id, "-A", APP)
    assert "reason: unknown task" in shown.stdout and "it.missing" in shown.stdout

    first_seq = (await DeadLetters(app).list())[0].seq
    replayed = await natask_cli(nats_server.url, "dlq", "replay", lost.id, "-A", APP)
    assert replayed.stdout.strip() == f"replayed {lost.id} to cli.default.it.missing"
    # The worker still does not know the task: the replay comes back as a new entry.
    dead = await _next_dead_letter(app, after=first_seq)
    assert dead.id == lost.id

    purged = await natask_cli(nats_server.url, "dlq", "purge", "--yes", "-A", APP)
    assert purged.stdout.strip() == "purged 1 dead letter(s)"
    assert await DeadLetters(app).list() == []

    missing = await natask_cli(nats_server.url, "dlq", "show", "nope", "-A", APP)
    assert missing.returncode != 0 and "no dead letter with id 'nope'" in missing.stderr


async def _next_dead_letter(app: Natask, after: int):  # type: ignore[no-untyped-def]
    broker = await app.client.broker()
    sub = await broker.subscribe("natask.dlq.cli.>")
    try:
        entries = [e for e in await DeadLetters(app).list() if e.seq > after]
        if not entries:
            await sub.next_msg(timeout=20)
            entries = [e for e in await DeadLetters(app).list() if e.seq > after]
        return entries[0]
    finally:
        await sub.unsubscribe()


async def test_revoke_command_stops_a_queued_task(nats_server: NatsServer, tmp_path: Path) -> None:
    app = Natask("cli-test", servers=[nats_server.url], subject_prefix="cli")
    try:
        result = await app.asend_task("it.add", [1, 2])
        out = await natask_cli(nats_server.url, "revoke", result.id, "-A", APP)
        assert out.stdout.strip() == f"revoked {result.id}"
        w = await WorkerProcess(nats_server.url, "cli", tmp_path / "log").ready()
        try:
            with pytest.raises(TaskRevoked):
                await result.aget(timeout=20)
        finally:
            w.signal(signal.SIGTERM)
            await w.wait()
        assert not (tmp_path / "log").exists()  # it.add never ran
    finally:
        await app.aclose()


async def test_worker_reports_a_bad_app_clearly(nats_server: NatsServer) -> None:
    out = await natask_cli(nats_server.url, "worker", "-A", "no_such_module:app")
    assert out.returncode == 2 and "cannot import 'no_such_module'" in out.stderr
    out = await natask_cli(nats_server.url, "worker", "-A", "tests.integration.workerapp:nothing")
    assert "has no attribute 'nothing'" in out.stderr
