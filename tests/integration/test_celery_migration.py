"""Celery tutorial-style code (tests/integration/celeryproj) run end to end with only the imports and
the broker URL changed: config_from_object, autodiscover_tasks, shared_task, task_routes, a chain,
a chord and a beat_schedule, through a worker against a real nats-server."""

from __future__ import annotations

import asyncio
import importlib
import sys
from typing import Any

import pytest

from natask.beat.leader import Beat
from natask.hooks import Middleware
from natask.server import NatsServer
from natask.testing import worker

PROJ = "tests.integration.celeryproj"


def fresh_project(monkeypatch: pytest.MonkeyPatch, url: str) -> Any:
    """Import the project as a process would (its app created, current and configured at import)."""
    monkeypatch.setenv("CELERYPROJ_BROKER_URL", url)
    for name in [m for m in sys.modules if m == PROJ or m.startswith(PROJ + ".")]:
        del sys.modules[name]
    return importlib.import_module(f"{PROJ}.celery").app


class Ran(Middleware):
    """Middleware recording the tasks a worker ran (name, args, queue)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[Any, ...], str]] = []
        self.changed = asyncio.Event()

    def after_task(self, request: Any, outcome: Any) -> None:
        self.items.append((request.task, tuple(request.args), request.queue))
        self.changed.set()

    async def wait(self, check: Any, timeout: float = 20) -> None:
        async def until() -> None:
            while not check(self.items):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)


async def test_tutorial_project_runs_through_a_worker(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    app = fresh_project(monkeypatch, nats_server.url)
    assert app.config.servers == (nats_server.url,)
    assert app.config.default_queue == "celery"
    assert app.config.result_ttl == 3600
    ran = Ran()
    app.add_middleware(ran)
    try:
        async with worker(app, queues=["celery", "math", "sums"]):
            # The worker finalized the app: autodiscover_tasks imported tasks.py, its shared tasks registered.
            assert f"{PROJ}.tasks.add" in app.tasks
            assert app.tasks[f"{PROJ}.tasks.add"].options.time_limit == 60  # task_time_limit
            client = importlib.import_module(f"{PROJ}.client")
            results = await asyncio.to_thread(client.run)
            assert results == {"add": 8, "mul": 12, "chain": 33, "chord": 20, "queue": "celery",
                               "queue_call": "math"}
            queues = {(name.rsplit(".", 1)[1], queue) for name, _, queue in ran.items}
            assert ("mul", "math") in queues  # task_routes: exact name
            assert ("xsum", "sums") in queues  # task_routes: glob
            assert ("add", "celery") in queues  # the default queue
            # beat_schedule: the every-second entry fires add(16, 16) through the worker.
            assert app.periodic_entries["nightly-xsum"].schedule == "30 3 * * mon-fri"
            assert app.periodic_entries["nightly-xsum"].tz == "Europe/Oslo"
            beat = Beat(app)
            runner = asyncio.create_task(beat.run())
            try:
                await ran.wait(lambda items: any(args == (16, 16) for _, args, _ in items))
            finally:
                runner.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await runner
    finally:
        await app.aclose()
