"""Health checks: a worker's ``/health`` endpoint (200 healthy, 503 not) and its Prometheus ``/metrics``.

``natask.metrics.serve(worker, metrics_port=..., health_port=...)`` starts the HTTP endpoints that
``natask worker --health-port 9101 --metrics-port 9100`` serves: ``GET /health`` answers 200 with
``{"healthy": true, "connected": ..., "consuming": ..., "last_heartbeat": ...}`` while the worker is
connected and consuming, and 503 otherwise, which is what a Kubernetes liveness/readiness probe or a
load balancer wants. ``/metrics`` needs ``pip install "natask[metrics]"``; port 0 picks a free port.

    python examples/health_checks.py       # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import urllib.error
import urllib.request

from natask import Natask
from natask.metrics import serve
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("health", subject_prefix="health")
HAVE_METRICS = importlib.util.find_spec("prometheus_client") is not None


@app.task(name="health.thumbnail")
def thumbnail(name: str) -> str:
    return f"thumb-{name}"


def http_get(url: str) -> tuple[int, str]:
    """A plain HTTP GET, as a probe would do it; returns (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:  # 503 and friends
        return e.code, e.read().decode()


async def probe(url: str) -> None:
    status, body = await asyncio.to_thread(http_get, url)
    report = json.loads(body)
    print(f"GET /health -> {status}  healthy={report['healthy']} connected={report['connected']} "
          f"consuming={report['consuming']} queues={report['queues']}")


async def main() -> None:
    async with app:
        worker = Worker(app, concurrency=4)
        await worker.start()
        endpoints = await serve(worker, metrics_port=0 if HAVE_METRICS else None, health_port=0, host="127.0.0.1")
        urls = {path: f"http://127.0.0.1:{endpoint.port}{path}" for endpoint in endpoints for path in endpoint.routes}
        print(f"worker endpoints: {', '.join(urls.values())}")
        try:
            await probe(urls["/health"])

            results = await thumbnail.adelay_many([(f"img{i}.png",) for i in range(5)])
            for result in results:
                await result.aget(timeout=10)
            if HAVE_METRICS:
                status, text = await asyncio.to_thread(http_get, urls["/metrics"])
                lines = [line for line in text.splitlines() if line.startswith("natask_tasks_total")]
                print(f"GET /metrics -> {status}")
                for line in lines:
                    print(f"  {line}")
            else:
                print('(no /metrics: pip install "natask[metrics]")')

            await worker.stop()  # stops consuming, closes its connection: no longer healthy
            await probe(urls["/health"])
        finally:
            await worker.stop()
            for endpoint in endpoints:
                await endpoint.stop()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
