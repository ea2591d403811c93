"""Control plane over core NATS request-reply: workers answer ping/stats/active from their event
loop; clients scatter a request and gather every worker's reply. Also queue status and purge."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from .beat.schedule import Scheduled, describe
from .broker import Message
from .client import App
from .dlq import DeadLetters
from .message import dumps, loads
from .naming import is_reply_subject

if TYPE_CHECKING:
    from .worker import Worker

COMMANDS: Final = ("ping", "stats", "active")


def control_subject(prefix: str, command: str = "*") -> str:
    return f"natask.control.{prefix}.{command}"


class ControlResponder:
    """Subscribed by every worker (no queue group: each one answers)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.hostname = socket.gethostname()

    async def start(self) -> None:
        broker = self.worker.broker_
        self._sub = await broker.subscribe(control_subject(broker.names.prefix), cb=self._on_request)

    async def stop(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass

    async def _on_request(self, msg: Message) -> None:
        if not is_reply_subject(msg.reply, self.worker.inboxes):
            return  # answering on any other subject would write there with the worker's rights
        command = msg.subject.rsplit(".", 1)[-1]
        w = self.worker
        answer: dict[str, Any] = {"worker": w.ident}
        if command == "ping":
            answer["pong"] = True
        elif command == "stats":
            answer.update(self.stats())
        elif command == "active":
            answer["active"] = w.active()
        else:
            answer["error"] = f"unknown command {command!r}; try one of {', '.join(COMMANDS)}"
        await w.broker_.publish_core(msg.reply, dumps(answer))

    def stats(self) -> dict[str, Any]:
        w = self.worker
        return {
            "app": w.app.name,
            "hostname": self.hostname,
            "pid": os.getpid(),
            "queues": list(w.queues),
            "concurrency": w.concurrency,
            "uptime": time.time() - w.started_at if w.started_at else 0.0,
            "processed": w.processed,
            "failed": w.failed,
            "running": len(w.active()),
            "results_not_stored": w.results_not_stored,
            "storage_full_since": w.storage_full_since,
        }


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


class StatusApp(App, Scheduled, Protocol):
    """What ``status`` reads: the client and the periodic entries."""


async def status(app: StatusApp, timeout: float = 1.0) -> dict[str, Any]:
    """Everything ``natask status`` shows: queues, DLQ size, live workers, periodic entries."""
    qs, dead, workers = await asyncio.gather(queues(app), dlq_size(app), inspect(app, "stats", timeout))
    return {
        "queues": [asdict(q) for q in qs],
        "dlq": dead,
        "workers": workers,
        "periodic": [{"name": n, "schedule": s, "next": t.isoformat()} for n, s, t in describe(app)],
    }
