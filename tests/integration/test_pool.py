"""``--pool processes`` (hard kill at ``time_limit``, lost children, the request across the process
boundary), ``soft_time_limit`` in every pool, ``--max-memory-per-child`` and ``--autoscale``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from natask import Natask, TaskFailed, Worker
from natask.server import NatsServer

from . import poolapp
from .helpers import KVEvents

SPEC = "tests.integration.poolapp:app"


@pytest.fixture
async def tasks(nats_server: NatsServer) -> AsyncIterator[tuple[Natask, dict[str, Any]]]:
    app = Natask("pool", servers=[nats_server.url], subject_prefix="pool", ack_wait=5)
    try:
        yield app, poolapp.register(app)
    finally:
        await app.aclose()


async def started(app: Natask, **options: Any) -> Worker:
    w = Worker(app, app_spec=SPEC, grace=5, **options)
    await w.start()
    return w


def watch_resizes(w: Worker) -> asyncio.Condition:
    """A condition notified each time the autoscaler resizes ``w``: the test waits on states, not times."""
    changed = asyncio.Condition()
    resize = w.resize

    def resized(concurrency: int) -> None:
        resize(concurrency)

        async def notify() -> None:
            async with changed:
                changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    w.resize = resized  # type: ignore[method-assign]
    return changed


async def until(changed: asyncio.Condition, check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    try:
        async with changed:
            await asyncio.wait_for(changed.wait_for(check), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not reached within {timeout}s: {what}") from None


async def get(result: Awaitable[Any]) -> Any:
    return await (await result).aget(timeout=30)


async def test_stuck_task_is_killed_and_its_slot_runs_the_next(tasks: tuple[Natask, dict[str, Any]],
                                                               nats_server: NatsServer) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=1)
    try:
        first = await get(t["pid"].adelay())
        async with KVEvents(nats_server.url, "pool") as events:
            stuck = await t["stuck"].adelay()
            await events.reached(stuck.id, "PROGRESS")  # update_state from the child, stored by the worker
        progress = [await stuck.ainfo()]
        assert progress == [{"pid": first, "id": stuck.id}]  # the child's pid, its own request
        assert first != os.getpid()
        with pytest.raises(TaskFailed) as info:
            await stuck.aget(timeout=30)
        assert info.value.exc_type == "natask.TimeLimitExceeded"
        assert "was killed" in info.value.message
        # The one slot came back and runs the next task, on a new child: the stuck one is gone.
        after = await get(t["pid"].adelay())
        assert after != first
        assert w._pool is not None and w._pool.replaced == 1 and len(w._pool.children) == 1
    finally:
        await w.stop()


async def test_request_retry_and_errors_cross_the_process_boundary(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=2)
    try:
        result = await t["retry_once"].adelay()
        assert await result.aget(timeout=30) == [1, result.id]  # bind, self.request, self.retry()
        with pytest.raises(TaskFailed) as info:
            await get(t["fails"].adelay())
        assert info.value.exc_type == "KeyError" and "raise KeyError" in info.value.traceback
        with pytest.raises(TaskFailed) as info:
            await get(t["die"].adelay())
        assert info.value.exc_type == "natask.WorkerLostError" and "exited with 7" in info.value.message
        assert isinstance(await get(t["pid"].adelay()), int)  # a new child took over
    finally:
        await w.stop()


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_soft_time_limit_raised_in_def_tasks(tasks: tuple[Natask, dict[str, Any]], pool: str) -> None:
    app, t = tasks
    w = await started(app, pool=pool, concurrency=2)
    try:
        state, pid = await get(t["soft"].adelay())
        assert state == "cleaned"
        state, pid = await get(t["soft_call"].aapply_async(soft_time_limit=0.3))  # the call option
        assert state == "cleaned"
        assert (pid == os.getpid()) == (pool == "threads")
    finally:
        await w.stop()


async def test_soft_time_limit_raised_in_async_tasks(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=1)  # async tasks stay on the loop
    try:
        assert await get(t["asoft"].adelay()) == "cleaned"
        assert await get(t["asoft"].aapply_async(soft_time_limit=0.2)) == "cleaned"
    finally:
        await w.stop()


async def test_child_above_max_memory_is_replaced(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=1, max_memory_per_child=250_000)
    try:
        one = await get(t["pid"].adelay())
        assert await get(t["pid"].adelay()) == one  # below the limit: the same child
        assert await get(t["hog"].adelay(400)) == one  # the task that crosses it finishes there
        assert await get(t["pid"].adelay()) != one  # then the child is replaced
        assert w._pool is not None and w._pool.replaced == 1
    finally:
        await w.stop()


async def test_autoscale_grows_under_backlog_and_shrinks_when_idle(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    poolapp.GATE.clear()
    w = await started(app, autoscale=(4, 1), autoscale_idle=1.0)
    changed = watch_resizes(w)
    assert w._control is not None
    stats = w._control.stats  # what `natask inspect stats` answers
    try:
        assert stats()["concurrency"] == 1
        results = await t["gated"].adelay_many([() for _ in range(8)])
        await until(changed, lambda: stats()["concurrency"] == 4, "grown to 4 under backlog")
        poolapp.GATE.set()
        for r in results:
            await r.aget(timeout=30)
        await until(changed, lambda: stats()["concurrency"] == 1, "shrunk to 1 when idle")
    finally:
        poolapp.GATE.set()
        await w.stop()


async def test_replace_and_map_in_the_process_pool(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=2)
    try:
        n, child = await (await t["replaced"].adelay(7)).aget(timeout=30)
        assert n == 7 and child != os.getpid()  # the replacement ran in a child too
        pids = await (await t["pid"].starmap([(), ()]).adelay()).aget(timeout=30)
        assert len(pids) == 2 and os.getpid() not in pids  # natask.starmap runs in a child as well
    finally:
        await w.stop()
