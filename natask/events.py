"""Lifecycle events on core NATS: ``natask.events.<prefix>.<kind>``, batched.

A worker collects its events as tuples for up to 50 ms (or 1,000 events) and then sends one
message per kind: msgpack ``{"worker": ident, "events": [[kind, ts, task id, task name, fields], ...]}``.
``EventStream`` (and so ``natask events`` and the dashboard) turns each row back into a map
``{"type", "ts", "worker", "id", "name", **fields}``. The tuples and the row format keep events
cheap enough to leave on: no map is built or encoded per event on the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgpack

from .message import loads

if TYPE_CHECKING:
    from .app import Natask
    from .broker import Broker

log = logging.getLogger("natask.events")

TASK_EVENTS: Final = ("task-sent", "task-started", "task-succeeded", "task-failed", "task-retried",
                      "task-revoked")
WORKER_EVENTS: Final = ("worker-online", "worker-heartbeat", "worker-offline")

Event = tuple[str, float, "str | None", "str | None", "dict[str, Any] | None"]
"""``(kind, unix time, task id, task name, extra fields)``; worker events have no id or name."""


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

    def __call__(self, events: list[Event]) -> None:
        by_kind: dict[str, list[Event]] = {}
        for event in events:
            rows = by_kind.get(event[0])
            if rows is None:
                rows = by_kind[event[0]] = []
            rows.append(event)
        task = self.broker.loop.create_task(self._send(by_kind))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, by_kind: dict[str, list[Event]]) -> None:
        prefix = self.broker.names.prefix
        for kind, rows in by_kind.items():
            try:
                batch = _pack({"worker": self.source, "events": rows})
                await self.broker.publish_core(events_subject(prefix, kind), batch)
            except Exception as e:  # events are best effort: never fail a task over them
                log.debug("dropped %d %s event(s): %s", len(rows), kind, e)

    async def drain(self) -> None:
        """Wait for the batches being sent (before the worker closes its connection)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def decode_events(data: bytes) -> Iterator[dict[str, Any]]:
    """The events of one message as maps; nothing for a message that is not an events batch."""
    try:
        batch = loads(data)
        worker, rows = batch["worker"], batch["events"]
    except Exception:
        return
    for row in rows if isinstance(rows, list) else ():
        if not isinstance(row, list) or len(row) != 5 or not isinstance(row[0], str):
            continue
        kind, ts, task_id, name, extra = row
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

    async def __aenter__(self) -> EventStream:
        broker = await self.app._broker()

        async def on_msg(msg: Any) -> None:
            if not self._queue.full():  # a slow reader loses events, never blocks the connection
                self._queue.put_nowait(msg.data)

        self._sub = await broker.subscribe(events_subject(self.app.config.subject_prefix, self.kinds), cb=on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            for event in decode_events(await self._queue.get()):
                yield event


async def follow(app: Natask, kinds: str = ">") -> AsyncIterator[dict[str, Any]]:
    """Yield the app's events as they happen (``natask events``)."""
    async with EventStream(app, kinds) as stream:
        async for event in stream:
            yield event
