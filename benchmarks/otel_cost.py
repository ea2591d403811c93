#!/usr/bin/env python
"""What ``natask.otel.instrument(app)`` costs: producer ``delay_many`` and an in-process worker's drain,
with and without tracing (SDK tracer provider, in-memory exporter, simple or batch span processor).

    python benchmarks/otel_cost.py              # 3 rounds of 5,000 tasks per measurement
    python benchmarks/otel_cost.py --runs 5 -n 10000

Each round measures every mode in turn on its own stream (so drift hits all modes alike); the table
shows the median rate per mode and its ratio to the untraced one. With tracing on, every task makes
two spans (publish, process) and carries a ``traceparent`` header.
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
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import natask.otel  # noqa: E402
from natask import Worker  # noqa: E402
from natask.server import NatsServer  # noqa: E402

MODES = ("off", "simple", "batch")
"""No tracing; SimpleSpanProcessor (exports on each span's end); BatchSpanProcessor (a thread)."""
CONCURRENCY = 64
"""Worker concurrency for the drains."""


async def measure(mode: str, n: int, prefix: str, task: str) -> tuple[float, float, int]:
    """(delay_many tasks/s, drain tasks/s, spans exported) for one mode."""
    app = bench_app.make_app(prefix)
    provider = None
    exporter = InMemorySpanExporter()
    if mode != "off":
        provider = TracerProvider()
        processor = SimpleSpanProcessor(exporter) if mode == "simple" else BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
        natask.otel.instrument(app, tracer_provider=provider)
    calls = [(i, i) for i in range(n)]
    await app.client.broker()  # connected before the clock starts
    started = time.perf_counter()
    await app.tasks[task].adelay_many(calls)
    enqueue = n / (time.perf_counter() - started)
    worker = Worker(app, [bench_app.QUEUE], concurrency=CONCURRENCY, max_tasks=n)
    await worker.start()
    started = time.perf_counter()
    await worker.run()
    drain = n / (time.perf_counter() - started)
    await app.aclose()
    if provider is not None:
        provider.shutdown()  # flushes the batch processor
    return enqueue, drain, len(exporter.get_finished_spans())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=5_000, help="tasks per measurement")
    args = parser.parse_args()
    rates: dict[tuple[str, str, str], list[float]] = {}
    with NatsServer() as server:
        os.environ["NATS_URL"] = server.url
        for r in range(args.runs):
            for task in (bench_app.ADD, bench_app.AADD):
                for mode in MODES:
                    prefix = f"oc{os.getpid()}r{r}{mode}{task.replace('.', '')}"
                    enqueue, drain, spans = asyncio.run(measure(mode, args.n, prefix, task))
                    expected = 0 if mode == "off" else 2 * args.n
                    assert spans == expected, f"{mode}: {spans} spans exported, expected {expected}"
                    rates.setdefault((task, mode, "delay_many"), []).append(enqueue)
                    rates.setdefault((task, mode, "drain"), []).append(drain)
    print(f"{args.n:,} no-op tasks per measurement, median of {args.runs} rounds, worker -c {CONCURRENCY} in-process\n")
    print("| task | measurement | untraced /s | simple /s | ratio | batch /s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task, kind in ((bench_app.ADD, "def"), (bench_app.AADD, "async def")):
        for what in ("delay_many", "drain"):
            off = statistics.median(rates[(task, "off", what)])
            simple = statistics.median(rates[(task, "simple", what)])
            batch = statistics.median(rates[(task, "batch", what)])
            print(f"| `{kind}` | {what} | {off:,.0f} | {simple:,.0f} | {simple / off:.2f} | {batch:,.0f} | "
                  f"{batch / off:.2f} |")


if __name__ == "__main__":
    main()
