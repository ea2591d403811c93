"""Worker processes: queue-group sharing, SIGKILL mid-task, leases longer than ack_wait, SIGTERM drain."""

from __future__ import annotations

import collections
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natask import Natask
from natask.server import NatsServer

from .helpers import KVEvents, WorkerProcess, log_lines
from .workerapp import add, asleep, sleep


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Natask]:
    """A producer app registering the worker app's tasks under the same names."""
    app = Natask("producer", servers=[nats_server.url], subject_prefix="proc")
    for task in (add, sleep, asleep):
        app.task(name=task.name)(task.fn)
    try:
        yield app
    finally:
        await app.aclose()


async def test_two_worker_processes_share_a_queue_and_run_each_task_once(
    nats_server: NatsServer, client: Natask, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    workers = [await WorkerProcess(nats_server.url, "proc", log, concurrency=2).ready() for _ in range(2)]
    try:
        # Tasks that take a while, so neither worker can drain the queue before the other asks.
        results = await client.tasks["it.asleep"].adelay_many([(0.01, f"n{i}") for i in range(200)])
        assert [await r.aget(timeout=30) for r in results] == [f"n{i}" for i in range(200)]
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        codes = [await w.wait() for w in workers]
    assert codes == [0, 0]
    lines = [line.split() for line in log_lines(log) if line.startswith("start")]
    calls = collections.Counter(tag for _, tag, _ in lines)
    assert len(calls) == 200 and set(calls.values()) == {1}  # every task ran, and ran once
    pids = collections.Counter(pid for *_, pid in lines)
    assert len(pids) == 2, f"both workers should have taken tasks: {pids}"


async def test_worker_killed_mid_task_task_is_redelivered_and_completed(
    nats_server: NatsServer, client: Natask, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    first = await WorkerProcess(nats_server.url, "proc", log, ack_wait=2).ready()
    async with KVEvents(nats_server.url, "proc") as events:
        result = await client.tasks["it.asleep"].adelay(1.0, "redo")
        await events.reached(result.id, "STARTED")
        first.kill()
        second = await WorkerProcess(nats_server.url, "proc", log, ack_wait=2).ready()
        try:
            assert await result.aget(timeout=30) == "redo"
        finally:
            second.signal(signal.SIGTERM)
            await second.wait()
    starts = [line.split()[-1] for line in log_lines(log) if line.startswith("start redo")]
    dones = [line.split()[-1] for line in log_lines(log) if line.startswith("done redo")]
    assert len(starts) == 2 and starts[0] != starts[1]  # ran again, in the other process
    assert dones == [starts[1]]


async def test_task_longer_than_ack_wait_runs_once(nats_server: NatsServer, client: Natask, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    w = await WorkerProcess(nats_server.url, "proc", log, ack_wait=1).ready()
    other = await WorkerProcess(nats_server.url, "proc", log, ack_wait=1).ready()
    try:
        result = await client.tasks["it.sleep"].adelay(3.5, "long")
        assert await result.aget(timeout=30) == "long"
    finally:
        for p in (w, other):
            p.signal(signal.SIGTERM)
            await p.wait()
    assert len([line for line in log_lines(log) if line.startswith("start long")]) == 1


async def test_sigterm_drains_in_flight_tasks_and_exits_zero(
    nats_server: NatsServer, client: Natask, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    w = await WorkerProcess(nats_server.url, "proc", log, concurrency=2).ready()
    async with KVEvents(nats_server.url, "proc") as events:
        running = [await client.tasks["it.sleep"].adelay(1.0, f"t{i}") for i in range(2)]
        waiting = [await client.tasks["it.sleep"].adelay(0.1, f"w{i}") for i in range(3)]
        for r in running:
            await events.reached(r.id, "STARTED")
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
        assert "draining 2 in-flight" in w.output()
        assert [await r.aget(timeout=5) for r in running] == ["t0", "t1"]
    starts = {line.split()[1] for line in log_lines(log) if line.startswith("start")}
    dones = {line.split()[1] for line in log_lines(log) if line.startswith("done")}
    assert starts == dones == {"t0", "t1"}  # in-flight finished; nothing else started
    # The tasks it never started are still queued for the next worker.
    nxt = await WorkerProcess(nats_server.url, "proc", log, concurrency=2).ready()
    try:
        assert [await r.aget(timeout=20) for r in waiting] == ["w0", "w1", "w2"]
    finally:
        nxt.signal(signal.SIGTERM)
        await nxt.wait()


async def test_idempotency_claim_keeps_a_side_effect_single_across_a_sigkill(
    nats_server: NatsServer, client: Natask, tmp_path: Path
) -> None:
    from .workerapp import charge

    client.task(name=charge.name, bind=True)(charge.fn)
    log = tmp_path / "calls.log"
    first = await WorkerProcess(nats_server.url, "proc", log, ack_wait=1).ready()
    async with KVEvents(nats_server.url, "proc") as events:
        result = await client.tasks["it.charge"].adelay("A-1")
        await events.reached(result.id, "CHARGED")
        first.kill()  # after the side effect, before the ack
        second = await WorkerProcess(nats_server.url, "proc", log, ack_wait=1).ready()
        try:
            assert await result.aget(timeout=30) == "ok"
        finally:
            second.signal(signal.SIGTERM)
            await second.wait()
    assert events.states[result.id].count("CHARGED") == 2  # the task ran twice...
    assert [line.split()[:2] for line in log_lines(log)] == [["charged", "A-1"]]  # ...the effect once
