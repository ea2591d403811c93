"""Lifecycle events on core NATS: ``natask.events.<prefix>.<kind>``, batched.

A worker collects its events per kind for up to 50 ms and then sends them, one message per kind
(and per 500 events): msgpack ``{"worker": ident, "type": kind, "events": [[ts, task id, task name, fields],
...]}``. ``EventStream`` (and so ``natask events`` and the dashboard) turns each row back into a map
``{"type", "ts", "worker", "id", "name", **fields}``. Rows of tuples keep events cheap enough to leave
on: no map is built, and nothing is regrouped, per event on the worker.

Whoever may publish on ``natask.events.>`` writes what observers read: ``decode_batch`` checks every
batch and row (types, bounds, the fields natask emits) and drops, and counts, what does not fit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import msgpack

from .errors import BrokerError
from .message import loads
from .naming import TASK_ID_RE

if TYPE_CHECKING:
    from .broker import Broker
    from .client import App

log = logging.getLogger("natask.events")

TASK_EVENTS: Final = ("task-sent", "task-started", "task-succeeded", "task-failed", "task-retried",
                      "task-revoked")
WORKER_EVENTS: Final = ("worker-online", "worker-heartbeat", "worker-offline")
IDLE_CHECK: Final = 5.0
"""Seconds without events after which an ``EventStream`` checks that its connection still lives."""

MESSAGE_ROWS: Final = 500
"""Events per message at most: a row is ~100 bytes, ~1 kB with an exception message."""
MAX_ROWS: Final = 10 * MESSAGE_ROWS
"""Rows of one received message beyond which the whole message is dropped."""
MAX_IDENT: Final = 300
"""Longest worker ident an event may carry (``host:pid``; a host name may have 253 characters)."""
MAX_NAME: Final = 256
"""Longest task name an event may carry."""
MAX_TEXT: Final = 2000
"""Longest text field (an exception message is cut to 1,000 characters by the worker)."""
MAX_FIELDS: Final = 64
"""Most extra fields one event may carry."""
_KIND_RE: Final = re.compile(r"^[a-z-]{1,40}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_RESERVED: Final = frozenset({"type", "ts", "worker", "id", "name"})
"""Keys of a decoded event that the row's fields may not set."""

Row = tuple[float, "str | None", "str | None", "dict[str, Any] | None"]
"""One event: ``(unix time, task id, task name, extra fields)``; worker events have no id or name."""
Batch = dict[str, list[Row]]
"""Events by kind, as a worker hands them to its listeners."""


def _pack(batch: dict[str, Any]) -> bytes:
    # Plain msgpack, not natask's strict codec: the rows are tuples and must go as arrays.
    return msgpack.packb(batch, use_bin_type=True, default=repr)  # type: ignore[no-any-return]


def events_subject(prefix: str, kind: str = ">") -> str:
    return f"natask.events.{prefix}.{kind}"


class EventPublisher:
    """A worker listener: publishes each batch of events, one message per kind."""

    def __init__(self, broker: Broker, source: str) -> None:
        self.broker = broker
        self.source = source
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, batch: Batch) -> None:
        task = self.broker.loop.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: Batch) -> None:
        prefix = self.broker.names.prefix
        for kind, rows in batch.items():
            for start in range(0, len(rows), MESSAGE_ROWS):  # messages well under max_payload
                chunk = rows[start:start + MESSAGE_ROWS]
                try:
                    data = _pack({"worker": self.source, "type": kind, "events": chunk})
                    await self.broker.publish_core(events_subject(prefix, kind), data)
                except Exception as e:  # events are best effort: never fail a task over them
                    log.debug("dropped %d %s event(s): %s", len(chunk), kind, e)

    async def drain(self) -> None:
        """Wait for the batches being sent (before the worker closes its connection)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


# -- checking what arrives ----------------------------------------------------------------------
def is_number(value: object) -> TypeGuard[float]:
    """A finite int or float (not a bool): what a time, a duration or a count may be."""
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def _seconds(value: object) -> bool:
    return is_number(value) and value >= 0


def _text(value: object) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)


def _queues(value: object) -> bool:
    return isinstance(value, list) and len(value) <= 1000 and all(
        isinstance(q, str) and 0 < len(q) <= MAX_NAME for q in value)


FIELD_CHECKS: Final[Mapping[str, Callable[[object], bool]]] = {
    "retries": _count, "concurrency": _count, "processed": _count, "failed": _count, "running": _count,
    "pid": _count, "uptime": _seconds, "countdown": _seconds, "queues": _queues,
    "exc_type": _text, "message": _text, "reason": _text, "state": _text, "hostname": _text, "app": _text,
}
"""What each field natask emits must be; an event with another value for one of them is dropped."""


def _scalar(value: object) -> bool:
    return value is None or type(value) is bool or is_number(value) or _text(value)


def check_fields(fields: object) -> dict[str, Any] | None:
    """The fields of an event (or a worker's ``stats`` reply) if they are well formed: a map with
    string keys, natask's fields of their types, other fields plain values (others are left out);
    None if not."""
    if not isinstance(fields, dict) or len(fields) > MAX_FIELDS:
        return None
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or len(key) > 64:
            return None
        check = FIELD_CHECKS.get(key)
        if check is not None:
            if not check(value):
                return None
            out[key] = value
        elif _scalar(value):  # fields of a newer natask: kept if they are plain values
            out[key] = value
    return out


def is_ident(value: object) -> TypeGuard[str]:
    """A worker ident as events carry it: a short printable string."""
    return isinstance(value, str) and 0 < len(value) <= MAX_IDENT and value.isprintable()


def _event(kind: str, worker: str, row: object) -> dict[str, Any] | None:
    if not isinstance(row, list) or len(row) != 4:
        return None
    ts, task_id, name, extra = row
    if not is_number(ts):
        return None
    if task_id is not None and not (isinstance(task_id, str) and TASK_ID_RE.match(task_id)):
        return None
    if name is not None and not (isinstance(name, str) and len(name) <= MAX_NAME and _NAME_RE.match(name)):
        return None
    fields = check_fields({} if extra is None else extra)
    if fields is None or not _RESERVED.isdisjoint(fields):
        return None
    fields.update(type=kind, ts=ts, worker=worker)
    if task_id is not None:
        fields.update(id=task_id, name=name)
    return fields


def decode_batch(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The well-formed events of one message as maps, and how many rows were dropped (a message
    that is not an events batch at all counts as one)."""
    try:
        batch = loads(data)
    except Exception:
        return [], 1
    if not isinstance(batch, dict):
        return [], 1
    worker, kind, rows = batch.get("worker"), batch.get("type"), batch.get("events")
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_ROWS:
        return [], 1
    if not is_ident(worker) or not isinstance(kind, str) or not _KIND_RE.match(kind):
        return [], len(rows)
    events = [event for event in (_event(kind, worker, row) for row in rows) if event is not None]
    return events, len(rows) - len(events)


def decode_events(data: bytes) -> Iterator[dict[str, Any]]:
    """The well-formed events of one message as maps (malformed rows left out)."""
    yield from decode_batch(data)[0]


class EventStream:
    """``async with EventStream(app) as events: async for event in events`` — subscribed on entry,
    so nothing that happens after ``__aenter__`` is missed. ``dropped`` counts the malformed rows
    (and messages) left out."""

    def __init__(self, app: App, kinds: str = ">") -> None:
        self.app = app
        self.kinds = kinds
        self.dropped = 0
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
        self._sub: Any = None
        self._broker: Broker | None = None

    async def __aenter__(self) -> EventStream:
        broker = self._broker = await self.app.client.broker()

        async def on_msg(msg: Any) -> None:
            if not self._queue.full():  # a slow reader loses events, never blocks the connection
                self._queue.put_nowait(msg.data)

        self._sub = await broker.subscribe(events_subject(self.app.config.subject_prefix, self.kinds), cb=on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        queue = self._queue
        while True:
            if queue.empty():
                try:
                    data = await asyncio.wait_for(queue.get(), IDLE_CHECK)
                except asyncio.TimeoutError:
                    # nats-py closes a connection for good on some server errors: then no event
                    # ever comes again, so end with an error and let the caller subscribe anew.
                    if self._broker is not None and self._broker.closed:
                        raise BrokerError("the connection of the event stream was closed") from None
                    continue
            else:
                data = queue.get_nowait()
            events, dropped = decode_batch(data)
            if dropped:
                self.dropped += dropped
                log.debug("dropped %d malformed event(s) (%d in all)", dropped, self.dropped)
            for event in events:
                yield event


async def follow(app: App, kinds: str = ">", stream: EventStream | None = None,
                 ) -> AsyncIterator[dict[str, Any]]:
    """Yield the app's events as they happen (``natask events``); pass ``stream`` to read its
    ``dropped`` count."""
    async with stream or EventStream(app, kinds) as events:
        async for event in events:
            yield event
