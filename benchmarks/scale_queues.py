#!/usr/bin/env python
"""Fetching at scale: many queues and large payloads, natask beside its reference in the same run.

    python benchmarks/scale_queues.py            # full: 10,000-task drains, 300 x 900 KB, 2,000 x 100 KB
    python benchmarks/scale_queues.py --quick    # smoke: smaller drains

Starts its own nats-server (file storage in a temp dir, free loopback port) and one ``natask worker
-c 64`` subprocess per measurement (``scale_app.py``), or ``raw_worker.py`` for the raw nats-py
pull loop. Rows (issue 14's bars):

- 100 queues, tasks spread evenly, one worker consuming all 100: drain rate vs a lone queue's.
- 100 queues, all tasks in the last: drain rate vs a lone queue's.
- a lone queue: the reference of both, beside the raw loop (``fetch(100)``).
- 900 KB arguments: natask (default byte budget) vs the raw loop at a safe batch (``fetch(8)``).
- 100 KB arguments: drain rate and worker peak RSS vs the raw loop (``fetch(100)``).

A drain is timed from the first task acknowledged to the last (the stream's message count, polled
every 10 ms: WorkQueue streams drop acknowledged messages), so start-up is left out on both sides.
``measure(server_url, quick)`` returns the rows, for ``benchmarks/scale.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from run import add_raw_stream, connect, delete_streams, fresh_id, log, stream_messages, vm_hwm_mb  # noqa: E402
from scale_app import BIG, BIG_QUEUE, QUEUES, make_app, task_name  # noqa: E402

from natask.server import NatsServer  # noqa: E402

POLL = 0.01
"""Seconds between two looks at the stream's message count."""
CONCURRENCY = 64
"""``natask worker -c`` of every measurement (the default of ``benchmarks/run.py``)."""
WORKER_ARGS: list[str] = []
"""More ``natask worker`` arguments for every natask measurement (``--worker-args``)."""
STALL = 30.0
"""A drain fails when nothing is acknowledged for this long."""


@dataclass(frozen=True)
class Sizes:
    even: int  # tasks spread over the 100 queues (and the lone queue's drain)
    last: int  # tasks in the last of the 100 queues
    big: int  # tasks with BIG_ARG-byte arguments
    medium: int  # tasks with MEDIUM_ARG-byte arguments


FULL = Sizes(even=10_000, last=5_000, big=300, medium=2_000)
QUICK = Sizes(even=2_000, last=1_000, big=60, medium=300)
BIG_ARG = 900_000
MEDIUM_ARG = 100_000
RAW_SAFE_BATCH = 8
"""The raw loop's batch for 900 KB messages: 8 x 900 KB stays far below the server's 64 MB max_pending."""
RAW_BATCH = 100


class BenchError(RuntimeError):
    """A measurement could not be taken."""


def _env(prefix: str | None, url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["NATS_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                   else []))
    env.pop("NATASK_SUBJECT_PREFIX", None)
    if prefix is not None:
        env["NATASK_BENCH_PREFIX"] = prefix
    return env


def _spawn(args: list[str], env: dict[str, str], logdir: Path, name: str) -> subprocess.Popen[bytes]:
    with open(logdir / f"{name}.log", "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(ROOT))
    proc.logfile = logdir / f"{name}.log"  # type: ignore[attr-defined]
    return proc


def _tail(proc: subprocess.Popen[bytes]) -> str:
    path = getattr(proc, "logfile", None)
    return Path(path).read_text(errors="replace")[-1500:] if path and Path(path).exists() else ""


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def _drain(js: Any, stream: str, total: int, proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(first ack, last ack) in perf_counter time, each the midpoint of the polls around it."""
    deadline = time.perf_counter() + max(120.0, total / 50)
    last_full = last_busy = progressed = time.perf_counter()
    started: float | None = None
    left_before = total
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{stream}: worker exited with {proc.returncode}: {_tail(proc)!r}")
        now = time.perf_counter()
        if now > deadline or (started is not None and now - progressed > STALL):
            raise BenchError(f"{stream}: {left_before:,}/{total:,} left, not drained (worker log: {_tail(proc)!r})")
        before = time.perf_counter()
        left = await stream_messages(js, stream)
        seen = (before + time.perf_counter()) / 2
        if left != left_before:
            left_before, progressed = left, seen
        if started is None:
            if left < total:
                started = (last_full + seen) / 2
            else:
                last_full = seen
        if started is not None and left == 0:
            return started, (last_busy + seen) / 2
        if started is not None:
            last_busy = seen
        await asyncio.sleep(POLL)


async def natask_drain(url: str, logdir: Path, work: dict[str, int], queues: list[str], arg: int = 0) -> dict[str, Any]:
    """Queue ``work`` (task queue -> tasks), then one ``natask worker -Q <queues>`` drains it all.
    ``arg``: the size of each task's bytes argument (the ``big`` task), else a no-op ``add``."""
    prefix = fresh_id("sq")
    app = make_app(prefix, [url])
    total = sum(work.values())
    try:
        for queue, n in work.items():
            task = app.tasks[BIG] if queue == BIG_QUEUE else app.tasks[task_name(queue)]
            blob = b"x" * arg
            chunk = 20 if arg else 5_000
            for lo in range(0, n, chunk):
                items = [(blob,) if arg else (i, i) for i in range(lo, min(n, lo + chunk))]
                await task.adelay_many(items)
    finally:
        await app.aclose()
    stream = app.names.stream
    async with connect(url) as (_, js):
        try:
            queued = await stream_messages(js, stream)
            if queued != total:
                raise BenchError(f"{stream} holds {queued} messages, expected {total}")
            args = [sys.executable, "-m", "natask", "worker", "-A", "scale_app:app", "-Q", ",".join(queues),
                    "-c", str(CONCURRENCY), "--loglevel", "warning", *WORKER_ARGS]
            proc = _spawn(args, _env(prefix, url), logdir, f"natask-{prefix}")
            try:
                t0, t1 = await _drain(js, stream, total, proc)
                rss = vm_hwm_mb(proc.pid)
                log_text = _tail(proc)
            finally:
                await _stop(proc)
        finally:
            await delete_streams(js, stream, f"KV_{app.names.results_bucket}")
    if "slow consumer" in log_text.lower() or "reconnected" in log_text.lower():
        log(f"  WARNING: the natask worker reconnected during the drain: {log_text!r}")
    return {"rate": total / (t1 - t0), "seconds": t1 - t0, "rss_mb": rss}


async def raw_drain(url: str, logdir: Path, n: int, body_size: int, batch: int) -> dict[str, Any]:
    """``n`` messages of ``body_size`` bytes drained by ``raw_worker.py`` with ``fetch(batch)``."""
    rid = fresh_id("r")
    stream, subject = f"RAW_{rid.upper()}", f"raw{rid}.>"
    body = b"x" * body_size
    async with connect(url) as (_, js):
        await add_raw_stream(js, stream, subject)
        try:
            chunk = max(1, min(1000, 20_000_000 // max(1, body_size)))
            for lo in range(0, n, chunk):
                futures = [await js.publish_async(f"raw{rid}.bench.add", body) for _ in range(lo, min(n, lo + chunk))]
                await asyncio.wait_for(asyncio.gather(*futures), 120)
            queued = await stream_messages(js, stream)
            if queued != n:
                raise BenchError(f"{stream} holds {queued} messages, expected {n}")
            args = [sys.executable, str(HERE / "raw_worker.py"), "--url", url, "--stream", stream, "--subject",
                    subject, "--durable", "raw", "--mode", "drain", "--batch", str(batch)]
            proc = _spawn(args, _env(None, url), logdir, f"raw-{rid}")
            try:
                t0, t1 = await _drain(js, stream, n, proc)
                rss = vm_hwm_mb(proc.pid)
            finally:
                await _stop(proc)
        finally:
            await delete_streams(js, stream)
    return {"rate": n / (t1 - t0), "seconds": t1 - t0, "rss_mb": rss}


def payload_size(arg: int) -> int:
    """Bytes of a natask message body: a ``big`` call with an ``arg``-byte argument, or (0) an ``add(1, 2)``,
    so the raw messages weigh the same."""
    app = make_app("sizing")
    if arg:
        return len(app.client.prepare(BIG, (b"x" * arg,), {}, queue=BIG_QUEUE).payload)
    return len(app.client.prepare(task_name(QUEUES[0]), (1, 2), {}, queue=QUEUES[0]).payload)


def _row(name: str, natask: float, reference: float, reference_name: str, unit: str, bar: str) -> dict[str, Any]:
    return {"name": name, "natask": natask, "reference": reference, "reference_name": reference_name,
            "ratio": natask / reference if reference else None, "unit": unit, "bar": bar}


CURVES = ("lone", "spread", "last", "big", "medium")
"""The measurements, for ``--only``: a lone queue (and the raw loop), 100 queues spread evenly, 100
queues with work in the last, 900 KB arguments, 100 KB arguments."""


async def measure(server_url: str, quick: bool, only: frozenset[str] = frozenset(CURVES)) -> list[dict[str, Any]]:
    """Every curve once; one row each: name, natask, reference (and what it is), ratio, unit, bar."""
    s = QUICK if quick else FULL
    logdir = Path(tempfile.mkdtemp(prefix="natask-scale-"))
    rows: list[dict[str, Any]] = []
    lone_name = f"a lone queue ({s.even:,} tasks)"
    lone: dict[str, Any] = {}
    if only & {"lone", "spread", "last"}:
        log(f"lone queue: {s.even:,} tasks")
        lone = await natask_drain(server_url, logdir, {QUEUES[0]: s.even}, [QUEUES[0]])
        log(f"  {lone['rate']:,.0f}/s")
    if "spread" in only:
        log(f"100 queues, {s.even:,} tasks spread evenly")
        spread = await natask_drain(server_url, logdir, {q: s.even // len(QUEUES) for q in QUEUES}, QUEUES)
        log(f"  {spread['rate']:,.0f}/s")
        rows.append(_row(f"100 queues, {s.even:,} tasks spread evenly, 1 worker -c {CONCURRENCY}", spread["rate"],
                         lone["rate"], lone_name, "/s", ">= 0.8"))
    if "last" in only:
        log(f"100 queues, {s.last:,} tasks in the last")
        last = await natask_drain(server_url, logdir, {QUEUES[-1]: s.last}, QUEUES)
        log(f"  {last['rate']:,.0f}/s")
        rows.append(_row(f"100 queues, all {s.last:,} tasks in the last", last["rate"], lone["rate"], lone_name,
                         "/s", ">= 0.5"))
    if "lone" in only:
        raw_lone = await raw_drain(server_url, logdir, s.even, payload_size(0), RAW_BATCH)
        log(f"  raw {raw_lone['rate']:,.0f}/s")
        rows.append(_row(f"a lone queue, {s.even:,} tasks", lone["rate"], raw_lone["rate"],
                         f"raw loop, fetch({RAW_BATCH})", "/s", ""))
    if "big" in only:
        log(f"{s.big} tasks with {BIG_ARG:,}-byte arguments")
        big = await natask_drain(server_url, logdir, {BIG_QUEUE: s.big}, [BIG_QUEUE], BIG_ARG)
        raw_big = await raw_drain(server_url, logdir, s.big, payload_size(BIG_ARG), RAW_SAFE_BATCH)
        log(f"  {big['rate']:,.0f}/s, raw {raw_big['rate']:,.0f}/s")
        rows.append(_row(f"{BIG_ARG // 1000} KB arguments, {s.big} tasks (default byte budget)", big["rate"],
                         raw_big["rate"], f"raw loop, fetch({RAW_SAFE_BATCH})", "/s", ">= 0.8"))
    if "medium" in only:
        log(f"{s.medium} tasks with {MEDIUM_ARG:,}-byte arguments")
        medium = await natask_drain(server_url, logdir, {BIG_QUEUE: s.medium}, [BIG_QUEUE], MEDIUM_ARG)
        raw_medium = await raw_drain(server_url, logdir, s.medium, payload_size(MEDIUM_ARG), RAW_BATCH)
        log(f"  {medium['rate']:,.0f}/s ({medium['rss_mb']:.0f} MB), raw {raw_medium['rate']:,.0f}/s "
            f"({raw_medium['rss_mb']:.0f} MB)")
        rows.append(_row(f"{MEDIUM_ARG // 1000} KB arguments, {s.medium:,} tasks", medium["rate"],
                         raw_medium["rate"], f"raw loop, fetch({RAW_BATCH})", "/s", ">= 0.8"))
        rows.append(_row(f"{MEDIUM_ARG // 1000} KB arguments: worker peak RSS", medium["rss_mb"],
                         raw_medium["rss_mb"], f"raw loop, fetch({RAW_BATCH})", "MB", ""))
    import shutil

    shutil.rmtree(logdir, ignore_errors=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: float | None, unit: str) -> str:
        if v is None:
            return "n/a"
        return f"{v:,.0f}/s" if unit == "/s" else f"{v:.1f} {unit}"

    lines = ["| curve | natask | reference | ratio | bar |", "|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {fmt(r['natask'], r['unit'])} | {fmt(r['reference'], r['unit'])} "
                     f"({r['reference_name']}) | {ratio} | {r['bar']} |")
    return "\n".join(lines)


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row: the medians of natask and reference, and the median of the per-run ratios."""
    out = []
    for rows in zip(*runs, strict=True):
        first = dict(rows[0])
        first["natask"] = statistics.median(r["natask"] for r in rows)
        first["reference"] = statistics.median(r["reference"] for r in rows)
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        first["ratio"] = statistics.median(ratios) if ratios else None
        first["ratio_runs"] = ratios
        out.append(first)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller drains")
    parser.add_argument("--runs", type=int, default=1, help="runs to take the medians of")
    parser.add_argument("--only", default=",".join(CURVES), help="comma-separated subset of: " + ", ".join(CURVES))
    parser.add_argument("--worker-args", default="",
                        help="more `natask worker` arguments, e.g. '--prefetch-bytes 8MiB'")
    args = parser.parse_args(argv)
    WORKER_ARGS[:] = args.worker_args.split()
    only = frozenset(c.strip() for c in args.only.split(",") if c.strip())
    if only - set(CURVES):
        parser.error(f"--only: unknown curve(s) {', '.join(sorted(only - set(CURVES)))}")
    workdir = Path(tempfile.mkdtemp(prefix="natask-scale-server-"))
    server = NatsServer(log_file=str(workdir / "nats-server.log"))
    runs: list[list[dict[str, Any]]] = []
    try:
        server.start()
        log(f"nats-server {server.url}; load average {os.getloadavg()[0]:.2f}")
        for i in range(max(1, args.runs)):
            log(f"run {i + 1}")
            runs.append(asyncio.run(measure(server.url, args.quick, only)))
    finally:
        server.close()
        with contextlib.suppress(Exception):
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(median_rows(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
