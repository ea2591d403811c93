"""Monitoring: live lifecycle events, what each worker runs right now, and queue depths.

- ``natask.events.EventStream(app)`` subscribes to the events workers publish on core NATS
  (``natask.events.<prefix>.<kind>``: ``worker-online``, ``task-started``, ``task-succeeded``,
  ``task-failed``, ``task-retried``, ``worker-heartbeat``, ``worker-offline``...). ``natask events``
  prints the same stream.
- ``natask.control.inspect(app, "active" | "stats" | "ping")`` asks every live worker; each answers
  from its event loop, even while its threads are busy (``natask inspect``).
- ``natask.control.status(app)`` gathers queues (pending, in flight, redelivered), the dead-letter
  count, live workers and periodic entries (``natask status``).

    python examples/monitoring.py          # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter

from natask import Natask, TaskFailed
from natask.control import inspect, status
from natask.events import EventStream
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("monitoring", subject_prefix="monitor")


@app.task(name="monitor.resize_image")
async def resize_image(name: str, seconds: float = 0.0) -> str:
    await asyncio.sleep(seconds)
    return f"{name} resized"


@app.task(name="monitor.parse_upload")
def parse_upload(data: str) -> int:
    return int(data)  # "oops" raises ValueError: a task-failed event


async def main() -> None:
    seen: Counter[str] = Counter()
    offline = asyncio.Event()

    async def watch(events: EventStream) -> None:
        async for event in events:
            seen[event["type"]] += 1
            if event["type"] == "worker-offline":
                offline.set()
            if event["type"].startswith("task-"):
                print(f"  event {event['type']:15} {event.get('name')}  {event.get('id')}")
            else:
                print(f"  event {event['type']:15} {event.get('worker')}  queues={event.get('queues')}")

    async with app, EventStream(app) as events:  # subscribed on entry: nothing after this is missed
        watcher = asyncio.create_task(watch(events))
        worker = Worker(app, concurrency=2)
        await worker.start()
        try:
            slow = [await resize_image.adelay(f"photo-{i}.jpg", 1.0) for i in (1, 2)]
            quick = [await resize_image.adelay(f"icon-{i}.png") for i in (1, 2, 3)]
            bad = await parse_upload.adelay("oops")
            await asyncio.sleep(0.3)  # the two slow tasks now fill both slots; the rest wait

            for reply in await inspect(app, "active", timeout=0.3):
                for task in reply["active"]:
                    print(f"active on {reply['worker']}: {task['name']} {task['id']} "
                          f"running for {task['runtime']:.1f} s")
            report = await status(app, timeout=0.3)
            for q in report["queues"]:
                print(f"queue {q['name']}: pending={q['pending']} in_flight={q['in_flight']} "
                      f"redelivered={q['redelivered']}")
            for w in report["workers"]:
                print(f"worker {w['worker']}: concurrency={w['concurrency']} processed={w['processed']} "
                      f"running={w['running']}")
            print(f"dead letters: {report['dlq']}")

            for result in [*slow, *quick]:
                await result.aget(timeout=10)
            with contextlib.suppress(TaskFailed):
                await bad.aget(timeout=10)
            for stats in await inspect(app, "stats", timeout=0.3):
                print(f"worker {stats['worker']} stats: processed={stats['processed']} failed={stats['failed']}")
        finally:
            await worker.stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(offline.wait(), 2)  # the worker's last event
        watcher.cancel()
    print("events seen: " + ", ".join(f"{kind}={n}" for kind, n in sorted(seen.items())))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
