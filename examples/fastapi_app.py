"""FastAPI: async endpoints that enqueue tasks, await their results, or call a worker directly over RPC.

- ``await task.adelay(...)`` enqueues from an ``async def`` endpoint on the server's own event loop
  and returns once the server stored the task (answer 202 with the id, the worker does the rest);
- ``await (await task.adelay(...)).aget(timeout=...)`` waits for the result inside the request;
- ``await task.acall(...)`` is a direct request-reply to a worker (no queue, at-most-once);
- a plain ``def`` endpoint (FastAPI runs it in a thread) can use the sync API, e.g. to read a
  task's state with ``app.AsyncResult(id).state``.

For a self-contained demo the lifespan below also runs a worker inside the web process and the
requests go through ``httpx.ASGITransport`` (no port, no uvicorn). In production run the workers
apart (``natask worker -A fastapi_app:app``) and serve with ``uvicorn fastapi_app:api``.

    pip install "natask[examples]"         # fastapi, httpx
    python examples/fastapi_app.py         # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException

from natask import Natask, NoWorkers, ResultTimeout, TaskFailed
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("fastapi-example", subject_prefix="fastapi")  # the natask app; `api` below is FastAPI's


@app.task(name="images.thumbnail")
async def thumbnail(url: str, size: int) -> dict[str, Any]:
    await asyncio.sleep(0.05)  # fetch and resize
    return {"url": url, "thumbnail": f"{url.rsplit('/', 1)[-1]}@{size}px"}


@app.task(name="billing.quote")
def quote(items: list[int]) -> dict[str, Any]:
    if any(item < 0 for item in items):
        raise ValueError(f"negative quantity in {items}")
    return {"items": len(items), "total": round(sum(items) * 9.99, 2)}


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with app:  # natask's connections are closed on shutdown
        async with Worker(app, concurrency=8):  # demo only: in production, `natask worker` processes
            yield


api = FastAPI(lifespan=lifespan)


@api.post("/thumbnails", status_code=202)
async def create_thumbnail(url: str, size: int = 128) -> dict[str, str]:
    result = await thumbnail.adelay(url, size)
    return {"task_id": result.id}


@api.get("/tasks/{task_id}")
def task_state(task_id: str) -> dict[str, Any]:  # plain def: FastAPI runs it in a thread, the sync API fits
    result = app.AsyncResult(task_id)
    return {"id": task_id, "state": result.state, "result": result.info if result.successful() else None}


@api.get("/quote")
async def get_quote(items: str) -> dict[str, Any]:
    try:
        result = await quote.adelay([int(i) for i in items.split(",")])
        return await result.aget(timeout=5)
    except TaskFailed as e:
        raise HTTPException(422, f"{e.exc_type}: {e.message}") from None
    except ResultTimeout:
        raise HTTPException(504, "no result in time") from None


@api.get("/quote/now")
async def get_quote_now(items: str) -> dict[str, Any]:
    try:
        return await quote.acall([int(i) for i in items.split(",")])
    except NoWorkers:
        raise HTTPException(503, "no billing worker is running") from None


async def main() -> None:
    async with api.router.lifespan_context(api):  # ASGITransport does not run the lifespan itself
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
            accepted = await client.post("/thumbnails", params={"url": "https://cdn.example/cat.jpg", "size": 64})
            task_id = accepted.json()["task_id"]
            print(f"POST /thumbnails -> {accepted.status_code} {accepted.json()}")
            for _ in range(100):  # poll, as a browser would (bounded: 100 * 50 ms)
                state = (await client.get(f"/tasks/{task_id}")).json()
                if state["state"] == "SUCCESS":
                    break
                await asyncio.sleep(0.05)
            print(f"GET /tasks/{task_id} -> {state}")

            for path, params in (("/quote", {"items": "1,2,3"}), ("/quote/now", {"items": "4,5"}),
                                 ("/quote", {"items": "1,-2"})):
                response = await client.get(path, params=params)
                print(f"GET {path}?items={params['items']} -> {response.status_code} {response.json()}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
