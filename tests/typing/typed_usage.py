"""Type-checked by tests/unit/test_typing.py with mypy; never run, never collected by pytest.

Every call here must type-check except the one marked ``# expect error``.
"""

from __future__ import annotations

from natask import AsyncResult, AsyncTask, Natask, Task

app = Natask("typed", servers="nats://127.0.0.1:1")


@app.task(name="typed.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="typed.double", queue="fast")
async def double(x: int) -> int:
    return 2 * x


def sync_usage() -> None:
    add.delay(1, 2)
    r: AsyncResult[int] = add.delay(1, 2)
    n: int = r.get(timeout=1)
    local: int = add(1, 2) + mul(3, 4)
    rs: list[AsyncResult[int]] = add.delay_many([(1, 2), (3, 4)])
    r2: AsyncResult[int] = add.apply_async((1, 2), countdown=5)
    t: Task[[int, int], int] = add
    print(n, local, rs, r2, t)


async def async_usage() -> None:
    r: AsyncResult[int] = await double.adelay(1)
    v: int = await r.aget(timeout=1)
    local: int = await double(2)
    t: AsyncTask[[int], int] = double
    print(v, local, t)


def bad_usage() -> None:
    add.delay("x", 1)  # expect error
