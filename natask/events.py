"""Lifecycle events on core NATS: ``natask.events.<prefix>.<kind>``, batched per loop turn.

Each message carries a msgpack list of event maps (``{"type", "ts", "worker", ...}``) so a busy
worker sends one message per kind per event-loop turn instead of one per task.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from .message import dumps, loads

if TYPE_CHECKING:
    from .app import Natask
    from .broker import Broker

log = logging.getLogger("natask.events")

TASK_EVENTS: Final = ("task-sent", "task-started", "task-succeeded", "task-failed", "task-retried",
                      "task-revoked")
WORKER_EVENTS: Final = ("worker-online", "worker-heartbeat", "worker-offline")


def events_subject(prefix: str, kind: str = ">") -> str:
    return f"natask.events.{prefix}.{kind}"


class EventPublisher:
    """A worker listener (or producer hook) that publishes events in batches."""

    def __init__(self, broker: Broker, source: str) -> None:
        self.broker = broker
        self.source = source
        self._batches: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._scheduled = False
        self._flushing: set[asyncio.Task[None]] = set()

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        fields["type"] = kind
        fields.setdefault("worker", self.source)
        self._batches[kind].append(fields)
        if not self._scheduled:
            self._scheduled = True
            self.broker.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batches, self._batches = self._batches, defaultdict(list)
        task = self.broker.loop.create_task(self._send(batches))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batches: dict[str, list[dict[str, Any]]]) -> None:
        prefix = self.broker.names.prefix
        for kind, events in batches.items():
            try:
                await self.broker.publish_core(events_subject(prefix, kind), dumps(events))
            except Exception as e:  # events are best effort: never fail a task over them
                log.debug("dropped %d %s event(s): %s", len(events), kind, e)

    async def drain(self) -> None:
        """Send what is buffered (before the worker closes its connection)."""
        if self._scheduled:
            self._flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)


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
            data = await self._queue.get()
            try:
                batch = loads(data)
            except Exception:
                continue
            for event in batch if isinstance(batch, list) else [batch]:
                if isinstance(event, dict):
                    yield event


async def follow(app: Natask, kinds: str = ">") -> AsyncIterator[dict[str, Any]]:
    """Yield the app's events as they happen (``natask events``)."""
    async with EventStream(app, kinds) as stream:
        async for event in stream:
            yield event
