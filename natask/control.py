"""Control plane over core NATS request-reply: clients scatter a request and gather every worker's
reply (workers answer in ``natask.worker.control``). Also queue status and purge."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from .beat.schedule import Scheduled, describe
from .broker import ConsumerState, StreamState
from .client import App
from .dlq import DeadLetters
from .naming import MAX_PRIORITY, Names
from .remote import Control


async def inspect(app: App, command: str, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Ask every live worker of the app; replies gathered for ``timeout`` seconds."""
    return await Control(app).asend(command, timeout=timeout)


@dataclass
class QueueStatus:
    """One queue as the server sees it, its priority levels (consumers ``_p<N>_<queue>``) counted in."""

    name: str
    pending: int
    """Tasks waiting: not yet delivered by a consumer, plus ``stranded``."""
    in_flight: int
    redelivered: int
    waiting_pulls: int
    consumed: bool = True
    """A worker has consumed the queue: it has the consumer workers create (producers create those of
    priority levels)."""
    stranded: int = 0
    """Tasks waiting in subjects no consumer takes (a queue, or a priority level, no worker has consumed):
    they wait until a worker starts with ``-Q <queue>``."""
    delivered: int = 0
    """Deliveries so far, by every consumer of the queue."""


async def queues(app: App) -> list[QueueStatus]:
    """Every queue that has a consumer or holds tasks, with its counters (``natask status``, the dashboard)."""
    broker = await app.client.broker()
    names = app.names
    found: dict[str, QueueStatus] = {}
    for stream, domain in await broker.task_streams():
        consumers, state = await asyncio.gather(broker.consumer_states(stream, domain),
                                                broker.stream_state(stream, f"{names.prefix}.>", domain))
        _count(names, consumers, state, found)
    for q in found.values():
        if not q.consumed:  # priority levels a producer created: no worker fetches them either
            q.stranded = q.pending
    return sorted(found.values(), key=lambda q: q.name)


def _count(names: Names, consumers: list[ConsumerState], state: StreamState | None,
           found: dict[str, QueueStatus]) -> None:
    """Add one stream's consumers and waiting subjects to the queues ``found``."""
    levels: set[tuple[str, int]] = set()
    for c in consumers:
        queue, level = Names.level_of_consumer(c.name) or (c.name, 0)
        levels.add((queue, level))
        q = found.setdefault(queue, QueueStatus(queue, 0, 0, 0, 0, consumed=False))
        q.consumed = q.consumed or level == 0
        q.pending, q.in_flight, q.redelivered = q.pending + c.pending, q.in_flight + c.in_flight, \
            q.redelivered + c.redelivered
        q.waiting_pulls, q.delivered = q.waiting_pulls + c.waiting_pulls, q.delivered + c.delivered
    # The task stream is a work queue: a subject's messages are the tasks not yet acked, so a subject
    # no consumer filters holds tasks nobody will run (subjects of scheduled calls excluded).
    for subject, count in (state.subjects if state is not None else {}).items():
        route = names.task_from_subject(subject)
        if route is None or (route[0], names.priority_from_subject(subject)) in levels:
            continue
        q = found.setdefault(route[0], QueueStatus(route[0], 0, 0, 0, 0, consumed=False))
        q.pending, q.stranded = q.pending + count, q.stranded + count


async def dlq_size(app: App) -> int:
    """Dead letters of this app."""
    return await DeadLetters(app).count()


async def purge(app: App, queue: str) -> int:
    """Delete every waiting task of a queue; returns how many there were."""
    from .config import check_queue_name

    check_queue_name(queue)
    broker = await app.client.broker()
    await broker.ensure_stream(queue)
    names, purged = app.names, 0
    stream, domain = broker.stream_of(queue), broker.domain_of(queue)
    # The queue's own subjects, then those of each priority level (their own subject token).
    for subject in (names.queue_filter(queue), *(names.priority_filter(queue, n) for n in range(1, MAX_PRIORITY + 1))):
        state = await broker.stream_state(stream, subject, domain)
        waiting = sum(state.subjects.values()) if state is not None else 0
        if waiting:
            await broker.purge(stream, subject, domain)
            purged += waiting
    return purged


async def status(app: Scheduled, timeout: float = 1.0) -> dict[str, Any]:
    """Everything ``natask status`` shows: queues, DLQ size, live workers, periodic entries."""
    qs, dead, workers = await asyncio.gather(queues(app), dlq_size(app), inspect(app, "stats", timeout))
    return {
        "queues": [asdict(q) for q in qs],
        "dlq": dead,
        "workers": workers,
        "periodic": [{"name": n, "schedule": s, "next": t.isoformat()} for n, s, t in describe(app)],
    }
