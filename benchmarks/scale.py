#!/usr/bin/env python
"""natask as its work grows, beside a raw nats-py loop doing the same work in the same run (issue 14).

    python benchmarks/scale.py            # every curve (several minutes)
    python benchmarks/scale.py --quick    # smaller sizes (a smoke run)
    python benchmarks/scale.py --only footprint,processes

Curves: many queues per worker (``scale_queues.py``), large payloads (``scale_queues.py``), many
outstanding results in one producer (``scale_waiters.py``), a beat with many entries
(``scale_beat.py``), the server's memory and store per queued task, tuple encoding, and
``--processes 2`` scaling. Each part starts its own nats-server (file storage in a temp dir, a free
loopback port). Prints one Markdown table (natask, the reference, their ratio, the bar) and writes
``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import nats  # noqa: E402
from nats.js.api import RetentionPolicy, StorageType, StreamConfig  # noqa: E402

from natask import Natask  # noqa: E402
from natask.message import Envelope, dumps  # noqa: E402
from natask.server import NatsServer  # noqa: E402

Row = dict[str, Any]
"""One curve: ``curve``, ``natask``, ``reference``, ``ratio``, ``unit``, ``bar`` (and ``note``)."""


def row(curve: str, natask: float, reference: float | None, unit: str, bar: str = "", note: str = "") -> Row:
    ratio = natask / reference if reference and reference == reference else None  # (not for NaN)
    return {"curve": curve, "natask": natask, "reference": reference, "ratio": ratio, "unit": unit, "bar": bar,
            "note": note}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- footprint on the server -------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _queue_natask(url: str, pid: int, n: int) -> tuple[float, int]:
    app = Natask("footprint", servers=[url])
    add = app.task(name="shop.add")(lambda x, y: x + y)  # results kept: the reply header travels too
    await add.adelay(0, 0)
    base = _rss_mb(pid)
    for start in range(0, n, 10_000):
        await add.adelay_many([(i, i) for i in range(start, min(n, start + 10_000))])
    info = await (await app.client.broker()).js.stream_info(app.names.stream)
    grown = _rss_mb(pid) - base
    await app.aclose()
    return grown, info.state.bytes


async def _queue_raw(url: str, pid: int, n: int, size: int) -> tuple[float, int]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE))
    base = _rss_mb(pid)
    body = b"x" * size
    for start in range(0, n, 10_000):
        futures = [await js.publish_async("raw.default.shop.add", body) for _ in range(start, min(n, start + 10_000))]
        await asyncio.gather(*futures)
    info = await js.stream_info("RAW")
    grown = _rss_mb(pid) - base
    await nc.close()
    return grown, info.state.bytes


def footprint(quick: bool) -> list[Row]:
    """Server memory and store per queued task: natask (results kept) vs raw messages of the same
    body size without headers, each on a fresh server."""
    n = 100_000 if quick else 500_000
    size = len(Envelope(id="a" * 32, task="shop.add", args=[n, n]).encode())
    with tempfile.TemporaryDirectory() as tmp:
        with NatsServer(store_dir=f"{tmp}/a") as server:
            assert server.proc is not None
            mem, store = asyncio.run(_queue_natask(server.url, server.proc.pid, n))
        with NatsServer(store_dir=f"{tmp}/b") as server:
            assert server.proc is not None
            raw_mem, raw_store = asyncio.run(_queue_raw(server.url, server.proc.pid, n, size))
    per = 1024 * 1024 / n
    note = "natask: Nats-Msg-Id (dedupe) and Natask-Reply headers; raw: no headers"
    return [row(f"server memory per queued task ({n:,} queued)", mem * per, raw_mem * per, "B", "<= 1.3x raw",
                note),
            row(f"server store per queued task ({n:,} queued)", store / n, raw_store / n, "B", "<= 1.3x raw", note)]


# -- encoding ----------------------------------------------------------------------------------
def encoding(quick: bool) -> list[Row]:
    """Encoding a 512 KB argument as a tuple vs as a list (the list is the reference)."""
    chunks = tuple(b"x" * 1024 for _ in range(512))
    rows_ = tuple((i, "abcdefghijklmnop") for i in range(20_000))

    def best(value: Any) -> float:
        return min(timeit.repeat(lambda: dumps(value), number=5, repeat=5)) / 5 * 1000

    return [row("encode a 512 KB tuple of bytes (list: reference)", best(chunks), best(list(chunks)), "ms",
                "linear in size"),
            row("encode 20,000 small tuples (lists: reference)", best(rows_), best([list(r) for r in rows_]), "ms",
                "linear in size")]


# -- processes ---------------------------------------------------------------------------------
def processes(quick: bool) -> list[Row]:
    """``--processes 2`` against one process, and 2 raw workers against one, in the same run."""
    from run import FULL, QUICK, Bench

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp, NatsServer(store_dir=f"{tmp}/js") as server:
        os.environ["NATS_URL"] = server.url  # bench_app's producer apps connect there
        bench = Bench(server, Path(tmp), sizes, 0.02, keep_logs=False)
        try:
            one, two = bench.natask_drain("def"), bench.natask_drain("def_p2")
            raw_one, raw_two = bench.raw_drain(), bench.raw_drain("2")
        finally:
            bench.stop_all()
    natask_scaling = two["rate"] / one["rate"]
    raw_scaling = raw_two["rate"] / raw_one["rate"]
    note = (f"natask {one['rate']:,.0f} -> {two['rate']:,.0f}/s, raw {raw_one['rate']:,.0f} -> "
            f"{raw_two['rate']:,.0f}/s")
    return [row("`--processes 2` scaling: 2 processes / 1 (raw: 2 raw workers / 1)", natask_scaling, raw_scaling,
                "x", ">= raw's scaling", note)]


# -- the other curves live beside this script ----------------------------------------------------
def _external(module: str) -> Callable[[bool], list[Row]]:
    def run(quick: bool) -> list[Row]:
        measure: Callable[[str, bool], Awaitable[list[Row]]] = __import__(module).measure
        with tempfile.TemporaryDirectory() as tmp, NatsServer(store_dir=f"{tmp}/js") as server:
            got = asyncio.run(measure(server.url, quick))
        return [row(str(r["name"]), r["natask"], r.get("reference"), str(r.get("unit", "")), str(r.get("bar", "")),
                    f"reference: {r['reference_name']}" if r.get("reference_name") else "") for r in got]

    return run


PARTS: dict[str, Callable[[bool], list[Row]]] = {
    "queues": _external("scale_queues"),
    "waiters": _external("scale_waiters"),
    "beat": _external("scale_beat"),
    "footprint": footprint,
    "encoding": encoding,
    "processes": processes,
}


def fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and unit in ("x", "ms"):
        return f"{value:,.2f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def table(rows: list[Row]) -> str:
    lines = ["| curve | natask | reference | ratio | unit | bar |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "n/a"
        lines.append(f"| {r['curve']} | {fmt(r['natask'], r['unit'])} | {fmt(r.get('reference'), r['unit'])} | "
                     f"{ratio} | {r['unit']} | {r.get('bar', '')} |")
    notes = [f"- {r['curve']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join([*lines, "", *notes] if notes else lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    parser.add_argument("--only", default="", help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--json", default=str(HERE / "results" / "scale.json"), help="where to write the results")
    args = parser.parse_args()
    chosen = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    rows: list[Row] = []
    failed = False
    started = time.time()
    for name in chosen:
        log(f"== {name}")
        try:
            got = PARTS[name](args.quick)
        except Exception as e:  # one broken curve must not hide the others
            log(f"   {name} FAILED: {type(e).__name__}: {e}")
            failed = True
            continue
        for r in got:
            log(f"   {r['curve']}: natask {fmt(r['natask'], r['unit'])} vs {fmt(r.get('reference'), r['unit'])}")
        rows.extend(got)
    print(table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
                               "seconds": time.time() - started, "rows": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
