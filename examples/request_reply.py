"""Request-reply with ``.call``: a load-balanced RPC to whichever worker of a queue group answers first.

``task.call(...)`` (sync) / ``await task.acall(...)`` sends the call over core NATS request-reply to
the queue's workers (subject ``natask.rpc.<prefix>.<queue>.<task>``, queue group ``<queue>``) and
returns the result: no stream, no persistence, at-most-once, about one network round trip. Workers
serve RPC beside their queue with the same concurrency limit. When nobody listens the call raises
``natask.NoWorkers`` at once; a task that fails raises ``natask.TaskFailed``.

Two calculator workers run in this process, each from its own app instance (as two ``natask
worker -Q calculators`` processes would), so every answer can say which one served it.

    python examples/request_reply.py       # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

from natask import AsyncTask, Natask, NoWorkers, TaskFailed
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

PREFIX = "rpc"


def calculator(label: str) -> tuple[Natask, AsyncTask[..., dict[str, Any]]]:
    """An app with the ``rpc.calculate`` task whose answers carry ``label``."""
    service = Natask(label, subject_prefix=PREFIX)

    @service.task(name="rpc.calculate", queue="calculators")
    async def calculate(operation: str, a: float, b: float) -> dict[str, Any]:
        if operation == "add":
            result = a + b
        elif operation == "multiply":
            result = a * b
        elif operation == "divide":
            result = a / b
        else:
            raise ValueError(f"unknown operation {operation!r}")
        return {"result": result, "served_by": label}

    return service, calculate


# The caller: the same task definition, used only to send calls.
app, calculate = calculator("caller")


async def main() -> None:
    started = time.perf_counter()
    try:
        await calculate.acall("add", 1, 2)
    except NoWorkers as e:
        print(f"no calculator running yet -> NoWorkers after {(time.perf_counter() - started) * 1000:.1f} ms: {e}")

    services = [calculator(f"calculator-{i}")[0] for i in (1, 2)]
    workers = [Worker(s, queues=["calculators"], concurrency=4) for s in services]
    async with app:
        for w in workers:
            await w.start()
        try:
            for i in range(4):
                started = time.perf_counter()
                answer = await calculate.acall("add", i, i * 2)
                took = (time.perf_counter() - started) * 1000
                print(f"request {i}: {i} + {i * 2} = {answer['result']} (served by {answer['served_by']}, "
                      f"{took:.1f} ms)")

            answers = await asyncio.gather(*(calculate.acall("multiply", i, 3) for i in range(20)))
            served = Counter(a["served_by"] for a in answers)
            print(f"20 concurrent calls answered, load-balanced: {dict(sorted(served.items()))}")

            # The sync API works too (from any thread, no event loop needed there).
            answer = await asyncio.to_thread(calculate.apply_call, ("multiply", 6, 7), timeout=5)
            print(f"sync apply_call from a thread: 6 * 7 = {answer['result']}")

            for operation, b in (("divide", 0), ("modulo", 3)):
                try:
                    await calculate.acall(operation, 1, b)
                except TaskFailed as e:
                    print(f"{operation}(1, {b}) raised remotely: {e.exc_type}: {e.message}")
        finally:
            for w in workers:
                await w.stop()
            for s in services:
                await s.aclose()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
