#!/usr/bin/env python
"""natask vs a raw nats-py loop, measured side by side in the same run (SPEC §12).

    python benchmarks/run.py            # full: median of 3 runs, 10,000-task drains
    python benchmarks/run.py --quick    # smoke: 1 run, 2,000 tasks
    python benchmarks/run.py --soak 100000  # also: 100,000 tasks through one worker, RSS start/end/peak

Starts its own nats-server (file storage in a temp dir, free loopback port), runs every measurement
for natask and for the raw reference, prints one Markdown table and writes
``benchmarks/results/latest.json``. See ``benchmarks/README.md`` for what each row measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
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

from natask.message import loads  # noqa: E402
from natask.server import NatsServer  # noqa: E402

POLL = 0.02
"""Seconds between two consumer-info polls while a worker drains."""
DLQ_STREAM = "NATASK_DLQ"
REPLY_HEADER = "Reply-To"  # must match raw_worker.REPLY_HEADER
SOAK_CHUNK = 10_000
"""Tasks per ``delay_many`` call (and per batch of raw publishes) when filling the soak queue."""
SOAK_START = 1_000
"""The soak's "start" RSS is read once this many tasks are done (imports, connections, buffers warm)."""
SOAK_STALL = 30.0
"""A soak fails when nothing is acked for this many seconds."""


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
    source: str = ""  # the measurement (PAIRS key) it is read from; default: key
    field: str = "rate"  # the field of that measurement's result
    raw: bool = True  # False: the raw loop has no counterpart (shown as n/a)


def metrics(s: Sizes) -> list[Metric]:
    workers = f"1 worker -c {s.concurrency}"
    return [
        Metric("drain_def", f"drain, `def` task ({s.drain:,} queued, {workers}; events on, the default)", "/s", True),
        Metric("drain_def_metrics", "drain, `def` task, events + metrics on (`--metrics-port`)", "/s", True),
        Metric("drain_def_noevents", "drain, `def` task, `--without-events`", "/s", True),
        Metric("drain_def_p2", f"drain, `def` task, `--processes 2` (2 children -c {s.concurrency} each)", "/s",
               True),
        Metric("drain_def_pool", f"drain, `def` task, `--pool processes` (child processes, {workers})", "/s",
               True),
        Metric("drain_async", f"drain, `async def` task ({s.drain:,} queued, {workers})", "/s", True),
        Metric("delay", f"sync `delay()` loop ({s.delay:,} sequential, PubAck each)", "/s", True),
        Metric("delay_many", f"`delay_many` ({s.many:,} pipelined)", "/s", True),
        Metric("rt_p50", f"round trip `delay().get()` p50 ({s.rt} sequential)", "ms", False, "rt", "p50_ms"),
        Metric("rt_p99", f"round trip `delay().get()` p99 ({s.rt} sequential)", "ms", False, "rt", "p99_ms"),
        Metric("cpu", "worker CPU per 1,000 tasks in the `def` drain (events on)", "ms", False, "drain_def",
               "cpu_ms_per_1k"),
        Metric("rss", "worker RSS peak after the `def` drain (VmHWM)", "MB", False, "drain_def", "rss_mb"),
        Metric("rss_p2", "worker RSS peak, `--processes 2`: sum of the 2 children's VmHWM (raw: n/a)", "MB",
               False, "drain_def_p2", "rss_mb", raw=False),
    ]


def soak_metrics(n: int) -> list[Metric]:
    return [
        Metric("soak_rate", f"soak: drain of {n:,} queued tasks (1 worker, events on)", "/s", True, "soak", "rate"),
        Metric("soak_rss_start", f"soak: worker RSS after the first {SOAK_START:,} tasks (VmRSS)", "MB", False,
               "soak", "rss_start_mb"),
        Metric("soak_rss_end", f"soak: worker RSS after all {n:,} tasks (VmRSS)", "MB", False, "soak",
               "rss_end_mb"),
        Metric("soak_rss_peak", "soak: worker RSS peak (VmHWM, whole life)", "MB", False, "soak", "rss_peak_mb"),
        Metric("soak_growth", "soak: RSS end / start (flat = within 10 %)", "x", False, "soak", "growth"),
    ]


# SPEC §12 bars: (metric, what is compared, limit)
BARS: list[tuple[str, str, float]] = [
    ("drain_async", "ratio>=", 0.60),
    ("drain_def", "ratio>=", 0.50),
    ("events_cost", "ratio>=", 0.95),
    ("events_cost", "cpu_ratio>=", 0.95),
    ("delay", "ratio>=", 0.80),
    ("delay_many", "ratio>=", 0.70),
    ("rt_p50", "ratio<=", 1.5),
    ("rt_p99", "natask<=", 3.0),
    ("rss", "natask<=", 50.0),
    ("soak_rss_peak", "natask<=", 50.0),
    ("soak_growth", "natask<=", 1.10),
    ("soak_growth", "natask>=", 0.90),
]

# natask against natask, paired within each run: (key, label, numerator, denominator)
COMPARISONS: list[tuple[str, str, str, str]] = [
    ("events_cost", "events + metrics on / `--without-events` (SPEC: >= 0.95)", "drain_def_metrics",
     "drain_def_noevents"),
    ("events_only", "events on (default) / `--without-events`", "drain_def", "drain_def_noevents"),
    ("metrics_only", "events + metrics on / events on (default)", "drain_def_metrics", "drain_def"),
    ("processes_2", "`--processes 2` / 1 process (both events on)", "drain_def_p2", "drain_def"),
    ("pool_processes", "`--pool processes` / `--pool threads` (the default)", "drain_def_pool", "drain_def"),
]


# -- small helpers ---------------------------------------------------------------------------
def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def proc_status_mb(pid: int, field: str) -> float | None:
    """A memory field (``VmHWM``: peak RSS, ``VmRSS``: RSS now) of a live process, in MB, from
    /proc/<pid>/status (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size of a live process."""
    return proc_status_mb(pid, "VmHWM")


def vm_rss_mb(pid: int) -> float | None:
    """Resident set size of a live process, now."""
    return proc_status_mb(pid, "VmRSS")


def child_pids(pid: int) -> list[int]:
    """The direct children of a live process, from /proc/<pid>/task/*/children (Linux 3.5+)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(p) for p in f.read().split())
    return sorted(set(out))


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of live processes, from /proc/<pid>/stat (None if one is gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Worker CPU per task in the steady middle of a drain. Called with the number of tasks acked
    at each poll, it keeps the first reading taken with at least 10 % of the tasks done and the
    last one with at most 90 % done: start-up (imports, connecting, the first prefetch) and the
    tail are left out, and the tasks in flight at either end roughly cancel out.
    ``children``: measure a supervisor's workers (summed) instead of the process itself."""

    def __init__(self, pid: int, total: int, children: bool = False) -> None:
        self.pid = pid
        self.low, self.high = total // 10, total - total // 10
        self.children = children
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def __call__(self, done: int) -> None:
        if done < self.low or done > self.high or (self.last is not None and done == self.last[0]):
            return
        cpu = cpu_seconds(child_pids(self.pid) if self.children else [self.pid])
        if cpu is None:
            return
        if self.first is None:
            self.first = (done, cpu)
        self.last = (done, cpu)

    def ms_per_1k(self) -> float | None:
        """CPU milliseconds per 1,000 tasks (None: too few readings, e.g. a drain faster than 3 polls)."""
        if self.first is None or self.last is None or self.last[0] - self.first[0] < 100:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0]) * 1e6


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() or None
    except OSError:
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_succeeded(port: int, task: str) -> float | None:
    """``natask_tasks_total{outcome="succeeded"}`` of ``task`` from a worker's /metrics (None: unreadable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("natask_tasks_total{") and 'outcome="succeeded"' in line and f'task="{task}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


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


# natask drain variants: variant -> (task, extra `natask worker` arguments; "{port}": a free port)
DRAIN_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "def": (ADD, ()),  # as users run it by default: events on, no metrics endpoint
    "async": (AADD, ()),
    "def_metrics": (ADD, ("--metrics-port", "{port}")),
    "def_noevents": (ADD, ("--without-events",)),
    "def_p2": (ADD, ("--processes", "2")),
    "def_pool": (ADD, ("--pool", "processes")),
}


def count_events(received: list[tuple[str, bytes]]) -> dict[str, int]:
    """Event messages seen and events per type (a message carries a batch of events of one type)."""
    counts = {"messages": len(received), "task-succeeded": 0}
    for subject, data in received:
        try:
            batch = loads(data)
        except Exception:
            continue
        kind = subject.rsplit(".", 1)[-1]
        rows = batch.get("events") if isinstance(batch, dict) else None
        counts[kind] = counts.get(kind, 0) + (len(rows) if isinstance(rows, list) else 1)
    return counts


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

    def spawn_natask_worker(self, prefix: str, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        """``natask worker`` as users run it: events on (the default) unless ``extra`` says otherwise."""
        args = [sys.executable, "-m", "natask", "worker", "-A", "bench_app:app", "-Q", QUEUE,
                "-c", str(self.sizes.concurrency), "--loglevel", "warning", *(extra or [])]
        return self.spawn(f"natask-worker-{prefix}", args, self.env(prefix))

    def spawn_raw_worker(self, stream: str, subject: str, mode: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, str(HERE / "raw_worker.py"), "--url", self.url, "--stream", stream,
                "--subject", subject, "--durable", "raw", "--mode", mode, "--batch", "100"]
        return self.spawn(f"raw-worker-{stream}", args, self.env())

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        # a supervisor's workers, with their command lines (to recognise them later)
        children = [(pid, _cmdline(pid)) for pid in child_pids(proc.pid)] if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                log(f"  pid {proc.pid} did not exit within 15 s of SIGTERM: killed")
                proc.kill()
                proc.wait(10)
        for pid, cmdline in children:  # normally gone with their supervisor; never leave one behind
            if _cmdline(pid) == cmdline:  # still that process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    log(f"  child pid {pid} outlived its supervisor: killed")
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
            return len(app.client.prepare(ADD, (1, 2), {}, queue=QUEUE).payload)
        except Exception:  # private API moved: any plausible size will do
            return 100

    # -- drains -----------------------------------------------------------------------------
    async def watch_drain(self, js: Any, stream: str, durable: str, total: int, proc: subprocess.Popen[bytes],
                          on_poll: Callable[[int], None] | None = None, fast_until: int = 0,
                          limit: float | None = None) -> tuple[float, float]:
        """Poll the consumer until everything is acked; (first delivery, drained) in perf_counter time,
        each estimated as the midpoint between the last poll before and the first poll after.

        ``on_poll(done)`` is called after every successful poll with the number of tasks acked so
        far; polls are 5 ms apart until ``fast_until`` tasks are done. Gives up after ``limit``
        seconds (default: max(60, total/200)), or when nothing is acked for SOAK_STALL seconds."""
        deadline = time.perf_counter() + (limit or max(60.0, total / 200))
        last_idle = time.perf_counter()
        started: float | None = None
        last_busy = last_idle
        done_before, progressed = -1, last_idle
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise BenchError(f"{stream}: not drained in time (worker log: {self.tail(proc)!r})")
            if proc.poll() is not None:
                raise BenchError(f"{stream}: worker exited with {proc.returncode}: {self.tail(proc)!r}")
            if started is not None and now - progressed > SOAK_STALL:
                raise BenchError(f"{stream}: stuck at {done_before:,}/{total:,} acked for {SOAK_STALL:.0f}s "
                                 f"(worker log: {self.tail(proc)!r})")
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
            done = None
            if info is not None:
                done = total - (info.num_pending or 0) - (info.num_ack_pending or 0)
                if done != done_before:
                    done_before, progressed = done, seen
                if on_poll is not None:
                    on_poll(done)
            if started is not None and info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
                return started, (last_busy + seen) / 2
            if started is not None:
                last_busy = seen
            fast = done is not None and done < fast_until
            await asyncio.sleep(min(self.poll, 0.005) if fast else self.poll)

    def natask_drain(self, variant: str) -> dict[str, Any]:
        """One ``natask worker`` (or supervisor) drains ``sizes.drain`` queued tasks; see DRAIN_VARIANTS."""
        n = self.sizes.drain
        task_name, options = DRAIN_VARIANTS[variant]
        port = free_port() if "--metrics-port" in options else None
        extra = [str(port) if o == "{port}" else o for o in options]
        processes = int(extra[extra.index("--processes") + 1]) if "--processes" in extra else 1
        events_on = "--without-events" not in extra
        prefix = fresh_id("d")
        app = bench_app.make_app(prefix)
        task = app.tasks[task_name]
        try:
            handles = task.delay_many([(i, i) for i in range(n)])
        finally:
            app.close()
        if len(handles) != n:
            raise BenchError(f"delay_many returned {len(handles)} handles for {n} calls")
        stream, durable = app.names.stream, app.names.consumer(QUEUE)

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (nc, js):
                queued = await stream_messages(js, stream)
                if queued != n:
                    raise BenchError(f"{stream} holds {queued} messages, expected {n}")
                dlq_before = await stream_messages(js, DLQ_STREAM)
                # Listen to the worker's events (as a dashboard would), to check they really flow.
                # The data is only kept here and decoded after the drain.
                received: list[tuple[str, bytes]] = []

                async def on_event(msg: Any) -> None:
                    received.append((msg.subject, msg.data))

                sub = await nc.subscribe(f"natask.events.{prefix}.>", cb=on_event)
                spawned = time.perf_counter()
                proc = self.spawn_natask_worker(prefix, extra)
                meter = CpuMeter(proc.pid, n, children=processes > 1)
                extra_out: dict[str, Any] = {}
                rss: float | None
                try:
                    t0, t1 = await self.watch_drain(js, stream, durable, n, proc, on_poll=meter)
                    if processes > 1:
                        kids = child_pids(proc.pid)
                        if len(kids) != processes:
                            raise BenchError(f"supervisor pid {proc.pid} has {len(kids)} children, expected "
                                             f"{processes}: {self.tail(proc)!r}")
                        hwms = [vm_hwm_mb(k) for k in kids]
                        rss = sum(h for h in hwms if h is not None)
                        extra_out |= {"children_rss_mb": hwms, "supervisor_rss_mb": vm_hwm_mb(proc.pid)}
                    else:
                        rss = vm_hwm_mb(proc.pid)
                    if port is not None:
                        scraped = await asyncio.to_thread(scrape_succeeded, port, task_name)
                        if scraped is None:
                            raise BenchError(f"no /metrics on port {port}: {self.tail(proc)!r}")
                        extra_out["metrics_succeeded"] = scraped
                        if scraped != n:
                            log(f"  WARNING: /metrics counts {scraped:.0f} succeeded tasks, expected {n}")
                finally:
                    self.stop(proc)
                await asyncio.sleep(0.2)  # the events sent while stopping
                await sub.unsubscribe()
                extra_out["events"] = count_events(received)
                succeeded = extra_out["events"]["task-succeeded"]
                if events_on and succeeded != n:
                    log(f"  WARNING: {succeeded} task-succeeded events seen, expected {n}")
                if not events_on and extra_out["events"]["messages"]:
                    log(f"  WARNING: --without-events, yet {extra_out['events']['messages']} event messages seen")
                dead = await stream_messages(js, DLQ_STREAM) - dlq_before
                left = await stream_messages(js, stream)
                await delete_streams(js, stream, f"KV_{app.names.results_bucket}")
                if dead or left:
                    raise BenchError(f"natask {variant} drain: {dead} dead-lettered, {left} left in the stream; "
                                     f"worker log: {self.tail(proc)!r}")
                return {"rate": n / (t1 - t0), "seconds": t1 - t0, "rate_incl_startup": n / (t1 - spawned),
                        "rss_mb": rss, "cpu_ms_per_1k": meter.ms_per_1k(), "worker_args": extra} | extra_out

        return asyncio.run(measure())

    def raw_drain(self, procs: str = "1") -> dict[str, Any]:
        """``procs`` raw workers (bound to the same durable consumer) drain ``sizes.drain`` messages."""
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
                    procs_ = [self.spawn_raw_worker(stream, subject, "drain") for _ in range(int(procs))]
                    proc = procs_[0]
                    meter = CpuMeter(proc.pid, n)
                    try:
                        t0, t1 = await self.watch_drain(js, stream, "raw", n, proc, on_poll=meter)
                        rss = vm_hwm_mb(proc.pid)
                    finally:
                        for p in procs_:
                            self.stop(p)
                finally:
                    await delete_streams(js, stream)
                return {"rate": n / (t1 - t0), "seconds": t1 - t0, "rate_incl_startup": n / (t1 - spawned),
                        "rss_mb": rss, "cpu_ms_per_1k": meter.ms_per_1k()}

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

    # -- soak -------------------------------------------------------------------------------
    async def soak_watch(self, js: Any, stream: str, durable: str, n: int,
                         proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """Drain ``n`` queued tasks, reading the worker's RSS at every poll."""
        samples: list[tuple[float, int, float]] = []  # (seconds since spawn, tasks done, VmRSS MB)
        start: dict[str, Any] = {}
        spawned = time.perf_counter()

        meter = CpuMeter(proc.pid, n)

        def on_poll(done: int) -> None:
            meter(done)
            rss = vm_rss_mb(proc.pid)
            if rss is None:
                return
            samples.append((round(time.perf_counter() - spawned, 3), done, rss))
            if not start and done >= SOAK_START:
                start.update(done=done, rss=rss)

        t0, t1 = await self.watch_drain(js, stream, durable, n, proc, on_poll=on_poll, fast_until=SOAK_START,
                                        limit=max(120.0, n / 500))
        end, peak = vm_rss_mb(proc.pid), vm_hwm_mb(proc.pid)
        first = start.get("rss")
        return {"rate": n / (t1 - t0), "seconds": t1 - t0, "rate_incl_startup": n / (t1 - spawned),
                "rss_start_mb": first, "start_after_tasks": start.get("done"), "rss_end_mb": end,
                "rss_peak_mb": peak, "rss_max_sampled_mb": max((s[2] for s in samples), default=None),
                "growth": end / first if end and first else None, "cpu_ms_per_1k": meter.ms_per_1k(),
                "samples": samples}

    def natask_soak(self, n: int) -> dict[str, Any]:
        """``n`` no-op ``def`` tasks (results ignored) queued with ``delay_many`` in chunks of SOAK_CHUNK,
        then drained by one ``natask worker`` run as users run it (events on)."""
        prefix = fresh_id("s")
        app = bench_app.make_app(prefix)
        task = app.tasks[ADD]
        filling = time.perf_counter()
        queued = 0
        try:
            for lo in range(0, n, SOAK_CHUNK):
                queued += len(task.delay_many([(i, i) for i in range(lo, min(n, lo + SOAK_CHUNK))]))
        finally:
            app.close()
        fill = time.perf_counter() - filling
        if queued != n:
            raise BenchError(f"delay_many returned {queued} handles for {n} calls")
        stream, durable = app.names.stream, app.names.consumer(QUEUE)

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (_, js):
                try:
                    held = await stream_messages(js, stream)
                    if held != n:
                        raise BenchError(f"{stream} holds {held} messages, expected {n}")
                    dlq_before = await stream_messages(js, DLQ_STREAM)
                    proc = self.spawn_natask_worker(prefix)
                    try:
                        out = await self.soak_watch(js, stream, durable, n, proc)
                    finally:
                        self.stop(proc)
                    dead = await stream_messages(js, DLQ_STREAM) - dlq_before
                    left = await stream_messages(js, stream)
                finally:
                    await delete_streams(js, stream, f"KV_{app.names.results_bucket}")
                if dead or left:
                    raise BenchError(f"natask soak: {dead} dead-lettered, {left} left in the stream; "
                                     f"worker log: {self.tail(proc)!r}")
                return out | {"fill_seconds": fill}

        return asyncio.run(measure())

    def raw_soak(self, n: int) -> dict[str, Any]:
        """The same through the raw drain worker (messages published in chunks of SOAK_CHUNK)."""
        rid = fresh_id("r")
        stream, subject = f"RAW_{rid.upper()}", f"raw{rid}.>"
        body = b"x" * self.payload

        async def measure() -> dict[str, Any]:
            async with connect(self.url) as (_, js):
                await add_raw_stream(js, stream, subject)
                try:
                    filling = time.perf_counter()
                    for lo in range(0, n, SOAK_CHUNK):
                        futures = [await js.publish_async(f"raw{rid}.bench.add", body)
                                   for _ in range(lo, min(n, lo + SOAK_CHUNK))]
                        await asyncio.wait_for(asyncio.gather(*futures), 60)
                    fill = time.perf_counter() - filling
                    held = await stream_messages(js, stream)
                    if held != n:
                        raise BenchError(f"{stream} holds {held} messages, expected {n}")
                    proc = self.spawn_raw_worker(stream, subject, "drain")
                    try:
                        out = await self.soak_watch(js, stream, "raw", n, proc)
                    finally:
                        self.stop(proc)
                finally:
                    await delete_streams(js, stream)
                return out | {"fill_seconds": fill}

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
    ("drain_def_metrics", "natask_drain:def_metrics", "raw_drain"),
    ("drain_def_noevents", "natask_drain:def_noevents", "raw_drain"),
    ("drain_def_p2", "natask_drain:def_p2", "raw_drain"),
    ("drain_def_pool", "natask_drain:def_pool", "raw_drain"),
    ("drain_async", "natask_drain:async", "raw_drain"),
    ("delay", "natask_delay", "raw_delay"),
    ("delay_many", "natask_delay_many", "raw_delay_many"),
    ("rt", "natask_rt", "raw_rt"),
]
SOAK = "soak"


def call(bench: Bench, spec: str) -> dict[str, Any]:
    name, _, arg = spec.partition(":")
    method: Callable[..., dict[str, Any]] = getattr(bench, name)
    return method(arg) if arg else method()


def measure_pair(bench: Bench, out: dict[str, Any], key: str, order: list[tuple[str, Callable[[], Any]]],
                 label: str) -> None:
    out[key] = {}
    for side, fn in order:
        try:
            out[key][side] = fn()
            log(f"  {label} {key:<18} {side:<6} {brief(out[key][side])}")
        except Exception as e:
            bench.stop_all()
            out[key][side] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  {label} {key:<18} {side:<6} FAILED: {e}")
            if os.environ.get("NATASK_BENCH_TRACE"):
                traceback.print_exc()


def one_run(bench: Bench, index: int, only: set[str] | None) -> dict[str, Any]:
    """Every measurement once, natask and raw back to back (alternating which goes first); odd runs
    also take the measurements in reverse order, so a slow drift in the machine's load does not
    always favour the same variant."""
    out: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    pairs = [p for p in PAIRS if not only or p[0] in only]
    if index % 2:
        pairs.reverse()
    for key, natask_spec, raw_spec in pairs:
        order: list[tuple[str, Callable[[], Any]]] = [("natask", functools.partial(call, bench, natask_spec)),
                                                      ("raw", functools.partial(call, bench, raw_spec))]
        if index % 2:
            order.reverse()
        measure_pair(bench, out, key, order, f"run {index + 1}")
    return out


def soak_run(bench: Bench, n: int) -> dict[str, Any]:
    """The soak, once: natask, then raw."""
    log(f"soak: {n:,} tasks (load average {os.getloadavg()[0]:.2f})")
    started = time.time()
    out: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    measure_pair(bench, out, SOAK, [("natask", lambda: bench.natask_soak(n)), ("raw", lambda: bench.raw_soak(n))],
                 "soak ")
    out["seconds"] = time.time() - started
    return out


def brief(result: dict[str, Any]) -> str:
    if "rss_start_mb" in result:
        return (f"{result['rate']:,.0f}/s in {result['seconds']:.2f}s; RSS {fmt(result['rss_start_mb'], 'MB')} "
                f"after {result['start_after_tasks']} tasks, {fmt(result['rss_end_mb'], 'MB')} at the end, peak "
                f"{fmt(result['rss_peak_mb'], 'MB')}")
    if "rate" in result:
        return f"{result['rate']:,.0f}/s in {result['seconds']:.3f}s" + (
            f", RSS {result['rss_mb']:.1f} MB" if result.get("rss_mb") else "") + (
            f", CPU {result['cpu_ms_per_1k']:.0f} ms/1k tasks" if result.get("cpu_ms_per_1k") else "")
    return f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"


def value(run: dict[str, Any], m: Metric, side: str) -> float | None:
    """The headline number of one metric in one run (None if it failed or has no such side)."""
    if side == "raw" and not m.raw:
        return None
    result = run.get(m.source or m.key, {}).get(side)
    if not result or "error" in result:
        return None
    v = result.get(m.field)
    return None if v is None else float(v)


def summarize(runs: list[dict[str, Any]], metric_list: list[Metric]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for m in metric_list:
        nat = [v for r in runs if (v := value(r, m, "natask")) is not None]
        raw = [v for r in runs if (v := value(r, m, "raw")) is not None]
        paired = [a / b for r in runs if m.unit != "x"
                  and (a := value(r, m, "natask")) is not None and (b := value(r, m, "raw"))]
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


def compare(runs: list[dict[str, Any]], only: set[str] | None) -> dict[str, Any]:
    """natask variants against each other, paired within each run (COMPARISONS)."""
    out: dict[str, Any] = {}
    for key, label, num, den in COMPARISONS:
        if only and not {num, den} <= only:
            continue
        a, b = Metric(num, "", "/s", True), Metric(den, "", "/s", True)
        per_run = [x / y for r in runs if (x := value(r, a, "natask")) is not None and (y := value(r, b, "natask"))]
        # The same from worker CPU per task (inverted: the rate a CPU-bound worker would reach); much
        # less sensitive to other load on the machine than the wall-clock rate.
        a, b = Metric(num, "", "ms", False, field="cpu_ms_per_1k"), Metric(den, "", "ms", False, field="cpu_ms_per_1k")
        cpu_runs = [y / x for r in runs if (x := value(r, a, "natask")) and (y := value(r, b, "natask")) is not None]
        out[key] = {"label": label, "ratio": statistics.median(per_run) if per_run else None, "ratio_runs": per_run,
                    "cpu_ratio": statistics.median(cpu_runs) if cpu_runs else None, "cpu_ratio_runs": cpu_runs,
                    "numerator": num, "denominator": den}
    return out


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "/s":
        return f"{v:,.0f}/s"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "x":
        return f"{v:.3f}x"
    return f"{v:.1f} MB"


def table(summary: dict[str, Any]) -> str:
    lines = ["| metric | natask | raw nats-py | ratio |", "|---|---:|---:|---:|"]
    for row in summary.values():
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"| {row['label']} | {fmt(row['natask'], row['unit'])} | {fmt(row['raw'], row['unit'])} "
                     f"| {ratio} |")
    return "\n".join(lines)


def comparisons_table(derived: dict[str, Any]) -> str:
    lines = ["| natask vs natask, `def` drains | rate ratio | per run | from worker CPU/task | per run |",
             "|---|---:|---|---:|---|"]

    def cells(ratio: float | None, per_run: list[float]) -> str:
        return ("n/a" if ratio is None else f"{ratio:.3f}x") + " | " + ", ".join(f"{r:.3f}" for r in per_run)

    for row in derived.values():
        lines.append(f"| {row['label']} | {cells(row['ratio'], row['ratio_runs'])} "
                     f"| {cells(row['cpu_ratio'], row['cpu_ratio_runs'])} |")
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
        v = "n/a" if b["value"] is None else f"{b['value']:.3f}"
        lines.append(f"  {mark} {b['metric']:<14} {b['what']} {v} {b['op']} {b['limit']:g}")
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
                        help="comma-separated subset of: " + ", ".join(k for k, _, _ in PAIRS)
                        + f"; '{SOAK}' alone: the soak only")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="after the runs, drain N queued tasks (>= 10,000) through one worker and report its "
                             "RSS at the start, the end and the peak (off by default)")
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
    known = {k for k, _, _ in PAIRS} | {SOAK}
    if only and only - known:
        parser.error(f"--only: unknown measurement(s) {', '.join(sorted(only - known))}")
    if args.soak and args.soak < 10 * SOAK_START:
        parser.error(f"--soak: at least {10 * SOAK_START:,} tasks")
    if only and SOAK in only and not args.soak:
        parser.error(f"--only {SOAK} needs --soak N")
    if only is not None:
        only.discard(SOAK)
    runs_wanted = sizes.runs if only != set() else 0

    workdir = Path(tempfile.mkdtemp(prefix="natask-bench-"))
    server = NatsServer(log_file=str(workdir / "nats-server.log"))
    bench: Bench | None = None
    started = time.time()
    runs: list[dict[str, Any]] = []
    soak: dict[str, Any] | None = None
    try:
        server.start()
        os.environ["NATS_URL"] = server.url  # the bench's own producer apps read it too
        env_info = environment()
        log(f"nats-server {server.url} (store {server.store_dir}); logs in {workdir}")
        log(f"sizes: {sizes}" + (f", soak {args.soak:,}" if args.soak else ""))
        bench = Bench(server, workdir, sizes, args.poll, args.keep_logs)
        for i in range(runs_wanted):
            log(f"run {i + 1}/{sizes.runs} (load average {os.getloadavg()[0]:.2f})")
            runs.append(one_run(bench, i, only))
        if args.soak:
            soak = soak_run(bench, args.soak)
    finally:
        if bench is not None:
            bench.stop_all()
        server.close()

    summary = summarize(runs, metrics(sizes)) if runs else {}
    if only:
        keep = {m.key for m in metrics(sizes) if (m.source or m.key) in only}
        summary = {k: v for k, v in summary.items() if k in keep}
    derived = compare(runs, only) if runs else {}
    if soak is not None:
        summary |= summarize([soak], soak_metrics(args.soak))
    bars = check_bars(summary | derived)
    text = table(summary)
    print()
    print(text)
    if derived:
        text += "\n\n" + comparisons_table(derived)
        print()
        print(comparisons_table(derived))
    print()
    print(bars_text(bars))
    notes = []
    if runs:
        notes.append(f"median of {sizes.runs} run(s); ratio = median of the per-run ratios")
    if soak is not None:
        notes.append(f"soak: 1 run, {soak['seconds']:.0f}s")
    print(f"\n({'; '.join(notes)}; {time.time() - started:.0f}s total)")

    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "sizes": asdict(sizes),
        "soak_tasks": args.soak or None,
        "raw_payload_bytes": bench.payload if bench else None,
        "poll_seconds": args.poll,
        "environment": env_info,
        "summary": summary,
        "comparisons": derived,
        "bars": bars,
        "runs": runs,
        "soak": soak,
        "total_seconds": time.time() - started,
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
    failed = any("error" in side for r in [*runs, soak or {}] for v in r.values() if isinstance(v, dict)
                 for side in v.values() if isinstance(side, dict))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
