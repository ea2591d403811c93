"""What a task is (``TaskOptions``, set at ``@app.task``) and what a running task knows about its own
call (``Request``, the current one in a context variable)."""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final

from .config import check_queue_name, seconds
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
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    """Exceptions never retried automatically, even when ``autoretry_for`` matches them."""
    retry_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """``max_retries`` and/or ``countdown`` for automatic retries (Celery's ``retry_kwargs``)."""
    default_retry_delay: float | None = None
    """Seconds before a retry that names no countdown (None: the exponential backoff)."""
    throws: tuple[type[BaseException], ...] = ()
    """Expected errors: the task still fails, logged at INFO without a traceback."""
    serializer: str = "msgpack"
    """How calls of this task are encoded: ``"msgpack"`` or ``"json"``."""
    typing: bool = True
    """False: arguments are not checked against the signature at call time."""
    shadow: str | None = None
    """The name shown in the worker's logs instead of the task's."""
    store_errors_even_if_ignored: bool = False
    """With ``ignore_result``: store FAILURE outcomes anyway."""
    acks_late: bool = True
    """Always True: natask acks a task message after its run ends."""
    reject_on_worker_lost: bool = False
    """True: a task whose process-pool child died (``WorkerLostError``) is retried, not failed."""
    hooked: bool = field(default=False, init=False, repr=False, compare=False)
    """Set by the task: its class overrides a ``base=`` handler (``before_start``, ``on_success``, ...)."""

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
        for what in ("autoretry_for", "dont_autoretry_for", "throws"):
            for exc in getattr(self, what):
                if not (isinstance(exc, type) and issubclass(exc, BaseException)):
                    raise ConfigError(f"{what} must hold exception classes, got {exc!r}")
        _check_retry_options(self)
        if self.acks_late is not True:
            raise ConfigError("acks_late=False is not supported: natask always acks a task after it ran (at least "
                              "once); for at-most-once use task.call() (request-reply) or broadcast=True")
        if self.shadow is not None and (not isinstance(self.shadow, str) or not self.shadow):
            raise ConfigError(f"shadow must be a non-empty str, got {self.shadow!r}")
        for what in ("retry_backoff", "retry_backoff_max", "time_limit", "expires", "soft_time_limit"):
            value = getattr(self, what)
            if value is not None and value < 0:
                raise ConfigError(f"{what} must be >= 0 seconds, got {value}")


OPTION_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: (f.default_factory() if f.default is MISSING else f.default)  # type: ignore[operator]
    for f in fields(TaskOptions) if f.init}
"""Each ``@app.task`` keyword's default (``retry_kwargs``'s ``None`` is read as ``{}``)."""


def task_options(given: Mapping[str, Any]) -> TaskOptions:
    """``TaskOptions`` from ``@app.task``'s keywords (durations as seconds or timedeltas, sequences
    of exception classes), validated."""
    values = dict(given)
    for what in ("retry_backoff", "retry_backoff_max", "time_limit", "expires", "soft_time_limit",
                 "default_retry_delay"):
        if values[what] is not None:
            values[what] = seconds(values[what], what)
    for what in ("autoretry_for", "dont_autoretry_for", "throws"):
        values[what] = tuple(values[what])
    values["retry_kwargs"] = dict(values["retry_kwargs"] or {})
    return TaskOptions(**values)


def _check_retry_options(self: TaskOptions) -> None:
    """``ConfigError`` for bad ``retry_kwargs``, ``default_retry_delay`` or ``serializer``."""
    unknown = set(self.retry_kwargs) - {"max_retries", "countdown"}
    if unknown:
        raise ConfigError(f"retry_kwargs takes max_retries and countdown, got {', '.join(sorted(unknown))}: "
                          "set backoff with retry_backoff/retry_backoff_max/retry_jitter")
    limit = self.retry_kwargs.get("max_retries")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"retry_kwargs max_retries must be an int >= 0 or None, got {limit!r}")
    for what, value in (("retry_kwargs countdown", self.retry_kwargs.get("countdown")),
                        ("default_retry_delay", self.default_retry_delay)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{what} must be a number of seconds >= 0, got {value!r}")
    if self.serializer not in SERIALIZERS:
        raise ConfigError(f"serializer must be one of {', '.join(SERIALIZERS)}, got {self.serializer!r} "
                          "(pickle and yaml are not supported: pass data msgpack or JSON can carry)")


SERIALIZERS: Final = ("msgpack", "json")
"""The ``serializer`` values natask can encode task calls with."""
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
