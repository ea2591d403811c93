"""The Django example project (examples/django) with Django's own test client, against a real
nats-server and an in-process worker: CELERY_* settings, autodiscover_tasks, a view that enqueues,
and delay_on_commit (sent when the transaction commits, never on a rollback)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from natask.server import NatsServer
from natask.testing import worker

pytest.importorskip("django")

PROJECT = Path(__file__).resolve().parents[2] / "examples" / "django"


class Ran:
    """Middleware recording the tasks a worker ran (name, args, queue)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[Any, ...], str]] = []
        self.changed = asyncio.Event()

    def after_task(self, request: Any, outcome: Any) -> None:
        self.items.append((request.task, tuple(request.args), request.queue))
        self.changed.set()

    async def wait_for(self, item: tuple[str, tuple[Any, ...], str]) -> None:
        while item not in self.items:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 20)


async def test_django_project(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "proj.settings")
    monkeypatch.syspath_prepend(str(PROJECT))
    for name in [m for m in sys.modules if m.split(".")[0] in ("proj", "orders")]:
        del sys.modules[name]
    import django
    from django.db import transaction
    from django.test import Client

    django.setup()
    from proj import celery_app as app

    from natask.hooks import Middleware

    ran = type("DjangoRan", (Ran, Middleware), {})()
    app.add_middleware(ran)
    try:
        assert app.config.default_queue == "django"  # CELERY_TASK_DEFAULT_QUEUE
        client = Client()
        async with worker(app, queues=["django", "mail"]):
            # Django's views and ORM are sync-only: the test client runs in a thread, as a WSGI server would.
            response = await asyncio.to_thread(client.get, "/add", {"x": 2, "y": 3})
            assert response.status_code == 202
            task_id = json.loads(response.content)["task_id"]
            await ran.wait_for(("orders.tasks.add", (2, 3), "django"))  # found by autodiscover_tasks
            response = await asyncio.to_thread(client.get, f"/result/{task_id}")
            assert json.loads(response.content) == {"state": "SUCCESS", "result": 5}

            def rolled_back() -> None:
                from orders.tasks import send_receipt

                with pytest.raises(RuntimeError), transaction.atomic():
                    send_receipt.delay_on_commit("never")
                    raise RuntimeError("rollback")

            await asyncio.to_thread(rolled_back)
            response = await asyncio.to_thread(client.get, "/orders", {"order": "A-7"})
            assert response.status_code == 201
            await ran.wait_for(("orders.tasks.send_receipt", ("A-7",), "mail"))  # CELERY_TASK_ROUTES
        assert [item for item in ran.items if item[0].endswith("send_receipt")] == [
            ("orders.tasks.send_receipt", ("A-7",), "mail")]  # the rolled-back call was never sent
    finally:
        await app.aclose()
        os.environ.pop("DJANGO_SETTINGS_MODULE", None)


def test_delay_on_commit_needs_django(monkeypatch: pytest.MonkeyPatch) -> None:
    from natask import ConfigError, Natask

    app = Natask("nodjango")
    add = app.task(name="t.add")(lambda x, y: x + y)
    monkeypatch.setitem(sys.modules, "django.db", None)  # as if Django were not installed
    with pytest.raises(ConfigError, match="Django is not installed: call delay"):
        add.delay_on_commit(1, 2)
