"""Fetching across many queues and large payloads, against a real server: every queue is served,
large arguments drain without the server cutting the worker off, a stopping worker is not handed
messages it would only give back."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from natask import Natask
from natask.task import Task
from natask.testing import worker
from natask.worker import Worker

QUEUES = [f"q{i}" for i in range(100)]


class Started:
    """The queues of the tasks started so far, in order; ``reach(n)`` waits for ``n`` of them."""

    def __init__(self) -> None:
        self.queues: list[str] = []
        self._changed = asyncio.Event()

    def add(self, queue: str) -> None:
        self.queues.append(queue)
        self._changed.set()

    async def reach(self, n: int) -> None:
        while len(self.queues) < n:
            self._changed.clear()
            await self._changed.wait()


def per_queue_tasks(app: Natask, queues: list[str], started: Started) -> dict[str, Task[Any, Any]]:
    """One no-op task per queue, noting its queue when it starts."""
    tasks: dict[str, Task[Any, Any]] = {}
    for queue in queues:
        async def run(i: int, queue: str = queue) -> None:
            started.add(queue)

        tasks[queue] = app.task(name=f"t.{queue}", queue=queue, ignore_result=True)(run)
    return tasks


@pytest.mark.timeout(120)
async def test_a_hundred_queues_with_work_spread_evenly_are_all_served(app: Natask) -> None:
    started = Started()
    tasks = per_queue_tasks(app, QUEUES, started)
    per_queue = 20
    for task in tasks.values():
        await task.adelay_many([(i,) for i in range(per_queue)])
    total = per_queue * len(QUEUES)
    async with worker(app, queues=QUEUES, concurrency=64):
        await started.reach(total)
    assert len(started.queues) == total
    assert all(started.queues.count(q) == per_queue for q in QUEUES)
    # No queue waited for the others: each had started a task before half of all tasks had started.
    first = {q: started.queues.index(q) for q in QUEUES}
    late = {q: i for q, i in first.items() if i >= total // 2}
    assert not late, f"queues first served after half of all tasks: {late}"


@pytest.mark.timeout(120)
async def test_work_in_the_last_of_a_hundred_queues_drains(app: Natask) -> None:
    started = Started()
    tasks = per_queue_tasks(app, QUEUES, started)
    await tasks["q99"].adelay_many([(i,) for i in range(1000)])
    async with worker(app, queues=QUEUES, concurrency=64):
        await started.reach(1000)
        # and work that arrives while the worker watches a hundred idle queues
        await tasks["q99"].adelay_many([(i,) for i in range(500)])
        await started.reach(1500)
    assert started.queues == ["q99"] * 1500


@pytest.mark.timeout(60)
async def test_more_queues_than_slots_are_all_served(app: Natask) -> None:
    queues = [f"s{i}" for i in range(5)]
    started = Started()
    tasks = per_queue_tasks(app, queues, started)
    for task in tasks.values():
        await task.adelay_many([(i,) for i in range(10)])
    async with worker(app, queues=queues, concurrency=2):
        await started.reach(50)
    assert sorted(started.queues) == sorted(q for q in queues for _ in range(10))


@pytest.mark.timeout(120)
async def test_large_arguments_drain_without_the_server_cutting_the_worker_off(app: Natask) -> None:
    done = Started()
    retried: list[int] = []

    @app.task(name="t.big", bind=True, ignore_result=True)
    async def big(self: Any, i: int, blob: bytes) -> None:
        if self.request.retries:
            retried.append(i)
        done.add(str(len(blob)))

    blob = b"x" * 900_000
    n = 150
    for lo in range(0, n, 10):
        await big.adelay_many([(i, blob) for i in range(lo, lo + 10)])
    w = Worker(app, concurrency=64)  # the default byte budget
    await w.start()
    try:
        broker = w.broker_
        await done.reach(n)
        assert broker.nc.stats["reconnects"] == 0, "the server cut the worker off (slow consumer)"
        assert broker.generation == 0
    finally:
        await w.stop()
    assert done.queues == [str(len(blob))] * n
    assert not retried
    async with app:
        pass
    info = await (await app.client.broker()).js.consumer_info(app.names.stream, app.names.consumer("default"))
    assert info.num_redelivered == 0 and info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.timeout(60)
async def test_a_stopping_worker_is_not_handed_the_same_message_again(app: Natask) -> None:
    draining = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "draining" in record.getMessage():
                draining.set()

    logger = logging.getLogger("natask.worker")
    watch, level = Watch(logging.INFO), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    gate, holding = asyncio.Event(), asyncio.Event()
    attempts: list[int] = []

    @app.task(name="t.hold", ignore_result=True)
    async def hold() -> None:
        holding.set()
        await gate.wait()

    @app.task(name="t.quick", bind=True)
    def quick(self: Any) -> int:
        attempts.append(self.request.retries)
        return 1

    acks: list[tuple[str, bytes]] = []  # what workers answer on deliveries (-NAK: handed back)

    async def on_ack(msg: Any) -> None:
        acks.append((msg.subject, msg.data))

    broker = await app.client.broker()
    await broker.subscribe(f"$JS.ACK.{app.names.stream}.>", cb=on_ack)
    first = Worker(app, concurrency=8)
    await first.start()
    await hold.adelay()
    await holding.wait()
    stopping = asyncio.create_task(first.stop(grace=30))  # waits for `hold`, its requests still open
    try:
        await draining.wait()
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
    result = await quick.adelay()
    async with worker(app):
        assert await result.aget(timeout=20) == 1
    # Delivered once, to the running worker: never bounced off the stopping one (which would also
    # have counted each bounce as an attempt against max_retries).
    assert attempts == [0], f"the worker answers seen: {acks}"
    gate.set()
    await stopping


@pytest.mark.timeout(120)
async def test_large_arguments_reach_a_worker_watching_several_queues(app: Natask) -> None:
    # Looks at idle queues expect small messages: a large one ends the look (409) and is fetched by
    # a request sized for the server's max_payload.
    done = Started()

    @app.task(name="t.big2", queue="bulk", ignore_result=True)
    async def big(i: int, blob: bytes) -> None:
        done.add(str(len(blob)))

    blob = b"y" * 900_000
    queues = ["default", "bulk", "other"]
    w = Worker(app, queues=queues, concurrency=16)
    await w.start()
    try:
        await big.adelay(0, blob)  # into an idle queue a look is waiting on
        await done.reach(1)
        for lo in range(1, 41, 10):
            await big.adelay_many([(i, blob) for i in range(lo, lo + 10)])
        await done.reach(41)
        assert w.broker_.nc.stats["reconnects"] == 0
    finally:
        await w.stop()
    assert done.queues == [str(len(blob))] * 41


@pytest.mark.timeout(60)
async def test_a_deleted_consumer_among_several_queues_is_recreated(app: Natask) -> None:
    @app.task(name="t.add", queue="b")
    def add(x: int, y: int) -> int:
        return x + y

    async with worker(app, queues=["a", "b", "c"]):
        assert await (await add.adelay(1, 2)).aget(timeout=10) == 3
        broker = await app.client.broker()
        await broker.js.delete_consumer(app.names.stream, "b")
        assert await (await add.adelay(2, 3)).aget(timeout=30) == 5
        await broker.js.delete_stream(app.names.stream)  # the producer recreates it, the worker its consumers
        assert await (await add.adelay(3, 4)).aget(timeout=30) == 7
