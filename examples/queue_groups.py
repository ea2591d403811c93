"""Publisher and queue-group workers: three worker processes share one queue, each task runs on one of them.

The publisher enqueues tasks without knowing who will run them. Every worker started with
``-Q orders`` joins the queue group ``orders`` (a durable JetStream pull consumer), so each task is
delivered to exactly one member and the work spreads across all of them. Add or stop workers at any
time: the queue keeps whatever nobody has taken yet.

This file is both the task module the workers load (``natask worker -A queue_groups:app``) and the
publisher that starts them, sends twelve orders and prints which worker process packed each one.

    python examples/queue_groups.py        # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from natask import Natask
from natask.control import inspect

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("queue-groups", subject_prefix="qgroups")

WORKERS = 3
ORDERS = 12


@app.task(name="qgroups.pack_order", queue="orders")
def pack_order(order_id: int) -> str:
    # Printed by the worker process that runs it (its stdout is this terminal).
    print(f"  [worker pid {os.getpid()}] packing order {order_id}", flush=True)
    time.sleep(0.05)  # stands in for real work, so the workers overlap
    return f"order {order_id} packed"


def start_workers(count: int) -> list[subprocess.Popen[bytes]]:
    """``natask worker`` processes on queue ``orders``, loading this file as the task module."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "natask", "worker", "-A", "queue_groups:app", "-Q", "orders", "-c", "2",
               "--loglevel", "warning"]
    return [subprocess.Popen(command, env=env, cwd=here) for _ in range(count)]


async def wait_for_workers(pids: set[int], timeout: float = 20.0) -> None:
    """Until every worker process answers a control ping (each one answers, not just one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = {int(reply["worker"].rsplit(":", 1)[1]) for reply in await inspect(app, "ping", timeout=0.3)}
        if pids <= answered:
            return
    raise TimeoutError(f"workers {sorted(pids)} did not all start within {timeout}s")


async def main() -> None:
    procs = start_workers(WORKERS)
    try:
        async with app:
            await wait_for_workers({p.pid for p in procs})
            print(f"{WORKERS} workers joined queue group 'orders': pids {', '.join(str(p.pid) for p in procs)}")

            results = await pack_order.adelay_many([(i,) for i in range(1, ORDERS + 1)])
            print(f"published {len(results)} orders to qgroups.orders.qgroups.pack_order")

            ran_on: Counter[str] = Counter()
            for order_id, result in enumerate(results, start=1):
                value = await result.aget(timeout=15)
                pid = (result.worker or "?").rsplit(":", 1)[-1]
                ran_on[pid] += 1
                print(f"order {order_id:2d}: {value!r:22} ran on worker pid {pid}")
            shares = ", ".join(f"pid {pid}: {n}" for pid, n in sorted(ran_on.items()))
            print(f"{sum(ran_on.values())} tasks, each run by exactly one worker ({shares})")
    finally:
        for p in procs:
            p.terminate()  # SIGTERM: each worker finishes what it runs, then exits 0
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
