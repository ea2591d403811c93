"""What priorities and expiry before delivery cost when used (issue 17, items 2 and 6).

Drain of N queued no-op tasks by one in-process worker (concurrency 64): all priority 0 (today's
path), then the same N spread over priorities 0, 5 and 9; and the publish rate of ``delay_many``
with and without ``expires`` (``Nats-TTL``). Each case gets a fresh subject prefix on one local
server. Run once: ``python benchmarks/priority_cost.py [N]``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from natask import Natask
from natask.server import NatsServer
from natask.testing import worker


async def drain(url: str, n: int, priorities: tuple[int, ...]) -> float:
    """Tasks per second drained; the tasks are queued before the worker starts."""
    app = Natask("bench", servers=[url], subject_prefix=f"b{os.urandom(3).hex()}")
    done = asyncio.Event()
    count = 0

    async def noop(i: int) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    task: Any = app.task(name="b.noop", ignore_result=True)(noop)
    per = n // len(priorities)
    for level in priorities:
        if level:
            await task.aapply_async((0,), priority=level)  # creates the level's consumer
            await asyncio.gather(*(task.aapply_async((i,), priority=level) for i in range(per - 1)))
        else:
            await task.adelay_many([(i,) for i in range(per)])
    n = per * len(priorities)
    start = time.perf_counter()
    async with worker(app, concurrency=64):
        await done.wait()
    elapsed = time.perf_counter() - start
    await app.aclose()
    return n / elapsed


async def publish(url: str, n: int, expires: float | None) -> float:
    """Calls per second published by ``delay_many`` (with or without an expiry)."""
    app = Natask("bench", servers=[url], subject_prefix=f"b{os.urandom(3).hex()}")
    task: Any = app.task(name="b.noop", ignore_result=True, expires=expires)(lambda i: None)
    await task.adelay_many([(0,)])  # connect, create the stream
    start = time.perf_counter()
    await task.adelay_many([(i,) for i in range(n)])
    elapsed = time.perf_counter() - start
    await app.aclose()
    return n / elapsed


async def main(n: int) -> None:
    server = NatsServer(store_dir=f"/tmp/natask-bench-{os.getpid()}")
    server.start()
    try:
        url = server.url
        print(f"drain, all priority 0:          {await drain(url, n, (0,)):8.0f} tasks/s")
        print(f"drain, priorities 0/5/9 mixed:   {await drain(url, n, (0, 5, 9)):8.0f} tasks/s")
        print(f"delay_many, no expires:          {await publish(url, n, None):8.0f} calls/s")
        print(f"delay_many, expires=600 (TTL):   {await publish(url, n, 600):8.0f} calls/s")
    finally:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 9000))
