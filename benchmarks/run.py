#!/usr/bin/env python
"""natask vs a raw nats-py loop, measured side by side in the same run (SPEC §12).

    python benchmarks/run.py            # full: median of 3 runs, 10,000-task drains
    python benchmarks/run.py --quick    # smoke: 1 run, 2,000 tasks

Starts its own nats-server (file storage in a temp dir, free loopback port), runs every measurement
for natask and for the raw reference, prints one Markdown table and writes
``benchmarks/results/latest.json``. See ``benchmarks/README.md`` for what each row measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_app  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402
from bench_app import AADD, ADD, ADD_RT, QUEUE  # noqa: E402
from nats.js.api import RetentionPolicy, StorageType, StreamConfig  # noqa: E402

from natask.server import NatsServer  # noqa: E402

POLL = 0.02
"""Seconds between two consumer-info polls while a worker drains."""
DLQ_STREAM = "NATASK_DLQ"
REPLY_HEADER = "Reply-To"  # must match raw_worker.REPLY_HEADER


class BenchError(RuntimeError):
    """A measurement could not be taken (timeout, worker died, lost messages)."""


@dataclass(frozen=True)
class Sizes:
    runs: int
    drain: int  # tasks queued before a worker drains them
    delay: int  # sequential delay() calls
    many: int  # tasks in one delay_many() call
    rt: int  # sequential round trips
    warmup: int  # untimed calls before the timed delay / round-trip loops
    concurrency: int  # natask worker -c


FULL = Sizes(runs=3, drain=10_000, delay=2_000, many=10_000, rt=500, warmup=50, concurrency=64)
QUICK = Sizes(runs=1, drain=2_000, delay=500, many=2_000, rt=200, warmup=20, concurrency=64)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "/s", "ms", "MB"
    higher_is_better: bool


def metrics(s: Sizes) -> list[Metric]:
    return [
        Metric("drain_def", f"drain, `def` task ({s.drain:,} queued, 1 worker -c {s.concurrency})", "/s", True),
        Metric("drain_async", f"drain, `async def` task ({s.drain:,} queued, 1 worker -c {s.concurrency})",
               "/s", True),
        Metric("delay", f"sync `delay()` loop ({s.delay:,} sequential, PubAck each)", "/s", True),
        Metric("delay_many", f"`delay_many` ({s.many:,} pipelined)", "/s", True),
        Metric("rt_p50", f"round trip `delay().get()` p50 ({s.rt} sequential)", "ms", False),
        Metric("rt_p99", f"round trip `delay().get()` p99 ({s.rt} sequential)", "ms", False),
        Metric("rss", "worker RSS peak after the `def` drain (VmHWM)", "MB", False),
    ]


# SPEC §12 bars: (metric, what is compared, limit)
BARS: list[tuple[str, str, float]] = [
    ("drain_async", "ratio>=", 0.60),
    ("drain_def", "ratio>=", 0.50),
    ("delay", "ratio>=", 0.80),
    ("delay_many", "ratio>=", 0.70),
    ("rt_p50", "ratio<=", 1.5),
    ("rt_p99", "natask<=", 3.0),
    ("rss", "natask<=", 50.0),
]


# -- small helpers ---------------------------------------------------------------------------
def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size of a live process, from /proc/<pid>/status (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def fresh_id(kind: str) -> str:
    return f"{kind}{secrets.token_hex(4)}"


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[tuple[Any, Any]]:
    nc = await nats.connect(url, name="natask-bench", connect_timeout=5, max_reconnect_attempts=3)
    try:
        yield nc, nc.jetstream()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)
        if not nc.is_closed:
            await nc.close()


async def stream_messages(js: Any, stream: str) -> int:
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.state.messages)


async def delete_streams(js: Any, *streams: str) -> None:
    for name in streams:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)


async def add_raw_stream(js: Any, name: str, subject: str) -> None:
    # The same kind of stream natask provisions: WorkQueue retention, file storage, one replica.
    await js.add_stream(StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE, num_replicas=1, allow_direct=True))


# -- the benchmark ---------------------------------------------------------------------------
class Bench:
    def __init__(self, server: NatsServer, workdir: Path, sizes: Sizes, poll: float, keep_logs: bool) -> None:
        self.server = server
        self.url = server.url
        self.workdir = workdir
        self.sizes = sizes
        self.poll = poll
        self.keep_logs = keep_logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.payload = self._natask_payload_size()

    # -- subprocesses ---------------------------------------------------------------------
    def env(self, prefix: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["NATS_URL"] = self.url
        paths = [str(HERE), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.pop("NATASK_SUBJECT_PREFIX", None)
        if prefix is not None:
            env["NATASK_BENCH_PREFIX"] = prefix
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        logfile = self.workdir / f"{name}.log"
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(ROOT))
        proc.logfile = logfile  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def spawn_natask_worker(self, prefix: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "natask", "worker", "-A", "bench_app:app", "-Q", QUEUE,
                "-c", str(self.sizes.concurrency), "--loglevel", "warning"]
        return self.spawn(f"natask-worker-{prefix}", args, self.env(prefix))

    def spawn_raw_worker(self, stream: str, subject: str, mode: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, str(HERE / "raw_worker.py"), "--url", self.url, "--stream", stream,
                "--subject", subject, "--durable", "raw", "--mode", mode, "--batch", "100"]
        return self.spawn(f"raw-worker-{stream}", args, self.env())

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)

    @staticmethod
    def tail(proc: subprocess.Popen[bytes], limit: int = 2000) -> str:
        path = getattr(proc, "logfile", None)
        if path is None or not Path(path).exists():
            return ""
        return Path(path).read_text(errors="replace")[-limit:]

    def _natask_payload_size(self) -> int:
        """Body size of one natask ``add(1, 2)`` message, so raw messages weigh the same."""
        app = bench_app.make_app("sizing")
        try:
            return len(app._prepare(ADD, (1, 2), {}, queue=QUEUE).payload)
        except Exception:  # private API moved: any plausible size will do
            return 100

    # -- drains -----------------------------------------------------------------------------
    async def watch_drain(self, js: Any, stream: str, durable: str, total: int,
                          proc: subprocess.Popen[bytes]) -> tuple[float, float]:
        """Poll the consumer until everything is acked; (first delivery, drained) in perf_counter time,
        each estimated as the midpoint between the last poll before and the first poll after."""
        deadline = time.perf_counter() + max(60.0, total / 200)
        last_idle = time.perf_counter()
        started: float | None = None
        last_busy = last_idle
        while True:
            if time.perf_counter() > deadline:
                raise BenchError(f"{stream}: not drained in time (worker log: {self.tail(proc)!r})")
            if proc.poll() is not None:
                raise BenchError(f"{stream}: worker exited with {proc.returncode}: {self.tail(proc)!r}")
            before = time.perf_counter()
            try:
                info = await js.consumer_info(stream, durable, timeout=2)
            except (nats.js.errors.NotFoundError, nats.errors.TimeoutError, asyncio.TimeoutError):
                info = None
            seen = (before + time.perf_counter()) / 2
            delivered = info is not None and info.delivered is not None and (info.delivered.stream_seq or 0) > 0
            if started is None:
                if delivered:
                    started = (last_idle + seen) / 2
                else:
                    last_idle = seen
            if started is not None and info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
                return started, (last_busy + seen) / 2
            if started is not None:
                last_busy = seen
            await asyncio.sleep(self.poll)

    def natask_drain(self, kind: str) -> dict[str, Any]:
        n = self.sizes.drain
        prefix = fresh_id("d")
        app = bench_app.make_app(prefix)
        task = app.tasks[ADD if kind == "def" else AADD]
        try:
            handles = task.delay_many([(i, i) for i in range(n)])
        finally:
            app.close()
        if len(handles) != n:
            raise BenchError(f"delay_many returned {len(handles)} handles for {n} calls")
        stream, durable = app.names.stream, app.names.consumer(QUEUE)

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (_, js):
                queued = await stream_messages(js, stream)
                if queued != n:
                    raise BenchError(f"{stream} holds {queued} messages, expected {n}")
                dlq_before = await stream_messages(js, DLQ_STREAM)
                spawned = time.perf_counter()
                proc = self.spawn_natask_worker(prefix)
                try:
                    t0, t1 = await self.watch_drain(js, stream, durable, n, proc)
                    rss = vm_hwm_mb(proc.pid)
                finally:
                    self.stop(proc)
                dead = await stream_messages(js, DLQ_STREAM) - dlq_before
                left = await stream_messages(js, stream)
                await delete_streams(js, stream, f"KV_{app.names.results_bucket}")
                if dead or left:
                    raise BenchError(f"natask {kind} drain: {dead} dead-lettered, {left} left in the stream; "
                                     f"worker log: {self.tail(proc)!r}")
                return {"rate": n / (t1 - t0), "seconds": t1 - t0, "rate_incl_startup": n / (t1 - spawned),
                        "rss_mb": rss}

        return asyncio.run(measure())

    def raw_drain(self) -> dict[str, Any]:
        n = self.sizes.drain
        rid = fresh_id("r")
        stream, subject = f"RAW_{rid.upper()}", f"raw{rid}.>"
        body = b"x" * self.payload

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (_, js):
                await add_raw_stream(js, stream, subject)
                try:
                    futures = [await js.publish_async(f"raw{rid}.bench.add", body) for _ in range(n)]
                    await asyncio.wait_for(asyncio.gather(*futures), 60)
                    queued = await stream_messages(js, stream)
                    if queued != n:
                        raise BenchError(f"{stream} holds {queued} messages, expected {n}")
                    spawned = time.perf_counter()
                    proc = self.spawn_raw_worker(stream, subject, "drain")
                    try:
                        t0, t1 = await self.watch_drain(js, stream, "raw", n, proc)
                        rss = vm_hwm_mb(proc.pid)
                    finally:
                        self.stop(proc)
                finally:
                    await delete_streams(js, stream)
                return {"rate": n / (t1 - t0), "seconds": t1 - t0, "rate_incl_startup": n / (t1 - spawned),
                        "rss_mb": rss}

        return asyncio.run(measure())

    # -- enqueue ----------------------------------------------------------------------------
    def natask_delay(self) -> dict[str, Any]:
        n, warmup = self.sizes.delay, self.sizes.warmup
        app = bench_app.make_app(fresh_id("e"))
        add = app.tasks[ADD]
        try:
            for _ in range(warmup):  # connect, create the stream, warm the I/O thread
                add.delay(1, 2)
            t0 = time.perf_counter()
            for _ in range(n):
                add.delay(1, 2)
            elapsed = time.perf_counter() - t0
        finally:
            app.close()
        self._check_and_drop(app.names.stream, n + warmup)
        return {"rate": n / elapsed, "seconds": elapsed}

    def raw_delay(self) -> dict[str, Any]:
        n, warmup = self.sizes.delay, self.sizes.warmup
        rid = fresh_id("r")
        stream, subject = f"RAW_{rid.upper()}", f"raw{rid}.bench.add"
        body = b"x" * self.payload

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (_, js):
                await add_raw_stream(js, stream, f"raw{rid}.>")
                try:
                    for _ in range(warmup):
                        await js.publish(subject, body)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        await js.publish(subject, body)
                    elapsed = time.perf_counter() - t0
                    queued = await stream_messages(js, stream)
                finally:
                    await delete_streams(js, stream)
                if queued != n + warmup:
                    raise BenchError(f"{stream} holds {queued} messages, expected {n + warmup}")
                return {"rate": n / elapsed, "seconds": elapsed}

        return asyncio.run(measure())

    def natask_delay_many(self) -> dict[str, Any]:
        n = self.sizes.many
        app = bench_app.make_app(fresh_id("m"))
        add = app.tasks[ADD]
        arglist = [(i, i) for i in range(n)]
        try:
            add.delay(0, 0)  # connect and create the stream outside the timing
            t0 = time.perf_counter()
            handles = add.delay_many(arglist)
            elapsed = time.perf_counter() - t0
        finally:
            app.close()
        if len(handles) != n:
            raise BenchError(f"delay_many returned {len(handles)} handles for {n} calls")
        self._check_and_drop(app.names.stream, n + 1)
        return {"rate": n / elapsed, "seconds": elapsed}

    def raw_delay_many(self) -> dict[str, Any]:
        n = self.sizes.many
        rid = fresh_id("r")
        stream, subject = f"RAW_{rid.upper()}", f"raw{rid}.bench.add"
        body = b"x" * self.payload

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (_, js):
                await add_raw_stream(js, stream, f"raw{rid}.>")
                try:
                    await js.publish(subject, body)
                    t0 = time.perf_counter()
                    futures = [await js.publish_async(subject, body) for _ in range(n)]
                    await asyncio.wait_for(asyncio.gather(*futures), 60)
                    elapsed = time.perf_counter() - t0
                    queued = await stream_messages(js, stream)
                finally:
                    await delete_streams(js, stream)
                if queued != n + 1:
                    raise BenchError(f"{stream} holds {queued} messages, expected {n + 1}")
                return {"rate": n / elapsed, "seconds": elapsed}

        return asyncio.run(measure())

    def _check_and_drop(self, stream: str, expected: int) -> None:
        async def check() -> None:
            async with connect(self.url) as (_, js):
                queued = await stream_messages(js, stream)
                await delete_streams(js, stream)
                if queued != expected:
                    raise BenchError(f"{stream} holds {queued} messages, expected {expected}")

        asyncio.run(check())

    # -- round trips ------------------------------------------------------------------------
    def natask_rt(self) -> dict[str, Any]:
        n, warmup = self.sizes.rt, self.sizes.warmup
        prefix = fresh_id("t")
        proc = self.spawn_natask_worker(prefix)
        app = bench_app.make_app(prefix)
        task = app.tasks[ADD_RT]

        async def measure() -> list[float]:
            try:
                first = await task.adelay(1, 2)  # waits for the worker to come up
                if await first.aget(timeout=60) != 3:
                    raise BenchError("add_rt(1, 2) did not return 3")
                for _ in range(warmup - 1):
                    await (await task.adelay(1, 2)).aget(timeout=10)
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await (await task.adelay(1, 2)).aget(timeout=10)
                    samples.append(time.perf_counter() - t0)
                return samples
            finally:
                await app.aclose()

        try:
            samples = asyncio.run(measure())
            rss = vm_hwm_mb(proc.pid)
        except Exception as e:
            raise BenchError(f"natask round trip failed: {e!r}; worker log: {self.tail(proc)!r}") from e
        finally:
            self.stop(proc)
            asyncio.run(self._drop(app.names.stream, f"KV_{app.names.results_bucket}"))
        return self._latency(samples) | {"rss_mb": rss}

    def raw_rt(self) -> dict[str, Any]:
        n, warmup = self.sizes.rt, self.sizes.warmup
        rid = fresh_id("r")
        stream, subject = f"RAW_{rid.upper()}", f"raw{rid}.bench.add"
        body = b"x" * self.payload

        async def measure() -> tuple[list[float], float | None]:
            async with connect(self.url) as (nc, js):
                await add_raw_stream(js, stream, f"raw{rid}.>")
                proc = self.spawn_raw_worker(stream, f"raw{rid}.>", "rpc")
                try:
                    inbox = nc.new_inbox()
                    waiting: dict[str, asyncio.Future[bytes]] = {}

                    async def on_reply(msg: Any) -> None:
                        fut = waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
                        if fut is not None and not fut.done():
                            fut.set_result(msg.data)

                    await nc.subscribe(f"{inbox}.*", cb=on_reply)
                    loop = asyncio.get_running_loop()

                    async def call(i: int, timeout: float) -> None:
                        fut: asyncio.Future[bytes] = loop.create_future()
                        waiting[str(i)] = fut
                        await js.publish(subject, body, headers={REPLY_HEADER: f"{inbox}.{i}"})
                        await asyncio.wait_for(fut, timeout)

                    await call(0, 60)  # waits for the worker to come up
                    for i in range(1, warmup):
                        await call(i, 10)
                    samples = []
                    for i in range(warmup, warmup + n):
                        t0 = time.perf_counter()
                        await call(i, 10)
                        samples.append(time.perf_counter() - t0)
                    return samples, vm_hwm_mb(proc.pid)
                except Exception as e:
                    raise BenchError(f"raw round trip failed: {e!r}; worker log: {self.tail(proc)!r}") from e
                finally:
                    self.stop(proc)
                    await delete_streams(js, stream)

        samples, rss = asyncio.run(measure())
        return self._latency(samples) | {"rss_mb": rss}

    async def _drop(self, *streams: str) -> None:
        async with connect(self.url) as (_, js):
            await delete_streams(js, *streams)

    @staticmethod
    def _latency(samples: list[float]) -> dict[str, Any]:
        ms = [s * 1000 for s in samples]
        return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms),
                "max_ms": max(ms), "n": len(ms)}


# -- one run, many runs ----------------------------------------------------------------------
PAIRS: list[tuple[str, str, str]] = [
    # (measurement, natask method, raw method)
    ("drain_def", "natask_drain:def", "raw_drain"),
    ("drain_async", "natask_drain:async", "raw_drain"),
    ("delay", "natask_delay", "raw_delay"),
    ("delay_many", "natask_delay_many", "raw_delay_many"),
    ("rt", "natask_rt", "raw_rt"),
]


def call(bench: Bench, spec: str) -> dict[str, Any]:
    name, _, arg = spec.partition(":")
    method: Callable[..., dict[str, Any]] = getattr(bench, name)
    return method(arg) if arg else method()


def one_run(bench: Bench, index: int, only: set[str] | None) -> dict[str, Any]:
    """Every measurement once, natask and raw back to back (alternating which goes first)."""
    out: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    for key, natask_spec, raw_spec in PAIRS:
        if only and key not in only:
            continue
        order = [("natask", natask_spec), ("raw", raw_spec)]
        if index % 2:
            order.reverse()
        out[key] = {}
        for side, spec in order:
            try:
                out[key][side] = call(bench, spec)
                log(f"  run {index + 1} {key:<11} {side:<6} {brief(out[key][side])}")
            except Exception as e:
                bench.stop_all()
                out[key][side] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  run {index + 1} {key:<11} {side:<6} FAILED: {e}")
                if os.environ.get("NATASK_BENCH_TRACE"):
                    traceback.print_exc()
    return out


def brief(result: dict[str, Any]) -> str:
    if "rate" in result:
        return f"{result['rate']:,.0f}/s in {result['seconds']:.3f}s" + (
            f", RSS {result['rss_mb']:.1f} MB" if result.get("rss_mb") else "")
    return f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"


def value(run: dict[str, Any], key: str, side: str) -> float | None:
    """The headline number of one metric in one run (None if it failed)."""
    source = {"drain_def": "drain_def", "drain_async": "drain_async", "delay": "delay",
              "delay_many": "delay_many", "rt_p50": "rt", "rt_p99": "rt", "rss": "drain_def"}[key]
    result = run.get(source, {}).get(side)
    if not result or "error" in result:
        return None
    field = {"rt_p50": "p50_ms", "rt_p99": "p99_ms", "rss": "rss_mb"}.get(key, "rate")
    v = result.get(field)
    return None if v is None else float(v)


def summarize(runs: list[dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for m in metrics(sizes):
        nat = [v for r in runs if (v := value(r, m.key, "natask")) is not None]
        raw = [v for r in runs if (v := value(r, m.key, "raw")) is not None]
        paired = [a / b for r in runs
                  if (a := value(r, m.key, "natask")) is not None and (b := value(r, m.key, "raw"))]
        summary[m.key] = {
            "label": m.label,
            "unit": m.unit,
            "natask": statistics.median(nat) if nat else None,
            "raw": statistics.median(raw) if raw else None,
            "ratio": statistics.median(paired) if paired else None,
            "natask_runs": nat,
            "raw_runs": raw,
            "ratio_runs": paired,
        }
    return summary


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "/s":
        return f"{v:,.0f}/s"
    if unit == "ms":
        return f"{v:.2f} ms"
    return f"{v:.1f} MB"


def table(summary: dict[str, Any]) -> str:
    lines = ["| metric | natask | raw nats-py | ratio |", "|---|---:|---:|---:|"]
    for row in summary.values():
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"| {row['label']} | {fmt(row['natask'], row['unit'])} | {fmt(row['raw'], row['unit'])} "
                     f"| {ratio} |")
    return "\n".join(lines)


def check_bars(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, how, limit in BARS:
        row = summary.get(key)
        if row is None:
            continue
        side, op = how[:-2], how[-2:]
        v = row[side]
        ok = None if v is None else (v >= limit if op == ">=" else v <= limit)
        out.append({"metric": key, "what": side, "op": op, "limit": limit, "value": v, "ok": ok})
    return out


def bars_text(bars: list[dict[str, Any]]) -> str:
    lines = ["SPEC §12 bars:"]
    for b in bars:
        mark = "n/a " if b["ok"] is None else ("ok  " if b["ok"] else "MISS")
        v = "n/a" if b["value"] is None else f"{b['value']:.2f}"
        lines.append(f"  {mark} {b['metric']:<12} {b['what']} {v} {b['op']} {b['limit']:g}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    server_version = None
    with contextlib.suppress(Exception):
        from natask.server import find_binary

        server_version = subprocess.run([find_binary(), "--version"], capture_output=True, text=True,
                                        timeout=5).stdout.strip()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "natask": version("natask"),
        "nats-py": version("nats-py"),
        "nats-server": server_version,
        "git_commit": commit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke: 1 run, 2,000 tasks")
    parser.add_argument("--runs", type=int, default=None, help="runs to take the median of (default 3; 1 with --quick)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per drain and per delay_many")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of: " + ", ".join(k for k, _, _ in PAIRS))
    parser.add_argument("--poll", type=float, default=POLL, help="consumer poll interval during drains (s)")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"), help="where to write the JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker/server logs and print where")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        sizes = Sizes(**{**asdict(sizes), "runs": max(1, args.runs)})
    if args.tasks is not None:
        sizes = Sizes(**{**asdict(sizes), "drain": args.tasks, "many": args.tasks})
    only = {k.strip() for k in args.only.split(",")} if args.only else None
    if only and only - {k for k, _, _ in PAIRS}:
        parser.error(f"--only: unknown measurement(s) {', '.join(sorted(only - {k for k, _, _ in PAIRS}))}")

    workdir = Path(tempfile.mkdtemp(prefix="natask-bench-"))
    server = NatsServer(log_file=str(workdir / "nats-server.log"))
    bench: Bench | None = None
    started = time.time()
    try:
        server.start()
        os.environ["NATS_URL"] = server.url  # the bench's own producer apps read it too
        env_info = environment()
        log(f"nats-server {server.url} (store {server.store_dir}); logs in {workdir}")
        log(f"sizes: {sizes}")
        bench = Bench(server, workdir, sizes, args.poll, args.keep_logs)
        runs = []
        for i in range(sizes.runs):
            log(f"run {i + 1}/{sizes.runs} (load average {os.getloadavg()[0]:.2f})")
            runs.append(one_run(bench, i, only))
    finally:
        if bench is not None:
            bench.stop_all()
        server.close()

    summary = summarize(runs, sizes)
    if only:
        keep = {k for k in summary if value_source(k) in only}
        summary = {k: v for k, v in summary.items() if k in keep}
    bars = check_bars(summary)
    text = table(summary)
    print()
    print(text)
    print()
    print(bars_text(bars))
    print(f"\n(median of {sizes.runs} run(s); ratio = median of the per-run natask/raw ratios; "
          f"{time.time() - started:.0f}s total)")

    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "sizes": asdict(sizes),
        "raw_payload_bytes": bench.payload if bench else None,
        "poll_seconds": args.poll,
        "environment": env_info,
        "summary": summary,
        "bars": bars,
        "runs": runs,
        "table_markdown": text,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {out}")
    if args.keep_logs:
        log(f"logs kept in {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    failed = any("error" in side for r in runs for k, v in r.items() if isinstance(v, dict)
                 for side in v.values() if isinstance(side, dict))
    return 1 if failed else 0


def value_source(key: str) -> str:
    return {"rt_p50": "rt", "rt_p99": "rt", "rss": "drain_def"}.get(key, key)


if __name__ == "__main__":
    sys.exit(main())
