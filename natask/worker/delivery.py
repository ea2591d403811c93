"""One task message being worked on (``Delivery``), what the worker's roles share about it, and the
small wire helpers they use to read headers and quote wire values in log lines."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Final, Protocol

from ..broker import Message
from ..naming import is_queue_name

log = logging.getLogger("natask.worker")

MAX_CLOCK_SKEW: Final = 60.0
"""A task delivered at most this long before its eta waits in the consumer (nak with a delay);
earlier ones go back to the server as a schedule."""
MAX_HEADER_INT: Final = 1_000_000
"""Largest value accepted in a counting header (``Natask-Retries``)."""
CUT_LIMIT: Final = 120
"""Characters of a wire value quoted in a log line or an error."""


class Delivery:
    """One task message being worked on (or one RPC call being answered)."""

    __slots__ = ("careful", "finished", "handler", "msg", "name", "result_seq", "revoked", "started", "started_at",
                 "superseded", "task_id", "touched", "writing")

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.started = self.touched = time.monotonic()
        self.started_at = time.time()
        self.task_id = ""
        self.name = ""
        self.revoked = False
        self.finished = False
        self.handler: asyncio.Task[None] | None = None
        self.result_seq: int | None = None
        """The task's results key revision as this delivery knows it (None: unknown, read first)."""
        self.careful = False
        """This delivery may repeat a finished run: store before replying."""
        self.superseded = False
        """Another run stored the final outcome first: this one's writes are dropped."""
        self.writing: asyncio.Task[None] | None = None
        """The last state write of this delivery (writes are chained, in order)."""


class Tally(Protocol):
    """The worker's counters, which the roles that settle tasks update (stats, health and metrics
    read them from the worker)."""

    processed: int
    failed: int
    results_not_stored: int
    storage_full_since: float | None


def header_int(headers: dict[str, str], name: str) -> int | None:
    """A non-negative integer header (absent: 0); None when malformed or beyond ``MAX_HEADER_INT``."""
    raw = headers.get(name)
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) > MAX_HEADER_INT:
        return None
    return int(raw)


def header_time(raw: str, now: float) -> float | None:
    """A Unix time header no later than ``now`` (plus clock skew); None when malformed."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= now + MAX_CLOCK_SKEW else None


def queue_token(subject: str, prefix: str) -> str:
    """The queue token of a subject under ``prefix``, or ``_invalid`` if it is not a queue name."""
    token = subject[len(prefix) + 1:].partition(".")[0] if subject.startswith(prefix + ".") else ""
    return token if is_queue_name(token) else "_invalid"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(text.split())


def cut(value: object, limit: int = CUT_LIMIT) -> str:
    """A wire value for a log line or an error: repr'd (control characters escaped) and bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


async def quietly(coro: Any) -> None:
    """Await ``coro``, logging (at debug) instead of raising what it raises."""
    try:
        await coro
    except Exception as e:
        log.debug("ignored: %s", e)
