#!/usr/bin/env python
"""Many outstanding results in one producer: natask's ``aget()`` vs a raw nats-py producer, same run.

    python benchmarks/scale_waiters.py                 # 30,000 and 100,000 outstanding results (~9 minutes)
    python benchmarks/scale_waiters.py --quick         # 3,000 and 10,000 (~1 minute)
    python benchmarks/scale_waiters.py --sizes 30000   # any sizes

For each size and each side, one producer process (a subprocess, so its CPU and memory are its own)
publishes N calls of a task that naps 1 ms, then waits for all N results while a single worker
(``natask worker -c 2``, a fresh one per measurement) works through them: most results wait for
tens of seconds. natask: ``adelay_many``, then ``aget()`` on every handle (``asyncio.gather``).
Raw: ``js.publish_async`` of the same envelope with the same headers (a ``Natask-Reply`` subject
on one inbox subscription), then a future per request resolved by the reply. The same natask
worker serves both, so only the producer differs.

Reported per size: the producer's CPU time from the first publish to the last result, its RSS
growth (peak RSS less the RSS before publishing) and its RSS growth while waiting (peak RSS less
the RSS once every wait is registered: flat if waiting costs nothing). ``measure()`` is the entry
point for a combined scale benchmark; run alone, the script starts its own nats-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import nats  # noqa: E402

from natask import Natask  # noqa: E402
from natask.naming import HDR_MSG_ID, HDR_REPLY  # noqa: E402
from natask.server import NatsServer  # noqa: E402

QUEUE: Final = "waiters"
NAP_TASK: Final = "waiters.nap"
NAP: Final = 0.001
"""Seconds each task naps: with ``-c 2`` the worker finishes ~1,000 a second, so results wait."""
SIZES: Final = (30_000, 100_000)
QUICK_SIZES: Final = (3_000, 10_000)
CHUNK: Final = 10_000
"""Calls per ``adelay_many`` (natask) and publishes between two PubAck waits (raw)."""
SAMPLE: Final = 0.25
"""Seconds between two RSS samples of the producer while it waits."""
PREFIX_ENV: Final = "NATASK_WAITERS_PREFIX"


def make_app(prefix: str, servers: list[str] | None = None) -> Natask:
    """The benchmark's app: one task that naps ``NAP`` seconds and returns its argument."""
    app = Natask("waiters", servers=servers, subject_prefix=prefix)

    @app.task(name=NAP_TASK, queue=QUEUE)
    async def nap(i: int) -> int:
        await asyncio.sleep(NAP)
        return i

    return app


app = make_app(os.environ.get(PREFIX_ENV) or "waiters")
"""The worker's app (``natask worker -A scale_waiters:app``); the prefix comes from the environment."""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


class Meter:
    """CPU and RSS of this process over a measurement; RSS sampled every ``SAMPLE`` s."""

    def __init__(self) -> None:
        self.rss_before = status_mb("VmRSS")
        self.cpu_before = time.process_time()
        self.wall_before = time.perf_counter()
        self.rss_waiting = 0.0
        self.samples: list[float] = []
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.samples.append(status_mb("VmRSS"))
            await asyncio.sleep(SAMPLE)

    def waiting(self) -> None:
        """Every wait is registered now."""
        self.rss_waiting = status_mb("VmRSS")

    def done(self, n: int) -> dict[str, Any]:
        cpu, wall = time.process_time() - self.cpu_before, time.perf_counter() - self.wall_before
        self._task.cancel()
        peak = max([*self.samples, status_mb("VmRSS")])
        return {"n": n, "cpu_s": cpu, "wall_s": wall, "rss_before_mb": self.rss_before,
                "rss_waiting_mb": self.rss_waiting, "rss_peak_mb": peak, "rss_growth_mb": peak - self.rss_before,
                "rss_growth_waiting_mb": max(0.0, peak - self.rss_waiting), "samples_mb": self.samples[::4]}


async def natask_producer(url: str, prefix: str, n: int) -> dict[str, Any]:
    producer = make_app(prefix, [url])
    nap = producer.tasks[NAP_TASK]
    try:
        assert await (await nap.adelay(-1)).aget(timeout=60) == -1  # connected, bucket open, worker up
        meter = Meter()
        results = []
        for start in range(0, n, CHUNK):
            results += await nap.adelay_many([(i,) for i in range(start, min(n, start + CHUNK))])
        waits = asyncio.gather(*(r.aget() for r in results))
        await asyncio.sleep(0)  # every aget() has registered its wait
        meter.waiting()
        values = await waits
        out = meter.done(n)
    finally:
        await producer.aclose()
    if values != list(range(n)):
        raise RuntimeError("natask: wrong results")
    return out


async def raw_producer(url: str, prefix: str, n: int) -> dict[str, Any]:
    nc = await nats.connect(url, name="waiters-raw")
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    subject = f"{prefix}.{QUEUE}.{NAP_TASK}"  # natask's task subject: <prefix>.<queue>.<task>
    inbox = nc.new_inbox()
    cut = len(inbox) + 1
    replies: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(msg: Any) -> None:
        fut = replies.pop(msg.subject[cut:], None)
        if fut is not None and not fut.done():
            fut.set_result(msg.data)

    async def call(i: int) -> asyncio.Future[Any]:
        task_id = os.urandom(16).hex()
        body = msgpack.packb({"v": 1, "id": task_id, "task": NAP_TASK, "args": [i], "kwargs": {}})
        replies[task_id] = fut = loop.create_future()
        headers = {HDR_MSG_ID: task_id, HDR_REPLY: f"{inbox}.{task_id}"}
        acks.append(await js.publish_async(subject, body, headers=headers))
        return fut

    try:
        await nc.subscribe(f"{inbox}.*", cb=on_reply)
        acks: list[asyncio.Future[Any]] = []
        first = await call(-1)
        await asyncio.gather(*acks)
        await asyncio.wait_for(first, 60)  # the worker is up
        meter = Meter()
        futures = []
        for start in range(0, n, CHUNK):
            acks = []
            futures += [await call(i) for i in range(start, min(n, start + CHUNK))]
            await asyncio.gather(*acks)
        waits = asyncio.gather(*futures)
        meter.waiting()
        values = [msgpack.unpackb(data).get("result") for data in await waits]
        out = meter.done(n)
    finally:
        await nc.close()
    if values != list(range(n)):
        raise RuntimeError("raw: wrong results")
    return out


# -- orchestration ------------------------------------------------------------------------------
def _env(url: str, prefix: str) -> dict[str, str]:
    env = dict(os.environ, NATS_URL=url, **{PREFIX_ENV: prefix})
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("NATASK_SUBJECT_PREFIX", None)
    return env


def _worker(url: str, prefix: str, logfile: Path) -> subprocess.Popen[bytes]:
    """``natask worker -c 2`` on ``prefix``, once it logs that it consumes (blocking)."""
    with open(logfile, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "natask", "worker", "-A", "scale_waiters:app", "-Q", QUEUE,
                                 "-c", "2", "--loglevel", "info"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_env(url, prefix), cwd=str(ROOT))
    deadline = time.monotonic() + 30
    while b" consuming " not in logfile.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the worker did not start:\n{logfile.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return proc


async def _producer(url: str, prefix: str, side: str, n: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--producer", side, "--n", str(n), "--url", url,
        "--prefix", prefix, stdout=asyncio.subprocess.PIPE, env=_env(url, prefix), cwd=str(ROOT))
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} producer failed (exit {proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


async def _one(url: str, side: str, n: int, workdir: Path) -> dict[str, Any]:
    prefix = f"w{secrets.token_hex(3)}"
    worker = await asyncio.to_thread(_worker, url, prefix, workdir / f"worker-{prefix}.log")
    try:
        result = await _producer(url, prefix, side, n)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
    log(f"  {side:6} n={n:,}: CPU {result['cpu_s']:.2f} s, RSS +{result['rss_growth_mb']:.1f} MB "
        f"(+{result['rss_growth_waiting_mb']:.1f} MB while waiting), {result['wall_s']:.1f} s")
    return result


def _row(name: str, natask: float, raw: float, unit: str, floor: float = 0.0) -> dict[str, Any]:
    """A table row; no ratio when both values are below ``floor`` (noise, e.g. RSS under 1 MB)."""
    ratio = natask / raw if raw and max(natask, raw) >= floor else None
    return {"name": name, "natask": natask, "reference": raw, "ratio": ratio, "unit": unit}


async def measure(server_url: str, quick: bool, sizes: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """Rows (name, natask, reference, ratio, unit) for ``SIZES`` (``QUICK_SIZES`` if quick, or
    ``sizes``) outstanding results in one producer, natask beside the raw producer, against
    ``server_url``."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="natask-waiters-") as tmp:
        for n in sizes or (QUICK_SIZES if quick else SIZES):
            ours = await _one(server_url, "natask", n, Path(tmp))
            raw = await _one(server_url, "raw", n, Path(tmp))
            label = f"{n:,} outstanding `aget()`, worker `-c 2`"
            rows += [
                _row(f"{label}: producer CPU, first publish to last result", ours["cpu_s"], raw["cpu_s"], "s"),
                _row(f"{label}: producer RSS growth (peak less before publishing)", ours["rss_growth_mb"],
                     raw["rss_growth_mb"], "MB"),
                _row(f"{label}: producer RSS growth while waiting (peak less all waits registered)",
                     ours["rss_growth_waiting_mb"], raw["rss_growth_waiting_mb"], "MB", floor=1.0),
            ]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| measurement | natask | raw nats-py | natask / raw |", "|---|---|---|---|"]
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['name']} | {r['natask']:.2f} {r['unit']} | {r['reference']:.2f} {r['unit']} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {SIZES}")
    parser.add_argument("--sizes", default=None, help="comma-separated numbers of outstanding results")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--producer", choices=["natask", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.producer:  # one producer run, in its own process: its result as JSON on stdout
        run = natask_producer if args.producer == "natask" else raw_producer
        print(json.dumps(asyncio.run(run(args.url, args.prefix, args.n))))
        return 0
    server = NatsServer()
    started = time.time()
    try:
        server.start()
        log(f"nats-server {server.url}; load average {os.getloadavg()[0]:.2f}")
        sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else None
        rows = asyncio.run(measure(server.url, args.quick, sizes))
    finally:
        with contextlib.suppress(Exception):
            server.close()
    print(table(rows))
    print(f"\n(one run each, natask and raw alternating on one shared nats-server; {time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
