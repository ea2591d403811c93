"""Lifecycle events of one worker, batched: listeners (the event publisher, metrics) get the events
of up to ``EVENTS_INTERVAL`` seconds at once, a batch costing about as much as one event."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from ..events import Batch
from ..message import Envelope
from ..states import State

log = logging.getLogger("natask.worker")

EVENTS_INTERVAL: Final = 0.05
"""Seconds a lifecycle event may wait to be sent with others."""
EVENTS_BATCH: Final = 1000
"""Events sent at once, without waiting out ``EVENTS_INTERVAL``."""
EVENT_TEXT: Final = 1000
"""Characters of an exception message an event carries (the result record has all of it)."""


class EventLog:
    """Collects events and hands them to ``listeners`` in batches.

    The two events of every task (started, succeeded) are noted as cheaply as possible in
    ``started`` and ``succeeded`` (a tuple each, by the worker's per-task path, which arms the
    timer with ``arm()`` when ``timer`` is None) and made rows on flush.
    """

    def __init__(self) -> None:
        self.listeners: list[Callable[[Batch], None]] = []
        """Callables given the lifecycle events in batches (event publisher, metrics)."""
        self.started: list[tuple[float, str, str, int]] = []
        self.succeeded: list[tuple[float, str, str]] = []
        self.timer: asyncio.TimerHandle | None = None
        self._batch: Batch = {}
        self._count = 0

    def event(self, kind: str, task_id: str | None = None, name: str | None = None, **fields: Any) -> None:
        """Record a lifecycle event; the listeners get the events of up to ``EVENTS_INTERVAL``
        seconds together (a batch costs about as much as one event)."""
        rows = self._batch.get(kind)
        if rows is None:
            rows = self._batch[kind] = []
        rows.append((time.time(), task_id, name, fields or None))
        self._count += 1
        if self._count >= EVENTS_BATCH:
            self.flush()
        elif self.timer is None:
            self.arm()

    def arm(self) -> None:
        """Flush in ``EVENTS_INTERVAL`` seconds."""
        self.timer = asyncio.get_running_loop().call_later(EVENTS_INTERVAL, self.flush)

    def flush(self) -> None:
        """Hand every event recorded so far to the listeners, now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch: Batch = {}
        if self.started:  # first: a subscriber reading the messages in order sees starts first
            batch["task-started"] = [(ts, task_id, name, {"retries": retries} if retries else None)
                                     for ts, task_id, name, retries in self.started]
            self.started = []
        batch.update(self._batch)
        self._batch, self._count = {}, 0
        if self.succeeded:
            batch["task-succeeded"] = [(ts, task_id, name, None) for ts, task_id, name in self.succeeded]
            self.succeeded = []
        if not batch:
            return
        for listener in self.listeners:
            try:
                listener(batch)
            except Exception:
                log.exception("event listener %r failed", listener)

    def outcome(self, env: Envelope, record: dict[str, Any]) -> None:
        """The event of a task's final outcome."""
        state = record["state"]
        if state == State.SUCCESS:
            self.succeeded.append((time.time(), env.id, env.task))
            if self.timer is None:
                self.arm()
        elif state == State.FAILURE:
            self.event("task-failed", env.id, env.task, exc_type=record.get("exc_type"),
                       message=str(record.get("message", ""))[:EVENT_TEXT])
        elif state == State.REVOKED:
            self.event("task-revoked", env.id, env.task, reason=(record.get("info") or {}).get("reason"))
        else:
            self.event("task-finished", env.id, env.task, state=state)
