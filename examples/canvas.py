"""Canvas: chains, groups and chords of tasks, plus ``link`` / ``link_error`` callbacks.

- ``task.s(...)`` is a signature: a call as data. ``task.si(...)`` ignores the previous result.
- ``chain(a.s(), b.s(), ...)`` (or ``a.s() | b.s()``) runs steps one after another, each receiving
  the previous result as its first argument; its result is the last step's.
- ``group(...)`` runs tasks in parallel; ``GroupResult.get()`` returns their results in order.
- ``chord(group, callback.s())`` calls ``callback`` with the list of results once all are done.
- ``apply_async(link=..., link_error=...)`` sends a callback on success / on failure.

Each step is a task message of its own and the workflow travels with it, so a worker restart in
the middle of a chain loses nothing, and a chord's callback is enqueued once.

    python examples/canvas.py              # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os

from natask import Natask, TaskFailed, chain, chord, group
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("canvas", subject_prefix="canvas")
notes: list[int | str] = []
callbacks_done = asyncio.Event()


@app.task(name="canvas.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="canvas.price")
async def price(sku: str) -> float:
    await asyncio.sleep(0.02)  # a lookup in some other service
    return {"apple": 0.5, "pear": 0.75, "plum": 0.25}.get(sku, 1.0)


@app.task(name="canvas.total")
def total(prices: list[float]) -> float:
    return round(sum(prices), 2)


@app.task(name="canvas.check_stock")
def check_stock(sku: str) -> int:
    if sku == "durian":
        raise LookupError(f"{sku} is out of stock")
    return 12


@app.task(name="canvas.note")
async def note(value: int | str) -> None:
    notes.append(value)
    if len(notes) == 2:
        callbacks_done.set()


async def main() -> None:
    async with app, Worker(app, concurrency=8):
        steps = chain(add.s(1, 2), add.s(3), mul.s(10))
        print(f"chain  {steps}: {await (await steps.adelay()).aget(timeout=10)}")

        piped = add.s(2, 2) | mul.s(5) | add.si(100, 1)
        print(f"pipe   {piped}: {await (await piped.adelay()).aget(timeout=10)}  (si ignores the 20)")

        squares = await group(mul.s(i, i) for i in range(8)).adelay()
        print(f"group  of 8 squares: {await squares.aget(timeout=10)}  "
              f"(completed {await squares.acompleted_count()} of {len(squares)})")

        basket = chord((price.s(sku) for sku in ("apple", "pear", "plum", "kiwi")), total.s())
        print(f"chord  prices -> total: {await (await basket.adelay()).aget(timeout=10)}")

        # Callbacks: link gets the result as its first argument, link_error gets the failed task's id.
        ok = await check_stock.aapply_async(("apple",), link=note.s(), link_error=note.s())
        bad = await check_stock.aapply_async(("durian",), link=note.s(), link_error=note.s())
        print(f"link   check_stock('apple') = {await ok.aget(timeout=10)}")
        try:
            await bad.aget(timeout=10)
        except TaskFailed as e:
            print(f"link_error  check_stock('durian') failed: {e.exc_type}: {e.message}")
        await asyncio.wait_for(callbacks_done.wait(), 10)
        got = "durian's task id" if bad.id in notes else "?"
        print(f"callbacks: link got {next(n for n in notes if n != bad.id)} (apple's stock), link_error got {got}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
