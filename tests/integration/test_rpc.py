"""``.call`` RPC over core NATS request-reply to the queue group."""

from __future__ import annotations

import asyncio

import pytest

from natask import Natask, NoWorkers, ResultTimeout, TaskFailed
from natask.testing import worker


async def test_call_returns_the_result_and_stores_nothing(app: Natask) -> None:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.aadd", queue="fast")
    async def aadd(x: int, y: int) -> int:
        return x + y

    async with worker(app, queues=["default", "fast"]):
        assert await add.acall(2, 3) == 5
        assert await aadd.aapply_call((4, 5), timeout=5) == 9
        assert await asyncio.to_thread(add.call, 1, 1) == 2  # the sync API
        broker = await app.client.broker()
        info = await broker.js.stream_info(app.names.stream)
        assert info.state.messages == 0  # RPC subjects are outside every stream


async def test_call_raises_task_failed_no_workers_and_timeout(app: Natask) -> None:
    @app.task(name="t.fail")
    def fail() -> None:
        raise KeyError("missing")

    @app.task(name="t.hang")
    async def hang() -> None:
        await asyncio.sleep(30)

    with pytest.raises(NoWorkers, match="-Q default"):
        await fail.acall()
    async with worker(app, grace=0):
        with pytest.raises(TaskFailed) as info:
            await fail.acall()
        assert info.value.exc_type == "KeyError"
        with pytest.raises(ResultTimeout):
            await hang.aapply_call(timeout=0.3)


async def test_rpc_shares_the_worker_concurrency_limit(app: Natask) -> None:
    running = 0
    peak = 0

    @app.task(name="t.busy")
    async def busy() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return 1

    async with worker(app, concurrency=2):
        queued = await busy.adelay_many([() for _ in range(6)])
        called = await asyncio.gather(*(busy.acall() for _ in range(6)))
        assert called == [1] * 6 and [await r.aget(timeout=10) for r in queued] == [1] * 6
    assert peak <= 2
