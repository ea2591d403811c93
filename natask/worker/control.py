"""The worker half of the control plane: every worker answers ping, stats and active over core NATS
request-reply (the client half, which scatters and gathers, is ``natask.control``)."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..broker import Broker, Message
from ..message import dumps
from ..naming import is_reply_subject

if TYPE_CHECKING:
    from ..app import Natask

COMMANDS: Final = ("ping", "stats", "active")
"""The commands a worker answers (the last token of ``natask.control.<prefix>.<command>``)."""


class Observed(Protocol):
    """What a worker shows of itself."""

    app: Natask
    ident: str
    queues: list[str]
    concurrency: int
    started_at: float
    processed: int
    failed: int
    results_not_stored: int
    storage_full_since: float | None

    @property
    def broker_(self) -> Broker: ...

    @property
    def inboxes(self) -> tuple[str, ...]: ...

    def active(self) -> list[dict[str, Any]]: ...


class ControlResponder:
    """Subscribed by every worker (no queue group: each one answers)."""

    def __init__(self, worker: Observed) -> None:
        self.worker = worker
        self.hostname = socket.gethostname()

    async def start(self) -> None:
        broker = self.worker.broker_
        self._sub = await broker.subscribe(broker.names.control_subject(), cb=self._on_request)

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
