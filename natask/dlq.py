"""Dead letters: read, replay and purge the entries an app's workers moved to ``NATASK_DLQ``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import nats.js.errors

from .errors import NataskError
from .message import HDR_MSG_ID, HDR_TASK
from .naming import DLQ_STREAM

if TYPE_CHECKING:
    from .app import Natask
    from .broker import Broker

HDR_DLQ_REASON: Final = "Natask-Dlq-Reason"
"""Why the message was dead-lettered (``unknown task``, ``undecodable``, ``max retries exceeded``...)."""
HDR_DLQ_ERROR: Final = "Natask-Dlq-Error"
"""The exception text, on one line."""
HDR_DLQ_ATTEMPTS: Final = "Natask-Dlq-Attempts"
"""How many times the task was delivered in all."""
HDR_DLQ_TIME: Final = "Natask-Dlq-Time"
"""When it was dead-lettered (Unix time)."""
HDR_DLQ_SUBJECT: Final = "Natask-Dlq-Subject"
"""The subject it was consumed from, where a replay publishes it again."""
HDR_DLQ_ID: Final = "Natask-Dlq-Id"
"""The task id, or ``seq-<stream sequence>`` for a message with no readable id."""
HDR_DLQ_TRUNCATED: Final = "Natask-Dlq-Truncated"
"""The original body's size when it had to be left out (it did not fit ``max_payload`` beside the
dead-letter headers)."""
HDR_REPLAYS: Final = "Natask-Replays"
"""How many times this task was replayed from the DLQ (derives the replay's message id)."""


@dataclass
class DeadLetter:
    """One dead-letter entry: the original message plus why it is here."""

    seq: int
    id: str
    task: str
    reason: str
    error: str
    attempts: int
    time: float
    subject: str
    data: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False)

    @classmethod
    def from_msg(cls, seq: int, data: bytes, headers: dict[str, str] | None) -> DeadLetter:
        h = dict(headers or {})
        return cls(
            seq=seq,
            id=h.get(HDR_DLQ_ID, f"seq-{seq}"),
            task=h.get(HDR_TASK, "?"),
            reason=h.get(HDR_DLQ_REASON, "?"),
            error=h.get(HDR_DLQ_ERROR, ""),
            attempts=int(h.get(HDR_DLQ_ATTEMPTS, "0") or 0),
            time=float(h.get(HDR_DLQ_TIME, "0") or 0),
            subject=h.get(HDR_DLQ_SUBJECT, ""),
            data=data,
            headers=h,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (the payload as its length only)."""
        return {"id": self.id, "seq": self.seq, "task": self.task, "reason": self.reason, "error": self.error,
                "attempts": self.attempts, "time": self.time, "subject": self.subject, "size": len(self.data)}


class DeadLetters:
    """The dead letters of one app (subjects ``natask.dlq.<prefix>.>``)."""

    def __init__(self, app: Natask) -> None:
        self.app = app
        self.filter = f"natask.dlq.{app.config.subject_prefix}.>"

    async def _broker(self) -> Broker:
        broker = await self.app._broker()
        await broker.ensure_dlq()
        return broker

    async def list(self, limit: int = 10_000) -> list[DeadLetter]:
        """Entries oldest first."""
        broker = await self._broker()
        out: list[DeadLetter] = []
        seq = 0
        while len(out) < limit:
            try:
                msg = await broker.js.get_msg(DLQ_STREAM, seq=seq + 1, subject=self.filter, next=True, direct=True)
            except nats.js.errors.NotFoundError:
                break
            assert msg.seq is not None
            seq = msg.seq
            out.append(DeadLetter.from_msg(seq, msg.data or b"", dict(msg.headers or {})))
        return out

    async def get(self, entry_id: str) -> DeadLetter:
        """The newest entry with this task id (or ``seq-N`` placeholder)."""
        matches = [e for e in await self.list() if e.id == entry_id or f"seq-{e.seq}" == entry_id]
        if not matches:
            raise NataskError(f"no dead letter with id {entry_id!r}: `natask dlq list` shows the ids")
        return matches[-1]

    async def replay(self, entry_id: str) -> DeadLetter:
        """Publish the original message again (fresh retry count, derived message id), then
        remove the entry."""
        entry = await self.get(entry_id)
        if not entry.subject.startswith(f"{self.app.config.subject_prefix}."):
            raise NataskError(f"dead letter {entry_id} has no original subject to replay to")
        broker = await self._broker()
        replays = int(entry.headers.get(HDR_REPLAYS, "0") or 0) + 1
        headers = {k: v for k, v in entry.headers.items()
                   if not k.startswith(("Natask-Dlq-", "Nats-")) and k != "Natask-Retries"}
        headers[HDR_REPLAYS] = str(replays)
        headers[HDR_MSG_ID] = f"{entry.id}:replay{replays}:{int(time.time())}"
        await broker.ensure_stream()
        if not entry.id.startswith("seq-"):
            # The stored FAILURE would answer get() before the replay ran: forget it first.
            await (await broker.results()).purge(entry.id)
        await broker.publish(entry.subject, entry.data, headers)
        await broker.js.delete_msg(DLQ_STREAM, entry.seq)
        return entry

    async def purge(self) -> int:
        """Delete every entry of this app; returns how many there were."""
        broker = await self._broker()
        count = len(await self.list())
        await broker.js.purge_stream(DLQ_STREAM, subject=self.filter)
        return count
