"""Tasks for the pool tests (``test_pool.py``): the process pool's children import ``app`` from here;
the tests register the same tasks on an app of their own server with ``register``."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from natask import Natask, SoftTimeLimitExceeded, Task

GATE = threading.Event()
"""Opened by the autoscale test: ``pool.gated`` tasks (thread pool, in the test's process) wait for it."""


def register(app: Natask) -> dict[str, Task[Any, Any]]:
    """The pool tests' tasks on ``app``, by short name."""

    @app.task(name="pool.pid")
    def pid() -> int:
        return os.getpid()

    @app.task(name="pool.stuck", bind=True, time_limit=1, max_retries=0)
    def stuck(self: Task[Any, Any]) -> None:
        self.update_state("PROGRESS", {"pid": os.getpid(), "id": self.request.id})
        while True:
            time.sleep(0.05)

    def wait_it_out() -> list[Any]:
        try:
            for _ in range(600):  # short sleeps: a thread gets an async exception between two of them
                time.sleep(0.05)
        except SoftTimeLimitExceeded:
            return ["cleaned", os.getpid()]
        return ["not interrupted", os.getpid()]

    app.task(name="pool.soft", soft_time_limit=0.3, time_limit=20)(wait_it_out)
    app.task(name="pool.soft_call", time_limit=20)(wait_it_out)

    @app.task(name="pool.asoft", soft_time_limit=0.3)
    async def asoft() -> str:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0)  # cleanup may await
            return "cleaned"
        return "not interrupted"

    @app.task(name="pool.hog")
    def hog(mb: int) -> int:
        block = b"x" * (mb * 1024 * 1024)  # touched: resident
        del block
        return os.getpid()

    @app.task(name="pool.die", max_retries=0)
    def die() -> None:
        os._exit(7)

    @app.task(name="pool.retry_once", bind=True)
    def retry_once(self: Task[Any, Any]) -> list[Any]:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return [self.request.retries, self.request.id]

    @app.task(name="pool.fails")
    def fails() -> None:
        raise KeyError("missing")

    @app.task(name="pool.gated")
    def gated() -> None:
        GATE.wait(60)

    @app.task(name="pool.replaced", bind=True)
    def replaced(self: Task[Any, Any], n: int) -> Any:
        return self.replace(pid.si() | replaced_by.s(n))

    @app.task(name="pool.replaced_by")
    def replaced_by(child_pid: int, n: int) -> list[int]:
        return [n, child_pid]

    return {t.name.split(".", 1)[1]: t for t in (pid, stuck, hog, die, retry_once, fails, gated, asoft, replaced,
                                                  app.tasks["pool.soft"], app.tasks["pool.soft_call"])}


app = Natask("pool")
register(app)
