"""Lifecycle events on core NATS: ``natask.events.<prefix>.<kind>``, batched.

A worker collects its events per kind for up to 50 ms and then sends them, one message per kind
(and per 500 events): msgpack ``{"worker": ident, "type": kind, "events": [[ts, task id, task name, fields],
...]}``. ``EventStream`` (and so ``natask events`` and the dashboard) turns each row back into a map
``{"type", "ts", "worker", "id", "name", **fields}``. Rows of tuples keep events cheap enough to leave
on: no map is built, and nothing is regrouped, per event on the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgpack

from .errors import BrokerError
from .message import loads

if TYPE_CHECKING:
    from .app import Natask
    from .broker import Broker

log = logging.getLogger("natask.events")

TASK_EVENTS: Final = ("task-sent", "task-started", "task-succeeded", "task-failed", "task-retried",
                      "task-revoked")
WORKER_EVENTS: Final = ("worker-online", "worker-heartbeat", "worker-offline")
IDLE_CHECK: Final = 5.0
"""Seconds without events after which an ``EventStream`` checks that its connection still lives."""

MESSAGE_ROWS: Final = 500
"""Events per message at most: a row is ~100 bytes, ~1 kB with an exception message."""

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


def decode_events(data: bytes) -> Iterator[dict[str, Any]]:
    """The events of one message as maps; nothing for a message that is not an events batch."""
    try:
        batch = loads(data)
        worker, kind, rows = batch["worker"], batch["type"], batch["events"]
    except Exception:
        return
    if not isinstance(kind, str) or not isinstance(rows, list):
        return
    for row in rows:
        if not isinstance(row, list) or len(row) != 4:
            continue
        ts, task_id, name, extra = row
        event: dict[str, Any] = dict(extra) if isinstance(extra, dict) else {}
        event.update(type=kind, ts=ts, worker=worker)
        if task_id is not None:
            event.update(id=task_id, name=name)
        yield event


class EventStream:
    """``async with EventStream(app) as events: async for event in events`` — subscribed on entry,
    so nothing that happens after ``__aenter__`` is missed."""

    def __init__(self, app: Natask, kinds: str = ">") -> None:
        self.app = app
        self.kinds = kinds
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
        self._sub: Any = None
        self._broker: Broker | None = None

    async def __aenter__(self) -> EventStream:
        broker = self._broker = await self.app._broker()

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
            for event in decode_events(data):
                yield event


async def follow(app: Natask, kinds: str = ">") -> AsyncIterator[dict[str, Any]]:
    """Yield the app's events as they happen (``natask events``)."""
    async with EventStream(app, kinds) as stream:
        async for event in stream:
            yield event
