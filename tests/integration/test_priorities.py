"""Priorities and expiry before delivery, against a real server: a priority-9 task overtakes a
backlog of 10,000 priority-0 tasks as soon as a slot frees, queues stay fair while one of them has
priorities, a retry keeps its priority, and an expired task is removed by the server unrun."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from natask import Natask, TaskRevoked
from natask.testing import worker


class Starts:
    """What started, in order; ``reach(n)`` waits for ``n`` starts."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self._changed = asyncio.Event()

    def add(self, what: str) -> None:
        self.order.append(what)
        self._changed.set()

    async def reach(self, n: int) -> None:
        while len(self.order) < n:
            self._changed.clear()
            await self._changed.wait()


class LevelFetched(logging.Handler):
    """Set once the worker logs that it fetches a priority level (it learns of new ones from the
    server's consumer-created advisory)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("fetching priority"):
            self.seen.set()


@pytest.mark.timeout(120)
async def test_a_priority_9_task_starts_in_the_first_free_slot_ahead_of_10000_queued_tasks(
        app: Natask, caplog: pytest.LogCaptureFixture) -> None:
    starts = Starts()
    opened = asyncio.Event()
    gate = asyncio.Semaphore(0)

    @app.task(name="prio.low", ignore_result=True)
    async def low(i: int) -> None:
        starts.add("low")
        if not opened.is_set():
            await gate.acquire()

    @app.task(name="prio.high", ignore_result=True, priority=9)
    async def high() -> None:
        starts.add("high")

    await low.adelay_many([(i,) for i in range(10_000)])
    caplog.set_level(logging.INFO, logger="natask.worker")
    fetched = LevelFetched()
    logging.getLogger("natask.worker").addHandler(fetched)
    try:
        async with worker(app, concurrency=2):
            await starts.reach(2)  # both slots hold a priority-0 task that waits
            await high.adelay()  # the first priority-9 call creates the level's consumer
            await fetched.seen.wait()
            gate.release()  # one slot frees
            await starts.reach(3)
            assert starts.order == ["low", "low", "high"]
            opened.set()
            gate.release()
            gate.release()
    finally:
        logging.getLogger("natask.worker").removeHandler(fetched)


@pytest.mark.timeout(120)
async def test_a_queue_with_a_priority_backlog_keeps_its_share_and_serves_higher_levels_first(app: Natask) -> None:
    starts = Starts()

    for queue in ("a", "b"):
        async def run(level: int, queue: str = queue) -> None:
            starts.add(f"{queue}{level}")

        app.task(name=f"fair.{queue}", queue=queue, ignore_result=True)(run)
    task_a, task_b = app.tasks["fair.a"], app.tasks["fair.b"]
    n = 300
    await task_a.adelay_many([(0,) for _ in range(n)])
    await task_b.adelay_many([(0,) for _ in range(n)])
    await task_a.aapply_async((9,), priority=9)  # the first call of a level makes its consumer
    await asyncio.gather(*(task_a.aapply_async((9,), priority=9) for _ in range(n - 1)))
    async with worker(app, queues=["a", "b"], concurrency=4):
        await starts.reach(3 * n)
    first = starts.order[: 2 * n]
    # Fairness across queues: b is served alongside a's two levels, not after them.
    assert first.count("b0") >= n // 2, first.count("b0")
    a_starts = [s for s in starts.order if s.startswith("a")]
    # Within a: priority 9 first, while priority 0 keeps a share of the turns (never starved).
    assert a_starts[:n].count("a9") >= n * 3 // 4, a_starts[:n].count("a9")
    assert 1 <= a_starts[:n].count("a0")


@pytest.mark.timeout(60)
async def test_a_retried_task_keeps_its_priority(app: Natask) -> None:
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()

    @app.task(name="prio.flaky", bind=True, max_retries=2, retry_backoff=0.0, retry_jitter=False)
    async def flaky(self: Any) -> str:
        seen.append((self.request.priority, self.request.retries))
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        done.set()
        return "ok"

    result = await flaky.aapply_async(priority=7)
    async with worker(app, concurrency=2):
        assert await result.aget(timeout=30) == "ok"
    assert seen == [(7, 0), (7, 1)]


@pytest.mark.timeout(60)
async def test_a_signature_carries_its_priority_and_the_task_default_applies(app: Natask) -> None:
    seen: list[int] = []

    @app.task(name="prio.step", bind=True, priority=3)
    async def step(self: Any, x: int) -> int:
        seen.append(self.request.priority)
        return x + 1

    async with worker(app, concurrency=2):
        workflow = await (step.s(1) | step.s().set(priority=8)).aapply_async()
        assert await workflow.aget(timeout=30) == 3
        assert await (await step.aapply_async((5,))).aget(timeout=30) == 6
    assert seen == [3, 8, 3]


@pytest.mark.timeout(60)
async def test_an_expired_task_is_removed_by_the_server_never_delivered_and_reads_revoked(app: Natask) -> None:
    ran: list[str] = []

    @app.task(name="exp.task")
    async def task(tag: str) -> str:
        ran.append(tag)
        return tag

    expiring = await task.aapply_async(("expired",), expires=1)
    with pytest.raises(TaskRevoked, match="expired"):
        await expiring.aget(timeout=20)  # nobody consumes: the server drops it at its TTL
    assert await expiring.astate() == "REVOKED"
    assert await app.AsyncResult(expiring.id).ainfo() == {"reason": "expired"}  # stored for every reader
    async with worker(app, concurrency=2) as w:
        assert await (await task.adelay("after")).aget(timeout=20) == "after"
        assert w.processed == 1
    assert ran == ["after"]


@pytest.mark.timeout(60)
async def test_a_stream_made_without_message_ttl_gets_it_and_expired_tasks_are_removed(app: Natask) -> None:
    import nats
    from nats.js.api import RetentionPolicy, StreamConfig

    nc = await nats.connect(app.config.servers[0])
    try:  # the task stream as a natask without per-message TTL made it
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=app.names.stream, subjects=app.names.stream_subjects,
                                         retention=RetentionPolicy.WORK_QUEUE, allow_msg_schedules=True,
                                         allow_direct=True))

        @app.task(name="exp.old")
        async def task() -> None: ...

        expiring = await task.aapply_async(expires=1)
        assert (await js.stream_info(app.names.stream)).config.allow_msg_ttl
        with pytest.raises(TaskRevoked, match="expired"):
            await expiring.aget(timeout=20)
        assert (await js.stream_info(app.names.stream)).state.messages == 0
    finally:
        await nc.close()


async def test_purge_empties_every_priority_level_of_the_queue(app: Natask) -> None:
    from natask.control import purge

    task = app.task(name="prio.purged", queue="pq")(lambda: None)
    await task.adelay_many([() for _ in range(3)])
    await task.aapply_async(priority=9)
    await task.aapply_async(priority=4)
    other = app.task(name="prio.kept", queue="pq2")(lambda: None)
    await other.aapply_async(priority=9)
    assert await purge(app, "pq") == 5
    broker = await app.client.broker()
    state = await broker.stream_state(app.names.stream, app.names.priority_filter("pq2", 9))
    assert state is not None and sum(state.subjects.values()) == 1  # another queue's level is kept
