"""The exception tree of natask.

    NataskError
    ├─ ConfigError                 bad option, bad name, unsupported server
    ├─ EncodeError                 an argument or result msgpack cannot carry
    ├─ DecodeError                 a message that is not a natask envelope (keeps raw bytes and headers)
    ├─ PayloadTooLarge             payload + headers over the server's max_payload
    ├─ TaskNotFound                no task of that name in the app's registry
    ├─ BrokerError                 NATS failures, translated at the broker boundary
    │  ├─ PermissionDenied         a publish or subscribe denied by NATS permissions
    │  ├─ NoWorkers                an RPC call nobody listens to
    │  └─ StorageFull              JetStream refused to store: out of storage or over a limit (err_code)
    ├─ ResultError                 getting a result failed
    │  ├─ ResultTimeout            also a builtin TimeoutError
    │  ├─ TaskFailed               the task raised: exc_type, message, traceback (text only)
    │  └─ TaskRevoked              the task was revoked or expired
    └─ TaskControl                 raised inside tasks to steer the worker, never logged as an error
       ├─ Retry
       ├─ Reject
       ├─ Ignore                   the task ends without a stored result, acked, not retried
       └─ TimeLimitExceeded
    MaxRetriesExceededError        raised by ``self.retry()`` once the task's retries ran out (as Celery's)
    SoftTimeLimitExceeded          raised inside a task past its soft_time_limit (an Exception, as Celery's)
    WorkerLostError                the process running a task died before it ended
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from .states import State


class NataskError(Exception):
    """Base class of every error natask raises."""


class ConfigError(NataskError):
    """An option, a name or the server does not fit what natask needs."""


class EncodeError(NataskError, TypeError):
    """A value cannot be carried by natask's msgpack wire format."""


class DecodeError(NataskError):
    """Bytes that are not a valid natask message; keeps them for the dead-letter queue."""

    def __init__(self, message: str, raw: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.raw = raw
        self.headers = dict(headers or {})


class PayloadTooLarge(NataskError):
    """The encoded call (payload + headers) exceeds the server's max_payload."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class TaskNotFound(NataskError, KeyError):
    """No task of that name is registered in this app."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not found"


class BrokerError(NataskError):
    """NATS failed to do what natask asked (connection, publish, stream)."""


class PermissionDenied(BrokerError):
    """NATS permissions deny a publish or subscribe on a subject."""

    def __init__(self, message: str, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class NoWorkers(BrokerError):
    """An RPC call found no worker listening on its queue."""


class StorageFull(BrokerError):
    """JetStream refused to store a message or create a stream: the server, the account or the
    stream is out of storage or at a limit. ``err_code`` is the server's JetStream error code."""

    def __init__(self, message: str, err_code: int = 0) -> None:
        super().__init__(message)
        self.err_code = err_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.err_code))


class ResultError(NataskError):
    """Getting a task's result failed."""


class ResultTimeout(ResultError, TimeoutError):
    """The result did not arrive within the timeout."""


class TaskFailed(ResultError):
    """The task raised; carries the remote exception as text, never as a rebuilt class."""

    def __init__(self, exc_type: str, message: str, traceback: str = "", task_id: str = "") -> None:
        super().__init__(f"{exc_type}: {message}" if message else exc_type)
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
        self.task_id = task_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.exc_type, self.message, self.traceback, self.task_id))


class TaskRevoked(ResultError):
    """The task was revoked (or expired) and will not run."""


class TaskControl(NataskError):
    """Raised inside a task to steer the worker; never logged as an error."""


class Retry(TaskControl):
    """Ask the worker to run this task again later (see ``Task.retry``)."""

    def __init__(self, message: str = "", exc: BaseException | None = None, countdown: float | None = None) -> None:
        super().__init__(message or (repr(exc) if exc else "retry requested"))
        self.exc = exc
        self.countdown = countdown


class Reject(TaskControl):
    """Refuse the task: it is dead-lettered with this reason and not retried."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


class Ignore(TaskControl):
    """Raised inside a task to end it with nothing stored: the message is acked, no retry, no
    result (the caller's ``get()`` waits on until its timeout, as in Celery)."""


class MaxRetriesExceededError(NataskError):
    """Raised by ``self.retry()`` (without ``exc=``) when the task has no retries left; a task
    that does not catch it fails with it (its FAILURE is stored, not dead-lettered)."""

    def __init__(self, message: str = "max retries exceeded", task_id: str = "", retries: int = 0) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.retries = retries


class ExceptionInfo:
    """What a base class's ``on_failure``/``on_retry``/``after_return`` get as ``einfo`` (Celery's
    names): ``exception``, ``type`` and ``traceback`` (the formatted text)."""

    __slots__ = ("exception", "traceback", "type")

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception
        self.type = type(exception)
        self.traceback = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))

    def __str__(self) -> str:
        return self.traceback


class TimeLimitExceeded(TaskControl):
    """The task ran longer than its ``time_limit``."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task that ran past its ``soft_time_limit``, so it can clean up; the hard
    ``time_limit`` still ends it after. An ``Exception`` as Celery's: a task that does not catch it
    fails with it (then its retry policy)."""


class WorkerLostError(NataskError):
    """The child process running a task of ``--pool processes`` died before the task ended (a
    segfault, ``os._exit``, the OOM killer): the task fails with it (then its retry policy)."""


class Forged(NataskError):
    """A message whose body or headers disagree with the subject it arrived on (a caller sees it as
    ``natask.Forged``; not raised in user code)."""


def type_name(cls: type) -> str:
    """An exception class as results name it: builtins bare, natask's by their public name
    (``natask.TaskFailed``), anything else ``module.QualName``."""
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module == __name__:
        return f"natask.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def failure_record(exc: BaseException, traceback_text: bool = True) -> dict[str, Any]:
    """The FAILURE result record of an exception: its type name, message and traceback text (the
    class itself is never sent: a caller rebuilds ``TaskFailed`` from text only)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if traceback_text else ""
    return {"state": State.FAILURE.value, "exc_type": type_name(type(exc)), "message": str(exc), "traceback": text}
