"""Wildcard routing and several queues: tasks routed to queues, workers per queue, wildcard subscribers.

Every call is published on ``<prefix>.<queue>.<task name>``, and task names are dotted, so the
subject tree can be cut with NATS wildcards (``*`` one token, ``>`` the rest):

- ``routing.orders.>``          everything routed to the ``orders`` queue, whatever the task;
- ``routing.*.mail.*``          every ``mail.*`` task, whatever queue it was routed to;
- ``routing.*.ops.alert``       every call of one task, including calls routed elsewhere per call.

Tasks pick their queue with ``@app.task(queue=...)``, overridable per call with
``apply_async(queue=...)``; each worker consumes the queues it was given (``natask worker -Q``), so
slow mail never holds up orders. NATS permissions can be granted along the same subjects.

    python examples/wildcard_routing.py    # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable

import nats
from nats.aio.msg import Msg

from natask import Natask, Task
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("routing", subject_prefix="routing")


@app.task(name="orders.created", queue="orders", bind=True)
def order_created(self: Task[..., str], order_id: int) -> str:
    return f"order {order_id} created (queue {self.request.queue})"


@app.task(name="orders.shipped", queue="orders", bind=True)
def order_shipped(self: Task[..., str], order_id: int) -> str:
    return f"order {order_id} shipped (queue {self.request.queue})"


@app.task(name="mail.welcome", queue="emails", bind=True)
def welcome_mail(self: Task[..., str], user: str) -> str:
    return f"welcome mail to {user} (queue {self.request.queue})"


@app.task(name="mail.receipt", queue="emails", bind=True)
def receipt_mail(self: Task[..., str], order_id: int) -> str:
    return f"receipt for order {order_id} (queue {self.request.queue})"


@app.task(name="ops.alert", bind=True)  # the default queue, unless a call says otherwise
def alert(self: Task[..., str], text: str) -> str:
    return f"alert {text!r} (queue {self.request.queue})"


SUBSCRIPTIONS = ("routing.orders.>", "routing.*.mail.*", "routing.*.ops.alert")
EXPECTED = 7  # messages the three subscriptions see in all (3 + 2 + 2)


async def main() -> None:
    nc = await nats.connect(servers=os.environ["NATS_URL"].split(","))
    seen: dict[str, list[str]] = defaultdict(list)
    all_seen = asyncio.Event()

    def tap(pattern: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            seen[pattern].append(msg.subject)
            if sum(map(len, seen.values())) >= EXPECTED:
                all_seen.set()
        return on_msg

    for pattern in SUBSCRIPTIONS:
        await nc.subscribe(pattern, cb=tap(pattern))
    await nc.flush()

    workers = [
        Worker(app, queues=["orders"], concurrency=4),            # the order desk
        Worker(app, queues=["emails"], concurrency=2),            # the mailer
        Worker(app, queues=["default", "urgent"], concurrency=2),  # operations
    ]
    try:
        async with app:
            for w in workers:
                await w.start()
            results = [
                await order_created.adelay(1),
                await order_created.adelay(2),
                await order_shipped.adelay(1),
                await welcome_mail.adelay("ada"),
                await receipt_mail.adelay(1),
                await alert.adelay("disk 80% full"),
                await alert.aapply_async(("disk 99% full",), queue="urgent"),  # routed per call
            ]
            for result in results:
                print(f"{result.task_name:15} -> {await result.aget(timeout=10)}")

            await asyncio.wait_for(all_seen.wait(), 5)
            for pattern in SUBSCRIPTIONS:
                print(f"subscriber {pattern!r} saw {len(seen[pattern])}: {', '.join(seen[pattern])}")
    finally:
        for w in workers:
            await w.stop()
        await nc.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
