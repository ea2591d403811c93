#!/usr/bin/env python
"""natask through a leaf node, beside the raw nats-py loop in the same layouts (issue 20).

    python benchmarks/leaf.py            # median of 3 runs: 10,000-task drains, 500 round trips
    python benchmarks/leaf.py --quick    # 1 run, 2,000 tasks, 200 round trips

Starts a hub (JetStream, domain ``hub``) and a leaf node without JetStream connected to it, both on
loopback. Producers and the measuring client are on the hub; the worker runs on the hub ("direct")
or on the leaf node (``NATASK_JS_DOMAIN=hub``, "via leaf"), so every task, ack, result and reply
crosses the leaf connection in the second layout. Measured per layout, natask and raw:

- drain: ``natask worker -c 64`` (events on) / ``raw_worker.py`` drains queued no-op tasks;
- round trip: sequential ``delay(1, 2)`` + ``get()`` / publish + reply from a raw pull worker;
- call: sequential ``.call(1, 2)`` over core request-reply / a raw queue-group responder.

The drains and round trips are ``run.py``'s own measurements (``run.Bench``), run against the hub
with the worker placed by this script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
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
import run  # noqa: E402
from bench_app import ADD_RT  # noqa: E402
from run import FULL, QUICK, Bench, BenchError, Sizes, connect, fresh_id, log  # noqa: E402

from natask import NoWorkers  # noqa: E402
from tests.integration.topology import Topology  # noqa: E402

DOMAIN = "hub"
"""The hub's JetStream domain; the leaf node's workers name it (``NATASK_JS_DOMAIN``)."""
LAYOUTS = ("direct", "leaf")
"""Where the worker runs: on the hub's server, or on the leaf node."""
UP_WAIT = 60.0
"""Seconds a call retries while the worker (or responder) is still starting."""


class LeafBench(Bench):
    """``run.Bench`` with its workers on a chosen server: the measuring client and the producers
    stay on the hub (``self.url``)."""

    def __init__(self, hub_url: str, workdir: Path, sizes: Sizes, poll: float) -> None:
        super().__init__(_Url(hub_url), workdir, sizes, poll, keep_logs=False)  # type: ignore[arg-type]
        self.worker_url = hub_url
        self.domain = ""

    def place(self, worker_url: str, domain: str) -> None:
        self.worker_url, self.domain = worker_url, domain

    def env(self, prefix: str | None = None) -> dict[str, str]:
        env = super().env(prefix)
        env["NATS_URL"] = self.worker_url
        env.pop("NATASK_JS_DOMAIN", None)
        if self.domain:
            env["NATASK_JS_DOMAIN"] = self.domain
        return env

    def spawn_raw_worker(self, stream: str, subject: str, mode: str) -> Any:
        args = [sys.executable, str(HERE / "raw_worker.py"), "--url", self.worker_url, "--stream", stream,
                "--subject", subject, "--durable", "raw", "--mode", mode, "--batch", "100", "--domain", self.domain]
        return self.spawn(f"raw-worker-{stream}", args, self.env())

    # -- RPC --------------------------------------------------------------------------------
    def natask_call(self) -> dict[str, Any]:
        n, warmup = self.sizes.rt, self.sizes.warmup
        prefix = fresh_id("c")
        proc = self.spawn_natask_worker(prefix)
        app = bench_app.make_app(prefix)
        task = app.tasks[ADD_RT]

        async def measure() -> list[float]:
            try:
                await _when_up(lambda: task.acall(1, 2), NoWorkers)
                for _ in range(warmup):
                    await task.acall(1, 2)
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await task.acall(1, 2)
                    samples.append(time.perf_counter() - t0)
                return samples
            finally:
                await app.aclose()

        try:
            samples = asyncio.run(measure())
        except Exception as e:
            raise BenchError(f"natask call failed: {e!r}; worker log: {self.tail(proc)!r}") from e
        finally:
            self.stop(proc)
            asyncio.run(self._drop(app.names.stream, f"KV_{app.names.results_bucket}"))
        return self._latency(samples)

    def raw_call(self) -> dict[str, Any]:
        n, warmup = self.sizes.rt, self.sizes.warmup
        subject = f"raw{fresh_id('r')}.rpc"
        body = b"x" * self.payload
        proc = self.spawn("raw-responder", [sys.executable, str(Path(__file__)), "--respond", subject,
                                            "--url", self.worker_url], self.env())

        async def measure() -> list[float]:
            async with connect(self.url) as (nc, _):
                await _when_up(lambda: nc.request(subject, body, timeout=5), nats.errors.NoRespondersError)
                for _ in range(warmup):
                    await nc.request(subject, body, timeout=5)
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await nc.request(subject, body, timeout=5)
                    samples.append(time.perf_counter() - t0)
                return samples

        try:
            samples = asyncio.run(measure())
        except Exception as e:
            raise BenchError(f"raw call failed: {e!r}; responder log: {self.tail(proc)!r}") from e
        finally:
            self.stop(proc)
        return self._latency(samples)


class _Url:
    """What ``run.Bench`` reads of its server: the URL."""

    def __init__(self, url: str) -> None:
        self.url = url


async def _when_up(call: Any, absent: type[BaseException]) -> None:
    """Make ``call()`` until nobody-listens (``absent``) stops: the worker has started."""
    deadline = time.monotonic() + UP_WAIT
    while True:
        try:
            await call()
            return
        except absent:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def respond(url: str, subject: str) -> None:
    """The raw RPC reference: a queue-group subscriber that answers every request, until killed."""
    nc = await nats.connect(url, name="raw-responder")

    async def answer(msg: Any) -> None:
        await nc.publish(msg.reply, b"3")

    await nc.subscribe(subject, queue="raw", cb=answer)
    await nc.flush()
    await asyncio.Event().wait()


# (row label, measurement method suffix, result field, unit)
ROWS: list[tuple[str, str, str, str]] = [
    ("drain (`def` task, queued, 1 worker -c 64)", "drain", "rate", "/s"),
    ("round trip `delay().get()` p50", "rt", "p50_ms", "ms"),
    ("round trip `delay().get()` p99", "rt", "p99_ms", "ms"),
    ("`call()` p50", "call", "p50_ms", "ms"),
    ("`call()` p99", "call", "p99_ms", "ms"),
]
METHODS = {"drain": ("natask_drain:def", "raw_drain"), "rt": ("natask_rt", "raw_rt"),
           "call": ("natask_call", "raw_call")}


def one_run(bench: LeafBench, urls: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layout in LAYOUTS:
        bench.place(urls[layout], DOMAIN if layout == "leaf" else "")
        for what, (natask_spec, raw_spec) in METHODS.items():
            for side, spec in (("natask", natask_spec), ("raw", raw_spec)):
                key = f"{layout}/{what}/{side}"
                try:
                    out[key] = run.call(bench, spec)
                    log(f"  {key:<22} {run.brief(out[key])}")
                except Exception as e:
                    bench.stop_all()
                    out[key] = {"error": f"{type(e).__name__}: {e}"}
                    log(f"  {key:<22} FAILED: {e}")
    return out


def median(runs: list[dict[str, Any]], key: str, field: str) -> float | None:
    values = [r[key][field] for r in runs if isinstance(r.get(key, {}).get(field), (int, float))]
    return statistics.median(values) if values else None


def table(runs: list[dict[str, Any]]) -> str:
    head = ("| measurement | natask direct | natask via leaf | via leaf / direct | raw direct | raw via leaf "
            "| via leaf / direct |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for label, what, field, unit in ROWS:
        cells = [label]
        for side in ("natask", "raw"):
            direct, leaf = (median(runs, f"{layout}/{what}/{side}", field) for layout in LAYOUTS)
            cells += [run.fmt(direct, unit), run.fmt(leaf, unit),
                      f"{leaf / direct:.2f}" if direct and leaf is not None else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run, 2,000 tasks, 200 round trips")
    parser.add_argument("--runs", type=int, default=None, help="runs to take the median of (default 3)")
    parser.add_argument("--poll", type=float, default=run.POLL, help="consumer poll interval during drains (s)")
    parser.add_argument("--respond", metavar="SUBJECT", help=argparse.SUPPRESS)  # the raw RPC responder
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.respond:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(respond(args.url, args.respond))
        return 0
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        sizes = Sizes(**{**asdict(sizes), "runs": max(1, args.runs)})
    started = time.time()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="natask-leaf-bench-") as tmp:
        workdir = Path(tmp)
        topology = Topology(workdir / "servers")
        topology.add("hub", domain=DOMAIN, leaf_listen=True)
        topology.add("leaf", js=False, leaf_remotes=[topology["hub"]])
        bench: LeafBench | None = None
        try:
            asyncio.run(topology.start())
            hub_url = topology["hub"].url
            os.environ["NATS_URL"] = hub_url  # the producer apps (bench_app) read it
            os.environ.pop("NATASK_JS_DOMAIN", None)
            urls = {"direct": hub_url, "leaf": topology["leaf"].url}
            log(f"hub {hub_url} (domain {DOMAIN}), leaf {urls['leaf']}; sizes: {sizes}")
            bench = LeafBench(hub_url, workdir, sizes, args.poll)
            for i in range(sizes.runs):
                log(f"run {i + 1}/{sizes.runs}")
                runs.append(one_run(bench, urls))
        finally:
            if bench is not None:
                bench.stop_all()
            topology.close()
    print()
    print(table(runs))
    print(f"\n(median of {sizes.runs} run(s); producers on the hub; {time.time() - started:.0f}s total)")
    failed = [k for r in runs for k, v in r.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
