#!/usr/bin/env python
"""What rate limits, concurrency caps and broadcasts cost when used (issue 17), on one machine.

    python benchmarks/limits.py              # 2,000 queued async no-op tasks per row
    python benchmarks/limits.py -n 5000

Each row: an in-process worker (``-c 64``) drains ``n`` queued no-op tasks of one kind, with a
limit so high it never makes a task wait, so the row shows the bookkeeping, not the waiting: the
drain rate and the process's CPU per task (the worker's; the publish is done before). The last
row sends ``n`` broadcasts one by one to one worker and waits until it ran them all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from natask import Natask, Worker
from natask.server import NatsServer

ROWS: dict[str, dict[str, Any]] = {
    "none": {},
    "rate_limit": {"rate_limit": "1000000/s"},
    "global_rate_limit": {"global_rate_limit": "1000000/s"},
    "max_concurrency": {"max_concurrency": 10_000},
}


async def drain(url: str, n: int, label: str, options: dict[str, Any]) -> tuple[float, float]:
    """(tasks/s, CPU µs per task) of one worker draining ``n`` queued tasks."""
    app = Natask("limits-bench", servers=[url], subject_prefix=f"lb{os.urandom(3).hex()}")

    async def noop(i: int) -> None:
        return None

    task = app.task(name=f"b.{label}", ignore_result=True, max_retries=None, **options)(noop)
    for start in range(0, n, 5000):
        await task.adelay_many([(i,) for i in range(start, min(n, start + 5000))])
    worker = Worker(app, concurrency=64, max_tasks=n, events=False)
    cpu, wall = time.process_time(), time.perf_counter()
    await worker.start()
    await worker.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await app.aclose()
    return n / wall, cpu / n * 1e6


async def broadcasts(url: str, n: int) -> tuple[float, float]:
    """(broadcasts/s, CPU µs per broadcast) sent and run by one worker in this process."""
    app = Natask("limits-bench", servers=[url], subject_prefix=f"lb{os.urandom(3).hex()}")
    done = asyncio.Event()
    count = 0

    async def hello(i: int) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    task = app.task(name="b.hello", broadcast=True)(hello)
    worker = Worker(app, concurrency=64, events=False)
    await worker.start()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        await task.adelay(i)
    await asyncio.wait_for(done.wait(), 60)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await worker.stop()
    await app.aclose()
    return n / wall, cpu / n * 1e6


async def main(n: int) -> None:
    server = NatsServer().start()
    try:
        rows: list[tuple[str, Callable[[], Awaitable[tuple[float, float]]]]] = [
            (label, lambda label=label, options=options: drain(server.url, n, label, options))  # type: ignore[misc]
            for label, options in ROWS.items()]
        rows.append(("broadcast (send + run)", lambda: broadcasts(server.url, n)))
        print(f"{'row':<24} {'tasks/s':>9} {'CPU µs/task':>12}")
        for label, run in rows:
            rate, cpu = await run()
            print(f"{label:<24} {rate:>9,.0f} {cpu:>12,.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="tasks per row")
    asyncio.run(main(parser.parse_args().n))
