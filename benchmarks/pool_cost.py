"""What issue 17's execution features cost when used: worker CPU per task and drain rate of an
in-process worker, for the thread pool with and without ``soft_time_limit`` (task option and call
option), ``async def`` with and without it, and ``--pool processes`` (its children's CPU is not in
the worker's figure: compare the drain rates).

    python benchmarks/pool_cost.py [-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_app import ADD, QUEUE, make_app

from natask import Worker
from natask.server import NatsServer

SPEC = "bench_app:app"


async def drain(n: int, prefix: str, variant: str) -> tuple[float, float]:
    """(tasks per second, worker CPU µs per task) for one variant."""
    app = make_app(prefix)
    soft_add = app.task(name="bench.soft_add", queue=QUEUE, ignore_result=True, soft_time_limit=60)(
        lambda x, y: x + y)

    async def soft_aadd(x: Any, y: Any) -> Any:
        return x + y

    app.task(name="bench.soft_aadd", queue=QUEUE, ignore_result=True, soft_time_limit=60)(soft_aadd)
    name = {"def": ADD, "def_soft": "bench.soft_add", "def_soft_call": ADD, "async": "bench.aadd",
            "async_soft": "bench.soft_aadd", "processes": ADD}[variant]
    task = app.tasks[name]
    if variant == "def_soft_call":
        for i in range(n):
            await task.aapply_async((i, i), soft_time_limit=60)
    else:
        await task.adelay_many([(i, i) for i in range(n)])
    del soft_add
    w = Worker(app, queues=[QUEUE], concurrency=64, events=False, app_spec=SPEC,
               pool="processes" if variant == "processes" else "threads")
    cpu, wall = time.process_time(), time.perf_counter()
    await w.start()
    while w.processed < n:  # noqa: ASYNC110 - a progress poll: 10 ms granularity is within the noise here
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await w.stop()
    await app.aclose()
    return n / wall, cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="tasks per drain")
    args = parser.parse_args()
    with NatsServer() as server:
        os.environ["NATS_URL"] = server.url
        for i, variant in enumerate(("def", "def_soft", "def_soft_call", "async", "async_soft", "processes")):
            rate, cpu = asyncio.run(drain(args.n, f"pc{os.getpid()}x{i}", variant))
            print(f"{variant:<14} {rate:8,.0f} tasks/s   worker CPU {cpu:6.1f} µs/task")


if __name__ == "__main__":
    main()
