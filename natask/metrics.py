"""Prometheus metrics (``--metrics-port``, needs ``natask[metrics]``) and the ``/health`` check
(``--health-port``) of a worker."""

from __future__ import annotations

import asyncio
import json
import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Final

from .http import DEFAULT_HOST, Handler, HttpServer

if TYPE_CHECKING:
    from .events import Batch
    from .worker import Worker

_OUTCOMES: Final = {"task-succeeded": "succeeded", "task-failed": "failed", "task-retried": "retried",
                    "task-revoked": "revoked"}
QUEUE_POLL: Final = 5.0
"""Seconds between queue depth readings from the server."""


class WorkerMetrics:
    """A worker listener counting in plain ints and floats; Prometheus reads them at scrape time.

    Per task this costs a few dict operations: no ``prometheus_client`` call (each takes a lock)
    on the hot path. Every worker has its own registry (several workers may share a process).
    """

    BUCKETS: Final = (.001, .005, .01, .05, .1, .5, 1.0, 5.0, 10.0, 60.0, 300.0)
    """Upper bounds (seconds) of the ``natask_task_duration_seconds`` histogram buckets."""

    def __init__(self, worker: Worker) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise RuntimeError('--metrics-port needs prometheus-client: pip install "natask[metrics]"') from None
        self.worker = worker
        self.counts: dict[tuple[str, str], int] = {}
        """Tasks finished, by (task name, outcome)."""
        self.durations: dict[str, list[float]] = {}
        """Per task name: a count per bucket (the last one is +Inf), then the sum of run times."""
        self.depth: dict[str, tuple[int, int]] = {}
        """Per queue: (pending, delivered and not yet acked), read from the server every few seconds."""
        self._started: dict[str | None, float] = {}
        self._poller: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def __call__(self, batch: Batch) -> None:
        started, counts, durations = self._started, self.counts, self.durations
        for ts, task_id, _, _ in batch.get("task-started", ()):
            started[task_id] = ts
        for kind, outcome in _OUTCOMES.items():
            for ts, task_id, name, _ in batch.get(kind, ()):
                if name is None:
                    continue
                key = (name, outcome)
                counts[key] = counts.get(key, 0) + 1
                began = started.pop(task_id, None)
                if began is not None:
                    hist = durations.get(name)
                    if hist is None:
                        hist = durations[name] = [0.0] * (len(self.BUCKETS) + 2)
                    hist[bisect_left(self.BUCKETS, ts - began)] += 1
                    hist[-1] += ts - began
        if "worker-offline" in batch:
            self.stop()

    def collect(self) -> Iterator[Any]:
        """The ``prometheus_client`` collector protocol: build the metric families from the counts."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        tasks = CounterMetricFamily("natask_tasks", "Tasks finished by this worker, by task name and outcome",
                                    labels=["task", "outcome"])
        for (name, outcome), n in self.counts.items():
            tasks.add_metric([name, outcome], n)
        yield tasks
        duration = HistogramMetricFamily("natask_task_duration_seconds", "Task run time", labels=["task"])
        bounds = [*map(str, self.BUCKETS), "+Inf"]
        for name, hist in self.durations.items():
            duration.add_metric([name], list(zip(bounds, accumulate(hist[:-1]), strict=True)), hist[-1])
        yield duration
        yield GaugeMetricFamily("natask_tasks_in_flight", "Tasks running in this worker",
                                value=len(self.worker.active()))
        yield CounterMetricFamily("natask_results_not_stored", "Outcomes not stored: JetStream storage was full",
                                  value=self.worker.results_not_stored)
        pending = GaugeMetricFamily("natask_queue_pending", "Tasks waiting in a queue", labels=["queue"])
        unacked = GaugeMetricFamily("natask_queue_in_flight", "Tasks delivered and not yet acked, all workers",
                                    labels=["queue"])
        for queue, (waiting, delivered) in self.depth.items():
            pending.add_metric([queue], waiting)
            unacked.add_metric([queue], delivered)
        yield pending
        yield unacked

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
                        self.depth[q.name] = (q.pending, q.in_flight)
            except Exception:
                pass  # the next reading will do
            await asyncio.sleep(QUEUE_POLL)

    async def render(self) -> tuple[int, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.worker._flush_events()  # count what happened up to this scrape
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
        "storage_full_since": worker.storage_full_since,  # results cannot be stored (tasks still drain)
        "results_not_stored": worker.results_not_stored,
        "last_heartbeat": worker.last_heartbeat or None,
        "heartbeat_age": age,
        "worker": worker.ident,
        "queues": list(worker.queues),
    }


async def serve(worker: Worker, metrics_port: int | None, health_port: int | None,
                host: str = DEFAULT_HOST) -> list[HttpServer]:
    """Start the HTTP endpoints asked for (one server when both use the same port), on loopback
    unless ``host`` says otherwise."""
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
