"""Remote control, the client half: ``app.control`` scatters a command to the app's live workers
over core NATS (``natask.control.<prefix>.<command>``) and gathers their replies; revokes are
records in the revoked bucket, which every worker mirrors (``natask.worker.revokes``). The worker
half is ``natask.worker.control``; the wire format is described there."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Final

from .errors import ConfigError
from .message import dumps, loads
from .naming import (
    CONTROL_COMMANDS,
    INSPECT_COMMANDS,
    MAX_TASK_NAME,
    check_task_id,
    check_task_name,
    revoked_name_key,
)
from .options import parse_rate
from .portal import Portal, blocking

DEFAULT_TIMEOUT: Final = 1.0
"""Seconds replies are gathered for (less when every worker of ``destination`` answered)."""


def _check_n(n: object) -> int:
    if type(n) is not int or n < 1:
        raise ValueError(f"n must be an int >= 1 (slots to add or remove), got {n!r}")
    return n


def _check_seconds(what: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be seconds > 0 (or None: no limit), got {value!r}")
    return float(value)


def check_pattern(pattern: object) -> str:
    """A task name or glob (``shop.*``, ``*.refund``) to revoke by: non-empty, no spaces."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_TASK_NAME or any(
            c.isspace() for c in pattern):
        raise ValueError(f"a revoke by name takes a task name or a glob such as 'shop.*' (no spaces, at most "
                         f"{MAX_TASK_NAME} characters), got {pattern!r:.80}")
    return pattern


class Control:
    """``app.control``: inspect and steer the app's live workers (Celery's ``app.control``).

    Every method gathers the replies of the workers that answer within ``timeout`` seconds, one
    dict per worker (``"worker"``: its ident, host:pid; ``"error"`` if it refused), sorted by
    worker; ``destination`` (idents) limits the command to those workers. Each method has an async
    twin, prefixed ``a``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def _portal(self) -> Portal:
        portal: Portal = self.app.client.portal
        return portal

    async def asend(self, command: str, args: dict[str, Any] | None = None,
                    destination: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Send ``command`` with ``args`` and gather the replies (the other methods call this)."""
        if command not in INSPECT_COMMANDS + CONTROL_COMMANDS:
            raise ValueError(f"unknown control command {command!r}: one of "
                             f"{', '.join(INSPECT_COMMANDS + CONTROL_COMMANDS)}")
        if isinstance(destination, str):
            destination = [d for d in destination.split(",") if d]
        body: dict[str, Any] = {"args": args or {}}
        if destination is not None:
            if not destination or not all(isinstance(d, str) and d for d in destination):
                raise ValueError(f"destination must be worker idents (host:pid, as `natask inspect ping` lists "
                                 f"them), got {destination!r}")
            body["destination"] = list(destination)
        broker = await self.app.client.broker()
        expected = len(set(destination)) if destination is not None else None
        replies: list[dict[str, Any]] = []
        for data in await broker.gather(self.app.names.control_subject(command), dumps(body), timeout, expected):
            try:
                answer = loads(data)
            except Exception:
                continue
            if isinstance(answer, dict):
                replies.append(answer)
        return sorted(replies, key=lambda r: str(r.get("worker")))

    send = blocking(asend, "Send a control or inspect ``command`` and gather the replies (sync twin of ``asend``).")

    async def ainspect(self, command: str, destination: Sequence[str] | None = None,
                       timeout: float = DEFAULT_TIMEOUT, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Ask the workers one of ``INSPECT_COMMANDS`` (``query_task`` takes ``ids``)."""
        if command not in INSPECT_COMMANDS:
            raise ValueError(f"unknown inspect command {command!r}: one of {', '.join(INSPECT_COMMANDS)}")
        args: dict[str, Any] = {}
        if command == "query_task":
            if isinstance(ids, str) or not ids:
                raise ValueError("query_task takes ids=[task id, ...]")
            args["ids"] = [check_task_id(i) for i in ids]
        return await self.asend(command, args, destination, timeout)

    inspect = blocking(ainspect, "Ask the workers one of ``INSPECT_COMMANDS`` (sync twin of ``ainspect``).")

    async def arate_limit(self, task_name: str, rate: str | None, destination: Sequence[str] | None = None,
                          timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Set the per-worker ``rate_limit`` of ``task_name`` (``"10/s"``; None or ``"0"``: none) on the
        workers, until they restart."""
        check_task_name(task_name)
        if rate is not None:
            parse_rate(rate, "rate")
            rate = str(rate)
        return await self.asend("rate_limit", {"task": task_name, "rate": rate}, destination, timeout)

    rate_limit = blocking(arate_limit, "Set the per-worker rate limit of a task (sync twin of ``arate_limit``).")

    async def atime_limit(self, task_name: str, hard: float | None = None, soft: float | None = None,
                          destination: Sequence[str] | None = None,
                          timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Set the hard and/or soft time limit of ``task_name`` (seconds) on the workers, until they restart."""
        check_task_name(task_name)
        args: dict[str, Any] = {"task": task_name, "hard": _check_seconds("hard", hard)}
        if soft is not None:
            args["soft"] = _check_seconds("soft", soft)
        return await self.asend("time_limit", args, destination, timeout)

    time_limit = blocking(atime_limit, "Set the time limits of a task (sync twin of ``atime_limit``).")

    async def aadd_consumer(self, queue: str, destination: Sequence[str] | None = None,
                            timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Make the workers consume ``queue`` too."""
        from .config import check_queue_name

        return await self.asend("add_consumer", {"queue": check_queue_name(queue)}, destination, timeout)

    add_consumer = blocking(aadd_consumer, "Make the workers consume a queue too (sync twin of ``aadd_consumer``).")

    async def acancel_consumer(self, queue: str, destination: Sequence[str] | None = None,
                               timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Make the workers stop consuming ``queue`` (refused by a worker for its only queue)."""
        from .config import check_queue_name

        return await self.asend("cancel_consumer", {"queue": check_queue_name(queue)}, destination, timeout)

    cancel_consumer = blocking(acancel_consumer, "Make the workers stop consuming a queue (sync twin of "
                                                 "``acancel_consumer``).")

    async def apool_grow(self, n: int = 1, destination: Sequence[str] | None = None,
                         timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Give each worker ``n`` more slots (``Worker.resize``)."""
        return await self.asend("pool_grow", {"n": _check_n(n)}, destination, timeout)

    pool_grow = blocking(apool_grow, "Give each worker n more slots (sync twin of ``apool_grow``).")

    async def apool_shrink(self, n: int = 1, destination: Sequence[str] | None = None,
                           timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Take ``n`` slots from each worker (running tasks finish first; never below 1)."""
        return await self.asend("pool_shrink", {"n": _check_n(n)}, destination, timeout)

    pool_shrink = blocking(apool_shrink, "Take n slots from each worker (sync twin of ``apool_shrink``).")

    async def ashutdown(self, destination: Sequence[str] | None = None,
                        timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Stop the workers warmly, as SIGTERM does (running tasks get the grace period)."""
        return await self.asend("shutdown", {}, destination, timeout)

    shutdown = blocking(ashutdown, "Stop the workers warmly (sync twin of ``ashutdown``).")

    async def arevoke(self, task_id: str | None = None, *, name: str | None = None, terminate: bool = False) -> None:
        """Revoke one task by id, or by ``name``: every task of that name or glob (``"shop.*"``)
        sent so far — queued ones never run, running ones are cancelled with ``terminate``; tasks
        sent afterwards run. Recorded durably (the revoked bucket, for ``result_ttl``), so workers
        started later apply it too."""
        if (task_id is None) == (name is None):
            raise ValueError("revoke takes a task id or name= (a task name or glob), not both")
        if task_id is not None:
            await self.app.client.revoke(task_id, terminate)
            return
        pattern = check_pattern(name)
        broker = await self.app.client.broker()
        # The stream's last sequence: what was stored up to now is covered, what comes later is not.
        record: dict[str, Any] = {"name": pattern, "seq": 0, "terminate": terminate, "at": time.time()}
        if broker.per_queue:  # each queue's stream counts its own sequences
            streams = await broker.queue_streams()
            record["seqs"] = {queue: state.last_seq for queue, (stream, domain) in streams.items()
                              if (state := await broker.stream_state(stream, domain=domain)) is not None}
        else:
            await broker.ensure_stream()
            state = await broker.stream_state(self.app.names.stream)
            if state is None:
                raise ConfigError(f"the task stream {self.app.names.stream} does not exist")
            record["seq"] = state.last_seq
        kv = await broker.revoked()
        await kv.put(revoked_name_key(pattern), dumps(record))

    revoke = blocking(arevoke, "Revoke a task by id, or every task sent so far of a name or glob (sync twin of "
                               "``arevoke``).")
