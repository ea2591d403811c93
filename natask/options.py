"""What a task is (``TaskOptions``, set at ``@app.task``) and what a running task knows about its own
call (``Request``, the current one in a context variable)."""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

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
    rate_limit: str | None = None
    """Starts per second/minute/hour in each worker (Celery's meaning): ``"100/m"``."""
    global_rate_limit: str | None = None
    """Starts per window across all workers together (a KV token bucket): ``"100/m"``."""
    max_concurrency: int | None = None
    """Runs of this task at once across the cluster (KV semaphore with leases)."""
    broadcast: bool = False
    """Sent over core NATS to every live worker of its queue: each runs it once, at most once."""
    limited: bool = field(default=False, init=False, repr=False, compare=False)
    """Set from the three limits above: the worker's gate asks ``worker.limits`` first."""
    soft_time_limit: float | None = None
    priority: int = 0
    """0..9, higher runs first (the call's ``priority=`` wins)."""

    def __post_init__(self) -> None:
        rates = [parse_rate(getattr(self, what), what) for what in ("rate_limit", "global_rate_limit")]
        if self.max_concurrency is not None and (
                isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int)
                or not 1 <= self.max_concurrency <= MAX_CONCURRENCY):
            raise ConfigError(f"max_concurrency must be an int from 1 to {MAX_CONCURRENCY} (or None: no cap), "
                              f"got {self.max_concurrency!r}")
        if self.broadcast and (self.rate_limit or self.global_rate_limit or self.max_concurrency):
            raise ConfigError("broadcast=True tasks run once on every worker, outside rate limits and caps: "
                              "drop rate_limit, global_rate_limit and max_concurrency, or broadcast")
        object.__setattr__(self, "limited", any(rates) or bool(self.max_concurrency))
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
        for what in ("retry_backoff", "retry_backoff_max", "time_limit", "expires", "soft_time_limit"):
            value = getattr(self, what)
            if value is not None and value < 0:
                raise ConfigError(f"{what} must be >= 0 seconds, got {value}")


MAX_CONCURRENCY: Final = 10_000
"""Largest ``max_concurrency``: the cap's leases live in one KV value."""
_RATE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$")
_PER: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(value: object, what: str = "rate_limit") -> float | None:
    """Starts per second of a Celery rate string (``"100/m"``, ``"10/s"``, ``"5/h"``; a plain number
    is per second); None for None, ``0`` or ``""`` (no limit, as in Celery). ``ConfigError`` otherwise."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    match = _RATE_RE.match(value) if isinstance(value, str) else None
    if isinstance(value, str) and not value.strip():
        return None
    if match is None:
        raise ConfigError(f"{what} must look like '100/m' (a number of starts per s, m or h; a plain number is "
                          f"per second), got {value!r:.60}")
    count = float(match.group(1))
    if not math.isfinite(count):
        raise ConfigError(f"{what} must be finite, got {value!r:.60}")
    return count / _PER[match.group(2)] if count else None


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
