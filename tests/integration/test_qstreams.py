"""Streams per queue (``stream_per_queue=True``) on a real nats-server: each queue's own stream
made on demand and healed, priorities, retries, expiry, revokes, dead letters, status and purge,
the dashboard's broker page, and a clear error where the one-stream layout holds the subjects."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import RetentionPolicy

from natask import ConfigError, Natask, Retry, TaskFailed, TaskRevoked
from natask.control import purge, queues
from natask.dashboard.feed import Feed
from natask.dashboard.model import Model
from natask.dlq import DeadLetters
from natask.server import NatsServer
from natask.testing import worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def qapp(nats_server: NatsServer) -> AsyncIterator[Natask]:
    """An app whose every queue has its own stream."""
    a = Natask("qs", servers=[nats_server.url], subject_prefix="qs", ack_wait=5, publish_timeout=5,
               stream_per_queue=True)
    try:
        yield a
    finally:
        await a.aclose()


async def stream_names(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return sorted([name async for name in _names(nc)])
    finally:
        await nc.close()


async def _names(nc: Any) -> AsyncIterator[str]:
    for name in await nc.jetstream().streams_info():
        yield name.config.name


async def test_each_queue_gets_its_own_stream_on_first_publish_and_tasks_run(
        qapp: Natask, nats_server: NatsServer) -> None:
    add = qapp.task(name="qs.add", queue="math")(lambda x, y: x + y)
    echo = qapp.task(name="qs.echo", queue="text")(lambda s: s)
    results = [await add.adelay(2, 3), await echo.adelay("hi")]
    streams = [s for s in await stream_names(nats_server.url) if s.startswith("NATASK_QS")]
    assert streams == ["NATASK_QS_q_math", "NATASK_QS_q_text"]  # no one-stream NATASK_QS
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info("NATASK_QS_q_math")
    finally:
        await nc.close()
    assert info.config.retention == RetentionPolicy.WORK_QUEUE and info.config.allow_msg_schedules
    assert info.config.subjects == ["qs.math.>", *(f"qs._p{n}.math.>" for n in range(1, 10)), "qs._sched.math.>"]
    async with worker(qapp, queues=["math", "text"]):
        assert [await r.aget(timeout=10) for r in results] == [5, "hi"]
        assert await (await add.adelay_many([(1, 1), (2, 2)]))[1].aget(timeout=10) == 4


async def test_priorities_retries_with_countdown_and_workflows_work_on_queue_streams(qapp: Natask) -> None:
    tries: list[int] = []

    @qapp.task(name="qs.flaky", queue="jobs", bind=True)
    def flaky(self: Any, x: int) -> int:
        tries.append(self.request.retries)
        if self.request.retries < 2:
            raise Retry(countdown=0.2)  # a server-held schedule in the queue's own stream
        return x

    double = qapp.task(name="qs.double", queue="other")(lambda x: x * 2)
    async with worker(qapp, queues=["jobs", "other"]):
        assert await (await flaky.adelay(7)).aget(timeout=20) == 7
        assert tries == [0, 1, 2]
        # Started after the worker: the level's consumer is announced on the queue stream's advisory.
        assert await (await double.aapply_async((4,), priority=7)).aget(timeout=20) == 8
        chained = flaky.s(5) | double.s()  # a step routed to the other queue's stream
        assert await (await chained.adelay()).aget(timeout=20) == 10
    broker = await qapp.client.broker()
    assert ("other", 7) in await broker.levels(["other"])


async def test_an_expired_task_is_removed_by_its_queue_stream_unrun(qapp: Natask) -> None:
    ran: list[str] = []
    task = qapp.task(name="qs.exp", queue="late")(lambda tag: ran.append(tag))
    expiring = await task.aapply_async(("expired",), expires=1)
    with pytest.raises(TaskRevoked, match="expired"):
        await expiring.aget(timeout=20)  # the stream dropped it at its TTL; the result handle checked it
    async with worker(qapp, queues=["late"]):
        await (await task.adelay("after")).aget(timeout=20)
    assert ran == ["after"]


async def test_revokes_by_id_and_by_name_cover_tasks_in_queue_streams(qapp: Natask) -> None:
    pay = qapp.task(name="shop.pay", queue="a")(lambda: "paid")
    ship = qapp.task(name="shop.ship", queue="b")(lambda: "shipped")
    mail = qapp.task(name="mail.send", queue="b")(lambda: "sent")
    for _ in range(3):  # queue a's stream counts further than b's: each stream has its own sequences
        await mail.aapply_async(queue="a")
    before = [await pay.adelay(), await ship.adelay()]
    kept, by_id = await mail.adelay(), await mail.adelay()
    await qapp.control.arevoke(name="shop.*")
    await qapp.control.arevoke(by_id.id)
    after = [await pay.adelay(), await ship.adelay()]
    async with worker(qapp, queues=["a", "b"]):
        for revoked in (*before, by_id):
            with pytest.raises(TaskRevoked):
                await revoked.aget(timeout=10)
        assert await kept.aget(timeout=10) == "sent"
        assert [await r.aget(timeout=10) for r in after] == ["paid", "shipped"]  # sent after the revoke


async def test_dead_letters_status_purge_and_broker_page_read_the_queue_streams(qapp: Natask) -> None:
    bad = qapp.task(name="qs.bad", queue="dl", max_retries=0, autoretry_for=(KeyError,))(lambda: {}["x"])
    async with worker(qapp, queues=["dl", "reports"]):
        result = await bad.adelay()
        with pytest.raises(TaskFailed):
            await result.aget(timeout=10)
    [entry] = await DeadLetters(qapp).list()
    assert entry.id == result.id and entry.subject == "qs.dl.qs.bad"
    slow = qapp.task(name="qs.slow", queue="reports")(lambda: None)
    for _ in range(4):
        await slow.adelay()
    await slow.aapply_async(priority=3)
    status = {q.name: q for q in await queues(qapp)}
    assert (status["reports"].pending, status["reports"].in_flight) == (5, 0)  # its level 3 counted in
    assert status["dl"].pending == 0 and status["dl"].consumed
    page = await Feed(qapp, Model()).broker_info()
    assert {"NATASK_QS_q_dl", "NATASK_QS_q_reports", "NATASK_DLQ"} <= {s["name"] for s in page["streams"]}
    assert {"dl", "reports", "_p3_reports"} <= {c["name"] for c in page["consumers"]}
    assert await purge(qapp, "reports") == 5
    assert {q.name: q.pending for q in await queues(qapp)}["reports"] == 0
    async with worker(qapp, queues=["dl"]):
        await DeadLetters(qapp).replay(entry.id)  # back into the queue's own stream
        with pytest.raises(TaskFailed):
            await qapp.AsyncResult(result.id).aget(timeout=10)


async def test_a_deleted_queue_stream_is_recreated_under_a_running_worker(
        qapp: Natask, nats_server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    echo = qapp.task(name="qs.echo2", queue="heal")(lambda s: s)
    async with worker(qapp, queues=["heal"]):
        assert await (await echo.adelay("one")).aget(timeout=10) == "one"
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().delete_stream("NATASK_QS_q_heal")
        finally:
            await nc.close()
        with caplog.at_level(logging.WARNING):
            assert await (await echo.adelay("two")).aget(timeout=30) == "two"
    assert any("NATASK_QS_q_heal was deleted" in r.getMessage() for r in caplog.records)


async def test_the_two_layouts_on_one_prefix_get_an_error_naming_both(nats_server: NatsServer) -> None:
    one = Natask("one", servers=[nats_server.url], subject_prefix="shared", publish_timeout=5)
    per = Natask("per", servers=[nats_server.url], subject_prefix="shared", publish_timeout=5, stream_per_queue=True)
    other = Natask("other", servers=[nats_server.url], subject_prefix="solo", publish_timeout=5, stream_per_queue=True)
    try:
        await one.asend_task("x.y", queue="eu")
        with pytest.raises(ConfigError, match=r"NATASK_SHARED_q_eu.*overlap stream NATASK_SHARED.*stream_per_queue"):
            await per.asend_task("x.y", queue="eu")
        await other.asend_task("x.y", queue="eu")
        solo = Natask("solo", servers=[nats_server.url], subject_prefix="solo", publish_timeout=5)
        try:
            with pytest.raises(ConfigError, match=r"NATASK_SOLO .*NATASK_SOLO_q_eu.*stream_per_queue=True"):
                await solo.asend_task("x.y", queue="eu")
        finally:
            await solo.aclose()
    finally:
        for a in (one, per, other):
            await a.aclose()


async def test_the_default_layout_keeps_one_stream_for_every_queue(app: Natask, nats_server: NatsServer) -> None:
    await app.asend_task("x.y", queue="eu")
    await app.asend_task("x.y", queue="us")
    assert [s for s in await stream_names(nats_server.url) if s.startswith("NATASK_")] == ["NATASK_TASKS"]
    broker = await app.client.broker()
    assert broker.stream_of("eu") == "NATASK_TASKS" and broker.next_subject("eu", "eu") == \
        "$JS.API.CONSUMER.MSG.NEXT.NATASK_TASKS.eu"


async def test_queue_streams_of_several_apps_are_told_apart(nats_server: NatsServer) -> None:
    a = Natask("a", servers=[nats_server.url], subject_prefix="a_b", publish_timeout=5, stream_per_queue=True)
    b = Natask("b", servers=[nats_server.url], subject_prefix="a", publish_timeout=5, stream_per_queue=True)
    try:
        await a.asend_task("x.y", queue="c")
        await b.asend_task("x.y", queue="b_c")  # the same name if queue and prefix were joined plainly
        assert {"NATASK_A_B_q_c", "NATASK_A_q_b_c"} <= set(await stream_names(nats_server.url))
        assert [q.name for q in await queues(a)] == ["c"] and [q.name for q in await queues(b)] == ["b_c"]
    finally:
        await asyncio.gather(a.aclose(), b.aclose())


async def test_a_mirror_copies_queued_tasks_without_taking_them_from_the_queue(
        qapp: Natask, nats_server: NatsServer) -> None:
    from natask.failover import add_mirror

    echo = qapp.task(name="qs.kept", queue="dr")(lambda i: i)
    sent = [await echo.adelay(i) for i in range(5)]  # queued before any worker: no consumer of the queue yet
    mirror = await add_mirror(qapp, "dr")
    assert mirror == "NATASK_QS_mirror_dr" and await add_mirror(qapp, "dr") == mirror  # once
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        caught_up = asyncio.get_running_loop().time() + 30
        while (await js.stream_info(mirror)).state.messages < 5:  # the mirror catches up within a second
            assert asyncio.get_running_loop().time() < caught_up, "the mirror never copied the queue"
            await asyncio.sleep(0.1)
        # Without a consumer of the queue, the server removes what the mirror copied about 0.7 s later;
        # nothing announces that it did not: watch the queue's stream for a while.
        watch_until = asyncio.get_running_loop().time() + 3
        while asyncio.get_running_loop().time() < watch_until:
            assert (await js.stream_info("NATASK_QS_q_dr")).state.messages == 5  # a copy: the queue keeps them
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    async with worker(qapp, queues=["dr"]):
        assert [await r.aget(timeout=10) for r in sent] == list(range(5))


async def test_the_failover_commands_mirror_refuse_a_live_primary_and_promote_with_force(
        nats_server: NatsServer) -> None:
    root = ROOT
    env = {**os.environ, "NATS_URL": nats_server.url, "NATASK_TEST_PREFIX": "fo", "NATASK_STREAM_PER_QUEUE": "1",
           "PYTHONPATH": str(root)}

    async def natask(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "natask", *args, "-A",
                                                        "tests.integration.workerapp:app"],
                                       env=env, cwd=root, capture_output=True, text=True, timeout=60)

    app = Natask("fo", servers=[nats_server.url], subject_prefix="fo", stream_per_queue=True, publish_timeout=5)
    try:
        sent = await app.asend_task("it.add", (1, 2), queue="orders")
        made = await natask("failover", "mirror", "orders")
        assert made.returncode == 0 and "NATASK_FO_mirror_orders mirrors queue orders" in made.stdout, made.stderr
        refused = await natask("failover", "promote", "orders")
        assert refused.returncode == 1 and "NATASK_FO_q_orders, the primary of queue 'orders', still answers" in \
            refused.stderr
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            caught_up = asyncio.get_running_loop().time() + 30
            while (await js.stream_info("NATASK_FO_mirror_orders")).state.messages < 1:
                assert asyncio.get_running_loop().time() < caught_up, "the mirror never copied the queue"
                await asyncio.sleep(0.1)
            forced = await natask("failover", "promote", "orders", "--force")
            assert forced.returncode == 0 and "NATASK_FO_mirror_orders holds queue orders now: 1 task(s) to run" \
                in forced.stdout, forced.stderr
            assert [s.config.name for s in await js.streams_info() if s.config.name.startswith("NATASK_FO")] == \
                ["NATASK_FO_mirror_orders"]
        finally:
            await nc.close()
        app.task(name="it.add", queue="orders")(lambda x, y: x + y)
        async with worker(app, queues=["orders"]):  # a new connection finds the queue's stream by its subjects
            assert await sent.aget(timeout=10) == 3
    finally:
        await app.aclose()


async def test_a_running_worker_follows_its_queue_to_the_promoted_mirror(
        qapp: Natask, caplog: pytest.LogCaptureFixture) -> None:
    from natask.failover import add_mirror, promote

    echo = qapp.task(name="qs.follow", queue="moving")(lambda s: s)
    async with worker(qapp, queues=["moving"]):
        assert await (await echo.adelay("before")).aget(timeout=10) == "before"
        await add_mirror(qapp, "moving")
        with caplog.at_level(logging.WARNING):
            promoted = await promote(qapp, "moving", force=True)  # the primary is deleted under the worker
            assert promoted.stream == "NATASK_QS_mirror_moving"
            assert await (await echo.adelay("after")).aget(timeout=40) == "after"
    assert any("queue moving: its tasks are in stream NATASK_QS_mirror_moving now" in r.getMessage()
               for r in caplog.records)
