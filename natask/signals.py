"""Celery's signals, with Celery's names and keyword arguments where natask has the same moment.

    from natask.signals import task_failure

    @task_failure.connect(sender="shop.tasks.charge")
    def report(sender, task_id, exception, **kwargs): ...

Receivers are called with ``sender=`` and ``signal=`` plus the signal's keyword arguments; accept
``**kwargs`` so arguments added later do not break them. ``sender=`` on ``connect`` filters by task
name (a task object or its name) or, for worker and beat signals, by the sender object. A receiver
that raises is logged and ignored. A signal without receivers costs nothing: signals ride on the
hook points of ``natask.hooks``, which are set only while some signal of that point has a receiver.
"""

from __future__ import annotations

import logging
import threading
import traceback as tb
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

from . import hooks as _hooks
from .states import State

if TYPE_CHECKING:
    from .hooks import Hook, Hooks, Outcome, WorkerInfo
    from .message import Call
    from .options import Request

log = logging.getLogger("natask.signals")

F = TypeVar("F", bound=Callable[..., Any])

_LOCK: Final = threading.Lock()


class Signal:
    """A named moment; ``connect`` receivers, natask ``send``s it."""

    def __init__(self, name: str, point: str | None = None) -> None:
        self.name = name
        self.point = point
        """The hook point it rides on (None: sent directly by the worker, beat or logging setup)."""
        self.receivers: tuple[tuple[Callable[..., Any], Any], ...] = ()

    def __repr__(self) -> str:
        return f"<Signal {self.name}: {len(self.receivers)} receivers>"

    @overload
    def connect(self, receiver: F, *, sender: Any = None) -> F: ...
    @overload
    def connect(self, receiver: None = None, *, sender: Any = None) -> Callable[[F], F]: ...
    def connect(self, receiver: Callable[..., Any] | None = None, *, sender: Any = None) -> Any:
        """Connect ``receiver`` (also as ``@signal.connect`` or ``@signal.connect(sender=...)``);
        ``sender`` limits it to one task (a task object or its name) or sender object."""

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"{self.name}.connect() takes a function, got {fn!r}")
            key = getattr(sender, "name", sender) if sender is not None else None
            with _LOCK:
                if not any(r is fn and s == key for r, s in self.receivers):
                    self.receivers = (*self.receivers, (fn, key))
            _rewire(self.point)
            return fn

        return register(receiver) if receiver is not None else register

    def disconnect(self, receiver: Callable[..., Any], *, sender: Any = None) -> bool:
        """Remove ``receiver`` (connected with the same ``sender``); True if it was connected."""
        key = getattr(sender, "name", sender) if sender is not None else None
        with _LOCK:
            kept = tuple((r, s) for r, s in self.receivers if not (r is receiver and s == key))
            found = len(kept) != len(self.receivers)
            self.receivers = kept
        _rewire(self.point)
        return found

    def send(self, sender: Any = None, **kwargs: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver whose ``sender`` filter matches; ``(receiver, its return value)``
        for each, a raised exception standing as the value."""
        out: list[tuple[Callable[..., Any], Any]] = []
        if not self.receivers:
            return out
        name = getattr(sender, "name", sender)
        for receiver, only in self.receivers:
            if only is not None and only != name and only is not sender:
                continue
            try:
                out.append((receiver, receiver(sender=sender, signal=self, **kwargs)))
            except Exception as e:
                log.exception("receiver %s of signal %s raised; natask goes on without it",
                              getattr(receiver, "__qualname__", receiver), self.name)
                out.append((receiver, e))
        return out


# -- producer --------------------------------------------------------------------------------------
before_task_publish = Signal("before_task_publish", "before_publish")
"""``sender`` task name, ``body`` (the encoded message), ``exchange`` (""), ``routing_key`` (the
queue), ``headers`` (mutable), ``properties``, ``declare``, ``retry_policy``."""
after_task_publish = Signal("after_task_publish", "after_publish")
"""``sender`` task name, ``body``, ``exchange``, ``routing_key``."""

# -- worker: a task's life -------------------------------------------------------------------------
task_received = Signal("task_received", "before_task")
"""``sender`` None, ``request``: a delivery was admitted (sent just before ``task_prerun``)."""
task_prerun = Signal("task_prerun", "before_task")
"""``sender`` the task, ``task_id``, ``task``, ``args``, ``kwargs``."""
task_postrun = Signal("task_postrun", "after_task")
"""``sender`` the task, ``task_id``, ``task``, ``args``, ``kwargs``, ``retval``, ``state``."""
task_success = Signal("task_success", "after_task")
"""``sender`` the task, ``result``."""
task_failure = Signal("task_failure", "after_task")
"""``sender`` the task, ``task_id``, ``exception``, ``args``, ``kwargs``, ``traceback``, ``einfo``
(the formatted traceback)."""
task_retry = Signal("task_retry", "on_retry")
"""``sender`` the task, ``request``, ``reason`` (the exception), ``einfo``."""
task_revoked = Signal("task_revoked", "on_revoked")
"""``sender`` the task, ``request``, ``terminated``, ``signum`` (None), ``expired``."""
task_rejected = Signal("task_rejected", "on_dead_letter")
"""``sender`` None, ``message`` (the request, None if undecodable), ``exc`` (the reason): a message
was dead-lettered for any reason other than an unknown task."""
task_unknown = Signal("task_unknown", "on_dead_letter")
"""``sender`` None, ``name``, ``id``, ``message``, ``exc``: a message named no registered task."""

# -- worker: its own life --------------------------------------------------------------------------
worker_init = Signal("worker_init", "on_worker_start")
"""``sender`` the worker, before ``worker_ready``."""
worker_ready = Signal("worker_ready", "on_worker_start")
"""``sender`` the worker: connected and consuming."""
worker_process_init = Signal("worker_process_init")
"""Sent in each child process of ``natask worker --processes N`` before its worker starts."""
worker_shutting_down = Signal("worker_shutting_down")
"""``sender`` the worker's ident, ``sig`` (the signal name or None), ``how`` ("warm"), ``exitcode``."""
worker_shutdown = Signal("worker_shutdown", "on_worker_stop")
"""``sender`` the worker: drained, about to close its connection."""

# -- beat and logging ------------------------------------------------------------------------------
beat_init = Signal("beat_init")
"""``sender`` the beat, when it starts."""
setup_logging = Signal("setup_logging")
"""``loglevel``, ``logfile``, ``format``, ``colorize``: when it has receivers, natask's command line
leaves logging to them and configures nothing."""
after_setup_logger = Signal("after_setup_logger")
"""``logger``, ``loglevel``, ``logfile``, ``format``, ``colorize``: after natask configured logging."""

ALL: Final = (
    before_task_publish, after_task_publish, task_received, task_prerun, task_postrun, task_success,
    task_failure, task_retry, task_revoked, task_rejected, task_unknown, worker_init, worker_ready,
    worker_process_init, worker_shutting_down, worker_shutdown, beat_init, setup_logging, after_setup_logger,
)
"""Every signal natask sends."""


# -- bridges: one hook per point, present only while a signal of that point has receivers ----------
def _task(hooks: Hooks, name: str) -> Any:
    return hooks.tasks.get(name, name)


def _before_publish(hooks: Hooks) -> Hook:
    def hook(call: Call) -> None:
        before_task_publish.send(call.task, body=call.payload, exchange="", routing_key=call.queue,
                                 headers=call.headers, properties={}, declare=[], retry_policy=None)
    return hook


def _after_publish(hooks: Hooks) -> Hook:
    def hook(call: Call) -> None:
        after_task_publish.send(call.task, body=call.payload, exchange="", routing_key=call.queue)
    return hook


def _before_task(hooks: Hooks) -> Hook:
    def hook(request: Request) -> None:
        task_received.send(None, request=request)
        task = _task(hooks, request.task)
        task_prerun.send(task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs)
    return hook


def _after_task(hooks: Hooks) -> Hook:
    def hook(request: Request, outcome: Outcome) -> None:
        task = _task(hooks, request.task)
        if outcome.state == State.SUCCESS:
            task_success.send(task, result=outcome.result)
        elif outcome.state == State.FAILURE:
            task_failure.send(task, task_id=request.id, exception=outcome.exception, args=request.args,
                              kwargs=request.kwargs, traceback=outcome.traceback, einfo=outcome.traceback)
        task_postrun.send(task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs,
                          retval=outcome.result if outcome.state == State.SUCCESS else outcome.exception,
                          state=outcome.state)
    return hook


def _on_retry(hooks: Hooks) -> Hook:
    def hook(request: Request, exception: BaseException | None, countdown: float) -> None:
        einfo = "".join(tb.format_exception(exception)) if exception is not None else None
        task_retry.send(_task(hooks, request.task), request=request, reason=exception, einfo=einfo)
    return hook


def _on_revoked(hooks: Hooks) -> Hook:
    def hook(request: Request, terminated: bool, expired: bool) -> None:
        task_revoked.send(_task(hooks, request.task), request=request, terminated=terminated, signum=None,
                          expired=expired)
    return hook


UNKNOWN_REASON: Final = "unknown task"
"""The dead-letter reason of a message that names no registered task (``task_unknown``)."""


def _on_dead_letter(hooks: Hooks) -> Hook:
    def hook(request: Request | None, reason: str, subject: str) -> None:
        if reason.startswith(UNKNOWN_REASON):
            task_unknown.send(None, name=request.task if request else None, id=request.id if request else None,
                              message=request, exc=reason)
        else:
            task_rejected.send(None, message=request, exc=reason)
    return hook


def _on_worker_start(hooks: Hooks) -> Hook:
    def hook(worker: WorkerInfo) -> None:
        worker_init.send(worker)
        worker_ready.send(worker)
    return hook


def _on_worker_stop(hooks: Hooks) -> Hook:
    def hook(worker: WorkerInfo) -> None:
        worker_shutdown.send(worker)
    return hook


_BRIDGES: Final[dict[str, Callable[[Hooks], Hook]]] = {
    "before_publish": _before_publish, "after_publish": _after_publish, "before_task": _before_task,
    "after_task": _after_task, "on_retry": _on_retry, "on_revoked": _on_revoked,
    "on_dead_letter": _on_dead_letter, "on_worker_start": _on_worker_start, "on_worker_stop": _on_worker_stop,
}


def _rewire(point: str | None) -> None:
    """Set or clear the bridge of ``point`` as its signals gain or lose their receivers."""
    if point is None:
        return
    wanted = any(s.receivers for s in ALL if s.point == point)
    _hooks.set_global(point, [_BRIDGES[point]] if wanted else [])
