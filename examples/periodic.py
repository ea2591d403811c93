"""Periodic tasks: cron and interval entries, fired by ``natask.beat.Beat``, each fire time enqueued once.

- ``@app.periodic(schedule, name=...)`` registers a task and its schedule in one go;
  ``app.add_periodic_task(schedule, task.s(...), name=...)`` schedules a call of an existing task.
  A schedule is a cron string (5 fields, or 6 with seconds last; ``tz=`` for local wall-clock time)
  or a ``timedelta`` aligned to the Unix epoch, so every beat computes the same fire times.
- ``Beat(app)`` enqueues the entries (``natask beat -A mod:app`` or ``natask worker -B`` run one).
  Any number may run: a lease in a KV bucket elects the leader, and each tick's task id is
  ``<entry>_<fire time>``, so even two beats that both think they lead enqueue a tick once.

Here two beats and one worker run for a few seconds; only one beat leads and no tick runs twice.

    python examples/periodic.py            # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import datetime, timedelta

from natask import AsyncTask, Natask
from natask.beat import Beat, describe
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("periodic", subject_prefix="periodic")

ran: Counter[str] = Counter()
ticks: list[str] = []
enough = asyncio.Event()


def record(entry: str, detail: str = "") -> None:
    ran[entry] += 1
    now = datetime.now()
    print(f"  {now:%H:%M:%S}.{now.microsecond // 1000:03d}  {entry} {detail}".rstrip())
    if ran["heartbeat"] >= 3 and ran["cleanup"] >= 1:
        enough.set()


@app.periodic(timedelta(seconds=1), name="periodic.heartbeat")
async def heartbeat() -> None:
    record("heartbeat")


@app.task(name="periodic.cleanup", bind=True)
async def cleanup(self: AsyncTask[..., None], keep: int) -> None:
    ticks.append(self.request.id)  # the tick id: entry name and fire time
    record("cleanup", f"(keep={keep}) as task {self.request.id}")


app.add_periodic_task(timedelta(seconds=2), cleanup.s(keep=10), name="periodic.cleanup-every-2s")


@app.periodic("0 3 * * *", name="periodic.nightly-report", tz="Europe/Berlin")
async def nightly_report() -> None:
    record("nightly-report")  # 03:00 Berlin time: not during this demo


async def main() -> None:
    for name, schedule, next_at in describe(app):
        print(f"entry {name:28} {schedule:28} next at {next_at:%Y-%m-%d %H:%M:%S} UTC")

    beats = [Beat(app, lease_ttl=2), Beat(app, lease_ttl=2)]
    async with app, Worker(app, concurrency=4):
        for beat in beats:
            await beat.start()
        try:
            await asyncio.wait_for(enough.wait(), 10)
            leaders = [beat.is_leader for beat in beats]
        finally:
            for beat in beats:
                await beat.stop()
    print(f"beats running: {len(beats)}, leading: {sum(leaders)}")
    repeated = [tick for tick, n in Counter(ticks).items() if n > 1]
    print(f"periodic tasks ran: heartbeat x{ran['heartbeat']}, cleanup x{ran['cleanup']}; "
          f"ticks run twice: {len(repeated)}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
