"""Persistence across restarts: tasks enqueued while no worker runs wait in the stream, even across a server restart.

A queue is a JetStream stream with WorkQueue retention on disk, not a core NATS subscription: a task
published while no worker exists is stored until one takes it, and a delayed task is a schedule
message the server itself holds. Here:

1. a producer enqueues six invoices (one delayed by 2 s) while no worker runs anywhere, then exits;
2. when this example started the bundled server, it restarts it on the same store dir (with
   ``$NATS_URL`` set it leaves your server alone);
3. a worker starts afterwards and runs every task, the delayed one once it is due.

    python examples/persistence.py         # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
import time

import nats

from natask import Natask
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("persistence", subject_prefix="persist")
STREAM = "NATASK_PERSIST"  # NATASK_<PREFIX>: the stream behind every queue of this app


@app.task(name="persist.render_invoice")
def render_invoice(number: int) -> dict[str, float | str]:
    return {"invoice": f"INV-{number:04d}", "ran_at": time.time()}


async def stream_messages() -> int:
    """How many messages the app's stream holds, read with plain nats-py."""
    nc = await nats.connect(servers=os.environ["NATS_URL"].split(","))
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return info.state.messages
    finally:
        await nc.close()


def enqueue() -> tuple[list[str], str, float]:
    """The producer: plain sync calls, then it goes away."""
    ids = [render_invoice.delay(n).id for n in range(1, 6)]
    due = time.time() + 2
    delayed = render_invoice.apply_async((6,), countdown=2).id
    app.close()  # the producer exits; no worker has ever run
    print(f"enqueued {len(ids)} invoices and 1 delayed by 2 s; no worker is running")
    return ids, delayed, due


async def work(ids: list[str], delayed: str, due: float) -> None:
    async with app, Worker(app, concurrency=4):
        print("worker started")
        for task_id in ids:
            result = await app.AsyncResult(task_id).aget(timeout=15)
            print(f"  {task_id}: {result['invoice']}")
        late = await app.AsyncResult(delayed).aget(timeout=15)
        print(f"  {delayed}: {late['invoice']} (delayed: ran {late['ran_at'] - due:+.2f} s after its due time)")
    print(f"all {len(ids) + 1} tasks enqueued before the worker existed ran; nothing was lost")


def main() -> None:
    ids, delayed, due = enqueue()
    print(f"stream {STREAM} holds {asyncio.run(stream_messages())} messages (5 tasks + 1 schedule)")
    if "server" in globals():
        server.restart()  # SIGTERM, then start again on the same port and store dir
        print(f"nats-server restarted; stream {STREAM} still holds {asyncio.run(stream_messages())} messages")
    else:
        print("$NATS_URL is set: not restarting a server this example did not start")
    asyncio.run(work(ids, delayed, due))


if __name__ == "__main__":
    try:
        main()
    finally:
        if "server" in globals():
            server.close()
