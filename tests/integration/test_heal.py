"""Operator faults heal: streams, consumers and buckets deleted under running processes are
recreated (logged once) and everything carries on, on a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from datetime import timedelta

import nats
import pytest
from nats.aio.msg import Msg

from natask import Natask, TaskRevoked, Worker
from natask.beat import Beat, bucket_name
from natask.server import NatsServer
from natask.testing import worker


async def revoked_on(w: Worker, task_id: str, timeout: float = 20) -> None:
    """Wait until the worker's revoke watch has delivered ``task_id`` (it mirrors the bucket locally)."""
    changed = asyncio.Event()
    revokes = w._revokes
    assert revokes is not None, "worker not started"
    record = revokes.on_revoke

    def spy(key: str, value: bytes | None, operation: str | None) -> None:
        record(key, value, operation)
        changed.set()

    async def reached() -> None:
        while task_id not in revokes.revoked:
            changed.clear()
            await changed.wait()

    revokes.on_revoke = spy  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(reached(), timeout)
    finally:
        del revokes.on_revoke


def warnings_about(caplog: pytest.LogCaptureFixture, start: str, *words: str) -> list[str]:
    """The warnings logged that start with ``start`` and contain every one of ``words``."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.getMessage().startswith(start) and all(w in r.getMessage() for w in words)]


async def test_deleted_results_bucket_is_recreated_and_no_task_reruns(
    app: Natask, caplog: pytest.LogCaptureFixture
) -> None:
    runs: Counter[str] = Counter()

    @app.task(name="t.count")
    def count(tag: str) -> str:
        runs[tag] += 1
        return tag

    async with worker(app):
        assert await (await count.adelay("before")).aget(timeout=10) == "before"
        broker = await app.client.broker()
        await broker.js.delete_key_value(app.names.results_bucket)
        results = [await count.adelay(f"after-{i}") for i in range(5)]
        for i, result in enumerate(results):
            assert await result.aget(timeout=20) == f"after-{i}"
    # The worker has stopped, so every outcome it had was stored before its ack.
    for result in results:
        assert await app.AsyncResult(result.id).astate() == "SUCCESS"
    assert runs == Counter({"before": 1, **{f"after-{i}": 1 for i in range(5)}})
    assert len(warnings_about(caplog, "bucket natask_results_tasks", "recreated")) == 1


async def test_deleted_task_stream_is_recreated_and_the_running_worker_consumes_again(
    app: Natask, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    async with worker(app):
        assert await (await add.adelay(1, 2)).aget(timeout=10) == 3
        broker = await app.client.broker()
        await broker.js.delete_stream(app.names.stream)
        # The producer recreates the stream on its next publish, the worker its consumer: no restart.
        assert await (await add.adelay(2, 3)).aget(timeout=30) == 5
        assert await (await add.adelay(3, 4)).aget(timeout=10) == 7
    assert warnings_about(caplog, "stream NATASK_TASKS", "recreated")
    assert len(warnings_about(caplog, "consumer default", "recreated")) == 1


async def test_deleted_consumer_is_recreated_by_the_running_worker(
    app: Natask, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    async with worker(app):
        assert await (await add.adelay(1, 2)).aget(timeout=10) == 3
        broker = await app.client.broker()
        await broker.js.delete_consumer(app.names.stream, "default")
        assert await (await add.adelay(2, 3)).aget(timeout=30) == 5
    assert len(warnings_about(caplog, "consumer default", "recreated")) == 1
    assert not warnings_about(caplog, "stream NATASK_TASKS", "recreated")


async def test_revoke_applies_after_the_revoked_bucket_is_deleted(
    app: Natask, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    @app.task(name="t.victim")
    def victim(tag: str) -> str:
        ran.append(tag)
        return tag

    async with worker(app) as w:
        earlier = os.urandom(8).hex()
        await app.AsyncResult(earlier).arevoke()  # the producer has the bucket open from now on
        await revoked_on(w, earlier)
        broker = await app.client.broker()
        await broker.js.delete_key_value(app.names.revoked_bucket)

        doomed = os.urandom(8).hex()
        await app.AsyncResult(doomed).arevoke()  # recreates the bucket
        # The worker's watch restarts on the recreated bucket and picks the revoke up.
        await revoked_on(w, doomed)
        with pytest.raises(TaskRevoked):
            await (await victim.aapply_async(("doomed",), task_id=doomed)).aget(timeout=10)
        assert await (await victim.adelay("fine")).aget(timeout=10) == "fine"
    assert ran == ["fine"]
    assert len(warnings_about(caplog, "bucket natask_revoked_tasks", "recreated")) == 1
    assert warnings_about(caplog, "watch of bucket natask_revoked_tasks", "restarting")


async def test_beat_keeps_firing_after_its_bucket_is_deleted(nats_server: NatsServer) -> None:
    app = Natask("beat", servers=[nats_server.url], subject_prefix="bh", publish_timeout=5)
    tick = app.task(name="jobs.tick")(lambda: None)
    app.add_periodic_task(timedelta(seconds=1), tick.s(), name="every.second")
    ids: set[str] = set()
    arrived = asyncio.Event()

    async def on_tick(msg: Msg) -> None:
        ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
        arrived.set()

    async def ticks(n: int) -> None:
        while len(ids) < n:
            arrived.clear()
            await arrived.wait()

    nc = await nats.connect(nats_server.url)
    beat = Beat(app, lease_ttl=1)
    try:
        await nc.subscribe("bh.>", cb=on_tick)
        await nc.flush()
        await beat.start()
        await asyncio.wait_for(ticks(1), 20)
        js = nc.jetstream()
        await js.delete_key_value(bucket_name(app))
        # Fire times after the deletion are enqueued (a tick sent again under its id is deduplicated
        # by the stream: a plain subscriber sees it twice, so count distinct ids).
        await asyncio.wait_for(ticks(len(ids) + 3), 30)
    finally:
        await beat.stop()
        await nc.close()
        await app.aclose()
