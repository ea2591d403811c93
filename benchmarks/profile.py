#!/usr/bin/env python
"""Profile natask's hot paths with pyinstrument and print where the time goes.

    pip install -e ".[bench]"
    python benchmarks/profile.py delay     # 3,000 sequential sync add.delay() calls (producer)
    python benchmarks/profile.py many      # add.delay_many() of 10,000 calls (producer)
    python benchmarks/profile.py drain     # an in-process worker draining 20,000 queued add() calls

Each starts its own nats-server (free loopback port, temporary JetStream directory). The report is
pyinstrument's call tree of the profiled thread (the caller's for ``delay``/``many``, the worker's
event loop for ``drain``; ``def`` tasks themselves run on worker threads and are not in it), with
frames under 2 % of the time folded away. ``--html PATH`` writes the interactive report too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from pyinstrument import Profiler  # noqa: E402

from natask import Worker  # noqa: E402
from natask.server import NatsServer  # noqa: E402


def profile_delay(profiler: Profiler, n: int) -> str:
    import bench_app

    app = bench_app.make_app(f"pd{os.getpid()}")
    add = app.tasks[bench_app.ADD]
    try:
        for _ in range(50):  # connect, create the stream, give the thread its own loop
            add.delay(1, 2)
        profiler.start()
        t0 = time.perf_counter()
        for _ in range(n):
            add.delay(1, 2)
        elapsed = time.perf_counter() - t0
        profiler.stop()
    finally:
        app.close()
    return f"{n:,} sync delay() calls: {n / elapsed:,.0f}/s"


def profile_many(profiler: Profiler, n: int) -> str:
    import bench_app

    app = bench_app.make_app(f"pm{os.getpid()}")
    add = app.tasks[bench_app.ADD]
    try:
        add.delay(0, 0)
        arglist = [(i, i) for i in range(n)]
        profiler.start()
        t0 = time.perf_counter()
        add.delay_many(arglist)
        elapsed = time.perf_counter() - t0
        profiler.stop()
    finally:
        app.close()
    return f"delay_many of {n:,} calls: {n / elapsed:,.0f}/s"


def profile_drain(profiler: Profiler, n: int) -> str:
    import bench_app

    app = bench_app.make_app(f"pw{os.getpid()}")
    add = app.tasks[bench_app.ADD]
    for start in range(0, n, 10_000):
        add.delay_many([(i, i) for i in range(start, min(n, start + 10_000))])
    app.close()

    async def drain() -> float:
        w = Worker(app, [bench_app.QUEUE], concurrency=64, max_tasks=n)
        profiler.start()
        t0 = time.perf_counter()
        await w.run()
        elapsed = time.perf_counter() - t0
        profiler.stop()
        return elapsed

    elapsed = asyncio.run(drain())
    app.close()
    return f"worker drained {n:,} def tasks (events on, -c 64): {n / elapsed:,.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["delay", "many", "drain"])
    parser.add_argument("-n", type=int, default=0, help="calls or tasks (defaults: 3,000 / 10,000 / 20,000)")
    parser.add_argument("--html", help="also write pyinstrument's HTML report here")
    args = parser.parse_args()
    n = args.n or {"delay": 3_000, "many": 10_000, "drain": 20_000}[args.what]
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    with NatsServer() as server:
        os.environ["NATS_URL"] = server.url
        run = {"delay": profile_delay, "many": profile_many, "drain": profile_drain}[args.what]
        summary = run(profiler, n)
    print(summary)
    print(profiler.output_text(unicode=True, color=False, show_all=False, time="percent_of_total",
                               flat=False, processor_options={"filter_threshold": 0.02}))
    if args.html:
        Path(args.html).write_text(profiler.output_html())


if __name__ == "__main__":
    main()
