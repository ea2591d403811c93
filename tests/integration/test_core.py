"""Calling, running and results against a real nats-server, with an in-process worker."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import uuid
from decimal import Decimal

import nats
import nats.aio.msg
import pytest

from natask import (
    EncodeError,
    Natask,
    PayloadTooLarge,
    ResultError,
    ResultTimeout,
    TaskFailed,
)
from natask.server import NatsServer
from natask.testing import worker


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_sync_and_async_tasks_return_results(app: Natask) -> None:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.aadd")
    async def aadd(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x + y

    async with worker(app):
        r1 = await add.adelay(2, 3)
        r2 = await aadd.adelay(4, 5)
        assert await r1.aget(timeout=10) == 5
        assert await r2.aget(timeout=10) == 9
    # The outcome is known locally after get(): no I/O needed (the server may even be gone).
    assert r1.state == "SUCCESS" and r1.ready() and r1.successful() and not r1.failed()
    assert r1.info == 5


async def test_every_wire_type_round_trips_through_a_worker(app: Natask) -> None:
    @app.task(name="t.echo")
    def echo(value: object, point: Point) -> list[object]:
        assert isinstance(point, Point)
        return [value, point]

    value = [dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc), dt.date(2026, 1, 2), dt.time(3, 4),
             dt.timedelta(seconds=-3.5), uuid.UUID(int=7), Decimal("1.10"), b"\x00\xff", {1, 2}, (1, (2, 3))]
    async with worker(app):
        out = await (await echo.adelay(value, Point(1, 2))).aget(timeout=10)
    assert out[0] == value
    assert out[1] == {"x": 1, "y": 2}  # the caller's side has no annotation to rebuild it from


async def test_result_from_another_app_instance(app: Natask, nats_server: NatsServer) -> None:
    @app.task(name="t.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    async with worker(app):
        result = await mul.adelay(6, 7)
        assert await result.aget(timeout=10) == 42
    other = Natask("other", servers=[nats_server.url])
    try:
        rebuilt = other.AsyncResult(result.id)
        assert await rebuilt.aget(timeout=10) == 42  # read back from the KV bucket
        assert rebuilt.state == "SUCCESS"
    finally:
        await other.aclose()


async def test_get_from_other_process_waits_for_a_result_still_to_come(app: Natask, nats_server: NatsServer) -> None:
    @app.task(name="t.slow")
    async def slow() -> str:
        await asyncio.sleep(0.3)
        return "done"

    other = Natask("other", servers=[nats_server.url])
    try:
        result = await slow.adelay()
        waiting = asyncio.create_task(other.AsyncResult(result.id).aget(timeout=20))
        async with worker(app):
            assert await waiting == "done"
    finally:
        await other.aclose()


async def test_failure_carries_type_message_and_traceback(app: Natask) -> None:
    @app.task(name="t.boom")
    def boom(n: int) -> None:
        raise ValueError(f"bad n={n}")

    async with worker(app):
        result = await boom.adelay(3)
        with pytest.raises(TaskFailed) as info:
            await result.aget(timeout=10)
    assert info.value.exc_type == "ValueError"
    assert info.value.message == "bad n=3"
    assert "raise ValueError" in info.value.traceback
    assert result.state == "FAILURE" and result.failed()
    assert isinstance(await result.aget(propagate=False), TaskFailed)


async def test_tasks_enqueued_before_any_worker_are_kept(app: Natask) -> None:
    @app.task(name="t.inc")
    def inc(x: int) -> int:
        return x + 1

    results = [await inc.adelay(i) for i in range(20)]
    async with worker(app):
        values = [await r.aget(timeout=10) for r in results]
    assert values == list(range(1, 21))


async def test_plain_subscriber_sees_every_call(app: Natask, nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    seen: list[str] = []
    got = asyncio.Event()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)
        if len(seen) >= 2:
            got.set()

    sub = await nc.subscribe("tasks.>", cb=on_msg)
    await nc.flush()

    @app.task(name="orders.process", queue="orders")
    def process(order_id: int) -> int:
        return order_id

    await process.adelay(1)
    await app.asend_task("mail.send", ["x"], queue="emails")
    await asyncio.wait_for(got.wait(), 10)
    assert seen == ["tasks.orders.orders.process", "tasks.emails.mail.send"]
    await sub.unsubscribe()
    await nc.close()


async def test_same_task_id_twice_runs_once(app: Natask) -> None:
    calls: list[int] = []

    @app.task(name="t.once")
    def once(x: int) -> int:
        calls.append(x)
        return x

    r1 = await once.aapply_async((1,), task_id="fixed-id-1")
    r2 = await once.aapply_async((1,), task_id="fixed-id-1")
    async with worker(app) as w:
        assert await r1.aget(timeout=10) == 1
        assert await r2.aget(timeout=10) == 1
        marker = await once.adelay(2)  # runs after the duplicate would have
        assert await marker.aget(timeout=10) == 2
        assert w.processed == 2
    assert calls == [1, 2]


async def test_queues_route_to_their_workers(app: Natask) -> None:
    @app.task(name="t.where", queue="emails")
    def where() -> str:
        return "emails"

    async with worker(app, queues=["default"]):
        result = await where.adelay()
        with pytest.raises(ResultTimeout):
            await result.aget(timeout=0.5)
    async with worker(app, queues=["emails"]):
        assert await result.aget(timeout=10) == "emails"
        other = await where.aapply_async(queue="default")
    async with worker(app, queues=["default"]):
        assert await other.aget(timeout=10) == "emails"


async def test_delay_many_returns_one_result_each_in_order(app: Natask) -> None:
    @app.task(name="t.sq")
    async def sq(x: int) -> int:
        return x * x

    results = await sq.adelay_many([(i,) for i in range(300)])
    assert len({r.id for r in results}) == 300
    async with worker(app, concurrency=32):
        assert [await r.aget(timeout=20) for r in results] == [i * i for i in range(300)]


async def test_bind_gives_request_id_and_retries(app: Natask) -> None:
    @app.task(name="t.whoami", bind=True)
    def whoami(self, tag: str) -> list[object]:  # type: ignore[no-untyped-def]
        return [self.request.id, self.request.retries, tag]

    @app.task(name="t.awhoami", bind=True)
    async def awhoami(self, tag: str) -> list[object]:  # type: ignore[no-untyped-def]
        return [self.request.id, self.request.retries, tag]

    async with worker(app):
        r1 = await whoami.adelay("a")
        r2 = await awhoami.adelay("b")
        assert await r1.aget(timeout=10) == [r1.id, 0, "a"]
        assert await r2.aget(timeout=10) == [r2.id, 0, "b"]


async def test_ignore_result_get_raises_at_once(app: Natask) -> None:
    ran = asyncio.Event()

    @app.task(name="t.fire", ignore_result=True)
    async def fire() -> int:
        ran.set()
        return 1

    async with worker(app):
        result = await fire.adelay()
        with pytest.raises(ResultError, match="ignore_result"):
            await result.aget(timeout=10)
        await asyncio.wait_for(ran.wait(), 10)


async def test_result_timeout_is_a_timeout_error(app: Natask) -> None:
    result = await app.asend_task("t.nobody", [1])
    with pytest.raises(TimeoutError):
        await result.aget(timeout=0.2)
    with pytest.raises(ResultTimeout, match=result.id):
        await result.aget(timeout=0.1)


async def test_unencodable_argument_fails_at_delay(app: Natask) -> None:
    @app.task(name="t.take")
    def take(user: object) -> None: ...

    with pytest.raises(EncodeError, match="user"):
        await take.adelay(user=object())
    with pytest.raises(TypeError, match=r"t\.take"):
        await take.adelay(1, 2)


async def test_payload_too_large_counts_headers(nats_server: NatsServer) -> None:
    app = Natask("test", servers=[nats_server.url], large_payload_limit=0)  # no Object Store share
    @app.task(name="t.big")
    def big(data: bytes) -> int:
        return len(data)

    broker = await app.client.broker()
    limit = broker.nc.max_payload
    with pytest.raises(PayloadTooLarge) as info:
        await big.adelay(b"x" * (limit - 20))  # under the limit alone, over it with headers
    assert info.value.limit == limit and info.value.size > limit
    assert broker.nc.is_connected  # refused before sending: the server never dropped us
    await app.aclose()


async def test_sync_api_from_threads_and_successive_loops(nats_server: NatsServer) -> None:
    app = Natask("sync", servers=[nats_server.url])
    add = app.task(name="s.add")(lambda x, y: x + y)
    ids: list[str] = []

    def produce() -> None:
        ids.append(add.delay(1, 2).id)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 4

    def run_twice() -> list[int]:
        async def once(i: int) -> int:
            async with worker(app):
                return await (await add.adelay(i, i)).aget(timeout=10)  # type: ignore[no-any-return]

        return [asyncio.run(once(1)), asyncio.run(once(2))]

    assert await asyncio.to_thread(run_twice) == [2, 4]
    # The results of the first four, read from another thread through the sync API.
    assert await asyncio.to_thread(lambda: [app.AsyncResult(i).get(timeout=10) for i in ids]) == [3] * 4
    await asyncio.to_thread(app.close)
    assert not [t for t in threading.enumerate() if t.name.startswith("natask-io") and t.is_alive()]


async def test_update_state_reports_progress_and_final_state_wins(app: Natask, nats_server: NatsServer) -> None:
    from .helpers import KVEvents

    go_on = asyncio.Event()

    @app.task(name="t.progress", bind=True)
    async def progress(self, total: int) -> str:  # type: ignore[no-untyped-def]
        self.update_state(state="PROGRESS", meta={"done": 1, "total": total})
        await go_on.wait()
        return "finished"

    @app.task(name="t.sync_progress", bind=True)
    def sync_progress(self) -> str:  # type: ignore[no-untyped-def]
        self.update_state("HALFWAY", {"pct": 50})
        return "ok"

    async with worker(app), KVEvents(nats_server.url, "tasks") as events:
        result = await progress.adelay(3)
        await events.reached(result.id, "PROGRESS")
        observer = app.AsyncResult(result.id)
        assert observer.state == "PROGRESS" and observer.info == {"done": 1, "total": 3}
        go_on.set()
        assert await result.aget(timeout=10) == "finished"
        other = await sync_progress.adelay()
        assert await other.aget(timeout=10) == "ok"
        # The reply can overtake the stored records on their way to this subscriber: wait for them.
        await events.reached(other.id, "SUCCESS")
        assert events.states[other.id] == ["HALFWAY", "SUCCESS"]
    assert app.AsyncResult(result.id).state == "SUCCESS"
