"""The worker half of the control plane: every worker answers the inspect and control commands on
``natask.control.<prefix>.<command>`` over core NATS request-reply (the client half, which scatters
and gathers, is ``natask.control``).

The request body is msgpack ``{"destination": [ident, ...], "args": {...}}`` (both optional; an empty
body is every worker, no arguments). A worker outside ``destination`` stays silent. The subject is a
wire input: an unknown command or a bad argument is answered with ``{"worker", "error"}``, never
raised. Who may send these is a NATS permission on the subject (README, "Remote control")."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..broker import Broker, Message
from ..config import REDACTED, redact_url
from ..message import dumps, loads
from ..naming import CONTROL_COMMANDS, INSPECT_COMMANDS, TASK_ID_RE, is_reply_subject
from ..options import parse_rate

if TYPE_CHECKING:
    from ..app import Natask
    from .gate import Gate
    from .revokes import Revokes

log = logging.getLogger("natask.worker")

COMMANDS: Final = INSPECT_COMMANDS + CONTROL_COMMANDS
"""The commands a worker answers (the last token of ``natask.control.<prefix>.<command>``)."""
MAX_ITEMS: Final = 1000
"""Longest list in a reply (registered tasks, revoked ids...): replies stay far below max_payload."""
MAX_QUERY_IDS: Final = 100
"""Most task ids one ``query_task`` asks about."""
MAX_POOL: Final = 10_000
"""Largest concurrency ``pool_grow`` reaches."""
MAX_REQUEST_BYTES: Final = 64 * 1024
"""Largest control request decoded (anything longer is answered with an error)."""
SCHEDULED_NOTE: Final = ("natask hands tasks with an eta to the server (a message schedule in its queue's stream): "
                         "no worker holds them, so none are listed here")
"""Why ``inspect scheduled`` answers an empty list."""


class Observed(Protocol):
    """What a worker shows of itself and lets operators change."""

    app: Natask
    ident: str
    queues: list[str]
    concurrency: int
    pool: str
    grace: float
    max_tasks: int | None
    autoscale: tuple[int, int] | None
    started_at: float
    processed: int
    failed: int
    results_not_stored: int
    storage_full_since: float | None
    gate: Gate | None

    @property
    def broker_(self) -> Broker: ...

    @property
    def inboxes(self) -> tuple[str, ...]: ...

    @property
    def revokes(self) -> Revokes | None: ...

    def active(self) -> list[dict[str, Any]]: ...

    def reserved(self) -> list[dict[str, Any]]: ...

    def resize(self, concurrency: int) -> None: ...

    async def add_queue(self, queue: str) -> bool: ...

    async def cancel_queue(self, queue: str) -> bool: ...

    async def stop(self, grace: float | None = None) -> None: ...


class BadRequest(ValueError):
    """A control request this worker refuses (its message is the reply's ``error``)."""


def _bounded(items: list[Any]) -> dict[str, Any]:
    return {"items": items[:MAX_ITEMS], "total": len(items), "truncated": len(items) > MAX_ITEMS}


class ControlResponder:
    """Subscribed by every worker (no queue group: each one answers)."""

    def __init__(self, worker: Observed) -> None:
        self.worker = worker
        self.hostname = socket.gethostname()
        self._stopping: asyncio.Task[None] | None = None
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            name: getattr(self, f"_{name}") for name in COMMANDS}

    async def start(self) -> None:
        broker = self.worker.broker_
        self._sub = await broker.subscribe(broker.names.control_subject(), cb=self._on_request)

    async def stop(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass

    async def _on_request(self, msg: Message) -> None:
        if not is_reply_subject(msg.reply, self.worker.inboxes):
            return  # answering on any other subject would write there with the worker's rights
        command = msg.subject.rsplit(".", 1)[-1]
        w = self.worker
        answer: dict[str, Any] = {"worker": w.ident}
        try:
            args, destination = self.parse(msg.data)
            if destination is not None and w.ident not in destination:
                return  # not addressed: silent, as a worker that does not exist
            handler = self._commands.get(command)
            if handler is None:
                raise BadRequest(f"unknown command {command!r}; try one of {', '.join(COMMANDS)}")
            answer.update(await handler(args))
        except BadRequest as e:
            answer["error"] = str(e)
        except Exception as e:  # a worker-side failure is an answer too, never a dead responder
            log.warning("control command %r failed: %s", command, e)
            answer["error"] = f"{command} failed: {type(e).__name__}: {e}"
        await w.broker_.publish_core(msg.reply, dumps(answer))

    @staticmethod
    def parse(data: bytes) -> tuple[dict[str, Any], frozenset[str] | None]:
        """The arguments and destination of a request (``BadRequest`` if malformed)."""
        if not data:
            return {}, None
        try:
            body = loads(data, MAX_REQUEST_BYTES)
        except Exception as e:
            raise BadRequest(f"the request body is not a msgpack map: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a map with 'args' and 'destination', got {type(body).__name__}")
        args = body.get("args") or {}
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise BadRequest("'args' must be a map of names to values")
        destination = body.get("destination")
        if destination is None:
            return args, None
        if not isinstance(destination, list) or not all(isinstance(d, str) for d in destination):
            raise BadRequest("'destination' must be a list of worker idents (host:pid)")
        return args, frozenset(destination)

    # -- inspect ----------------------------------------------------------------------------
    async def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True}

    async def _stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.stats()

    async def _active(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"active": self.worker.active()[:MAX_ITEMS]}

    async def _registered(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"registered": _bounded(sorted(self.worker.app.tasks))}

    async def _query_task(self, args: dict[str, Any]) -> dict[str, Any]:
        ids = args.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_QUERY_IDS or not all(
                isinstance(i, str) and TASK_ID_RE.match(i) for i in ids):
            raise BadRequest(f"query_task takes 'ids': a list of 1 to {MAX_QUERY_IDS} task ids")
        wanted = set(ids)
        w = self.worker
        found: dict[str, Any] = {}
        for state, tasks in (("active", w.active()), ("reserved", w.reserved())):
            for t in tasks:
                if t.get("id") in wanted:
                    found[t["id"]] = {"state": state, **t}
        revoked = w.revokes.revoked if w.revokes is not None else set()
        for i in wanted & revoked:
            found.setdefault(i, {"state": "revoked", "id": i})
        return {"tasks": found}

    async def _active_queues(self, args: dict[str, Any]) -> dict[str, Any]:
        names = self.worker.broker_.names
        return {"queues": [{"name": q, "consumer": names.consumer(q), "subject": names.queue_filter(q)}
                           for q in self.worker.queues]}

    async def _scheduled(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"scheduled": [], "note": SCHEDULED_NOTE}

    async def _reserved(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": self.worker.reserved()[:MAX_ITEMS]}

    async def _revoked(self, args: dict[str, Any]) -> dict[str, Any]:
        revokes = self.worker.revokes
        ids = sorted(revokes.revoked) if revokes is not None else []
        names = sorted({p for p, *_ in revokes.names.values()}) if revokes is not None else []
        return {"revoked": _bounded(ids), "revoked_names": names[:MAX_ITEMS]}

    async def _conf(self, args: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        config: dict[str, Any] = {}
        for f in dataclasses.fields(w.app.config):
            value: Any = getattr(w.app.config, f.name)
            if f.name == "servers":
                value = [redact_url(s) for s in value]
            elif f.name == "connect_options":
                value = dict.fromkeys(value, REDACTED)  # passwords, tokens, seeds: names only
            elif isinstance(value, tuple):
                value = list(value)
            elif not isinstance(value, (str, int, float, bool, type(None), dict)):
                value = repr(value)
            config[f.name] = value
        worker = {"queues": list(w.queues), "concurrency": w.concurrency, "pool": w.pool, "grace": w.grace,
                  "max_tasks": w.max_tasks, "autoscale": list(w.autoscale) if w.autoscale else None}
        return {"conf": {"app": config, "worker": worker}}

    # -- control ----------------------------------------------------------------------------
    def _task(self, args: dict[str, Any]) -> Any:
        name = args.get("task")
        if not isinstance(name, str) or not name:
            raise BadRequest("'task' must be a task name")
        task = self.worker.app.tasks.get(name)
        if task is None:
            raise BadRequest(f"no task named {name[:200]!r} is registered in this worker")
        return task

    async def _rate_limit(self, args: dict[str, Any]) -> dict[str, Any]:
        task = self._task(args)
        rate = args.get("rate")
        if rate is not None and not isinstance(rate, str):
            raise BadRequest("'rate' must be a string such as '10/s', '100/m' or '0' (no limit)")
        try:
            rate = None if rate is None or parse_rate(rate, "rate_limit") is None else rate
            options = dataclasses.replace(task.options, rate_limit=rate)
        except Exception as e:
            raise BadRequest(str(e)) from None
        task.options = options
        gate = self.worker.gate
        if gate is not None:  # the next start is paced by the new interval
            gate.limits.intervals.pop((task.name, "rate_limit"), None)
            gate.limits.local.pop(task.name, None)
        log.info("rate limit of %s set to %s by a control command", task.name, rate or "none")
        return {"ok": True, "task": task.name, "rate_limit": rate}

    async def _time_limit(self, args: dict[str, Any]) -> dict[str, Any]:
        task = self._task(args)
        limits: dict[str, float | None] = {}
        for key, field in (("hard", "time_limit"), ("soft", "soft_time_limit")):
            if key not in args:
                continue
            value = args[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise BadRequest(f"'{key}' must be seconds > 0 (or None: no limit), got {value!r}")
            limits[field] = None if value is None else float(value)
        if not limits:
            raise BadRequest("time_limit takes 'hard' and/or 'soft' seconds")
        task.options = dataclasses.replace(task.options, **limits)
        log.info("time limits of %s set to %s by a control command", task.name, limits)
        return {"ok": True, "task": task.name, "time_limit": task.options.time_limit,
                "soft_time_limit": task.options.soft_time_limit}

    def _queue(self, args: dict[str, Any]) -> str:
        from ..config import check_queue_name

        queue = args.get("queue")
        if not isinstance(queue, str):
            raise BadRequest("'queue' must be a queue name")
        try:
            return check_queue_name(queue)
        except Exception as e:
            raise BadRequest(str(e)) from None

    async def _add_consumer(self, args: dict[str, Any]) -> dict[str, Any]:
        queue = self._queue(args)
        added = await self.worker.add_queue(queue)
        return {"ok": True, "queue": queue, "changed": added, "queues": list(self.worker.queues)}

    async def _cancel_consumer(self, args: dict[str, Any]) -> dict[str, Any]:
        queue = self._queue(args)
        try:
            cancelled = await self.worker.cancel_queue(queue)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return {"ok": True, "queue": queue, "changed": cancelled, "queues": list(self.worker.queues)}

    def _n(self, args: dict[str, Any]) -> int:
        n = args.get("n", 1)
        if type(n) is not int or not 1 <= n <= MAX_POOL:
            raise BadRequest(f"'n' must be an int from 1 to {MAX_POOL}, got {n!r}")
        return n

    async def _pool_grow(self, args: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        size = w.concurrency + self._n(args)
        if size > MAX_POOL:
            raise BadRequest(f"the pool would have {size} slots, more than {MAX_POOL}")
        w.resize(size)
        return {"ok": True, "concurrency": w.concurrency}

    async def _pool_shrink(self, args: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        size = w.concurrency - self._n(args)
        if size < 1:
            raise BadRequest(f"the pool has {w.concurrency} slot(s): it cannot shrink below 1")
        w.resize(size)
        return {"ok": True, "concurrency": w.concurrency}

    async def _shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._stopping is None:
            log.info("worker %s stopping: asked by a control command", self.worker.ident)
            # Its own task: stop() unsubscribes this responder, whose callback would be cancelled.
            self._stopping = asyncio.get_running_loop().create_task(self.worker.stop())
        return {"ok": True, "shutdown": True}

    def stats(self) -> dict[str, Any]:
        w = self.worker
        return {
            "app": w.app.name,
            "hostname": self.hostname,
            "pid": os.getpid(),
            "queues": list(w.queues),
            "concurrency": w.concurrency,
            "uptime": time.time() - w.started_at if w.started_at else 0.0,
            "processed": w.processed,
            "failed": w.failed,
            "running": len(w.active()),
            "results_not_stored": w.results_not_stored,
            "storage_full_since": w.storage_full_since,
        }
