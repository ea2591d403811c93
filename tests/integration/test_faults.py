"""Fault tests on real servers: crash loops, the server killed mid-load, the broker down at enqueue."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from natask import BrokerError, Natask
from natask.dlq import DeadLetters
from natask.server import NatsServer, free_port
from natask.testing import worker

from .helpers import WorkerProcess, log_lines
from .workerapp import crash


async def test_task_that_crashes_its_worker_is_dead_lettered_after_its_retry_limit(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    app = Natask("producer", servers=[nats_server.url], subject_prefix="crash")
    app.task(name=crash.name, max_retries=crash.options.max_retries)(crash.fn)
    log = tmp_path / "calls.log"
    try:
        result = await app.tasks["it.crash"].adelay("loop")
        codes = []
        # max_retries=1: deliveries 1 and 2 crash their worker; delivery 3 is dead-lettered unrun.
        broker = await app.client.broker()
        await broker.ensure_dlq()
        # Subscribed before any worker starts: the last one dead-letters as soon as it fetches.
        dead = await broker.subscribe("natask.dlq.crash.>")
        try:
            for _ in range(3):
                w = await WorkerProcess(nats_server.url, "crash", log, ack_wait=1).ready()
                done = asyncio.create_task(w.wait(timeout=30))
                try:
                    entries = await _wait_dlq_or_exit(app, dead, done)
                finally:
                    if not done.done():
                        w.signal(signal.SIGTERM)  # drain: it stores the FAILURE result, then acks
                    codes.append(await done)
                if entries:
                    break
        finally:
            await dead.unsubscribe()
        assert codes[:2] == [3, 3]  # os._exit(3) inside the task, twice
        [entry] = entries
        assert entry.id == result.id and entry.reason == "max retries exceeded" and entry.attempts == 3
        assert len([line for line in log_lines(log) if line.startswith("crash loop")]) == 2
        with pytest.raises(Exception, match="worker crashed"):
            await result.aget(timeout=10)
    finally:
        await app.aclose()


async def _wait_dlq_or_exit(app: Natask, dead: Any, exited: asyncio.Task[int]) -> list:  # type: ignore[type-arg]
    """Dead letters of the app once one arrived on ``dead``, or [] as soon as the worker process exits."""
    arrived = asyncio.create_task(dead.next_msg(timeout=30))
    await asyncio.wait({arrived, exited}, return_when=asyncio.FIRST_COMPLETED)
    if arrived.done() and not arrived.exception():
        return await DeadLetters(app).list()
    arrived.cancel()
    return []


async def test_server_killed_and_restarted_mid_load_loses_nothing(nats_server: NatsServer) -> None:
    app = Natask("load", servers=[nats_server.url], publish_timeout=30)
    done: set[int] = set()
    total = 300
    some, all_done = asyncio.Event(), asyncio.Event()

    @app.task(name="t.count", ignore_result=True)
    async def count(i: int) -> None:
        done.add(i)
        if len(done) >= 50:
            some.set()
        if len(done) == total:
            all_done.set()

    try:
        async with worker(app, concurrency=16):
            async def produce() -> None:
                for i in range(total):
                    await count.adelay(i)  # must never fail: publishes are retried across the restart

            producer = asyncio.create_task(produce())
            await asyncio.wait_for(some.wait(), 30)
            await asyncio.to_thread(nats_server.restart, True)  # SIGKILL, then start on the same store
            await asyncio.wait_for(producer, 60)
            await asyncio.wait_for(all_done.wait(), 60)
        assert done == set(range(total))
    finally:
        await app.aclose()


async def test_result_get_survives_a_server_restart(nats_server: NatsServer) -> None:
    app = Natask("restart", servers=[nats_server.url])
    gate = asyncio.Event()

    @app.task(name="t.gated")
    async def gated() -> str:
        await gate.wait()
        return "after restart"

    try:
        async with worker(app):
            result = await gated.adelay()
            waiting = asyncio.create_task(result.aget(timeout=40))
            await asyncio.to_thread(nats_server.restart, True)
            gate.set()  # finishes after the reconnect: the reply may be lost, the KV record is not
            assert await waiting == "after restart"
    finally:
        await app.aclose()


async def test_broker_down_at_enqueue_is_a_clear_error_within_the_bound() -> None:
    port = free_port()
    app = Natask("down", servers=[f"nats://user:secret@127.0.0.1:{port}"], publish_timeout=1.5)

    @app.task(name="t.never")
    def never() -> None: ...

    started = time.monotonic()
    try:
        with pytest.raises(BrokerError) as info:
            await never.adelay()
    finally:
        await app.aclose()
    assert time.monotonic() - started < 15
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "secret" not in text and "natask server" in text
