"""Control plane over core NATS request-reply: clients scatter a request and gather every worker's
reply (workers answer in ``natask.worker.control``). Also queue status and purge."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from .beat.schedule import Scheduled, describe
from .client import App
from .dlq import DeadLetters
from .message import loads
from .naming import Names


def control_subject(prefix: str, command: str = "*") -> str:
    """The control subject of ``command`` for the subject prefix ``prefix`` (``Names.control_subject``)."""
    return Names(prefix).control_subject(command)


async def inspect(app: App, command: str, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Ask every live worker of the app; replies gathered for ``timeout`` seconds."""
    broker = await app.client.broker()
    replies: list[dict[str, Any]] = []
    for data in await broker.gather(control_subject(app.config.subject_prefix, command), b"", timeout):
        try:
            answer = loads(data)
        except Exception:
            continue
        if isinstance(answer, dict):
            replies.append(answer)
    return sorted(replies, key=lambda r: str(r.get("worker")))


@dataclass
class QueueStatus:
    """One queue as the server sees it."""

    name: str
    pending: int
    in_flight: int
    redelivered: int
    waiting_pulls: int


async def queues(app: App) -> list[QueueStatus]:
    """Every queue that has a consumer (created by a worker), with its counters."""
    broker = await app.client.broker()
    return sorted((QueueStatus(c.name, c.pending, c.in_flight, c.redelivered, c.waiting_pulls)
                   for c in await broker.consumer_states(app.names.stream)), key=lambda q: q.name)


async def dlq_size(app: App) -> int:
    """Dead letters of this app."""
    return await DeadLetters(app).count()


async def purge(app: App, queue: str) -> int:
    """Delete every waiting task of a queue; returns how many there were."""
    from .config import check_queue_name

    check_queue_name(queue)
    broker = await app.client.broker()
    await broker.ensure_stream()
    subject = app.names.queue_filter(queue)
    state = await broker.stream_state(app.names.stream, subject)
    await broker.purge(app.names.stream, subject)
    return sum(state.subjects.values()) if state is not None else 0


async def status(app: Scheduled, timeout: float = 1.0) -> dict[str, Any]:
    """Everything ``natask status`` shows: queues, DLQ size, live workers, periodic entries."""
    qs, dead, workers = await asyncio.gather(queues(app), dlq_size(app), inspect(app, "stats", timeout))
    return {
        "queues": [asdict(q) for q in qs],
        "dlq": dead,
        "workers": workers,
        "periodic": [{"name": n, "schedule": s, "next": t.isoformat()} for n, s, t in describe(app)],
    }
