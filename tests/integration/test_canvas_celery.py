"""Celery's canvas surface against a real nats-server and an in-process worker: map/starmap/chunks,
link/on_error, group.link, nested groups unrolled, app.signature/task.signature, freeze, saved groups,
new-style errbacks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from natask import GroupResult, Natask, ResultError, TaskFailed, chord, group
from natask.options import Request
from natask.testing import worker


class Calls:
    """What the test tasks were called with; lets a test await the n-th call."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._loop.call_soon_threadsafe(self._changed.set)

    async def wait(self, n: int, timeout: float = 20) -> list[Any]:
        async def until() -> None:
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)
        return self.items


def tasks(app: Natask) -> tuple[Any, Any, Any]:
    @app.task(name="c.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="c.square")
    def square(x: int) -> int:
        return x * x

    @app.task(name="c.total")
    def total(xs: list[int]) -> int:
        return sum(xs)

    return add, square, total


async def test_map_starmap_and_chunks_run_on_a_worker(app: Natask) -> None:
    add, square, _ = tasks(app)
    async with worker(app):
        assert await (await square.map([1, 2, 3]).adelay()).aget(timeout=20) == [1, 4, 9]
        assert await (await add.starmap([(1, 1), (2, 3)]).adelay()).aget(timeout=20) == [2, 5]
        parts = await add.chunks([(i, i) for i in range(5)], 2).adelay()
        assert isinstance(parts, GroupResult) and len(parts) == 3
        assert await parts.aget(timeout=20) == [[0, 2], [4, 6], [8]]


async def test_nested_groups_give_flat_results_as_in_celery(app: Natask) -> None:
    add, _, total = tasks(app)
    async with worker(app):
        res = await group(add.s(1, 10), group(add.s(1, 100), group(add.s(1, 1000), add.s(1, 2000)))).adelay()
        assert await res.aget(timeout=20) == [11, 101, 1001, 2001]
        body = await chord(group(add.s(1, 1), group(add.s(2, 2), add.s(3, 3))), total.s()).adelay()
        assert await body.aget(timeout=20) == 12  # the body got [2, 4, 6]


async def test_link_on_error_and_group_link(app: Natask) -> None:
    add, _, _ = tasks(app)
    calls = Calls()

    @app.task(name="c.record")
    def record(value: Any) -> None:
        calls.add(value)

    @app.task(name="c.bad")
    def bad() -> None:
        raise ValueError("nope")

    async with worker(app):
        sig = add.s(2, 2)
        sig.link(record.s())
        await sig.adelay()
        assert await calls.wait(1) == [4]
        failed = await bad.s().on_error(record.s()).adelay()
        with pytest.raises(TaskFailed):
            await failed.aget(timeout=20)
        assert (await calls.wait(2))[1] == failed.id  # an old-style errback gets the failed task's id
        g = group(add.s(1, 1), add.s(2, 2))
        g.link(record.s("after first"))
        await (await g.adelay()).aget(timeout=20)
        assert (await calls.wait(3))[2] == "after first"


async def test_new_style_errback_gets_request_exception_and_traceback(app: Natask) -> None:
    calls = Calls()

    @app.task(name="c.fails")
    def fails(x: int) -> None:
        raise KeyError(x)

    @app.task(name="c.on_error")
    def on_error(request: Request, exc: BaseException, traceback: str) -> None:
        calls.add((request.id, request.args, type(exc).__name__, getattr(exc, "exc_type", ""), "KeyError" in traceback))

    async with worker(app):
        res = await fails.aapply_async((7,), link_error=on_error.s())
        (got,) = await calls.wait(1)
        assert got == (res.id, [7], "TaskFailed", "KeyError", True)


async def test_signatures_by_name_with_options_and_freeze(app: Natask) -> None:
    add, _, _ = tasks(app)
    async with worker(app):
        by_name = app.signature("c.add", (1, 2), queue=add.queue)
        assert await (await by_name.adelay()).aget(timeout=20) == 3
        sig = add.signature((5,), {"y": 6}, countdown=0)
        frozen = sig.freeze()
        sent = await sig.adelay()
        assert sent.id == frozen.id and await frozen.aget(timeout=20) == 11
        assert await sig() == 11  # calling a signature runs it here (a coroutine for an async task)


async def test_group_result_save_and_restore(app: Natask) -> None:
    add, _, _ = tasks(app)
    async with worker(app):
        res = await group(add.s(1, 1), add.s(2, 2)).adelay()
        await res.asave()
        again = await GroupResult.arestore(app, res.id)
        assert [r.id for r in again] == [r.id for r in res]
        assert await again.aget(timeout=20) == [2, 4]
        restored = await asyncio.to_thread(app.GroupResult, res.id)
        assert len(restored) == 2 and restored.id == res.id
        await res.adelete()
        with pytest.raises(ResultError, match="no saved group"):
            await GroupResult.arestore(app, res.id)


async def test_replace_takes_the_tasks_place_and_the_chain_goes_on(app: Natask) -> None:
    add, _, total = tasks(app)
    calls = Calls()

    @app.task(name="c.record")
    def record(value: Any) -> None:
        calls.add(value)

    @app.task(name="c.fan", bind=True)
    def fan(self: Any, n: int, how: str) -> Any:
        if how == "task":
            return self.replace(add.s(n, 1))
        if how == "chain":
            return self.replace(add.s(n, 1) | add.s(100))
        return self.replace(group(add.s(n, 1), add.s(n, 2)))

    async with worker(app):
        assert await (await fan.adelay(1, "task")).aget(timeout=20) == 2
        assert await (await fan.adelay(1, "chain")).aget(timeout=20) == 102
        assert await (await fan.adelay(1, "group")).aget(timeout=20) == [2, 3]
        piped = await (fan.s(1, "task") | add.s(10) | add.s(100)).adelay()
        assert await piped.aget(timeout=20) == 112
        linked = await fan.aapply_async((5, "task"), link=record.s())
        assert await linked.aget(timeout=20) == 6
        assert await calls.wait(1) == [6]  # the replaced task's link moved to its replacement
        # A replacement in a chord header completes that member.
        assert await (await chord([fan.s(1, "task"), add.s(1, 2)], total.s()).adelay()).aget(timeout=20) == 5
