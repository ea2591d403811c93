"""Running a task: coroutine functions on the loop, plain functions on the worker's threads, each
within its time limit; an admitted task's run ends in its outcome (``Outcome``)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import reprlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ExceptionInfo, TimeLimitExceeded, failure_record
from ..hooks import Hooks
from ..hooks import Outcome as Ended
from ..message import Envelope, dumps
from ..naming import HDR_SOFT_TIME_LIMIT, HDR_TIME_LIMIT
from ..options import Request, current_request
from ..states import State
from .delivery import Delivery, Tally
from .events import EventLog
from .outcome import Outcome, shown
from .processes import ProcessPool
from .soft import ThreadAlarm, run_async, soft_error
from .threads import ThreadRunner

if TYPE_CHECKING:
    from ..task import Task

log = logging.getLogger("natask.worker")
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 200


class Execution:
    """Runs the tasks of one started worker."""

    def __init__(self, runner: ThreadRunner, outcome: Outcome, events: EventLog, tally: Tally, ident: str,
                 hooks: Hooks, pool: ProcessPool | None = None) -> None:
        self.runner = runner
        self.pool = pool
        """The process pool of ``--pool processes`` (None: ``def`` tasks run on ``runner``'s threads)."""
        self.hooks = hooks
        self.outcome = outcome
        self.events = events
        self.tally = tally
        self.ident = ident

    async def task(self, delivery: Delivery, env: Envelope, task: Task[Any, Any], args: Sequence[Any],  # noqa: C901
                   kwargs: dict[str, Any], request: Request, retries: int) -> None:
        """Run an admitted task and settle its outcome: the one place a task message starts running
        and the one where its run ends."""
        events, hooks, options = self.events, self.hooks, task.options
        if options.hooked:
            await handler(task, "before_start", env.id, args, kwargs)
        if hooks.before_task:
            # In this delivery's own asyncio task: context variables a hook sets are the task's.
            await hooks.call("before_task", request)
        info = log.isEnabledFor(logging.INFO)
        if info:
            log.info("task %s[%s] received", shown(task, env, request), env.id)
        if events.listeners:
            events.started.append((delivery.started_at, env.id, env.task, retries))
            if events.timer is None:
                events.arm()
        options = task.options
        # A task with an expiry says it started: its caller reads a missing state after the expiry
        # as "expired" once the server removed the message (README, "Expiry").
        if (options.track_started or request.expires is not None) and not options.ignore_result:
            self.outcome.write_state(delivery, dumps({"state": State.STARTED.value, "info": {"worker": self.ident}}))
        started = time.perf_counter()
        try:
            value = await self.run(task, args, kwargs, request)
        except asyncio.CancelledError:
            delivery.finished = True
            if not delivery.revoked:
                raise
            if hooks.on_revoked:
                await hooks.call("on_revoked", request, True, False)
            await self.outcome.finish(delivery, env, task, {"state": State.REVOKED.value,
                                                            "info": {"reason": "terminated"}})
            return
        except Exception as exc:
            delivery.finished = True
            runtime = time.perf_counter() - started
            state = await self.outcome.failed(delivery, env, task, exc, retries, request)
            if hooks.after_task:
                cause = getattr(exc, "exc", None) or exc
                await hooks.call("after_task", request, Ended(state, exception=cause, runtime=runtime,
                                                              traceback=failure_record(cause)["traceback"]))
            if options.hooked:
                await self.handlers_after_failure(task, env, args, kwargs, exc, state)
            return
        delivery.finished = True
        self.tally.processed += 1
        if info or hooks.after_task:
            runtime = time.perf_counter() - started
            if info:
                log.info("task %s[%s] succeeded in %.3fs: %s", shown(task, env, request), env.id, runtime,
                         _short.repr(value))
        # Settled first (follow-ups sent in the run's context, outcome stored, message acked): a hook
        # after the task can neither delay nor lose it.
        await self.outcome.finish(delivery, env, task, {"state": State.SUCCESS.value, "result": value}, retries)
        if hooks.after_task:
            await hooks.call("after_task", request, Ended(State.SUCCESS.value, value, runtime=runtime))
        if options.hooked:
            await handler(task, "on_success", value, env.id, args, kwargs)
            await handler(task, "after_return", State.SUCCESS.value, value, env.id, args, kwargs, None)

    @staticmethod
    async def handlers_after_failure(task: Task[Any, Any], env: Envelope, args: Sequence[Any],
                                     kwargs: dict[str, Any], exc: Exception, state: str) -> None:
        """The ``base=`` class's ``on_retry`` or ``on_failure``, then ``after_return``."""
        cause = getattr(exc, "exc", None) or exc
        if state == State.IGNORED:
            return
        einfo = ExceptionInfo(cause)
        await handler(task, "on_retry" if state == State.RETRY else "on_failure", cause, env.id, args, kwargs, einfo)
        await handler(task, "after_return", state, cause, env.id, args, kwargs, einfo)

    async def run(self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any], request: Request) -> Any:
        """The task's return value (``TimeLimitExceeded`` past its time limit)."""
        options = task.options
        fn, limit, soft = task.fn, options.time_limit, options.soft_time_limit
        if request.headers:
            soft, limit = call_limits(request.headers, soft, limit)
        if not task.is_async and self.pool is not None:
            return await self.pool.run(task, args, kwargs, request, soft, limit)
        if options.bind:
            args = (task, *args)
        if task.is_async:
            current_request.set(request)
            if limit is None and soft is None:
                return await fn(*args, **kwargs)
            coro = fn(*args, **kwargs)
            if soft is not None:
                coro = run_async(coro, soft, soft_error(task.name, soft))
            if limit is None:
                return await coro
            try:
                return await asyncio.wait_for(coro, limit)
            except asyncio.TimeoutError:
                raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {limit:g}s") from None
        alarm = None
        if soft is not None:
            fn = alarm = ThreadAlarm(fn, soft_error(task.name, soft))
        # With hooks before a task, its thread runs in the context they set (a copy per run).
        context = contextvars.copy_context() if self.hooks.before_task else None
        future = self.runner.run(fn, args, kwargs, request, context)
        if limit is None and alarm is None:
            return await future
        timer = None if alarm is None else asyncio.get_running_loop().call_later(soft or 0.0, alarm.fire)
        try:
            if limit is None:
                return await future
            # The thread cannot be stopped: it runs on, its outcome is ignored (see README).
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except asyncio.TimeoutError:
            raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {limit:g}s") from None
        finally:
            if timer is not None:
                timer.cancel()


async def handler(task: Task[Any, Any], name: str, *args: Any) -> None:
    """Call a ``base=`` class's handler (awaited when ``async def``); what it raises is logged."""
    try:
        value = getattr(task, name)(*args)
        if inspect.isawaitable(value):
            await value
    except Exception:
        log.exception("task %s: its %s handler raised", task.name, name)


def call_limits(headers: Mapping[str, str], soft: float | None, limit: float | None) -> tuple[float | None,
                                                                                          float | None]:
    """The soft and hard time limits of a call: those its headers carry, else the task's."""
    raw = headers.get(HDR_SOFT_TIME_LIMIT)
    if raw is not None:
        soft = soft_limit_of(raw, soft)
    raw = headers.get(HDR_TIME_LIMIT)
    if raw is not None:
        limit = soft_limit_of(raw, limit, HDR_TIME_LIMIT)
    return soft, limit


def soft_limit_of(raw: str, default: float | None, header: str = HDR_SOFT_TIME_LIMIT) -> float | None:
    """The ``soft_time_limit`` (or ``time_limit``) a call carries in ``header``: seconds > 0, else the
    task's own (logged)."""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        log.warning("ignoring malformed %s header %r: the task's own limit applies", header,
                    raw[:40])
        return default
    return value
