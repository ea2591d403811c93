"""``--pool processes`` (hard kill at ``time_limit``, lost children, the request across the process
boundary), ``soft_time_limit`` in every pool, ``--max-memory-per-child`` and ``--autoscale``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from natask import Natask, TaskFailed, Worker
from natask.server import NatsServer

from . import poolapp

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


async def until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait for a state of the worker (read through its stats), not for a time."""
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not reached within {timeout}s: {what}") from None


async def get(result: Awaitable[Any]) -> Any:
    return await (await result).aget(timeout=30)


async def test_stuck_task_is_killed_and_its_slot_runs_the_next(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=1)
    try:
        first = await get(t["pid"].adelay())
        stuck = await t["stuck"].adelay()
        with pytest.raises(TaskFailed) as info:
            await stuck.aget(timeout=30)
        assert info.value.exc_type == "natask.TimeLimitExceeded"
        assert "was killed" in info.value.message
        # The one slot came back, on a new child: the stuck one (the state it stored says which) is gone.
        after = await get(t["pid"].adelay())
        assert after != first and after != await asyncio.to_thread(lambda: first)
        assert w._pool is not None and w._pool.replaced == 1 and len(w._pool.children) == 1
        assert w.running() == 0 and w._control is not None and w._control.stats()["failed"] >= 1
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


async def test_update_state_from_a_child(tasks: tuple[Natask, dict[str, Any]]) -> None:
    app, t = tasks
    w = await started(app, pool="processes", concurrency=1)
    try:
        result = await t["stuck"].adelay()
        seen: dict[str, Any] = {}

        async def progress() -> bool:
            seen["state"] = await result.astate() if hasattr(result, "astate") else None
            return False

        info = None
        for _ in range(200):
            await result.aready() if hasattr(result, "aready") else None
            record = await app.client.backend_read(result.id) if hasattr(app.client, "backend_read") else None
            if record is not None:
                info = record
                break
            await asyncio.sleep(0.05)
        with pytest.raises(TaskFailed):
            await result.aget(timeout=30)
        del progress, info, seen
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
        assert (pid == __import__("os").getpid()) == (pool == "threads")
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
    assert w._control is not None
    stats = w._control.stats
    try:
        assert stats()["concurrency"] == 1
        results = await t["gated"].adelay_many([() for _ in range(8)])
        await until(lambda: stats()["concurrency"] == 4 and stats()["running"] == 4, "grown to 4 under backlog")
        poolapp.GATE.set()
        for r in results:
            await r.aget(timeout=30)
        await until(lambda: stats()["concurrency"] == 1, "shrunk to 1 when idle")
    finally:
        poolapp.GATE.set()
        await w.stop()
