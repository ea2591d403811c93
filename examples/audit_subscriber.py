"""An audit subscriber beside a queue group: a plain NATS subscription sees every call, the workers share them.

A queue group hands each message to one member; a plain subscriber on the same subjects gets a copy
of every message. natask publishes each call on ``<prefix>.<queue>.<task>``, so a nats-py
subscription on ``<prefix>.>`` (no natask involved, no queue group) is an audit log, an analytics
feed or a debugging tap that never takes work away from the workers. A delayed call shows up once,
as its schedule message on ``<prefix>._sched.<queue>.<task id>``, when it is sent (the server moves
it into the queue inside JetStream when it fires).

Two workers run in this process, each from its own app instance (as two ``natask worker -Q orders``
processes would), so each one can say that it ran a task.

    python examples/audit_subscriber.py    # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import msgpack
import nats
from nats.aio.msg import Msg

from natask import AsyncTask, Natask
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

PREFIX = "audit"


def order_service(label: str) -> tuple[Natask, AsyncTask[[str, float], str]]:
    """An app with the ``audit.process_order`` task; the task reports ``label`` as who ran it."""
    service = Natask(label, subject_prefix=PREFIX)

    @service.task(name="audit.process_order", queue="orders")
    async def process_order(order_id: str, total: float) -> str:
        print(f"[{label.upper()}] processing {order_id} ({total:.2f})")
        await asyncio.sleep(0.05)
        return label

    return service, process_order


app, process_order = order_service("shop")  # the publisher


async def main() -> None:
    # The audit log: plain nats-py, not in a queue group, so it receives a copy of every call.
    nc = await nats.connect(servers=os.environ["NATS_URL"].split(","))
    audited: list[str] = []
    all_seen = asyncio.Event()

    async def audit(msg: Msg) -> None:
        headers = msg.headers or {}
        body = msgpack.unpackb(msg.data) if msg.data else {}
        args = body.get("args") if isinstance(body, dict) else None
        audited.append(msg.subject)
        if len(audited) == 5:
            all_seen.set()
        task = msg.subject.split(".", 2)[-1]  # <prefix>.<queue>.<task name>
        print(f"[AUDIT] {msg.subject}  task={task}  id={headers.get('Nats-Msg-Id')}  "
              f"args={args}")

    await nc.subscribe(f"{PREFIX}.>", cb=audit)
    await nc.flush()

    services = [order_service(f"worker-{i}")[0] for i in (1, 2)]
    workers = [Worker(s, queues=["orders"], concurrency=1) for s in services]
    try:
        async with app:
            for w in workers:
                await w.start()
            results = [await process_order.adelay(f"order-{i}", i * 25.5) for i in range(1, 5)]
            later = await process_order.aapply_async(("order-5", 99.0), countdown=0.5)
            ran_by = Counter([await r.aget(timeout=10) for r in [*results, later]])

            # Five calls: four on the queue's subject, the delayed one as its schedule message.
            await asyncio.wait_for(all_seen.wait(), 5)
            scheduled = sum(s.startswith(f"{PREFIX}._sched.") for s in audited)
            print(f"audit saw all {len(audited)} calls ({scheduled} delayed); "
                  f"the queue group shared them: {dict(sorted(ran_by.items()))}")
    finally:
        for w in workers:
            await w.stop()
        for s in services:
            await s.aclose()
        await nc.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
