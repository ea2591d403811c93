"""Flow limits across worker processes (issue 17): a global rate limit, a concurrency cap, broadcast
tasks, and a per-queue ``max_ack_pending``."""

from __future__ import annotations

import collections
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from natask import Natask, Worker
from natask.server import NatsServer
from natask.testing import worker

from .helpers import WorkerProcess
from .workerapp import capped, hello, paced

RATE = 30.0
"""``it.paced``'s global_rate_limit, per second."""
WINDOW = 20.0
"""Seconds over which the rate is measured (600 starts at 30/s: ±10 % is ±60)."""


def producer(url: str, prefix: str) -> Natask:
    app = Natask("producer", servers=[url], subject_prefix=prefix)
    app.task(name=paced.name)(paced.fn)
    app.task(name=capped.name)(capped.fn)
    app.task(name=hello.name, broadcast=True)(hello.fn)
    return app


@contextlib.asynccontextmanager
async def workers(url: str, prefix: str, tmp_path: Path, n: int = 3, concurrency: int = 8
                  ) -> AsyncIterator[list[WorkerProcess]]:
    procs = [WorkerProcess(url, prefix, tmp_path / "calls.log", concurrency=concurrency) for _ in range(n)]
    try:
        for proc in procs:
            await proc.ready()
        yield procs
    finally:
        for proc in procs:
            proc.signal(signal.SIGTERM)
        codes = [await proc.wait() for proc in procs]
        assert codes == [0] * n, "\n".join(p.output() for p in procs)


async def test_three_workers_stay_within_the_global_rate(nats_server: NatsServer, tmp_path: Path) -> None:
    app = producer(nats_server.url, "rate")
    async with workers(nats_server.url, "rate", tmp_path):
        # More tasks than the window needs, queued at once: the workers would start them all
        # within a second without the limit.
        total = int(RATE * (WINDOW + 3))
        results = await app.tasks["it.paced"].adelay_many([(i,) for i in range(total)])
        starts = sorted([await r.aget(timeout=120) for r in results])  # max_retries=0: none dead-lettered
        await app.aclose()
    first = starts[0] + 1.0  # measured from the second second on: the window is all steady state
    count = sum(1 for t in starts if first <= t < first + WINDOW)
    assert abs(count - RATE * WINDOW) <= 0.1 * RATE * WINDOW, count


def most_at_once(runs: list[tuple[float, float]]) -> int:
    """The largest number of runs in progress at one instant (an end before a start at a tie)."""
    edges = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


async def test_max_concurrency_holds_across_three_workers(nats_server: NatsServer, tmp_path: Path) -> None:
    app = producer(nats_server.url, "cap")
    async with workers(nats_server.url, "cap", tmp_path, concurrency=4):
        results = await app.tasks["it.capped"].adelay_many([(0.3,) for _ in range(16)])
        runs = [tuple(await r.aget(timeout=120)) for r in results]  # max_retries=0: none dead-lettered
        workers_used = {r.worker.split(":")[-1] for r in results}
        await app.aclose()
    assert len(runs) == 16
    assert most_at_once(runs) <= 2  # type: ignore[arg-type]
    assert len(workers_used) >= 2  # the cap was shared, not one worker running everything


async def test_broadcast_runs_once_on_every_worker(nats_server: NatsServer, tmp_path: Path) -> None:
    app = producer(nats_server.url, "bcast")
    async with workers(nats_server.url, "bcast", tmp_path) as procs:
        broker = await app.client.broker()
        seen = await broker.subscribe("test.hello")
        pids = {str(p.proc.pid) for p in procs}
        heard: list[tuple[str, str]] = []

        async def hear(token: str) -> None:
            while sum(1 for t, _ in heard if t == token) < 3:
                msg = await seen.next_msg(timeout=30)
                tok, pid = msg.data.decode().split()
                heard.append((tok, pid))

        await app.tasks["it.hello"].adelay("test.hello", "first")
        await hear("first")
        # A second broadcast after the first was heard from all: a duplicate of the first would
        # have been published (in order, on the same connection) before that worker's second.
        await app.tasks["it.hello"].adelay("test.hello", "second")
        await hear("second")
        await app.aclose()
    firsts = collections.Counter(pid for tok, pid in heard if tok == "first")
    assert set(firsts) == pids and set(firsts.values()) == {1}


async def test_queue_options_set_the_queue_consumers_max_ack_pending(nats_server: NatsServer) -> None:
    app = Natask("qopts", servers=[nats_server.url], subject_prefix="qopts",
                 queue_options={"orders": {"max_ack_pending": 50}})
    async with Worker(app, queues=["orders", "default"]) as worker:
        js = worker.broker_.js
        orders = await js.consumer_info(app.names.stream, app.names.consumer("orders"))
        default = await js.consumer_info(app.names.stream, app.names.consumer("default"))
    await app.aclose()
    assert orders.config.max_ack_pending == 50
    assert default.config.max_ack_pending == app.config.max_ack_pending


async def test_rate_limit_is_per_worker_and_waiting_tasks_are_not_lost(app: Natask) -> None:
    @app.task(name="t.local", rate_limit="10/s", max_retries=0)
    async def local(i: int) -> float:
        return time.time()

    # Two workers at 10/s each: together about 20/s. 40 tasks take ~2 s rather than an instant;
    # those beyond the first ~0.25 s of reservations wait as schedules and come back.
    async with worker(app), worker(app):
        results = await local.adelay_many([(i,) for i in range(40)])
        starts = sorted([await r.aget(timeout=60) for r in results])
    span = starts[-1] - starts[0]
    assert 0.9 * (40 / 20 - 0.1) <= span  # never faster than two workers' limits together
