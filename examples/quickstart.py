"""Quickstart: define tasks, run a worker in-process, call them and read the results.

    python examples/quickstart.py          # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os

from natask import Natask, TaskFailed
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("quickstart", subject_prefix="quickstart")


@app.task(name="quickstart.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="quickstart.greet")
async def greet(name: str) -> str:
    await asyncio.sleep(0.01)
    return f"hello {name}"


@app.task(name="quickstart.divide")
def divide(x: float, y: float) -> float:
    return x / y


async def main() -> None:
    async with app, Worker(app, concurrency=4):  # an in-process worker; `natask worker` runs one on its own
        total = await add.adelay(2, 3)
        hello = await greet.adelay("natask")
        print("add(2, 3) =", await total.aget(timeout=10))
        print("greet('natask') =", await hello.aget(timeout=10))
        bad = await divide.adelay(1, 0)
        try:
            await bad.aget(timeout=10)
        except TaskFailed as e:
            print("divide(1, 0) failed remotely:", e.exc_type, "-", e.message)
        results = await add.adelay_many([(i, i) for i in range(5)])
        print("delay_many:", [await r.aget(timeout=10) for r in results])


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
