"""Dead letters: read (newest first, paged, or by id), replay and purge the entries an app's workers
moved to ``NATASK_DLQ``; the id index the worker writes beside each entry."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .errors import NataskError
from .naming import (
    DLQ_STREAM,
    HDR_DLQ_ATTEMPTS,
    HDR_DLQ_ERROR,
    HDR_DLQ_ID,
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TIME,
    HDR_MSG_ID,
    HDR_REPLAYS,
    HDR_TASK,
    TASK_ID_RE,
)

if TYPE_CHECKING:
    from .broker import Broker
    from .client import App

log = logging.getLogger("natask.dlq")
T = TypeVar("T")


PLACEHOLDER_RE: Final = re.compile(r"^seq-([0-9]{1,18})$")
"""The id of a dead letter without a readable task id: ``seq-<its NATASK_DLQ sequence>``, read directly."""
DEFAULT_PAGE: Final = 50
"""Dead letters per page (``natask dlq list``)."""
MAX_REASON: Final = 200
"""Longest reason (and task name) kept from a header."""
MAX_ERROR: Final = 1000
"""Longest error text kept from a header (the worker writes at most this much)."""
MAX_SUBJECT: Final = 4000
"""Longest original subject a replay publishes to (a longer one could not be a subject)."""
BATCH: Final = 256
"""Messages one batched direct get asks for."""
BATCH_BYTES: Final = 4 * 1024 * 1024
"""Bytes one batched direct get may return (dead letters carry their original payload)."""
MAX_WINDOW: Final = 4096
"""Most stream sequences read into memory at once while reading back from the end."""
SCAN_WINDOW: Final = 1024
"""First window of a scan for an id that the index does not know."""
INDEX_WAIT: Final = 2.0
"""Seconds a worker spends at most noting a dead letter in the index."""
_COUNT_RE: Final = re.compile(r"^[0-9]{1,18}$")


class DeadLetterNotFound(NataskError):
    """No dead letter of this app has the id asked for."""


@dataclass
class DeadLetter:
    """One dead-letter entry: the original message plus why it is here.

    Every field comes from headers anyone allowed to publish on ``natask.dlq.>`` may have written,
    so each is checked: ``id`` is a task id (else the ``seq-N`` placeholder), numbers that do not
    parse are 0, texts are cut to a bound (and may still hold control characters: escape them
    before printing, see ``natask.cli.printable``).
    """

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
    def from_msg(cls, seq: int, data: bytes, headers: Mapping[str, str] | None) -> DeadLetter:
        h = {k: v for k, v in (headers or {}).items() if isinstance(k, str) and isinstance(v, str)}
        given, subject = h.get(HDR_DLQ_ID, ""), h.get(HDR_DLQ_SUBJECT, "")
        # A worker's placeholder names the message's sequence in the task stream, which is gone:
        # the entry is known by its own sequence in NATASK_DLQ instead (unique, and read directly).
        entry_id = given if TASK_ID_RE.match(given) and not PLACEHOLDER_RE.match(given) else f"seq-{seq}"
        return cls(
            seq=seq,
            id=entry_id,
            task=h.get(HDR_TASK, "?")[:MAX_REASON],
            reason=h.get(HDR_DLQ_REASON, "?")[:MAX_REASON],
            error=h.get(HDR_DLQ_ERROR, "")[:MAX_ERROR],
            attempts=parse_count(h.get(HDR_DLQ_ATTEMPTS)),
            time=_parse_time(h.get(HDR_DLQ_TIME)),
            subject=subject if len(subject) <= MAX_SUBJECT else "",  # never cut: it is replayed to
            data=data,
            headers=h,
        )

    @property
    def replays(self) -> int:
        """How many times this task was replayed before (0 for a malformed header)."""
        return parse_count(self.headers.get(HDR_REPLAYS))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (the payload as its length only)."""
        return {"id": self.id, "seq": self.seq, "task": self.task, "reason": self.reason, "error": self.error,
                "attempts": self.attempts, "time": self.time, "subject": self.subject, "size": len(self.data)}


def parse_count(value: object) -> int:
    """A count from a header: a non-negative integer, else 0."""
    return int(value) if isinstance(value, str) and _COUNT_RE.match(value) else 0


def _parse_time(value: object) -> float:
    if not isinstance(value, str) or len(value) > 40:
        return 0.0
    try:
        t = float(value)
    except ValueError:
        return 0.0
    return t if math.isfinite(t) and t >= 0 else 0.0


async def index_dead_letter(broker: Broker, entry_id: str, seq: int) -> None:
    """Note where the dead letter ``entry_id`` went (its ``NATASK_DLQ`` sequence), so ``show`` and
    ``replay`` read it directly. Best effort: without the note ``DeadLetters.get`` scans for it."""
    if seq <= 0 or not TASK_ID_RE.match(entry_id) or PLACEHOLDER_RE.match(entry_id):
        return  # placeholders are read by sequence, no index needed

    async def put() -> None:
        kv = await broker.dlq_index()
        await kv.put(entry_id, str(seq).encode())

    # A worker holds a task slot meanwhile.
    await _on_index(put, f"cannot index dead letter {entry_id}: `natask dlq show` will scan for it",
                    logging.WARNING)


async def _on_index(op: Callable[[], Awaitable[T]], failed: str, level: int = logging.DEBUG) -> T | None:
    """Run an operation on the id index, bounded: the index is a shortcut, and a NATS user that may
    not use its bucket sees a denied request only as a timeout."""
    try:
        return await asyncio.wait_for(op(), INDEX_WAIT)
    except Exception as e:
        log.log(level, "%s (%s)", failed, _describe(e))
        return None


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


class DeadLetters:
    """The dead letters of one app (subjects ``natask.dlq.<prefix>.>`` of the shared stream)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.filter = app.names.dlq_filter

    async def _broker(self) -> Broker:
        broker = await self.app.client.broker()
        await broker.ensure_dlq()
        return broker

    # -- reading ----------------------------------------------------------------------------
    async def count(self) -> int:
        """How many dead letters the app has (from the stream's per-subject counts, nothing read)."""
        broker = await self._broker()
        state = await broker.stream_state(DLQ_STREAM, self.filter)
        return sum(state.subjects.values()) if state is not None else 0

    async def page(self, limit: int = DEFAULT_PAGE, before: int | None = None,
                   ) -> tuple[list[DeadLetter], int | None]:
        """Up to ``limit`` entries, newest first, and the cursor of the next page (or None).

        ``before`` (a stream sequence, the previous page's cursor) starts the page below it; None
        starts at the newest entry."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        broker = await self._broker()
        found: list[DeadLetter] = []
        async with aclosing(self._newest_first(broker, before, 4 * (limit + 1))) as entries:
            async for entry in entries:
                found.append(entry)
                if len(found) > limit:
                    break
        if len(found) > limit:
            return found[:limit], found[limit - 1].seq
        return found, None

    async def get(self, entry_id: str) -> DeadLetter:
        """The newest entry with this id (a task id, or a ``seq-N`` placeholder), without listing.

        A placeholder is read by its sequence, a task id through the id index; a stale or missing
        index entry falls back to a newest-first scan. ``DeadLetterNotFound`` if there is none."""
        if not isinstance(entry_id, str) or not TASK_ID_RE.match(entry_id):
            raise DeadLetterNotFound(f"no dead letter with id {str(entry_id)[:100]!r}: ids are task ids or "
                                     "seq-N placeholders; `natask dlq list` shows them")
        broker = await self._broker()
        placeholder = PLACEHOLDER_RE.match(entry_id)
        seq = int(placeholder.group(1)) if placeholder else await self._indexed(broker, entry_id)
        if seq:
            entry = await self._at(broker, seq)
            if entry is not None and entry.id == entry_id:
                return entry
        if not placeholder:
            async with aclosing(self._newest_first(broker, None, SCAN_WINDOW)) as entries:
                async for entry in entries:
                    if entry.id == entry_id:
                        return entry
        raise DeadLetterNotFound(f"no dead letter with id {entry_id!r}: `natask dlq list` shows the ids")

    async def _indexed(self, broker: Broker, entry_id: str) -> int:
        async def read() -> bytes:
            entry = await (await broker.dlq_index()).get(entry_id)
            return entry.value if entry is not None else b""

        value = await _on_index(read, f"dead-letter index unreadable: scanning for {entry_id}")
        return parse_count(value.decode("ascii", "replace")) if value else 0

    async def _newest_first(self, broker: Broker, before: int | None, window: int) -> AsyncGenerator[DeadLetter, None]:
        """This app's entries below ``before``, newest first: windows read back from the end of the
        shared stream (each read forward, in batches), growing while they find little."""
        info = await broker.api(lambda: broker.js.stream_info(DLQ_STREAM))
        first, high = info.state.first_seq, info.state.last_seq + 1
        if before is not None:
            high = min(high, before)
        window = min(window, MAX_WINDOW)
        while high > first:
            low = max(first, high - window)
            for entry in reversed(await self._forward(broker, low, high)):
                yield entry
            high, window = low, min(window * 4, MAX_WINDOW)

    async def _forward(self, broker: Broker, low: int, high: int) -> list[DeadLetter]:
        """This app's entries with a sequence in ``[low, high)``, oldest first."""
        stored = await broker.read_forward(DLQ_STREAM, self.filter, low, high, batch=BATCH, max_bytes=BATCH_BYTES)
        return [DeadLetter.from_msg(m.seq, m.data, m.headers) for m in stored]

    async def _at(self, broker: Broker, seq: int) -> DeadLetter | None:
        """The entry at ``seq``, if there is one and it is this app's."""
        stored = await broker.read_at(DLQ_STREAM, seq)
        if stored is None or not stored.subject.startswith(self.filter[:-1]):
            return None
        return DeadLetter.from_msg(seq, stored.data, stored.headers)

    # -- changing ---------------------------------------------------------------------------
    async def replay(self, entry_id: str) -> DeadLetter:
        """Publish the original message again (fresh retry count, derived message id), then
        remove the entry and its index key."""
        entry = await self.get(entry_id)
        if not self.app.names.is_task_subject(entry.subject):
            raise NataskError(f"dead letter {entry.id} has no original subject of this app to replay to "
                              f"(it names {entry.subject[:200]!r})")
        broker = await self._broker()
        replays = entry.replays + 1
        headers = {k: v for k, v in entry.headers.items()
                   if not k.startswith(("Natask-Dlq-", "Nats-")) and k != "Natask-Retries"}
        headers[HDR_REPLAYS] = str(replays)
        headers[HDR_MSG_ID] = f"{entry.id}:replay{replays}:{int(time.time())}"
        await broker.ensure_stream(self.app.names.queue_of_subject(entry.subject))
        placeholder = PLACEHOLDER_RE.match(entry.id)
        if not placeholder:
            # The stored FAILURE would answer get() before the replay ran: forget it first.
            await (await broker.results()).purge(entry.id)
        await broker.publish(entry.subject, entry.data, headers)
        await broker.delete_message(DLQ_STREAM, entry.seq)
        if not placeholder:  # a stale key would only cost a later lookup its shortcut
            await _on_index(lambda: _delete_key(broker, entry.id), f"dead-letter index: cannot remove {entry.id}")
        return entry

    async def purge(self) -> int:
        """Delete every entry of this app (and the id index); returns how many there were."""
        broker = await self._broker()
        count = await self.count()
        await broker.purge(DLQ_STREAM, self.filter)
        # Stale keys would only point at sequences that are gone (``get`` checks): best effort.
        await _on_index(lambda: _purge_index(broker), "dead-letter index: cannot purge it", logging.WARNING)
        return count

    # Last: from here on, ``list`` in an annotation would name this method.
    async def list(self, limit: int = 10_000) -> list[DeadLetter]:
        """The ``limit`` newest entries, newest first."""
        return (await self.page(limit))[0]


async def _delete_key(broker: Broker, key: str) -> None:
    await (await broker.dlq_index()).delete(key)


async def _purge_index(broker: Broker) -> None:
    await broker.purge(f"KV_{broker.names.dlq_index_bucket}")  # nothing if no dead letter was ever indexed
