"""Retry policy: the pure backoff function and the decision taken when a task raises."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from .errors import Reject, Retry, TimeLimitExceeded, WorkerLostError
from .options import TaskOptions


def backoff(retries: int, base: float, maximum: float, jitter: bool, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retries + 1``: ``base * 2**retries`` capped at
    ``maximum``; with ``jitter`` a uniform draw in ``[0, that]`` ("full jitter")."""
    delay: float = min(maximum, base * 2.0 ** min(retries, 62))
    if jitter:
        delay = float((rng or random).uniform(0, delay))
    return delay


class Action(str, enum.Enum):
    """What the worker does with a task that raised."""

    RETRY = "retry"
    """Publish it again, held by the server for the countdown."""
    FAIL = "fail"
    """Store its FAILURE (and dead-letter it when ``Decision.reason`` says its retries ran out)."""
    REJECT = "reject"
    """Dead-letter it now, without retrying (``raise natask.Reject(...)``)."""


@dataclass(frozen=True)
class Decision:
    """What to do with a task that raised."""

    action: Action
    countdown: float = 0.0
    reason: str = ""


def decide(exc: BaseException, options: TaskOptions, retries: int) -> Decision:
    """Retry, fail (FAILURE result, dead-lettered when retries are exhausted) or reject."""
    if isinstance(exc, Reject):
        return Decision(Action.REJECT, reason=exc.reason)
    limit = options.max_retries
    if isinstance(exc, Retry):
        override = getattr(exc, "max_retries", None)
        limit = override if override is not None else limit
        countdown = exc.countdown
    elif (options.autoretry_for and isinstance(exc, options.autoretry_for) and not isinstance(exc, TimeLimitExceeded)
          and not (options.dont_autoretry_for and isinstance(exc, options.dont_autoretry_for))) or (
            options.reject_on_worker_lost and isinstance(exc, WorkerLostError)):
        countdown = None
        if options.retry_kwargs:
            limit = options.retry_kwargs.get("max_retries", limit)
            countdown = options.retry_kwargs.get("countdown")
    else:
        return Decision(Action.FAIL)
    if limit is not None and retries >= limit:
        return Decision(Action.FAIL, reason=f"max retries ({limit}) exceeded")
    if countdown is None:
        countdown = options.default_retry_delay
    if countdown is None:
        countdown = backoff(retries, options.retry_backoff, options.retry_backoff_max, options.retry_jitter)
    return Decision(Action.RETRY, countdown=max(0.0, countdown))
