"""A worker whose NATS connection is closed for good (nats-py gives up after most ``-ERR``s from the
server) stops instead of idling on: ``Worker.run()`` raises, ``natask worker`` exits non-zero so a
supervisor restarts it, and its unacked tasks are redelivered to the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from natask import BrokerError, Natask, Worker
from natask.server import NatsServer

from .faultproxy import FaultProxy
from .helpers import WorkerProcess

FATAL: bytes = b"-ERR 'Unknown Protocol Operation'\r\n"
"""A server error after which nats-py closes the connection for good (no reconnect)."""


async def test_worker_process_exits_non_zero_when_its_connection_is_closed_for_good(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with FaultProxy(nats_server.port) as proxy:
        w = await WorkerProcess(proxy.url, "closed", tmp_path / "calls.log").ready()
        try:
            proxy.inject_to_clients(FATAL)
            code = await w.wait(timeout=30)
        finally:
            w.kill()
    assert code != 0
    out = w.output()
    assert "lost its NATS connection for good" in out and "unknown protocol operation" in out.lower()


async def test_worker_run_raises_and_its_running_task_goes_to_another_worker(nats_server: NatsServer) -> None:
    runs: list[str] = []
    started = asyncio.Event()

    async def slow(tag: str) -> str:
        runs.append(tag)
        started.set()
        if len(runs) == 1:
            await asyncio.Event().wait()  # the first run never ends on its own
        return f"done {tag}"

    async with FaultProxy(nats_server.port) as proxy:
        doomed_app = Natask("doomed", servers=[proxy.url], ack_wait=1)
        healthy_app = Natask("healthy", servers=[nats_server.url], ack_wait=1)
        for app in (doomed_app, healthy_app):
            app.task(name="t.slow")(slow)
        doomed = Worker(doomed_app, grace=30)
        try:
            await doomed.start()
            running = asyncio.create_task(doomed.run())
            result = await healthy_app.asend_task("t.slow", ("a",))
            await asyncio.wait_for(started.wait(), 10)  # the doomed worker runs the task
            proxy.inject_to_clients(FATAL)
            # Stops at once (not after its 30 s grace): nothing it holds can be acked any more.
            with pytest.raises(BrokerError, match="closed for good"):
                await asyncio.wait_for(running, 10)
            assert not doomed.consuming
            async with Worker(healthy_app):  # the server redelivers the unacked task after ack_wait
                assert await result.aget(timeout=20) == "done a"
            assert runs == ["a", "a"]
        finally:
            await doomed.stop()
            await doomed_app.aclose()
            await healthy_app.aclose()
