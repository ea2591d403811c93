#!/usr/bin/env python
"""What events and metrics cost a worker, measured inside one worker process.

    python benchmarks/events_cost.py                # 3 runs of 60,000 queued def tasks
    python benchmarks/events_cost.py --runs 5 -n 100000

Comparing two separate drains (``run.py``'s events rows) mixes the cost in with the machine's
drift between the drains, which on a small VM is larger than the cost. Here one worker (``-c 64``,
events on, Prometheus metrics on) drains the queue while its event listeners are switched off and
on every 100 ms; the worker's CPU time (all threads) is summed per phase and divided by the tasks
finished in that phase. Switching off removes the event publisher and the metrics counting, i.e.
what ``--without-events`` and no ``--metrics-port`` remove. Drift hits both phases alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_app  # noqa: E402

from natask import Worker  # noqa: E402
from natask.metrics import WorkerMetrics  # noqa: E402
from natask.server import NatsServer  # noqa: E402

PHASE = 0.1
"""Seconds per phase (listeners on, then off, then on...)."""


async def one_run(n: int, prefix: str) -> tuple[float, float]:
    """CPU microseconds per task with the listeners on, and off."""
    app = bench_app.make_app(prefix)
    add = app.tasks[bench_app.ADD]
    for start in range(0, n, 10_000):
        await add.adelay_many([(i, i) for i in range(start, min(n, start + 10_000))])
    await app.aclose()
    worker = Worker(app, [bench_app.QUEUE], concurrency=64, max_tasks=n)
    await worker.start()
    metrics = WorkerMetrics(worker)
    worker.listeners.append(metrics)
    metrics.start()
    on = list(worker.listeners)
    totals = {True: [0.0, 0], False: [0.0, 0]}

    async def switch() -> None:
        state = True
        cpu, done = time.process_time(), worker.processed
        while True:
            await asyncio.sleep(PHASE)
            cpu2, done2 = time.process_time(), worker.processed
            totals[state][0] += cpu2 - cpu
            totals[state][1] += done2 - done
            cpu, done, state = cpu2, done2, not state
            worker.listeners[:] = on if state else []

    switcher = asyncio.create_task(switch())
    await worker.run()
    switcher.cancel()
    await app.aclose()
    return (totals[True][0] / max(1, totals[True][1]) * 1e6, totals[False][0] / max(1, totals[False][1]) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=60_000, help="tasks per run")
    args = parser.parse_args()
    ratios = []
    with NatsServer() as server:
        os.environ["NATS_URL"] = server.url
        for i in range(args.runs):
            on, off = asyncio.run(one_run(args.n, f"ec{os.getpid()}x{i}"))
            ratios.append(off / on)
            print(f"run {i + 1}: worker CPU per task {on:.1f} µs with events and metrics, {off:.1f} µs "
                  f"without: rate ratio on/off {off / on:.3f}")
    print(f"median rate ratio on/off: {statistics.median(ratios):.3f} (SPEC: a drop of at most 5 %, >= 0.95)")


if __name__ == "__main__":
    main()
