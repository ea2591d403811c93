"""Middleware: the points where code plugs into natask (tracing, error reporting, request context,
session cleanup). Subclass ``Middleware``, override the points you need (each may be ``def`` or
``async def``) and register it with ``app.add_middleware(obj)``.

A hook that raises is logged and ignored: it never loses, fails or delays the settling of a task.
A point no registered middleware overrides costs nothing: each point is a tuple of the overriding
methods, rebuilt when a middleware is added (or a signal connected), and callers skip empty ones.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from .message import Call
    from .options import Request

log = logging.getLogger("natask.hooks")

Hook = Callable[..., "Awaitable[None] | None"]

POINTS: Final = (
    "before_publish", "after_publish", "on_worker_start", "on_worker_stop", "before_task", "after_task",
    "on_retry", "on_dead_letter", "on_revoked", "before_tick",
)
"""Every hook point, in the order of a task's life."""


class WorkerInfo(Protocol):
    """What a worker hook sees of the worker (``natask.Worker`` is one)."""

    @property
    def ident(self) -> str: ...
    @property
    def queues(self) -> Sequence[str]: ...
    @property
    def concurrency(self) -> int: ...


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as ``after_task`` sees it: ``state`` is ``SUCCESS``, ``FAILURE`` or ``RETRY``
    (a retry scheduled: ``on_retry`` was called too); ``result`` the return value on success;
    ``exception`` and ``traceback`` on failure or retry; ``runtime`` in seconds."""

    state: str
    result: Any = None
    exception: BaseException | None = None
    traceback: str | None = None
    runtime: float = 0.0


class Middleware:
    """Override any of these points; the defaults do nothing and are never called."""

    def before_publish(self, call: Call) -> Awaitable[None] | None:
        """A task message is about to be published (by a producer, or a workflow step a worker sends
        in the context of the task that finished); ``call.headers`` may be changed (e.g. to carry a
        trace context). A retry is the same message again: its headers go along."""

    def after_publish(self, call: Call) -> Awaitable[None] | None:
        """The server stored the message of ``call``."""

    def on_worker_start(self, worker: WorkerInfo) -> Awaitable[None] | None:
        """The worker is connected and about to consume its queues."""

    def on_worker_stop(self, worker: WorkerInfo) -> Awaitable[None] | None:
        """The worker finished its drain and is about to close its connection."""

    def before_task(self, request: Request) -> Awaitable[None] | None:
        """A delivery was admitted and its task is about to run (``request.args``/``kwargs`` decoded,
        ``request.headers`` as published). Runs in the task's context: context variables set here
        are seen by the task (for a ``def`` task, on its thread)."""

    def after_task(self, request: Request, outcome: Outcome) -> Awaitable[None] | None:
        """The run ended and was settled: workflow follow-ups sent, the outcome stored, the message
        acknowledged (or a retry scheduled, or the message dead-lettered). Runs in the same context
        as ``before_task``."""

    def on_retry(self, request: Request, exception: BaseException | None, countdown: float) -> Awaitable[None] | None:
        """The run raised and will run again in ``countdown`` seconds."""

    def on_dead_letter(self, request: Request | None, reason: str, subject: str) -> Awaitable[None] | None:
        """A message was dead-lettered (``reason``: unknown task, forged, malformed, max retries,
        rejected...); ``request`` is None when the message could not be decoded."""

    def on_revoked(self, request: Request, terminated: bool, expired: bool) -> Awaitable[None] | None:
        """A task was revoked before it ran (``expired``: its ``expires`` passed) or cancelled while
        running (``terminated``)."""

    def before_tick(self, entry: str, task: str, fire_time: float) -> Awaitable[None] | None:
        """The beat is about to send the periodic entry ``entry`` (task ``task``) for ``fire_time``."""


_BASE: Final = {point: getattr(Middleware, point) for point in POINTS}


async def _call(point: str, hooks: tuple[Hook, ...], args: tuple[Any, ...]) -> None:
    for hook in hooks:
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("middleware hook %s (%s) raised; natask goes on without it", point,
                          getattr(hook, "__qualname__", hook))


class Hooks:
    """The registered middleware of one app, compiled per point: ``hooks.before_task`` is a tuple
    of the overriding methods (empty when none), ``await hooks.call("before_task", request)``
    calls them in registration order."""

    before_publish: tuple[Hook, ...]
    after_publish: tuple[Hook, ...]
    on_worker_start: tuple[Hook, ...]
    on_worker_stop: tuple[Hook, ...]
    before_task: tuple[Hook, ...]
    after_task: tuple[Hook, ...]
    on_retry: tuple[Hook, ...]
    on_dead_letter: tuple[Hook, ...]
    on_revoked: tuple[Hook, ...]
    before_tick: tuple[Hook, ...]

    def __init__(self, tasks: Mapping[str, Any] | None = None) -> None:
        self.middleware: list[Middleware] = []
        self.tasks: Mapping[str, Any] = tasks if tasks is not None else {}
        """The app's task registry (signals name a task object as their sender)."""
        self._compile()
        _ALL.add(self)

    def add(self, middleware: Middleware) -> None:
        """Register ``middleware`` after the ones registered before it."""
        if not isinstance(middleware, Middleware):
            raise TypeError(f"add_middleware() takes a natask.hooks.Middleware, got {type(middleware).__name__}")
        self.middleware.append(middleware)
        self._compile()

    def _compile(self) -> None:
        for point in POINTS:
            own = [getattr(m, point) for m in self.middleware if getattr(type(m), point, None) is not _BASE[point]]
            setattr(self, point, (*own, *(make(self) for make in _GLOBAL.get(point, ()))))

    async def call(self, point: str, *args: Any) -> None:
        """Call every hook of ``point`` with ``args``; a hook that raises is logged and skipped."""
        hooks: tuple[Hook, ...] = getattr(self, point)
        if hooks:
            await _call(point, hooks, args)


_ALL: weakref.WeakSet[Hooks] = weakref.WeakSet()
_GLOBAL: dict[str, list[Callable[[Hooks], Hook]]] = {}
"""Hooks every app runs after its own middleware, made per app (``natask.signals`` once a signal
has a receiver)."""


def set_global(point: str, makers: Sequence[Callable[[Hooks], Hook]]) -> None:
    """Replace the hooks of ``point`` that every app runs (now and later) after its own."""
    if point not in POINTS:
        raise ValueError(f"no hook point {point!r} (known: {', '.join(POINTS)})")
    _GLOBAL[point] = list(makers)
    for hooks in list(_ALL):
        hooks._compile()
