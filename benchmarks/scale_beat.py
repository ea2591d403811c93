#!/usr/bin/env python
"""Beat at scale: N one-second interval entries, natask's beat beside a raw nats-py loop in the same run.

    python benchmarks/scale_beat.py           # 1,000 and 10,000 entries, 20 s measured each
    python benchmarks/scale_beat.py --quick   # the same sizes, 6 s measured each
    python benchmarks/scale_beat.py --sizes 1000 --seconds 30

Starts its own nats-server (file storage in a temp dir, free loopback port), or uses ``--server URL``.
Per size: a natask ``Beat`` (lease, records, the app's publish path) runs in this process; then a raw
nats-py loop that, at each whole second, publishes the same ticks (same subject, same ``Nats-Msg-Id``s,
a msgpack body) pipelined on one connection and waits for every PubAck (no lease, no records). Tick
lag = the stream's store time of a tick minus its fire time, over every tick that fell due in the
measured window; CPU = this process's CPU time over that window (the server's excluded).
``measure(server_url, quick)`` returns the rows for a combined report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import nats  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig  # noqa: E402

from natask import Natask  # noqa: E402
from natask.beat import TICK_SEP, TICK_TIME_FORMAT, Beat, tick_id  # noqa: E402
from natask.beat.leader import bucket_name  # noqa: E402
from natask.beat.records import RECORD_PREFIX  # noqa: E402
from natask.server import NatsServer  # noqa: E402

SIZES = (1_000, 10_000)
"""Entries per measurement (each a one-second interval entry)."""
FULL_SECONDS = 20
QUICK_SECONDS = 6
WARMUP = 3.0
"""Seconds the beat (or raw loop) runs before the measured window opens: election, first load, first pass."""
DRAIN_LIMIT = 60.0
"""Seconds after the window to wait for its last ticks before giving up (they count as missing)."""
TASK = "jobs.tick"
UTC = timezone.utc


def noop() -> None: ...


def entry_name(i: int) -> str:
    return f"e{i:05d}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@lru_cache(maxsize=4096)
def _fire_of_stamp(stamp: str) -> float:
    return datetime.strptime(stamp, TICK_TIME_FORMAT).replace(tzinfo=UTC).timestamp()


def fire_of(task_id: str) -> float:
    return _fire_of_stamp(task_id.rsplit(TICK_SEP, 1)[1])


async def sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.time()))


async def stored_lags(nc: Any, stream: str, subject: str, start: float, end: float) -> tuple[list[float], int]:
    """Lags (s) of the stored ticks whose fire time is in [start, end), and how many were stored twice."""
    js = nc.jetstream()
    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1, ack_wait=600)
    psub = await js.pull_subscribe(subject, durable="lagreader", stream=stream, config=config)
    lags: list[float] = []
    ids: Counter[str] = Counter()
    total = (await js.stream_info(stream)).state.messages
    seen = 0
    try:
        while seen < total:
            batch = await psub.fetch(1000, timeout=10)
            for msg in batch:
                seen += 1
                task_id = (msg.headers or {})["Nats-Msg-Id"]
                fire = fire_of(task_id)
                if start <= fire < end:
                    ids[task_id] += 1
                    lags.append(msg.metadata.timestamp.timestamp() - fire)
    finally:
        await psub.unsubscribe()
    return lags, sum(c - 1 for c in ids.values())


def summary(side: str, n: int, seconds: int, lags: list[float], twice: int, cpu: float) -> dict[str, Any]:
    expected = n * seconds
    out = {"side": side, "entries": n, "expected": expected, "stored": len(lags) - twice, "twice": twice,
           "missing": expected - (len(lags) - twice), "cpu_pct": 100 * cpu / seconds,
           "p50_ms": 1000 * percentile(lags, 0.50) if lags else math.nan,
           "p99_ms": 1000 * percentile(lags, 0.99) if lags else math.nan,
           "max_ms": 1000 * max(lags) if lags else math.nan}
    print(f"  {side:<6} {n:>6,} entries: lag p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms, "
          f"max {out['max_ms']:.1f} ms, CPU {out['cpu_pct']:.1f} %, {out['missing']} missing, "
          f"{twice} stored twice", file=sys.stderr)
    return out


async def natask_side(url: str, n: int, seconds: int) -> dict[str, Any]:
    prefix = f"sb{n}x{os.getpid()}"
    app = Natask("scalebeat", servers=[url], subject_prefix=prefix, publish_timeout=30)
    tick = app.task(name=TASK)(noop)
    for i in range(n):
        app.add_periodic_task(timedelta(seconds=1), tick.s(), name=entry_name(i))
    beat = Beat(app)
    broker = await app.client.broker()
    try:
        await beat.start()
        start = math.ceil(time.time() + WARMUP)
        end = start + seconds
        await sleep_until(start)
        cpu0 = time.process_time()
        await sleep_until(end)
        cpu = time.process_time() - cpu0
        # Wait for the window's last fire time to be recorded for the last entry (the last one sent).
        kv = await broker.js.key_value(bucket_name(app))
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                if _later((await kv.get(RECORD_PREFIX + entry_name(n - 1))).value, end - 1):
                    break
            await asyncio.sleep(0.2)
        await beat.stop()
        stream = broker.names.stream
        lags, twice = await stored_lags(broker.nc, stream, f"{prefix}.>", start, end)
        await broker.js.delete_stream(stream)
        await broker.js.delete_key_value(bucket_name(app))
    finally:
        await beat.stop()
        await app.aclose()
    return summary("natask", n, seconds, lags, twice, cpu)


def _later(value: bytes | None, fire: int) -> bool:
    try:
        return int(json.loads(value or b"{}").get("fire", 0)) >= fire
    except ValueError:
        return False


async def raw_side(url: str, n: int, seconds: int) -> dict[str, Any]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"RAWBEAT{n}X{os.getpid()}"
    subject = f"rawbeat{n}.default.{TASK}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"rawbeat{n}.>"], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE, duplicate_window=120))
    names = [entry_name(i) for i in range(n)]
    acks = 0
    done = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        nonlocal acks
        acks += 1
        if acks >= n:
            done.set()

    inbox = nc.new_inbox()
    await nc.subscribe(f"{inbox}.*", cb=on_ack)
    stop = False

    async def loop() -> None:
        nonlocal acks
        fire = math.ceil(time.time())
        while not stop:
            await sleep_until(fire)
            when = datetime.fromtimestamp(fire, UTC)
            acks = 0
            done.clear()
            for i, name in enumerate(names):
                task_id = tick_id(name, when)
                body = msgpack.packb({"id": task_id, "task": TASK, "args": [], "kwargs": {}})
                await nc.publish(subject, body, f"{inbox}.{i}", {"Nats-Msg-Id": task_id, "Natask-Task": TASK})
            await asyncio.wait_for(done.wait(), 30)
            fire = max(fire + 1, math.ceil(time.time()))

    try:
        runner = asyncio.create_task(loop())
        start = math.ceil(time.time() + WARMUP)
        end = start + seconds
        await sleep_until(start)
        cpu0 = time.process_time()
        await sleep_until(end)
        cpu = time.process_time() - cpu0
        await sleep_until(end + 0.5)  # the window's last second is published by then (or counted missing)
        stop = True
        await runner
        lags, twice = await stored_lags(nc, stream, f"rawbeat{n}.>", start, end)
        await js.delete_stream(stream)
    finally:
        await nc.close()
    return summary("raw", n, seconds, lags, twice, cpu)


def rows_for(n: int, nat: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label, unit in (("p50_ms", "tick lag p50", "ms"), ("p99_ms", "tick lag p99", "ms"),
                             ("cpu_pct", "beat process CPU", "%")):
        a, b = nat[key], raw[key]
        rows.append({"name": f"beat, {n:,} one-second entries: {label}", "natask": a, "reference": b,
                     "ratio": a / b if b else math.nan, "unit": unit})
    for side in (nat, raw):
        if side["missing"] or side["twice"]:
            rows.append({"name": f"beat, {n:,} entries, {side['side']}: ticks missing (stored twice: "
                                 f"{side['twice']})",
                         "natask": side["missing"] if side is nat else math.nan,
                         "reference": side["missing"] if side is raw else math.nan,
                         "ratio": math.nan, "unit": "ticks"})
    return rows


async def measure(server_url: str, quick: bool, sizes: tuple[int, ...] = SIZES,
                  seconds: int | None = None) -> list[dict[str, Any]]:
    """Rows (name, natask, reference, ratio, unit) for each size: tick lag p50/p99 and CPU %."""
    window = seconds or (QUICK_SECONDS if quick else FULL_SECONDS)
    rows = []
    for n in sizes:
        print(f"beat, {n:,} one-second entries, {window} s measured (load average {os.getloadavg()[0]:.2f})",
              file=sys.stderr)
        nat = await natask_side(server_url, n, window)
        raw = await raw_side(server_url, n, window)
        rows.extend(rows_for(n, nat, raw))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: float, unit: str) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "n/a"
        return f"{v:,.1f} {unit}" if unit != "ticks" else f"{v:,.0f}"

    lines = ["| metric | natask | raw nats-py | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = "n/a" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {fmt(r['natask'], r['unit'])} | {fmt(r['reference'], r['unit'])} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS} s windows instead of {FULL_SECONDS}")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="entry counts, comma-separated")
    parser.add_argument("--seconds", type=int, default=None, help="length of each measured window")
    parser.add_argument("--server", default=None, help="use this nats-server instead of starting one")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.server:
        rows = asyncio.run(measure(args.server, args.quick, sizes, args.seconds))
    else:
        with NatsServer() as server:
            rows = asyncio.run(measure(server.url, args.quick, sizes, args.seconds))
    print(table(rows))


if __name__ == "__main__":
    main()
