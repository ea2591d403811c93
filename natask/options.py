"""What a task is (``TaskOptions``, set at ``@app.task``) and what a running task knows about its own
call (``Request``, the current one in a context variable)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import check_queue_name
from .errors import ConfigError
from .naming import MAX_PRIORITY


@dataclass(frozen=True)
class TaskOptions:
    """Per-task settings given to ``@app.task``."""

    queue: str | None = None
    max_retries: int | None = 3
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: float = 1.0
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    time_limit: float | None = None
    expires: float | None = None
    ignore_result: bool = False
    track_started: bool = False
    bind: bool = False
    priority: int = 0
    """0..9, higher runs first (the call's ``priority=`` wins)."""

    def __post_init__(self) -> None:
        if self.queue is not None:
            check_queue_name(self.queue)
        if type(self.priority) is not int or not 0 <= self.priority <= MAX_PRIORITY:
            raise ConfigError(f"priority must be an int from 0 to {MAX_PRIORITY} (higher runs first), "
                              f"got {self.priority!r}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0 or None (forever), got {self.max_retries}")
        for exc in self.autoretry_for:
            if not (isinstance(exc, type) and issubclass(exc, BaseException)):
                raise ConfigError(f"autoretry_for must hold exception classes, got {exc!r}")
        for what in ("retry_backoff", "retry_backoff_max", "time_limit", "expires"):
            value = getattr(self, what)
            if value is not None and value < 0:
                raise ConfigError(f"{what} must be >= 0 seconds, got {value}")


@dataclass
class Request:
    """What a running task knows about its own call (``self.request`` in a ``bind=True`` task)."""

    id: str
    task: str
    retries: int = 0
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str = ""
    parent_id: str | None = None
    root_id: str | None = None
    eta: float | None = None
    expires: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    """The priority it was sent with (0..9), as the subject it arrived on says."""
    report: Callable[[str, Any], None] | None = field(default=None, repr=False, compare=False)
    """Set by the worker: stores a custom state (``Task.update_state``)."""


current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar("natask_request", default=None)
"""The request of the task running in this context (async task or worker thread)."""
