"""Prometheus metrics (``--metrics-port``, needs ``natask[metrics]``) and the ``/health`` check
(``--health-port``) of a worker."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Final

from .http import Handler, HttpServer

if TYPE_CHECKING:
    from .worker import Worker

_OUTCOMES: Final = {"task-succeeded": "succeeded", "task-failed": "failed", "task-retried": "retried",
                    "task-revoked": "revoked"}
QUEUE_POLL: Final = 5.0
"""Seconds between queue depth readings from the server."""


class WorkerMetrics:
    """A worker listener feeding its own registry (several workers may share a process)."""

    def __init__(self, worker: Worker) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise RuntimeError('--metrics-port needs prometheus-client: pip install "natask[metrics]"') from None
        self.worker = worker
        self.registry = CollectorRegistry()
        self.tasks = Counter("natask_tasks", "Tasks finished by this worker, by task name and outcome",
                             ["task", "outcome"], registry=self.registry)
        self.duration = Histogram("natask_task_duration_seconds", "Task run time", ["task"],
                                  registry=self.registry,
                                  buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 10, 60, 300))
        self.in_flight = Gauge("natask_tasks_in_flight", "Tasks running in this worker", registry=self.registry)
        self.in_flight.set_function(lambda: len(worker.active()))
        self.pending = Gauge("natask_queue_pending", "Tasks waiting in a queue", ["queue"], registry=self.registry)
        self.unacked = Gauge("natask_queue_in_flight", "Tasks delivered and not yet acked, all workers",
                             ["queue"], registry=self.registry)
        self._started: dict[str, float] = {}
        # labels() costs a lock and a tuple lookup per call: keep the children per task name.
        self._count: dict[tuple[str, str], Any] = {}
        self._timing: dict[str, Any] = {}
        self._poller: asyncio.Task[None] | None = None

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "worker-offline":
            self.stop()
            return
        if kind == "task-started":
            self._started[fields["id"]] = fields["ts"]
            return
        outcome = _OUTCOMES.get(kind)
        if outcome is None:
            return
        name = fields.get("name", "")
        counter = self._count.get((name, outcome))
        if counter is None:
            counter = self._count[(name, outcome)] = self.tasks.labels(name, outcome)
        counter.inc()
        began = self._started.pop(fields.get("id", ""), None)
        if began is not None:
            timing = self._timing.get(name)
            if timing is None:
                timing = self._timing[name] = self.duration.labels(name)
            timing.observe(fields["ts"] - began)

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_queues())

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    async def _poll_queues(self) -> None:
        from .control import queues

        while True:
            try:
                for q in await queues(self.worker.app):
                    if q.name in self.worker.queues:
                        self.pending.labels(q.name).set(q.pending)
                        self.unacked.labels(q.name).set(q.in_flight)
            except Exception:
                pass  # the next reading will do
            await asyncio.sleep(QUEUE_POLL)

    async def render(self) -> tuple[int, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)


def health(worker: Worker) -> dict[str, Any]:
    """connected, consuming, last heartbeat; ``healthy`` when all is well."""
    broker = worker.broker
    connected = broker is not None and broker.nc.is_connected
    consuming = worker.consuming
    age = time.time() - worker.last_heartbeat if worker.last_heartbeat else None
    return {
        "healthy": bool(connected and consuming),
        "connected": connected,
        "consuming": consuming,
        "last_heartbeat": worker.last_heartbeat or None,
        "heartbeat_age": age,
        "worker": worker.ident,
        "queues": list(worker.queues),
    }


async def serve(worker: Worker, metrics_port: int | None, health_port: int | None,
                host: str = "0.0.0.0") -> list[HttpServer]:
    """Start the HTTP endpoints asked for (one server when both use the same port)."""
    routes: dict[int, dict[str, Handler]] = {}
    if metrics_port is not None:
        metrics = WorkerMetrics(worker)
        worker.listeners.append(metrics)
        metrics.start()
        routes.setdefault(metrics_port, {})["/metrics"] = metrics.render
    if health_port is not None:
        async def check() -> tuple[int, str, bytes]:
            report = health(worker)
            return (200 if report["healthy"] else 503), "application/json", json.dumps(report).encode()

        routes.setdefault(health_port, {})["/health"] = check
    servers = []
    for port, handlers in routes.items():
        server = HttpServer(handlers, host, port)
        await server.start()
        servers.append(server)
    return servers
