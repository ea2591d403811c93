"""Running a task: coroutine functions on the loop, plain functions on the worker's threads, each
within its time limit; an admitted task's run ends in its outcome (``Outcome``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import TimeLimitExceeded
from ..message import Envelope, dumps
from ..options import Request, current_request
from ..states import State
from .delivery import Delivery, Tally
from .events import EventLog
from .outcome import Outcome
from .threads import ThreadRunner

if TYPE_CHECKING:
    from ..task import Task


class Execution:
    """Runs the tasks of one started worker."""

    def __init__(self, runner: ThreadRunner, outcome: Outcome, events: EventLog, tally: Tally, ident: str) -> None:
        self.runner = runner
        self.outcome = outcome
        self.events = events
        self.tally = tally
        self.ident = ident

    async def task(self, delivery: Delivery, env: Envelope, task: Task[Any, Any], args: Sequence[Any],
                   kwargs: dict[str, Any], request: Request, retries: int) -> None:
        """Run an admitted task and settle its outcome: the one place a task message starts running
        and the one where its run ends."""
        events = self.events
        if events.listeners:
            events.started.append((delivery.started_at, env.id, env.task, retries))
            if events.timer is None:
                events.arm()
        options = task.options
        if options.track_started and not options.ignore_result:
            self.outcome.write_state(delivery, dumps({"state": State.STARTED.value, "info": {"worker": self.ident}}))
        try:
            value = await self.run(task, args, kwargs, request)
        except asyncio.CancelledError:
            delivery.finished = True
            if not delivery.revoked:
                raise
            await self.outcome.finish(delivery, env, task, {"state": State.REVOKED.value,
                                                            "info": {"reason": "terminated"}})
            return
        except Exception as exc:
            delivery.finished = True
            await self.outcome.failed(delivery, env, task, exc, retries)
            return
        delivery.finished = True
        self.tally.processed += 1
        await self.outcome.finish(delivery, env, task, {"state": State.SUCCESS.value, "result": value}, retries)

    async def run(self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any], request: Request) -> Any:
        """The task's return value (``TimeLimitExceeded`` past its time limit)."""
        fn, limit = task.fn, task.options.time_limit
        if task.options.bind:
            args = (task, *args)
        if task.is_async:
            current_request.set(request)
            if limit is None:
                return await fn(*args, **kwargs)
            try:
                return await asyncio.wait_for(fn(*args, **kwargs), limit)
            except asyncio.TimeoutError:
                raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {limit:g}s") from None
        future = self.runner.run(fn, args, kwargs, request)
        if limit is None:
            return await future
        try:
            # The thread cannot be stopped: it runs on, its outcome is ignored (see README).
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except asyncio.TimeoutError:
            raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {limit:g}s") from None
