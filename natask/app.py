"""Natask: configuration, the task registry and the connection lifecycle (sync portal + async)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar, overload

from .broker import Broker, NoResponders, SequenceConflict
from .canvas import Signature
from .config import Config, Options, Seconds, check_queue_name, seconds
from .errors import BrokerError, ConfigError, EncodeError, NoWorkers, ResultTimeout, TaskFailed, TaskNotFound
from .message import Call, Envelope, at_schedule, dumps, find_unencodable, loads
from .naming import (
    HDR_CHECK_STORED,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    TASK_ID_RE,
    Names,
    check_kv_key,
    check_task_id,
    check_task_name,
    invalid_task_id,
)
from .portal import Portal
from .result import AsyncResult
from .result import AsyncResult as _AsyncResult  # the name AsyncResult is also a method of Natask
from .states import State
from .task import AsyncTask, Task, TaskOptions
from .waiting import KeyWatch, recheck

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .beat import PeriodicEntry
    from .beat.schedules import Schedules

_NO_LINKS: list[Any] = []  # shared defaults: the envelope is encoded and dropped, never mutated
_NO_META: dict[str, Any] = {}
_RESERVED_HEADERS = ("natask-", "nats-")
_FAILURE_MEMORY = 2.0
"""Seconds a failed connect is remembered, so a burst of calls fails fast instead of each waiting."""

P = ParamSpec("P")
R = TypeVar("R")



class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class _BoundDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, R]], /) -> AsyncTask[..., R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> Task[..., R]: ...


class Natask:
    """A natask application: tasks, their configuration and the NATS connections behind them.

    Connecting is lazy; nothing happens at construction or decoration time. Sync calls go
    through a private I/O thread; async calls use a connection bound to the running loop.
    """

    def __init__(self, name: str, servers: str | Sequence[str] | None = None, **options: Unpack[Options]) -> None:
        """``servers``: a comma-separated string or a sequence of NATS URLs (default ``$NATS_URL``,
        else ``nats://127.0.0.1:4222``); ``options``: see ``natask.config.Config`` (each with its
        ``NATASK_*`` environment variable and default)."""
        self.config = Config.build(name, servers, **options)
        self.name = name
        self.names = Names(self.config.subject_prefix)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.periodic_entries: dict[str, PeriodicEntry] = {}
        self._portal = Portal(name, self._close_loop_brokers)
        self._lock = threading.Lock()
        self._brokers: dict[asyncio.AbstractEventLoop, asyncio.Task[Broker]] = {}
        self._ready: dict[asyncio.AbstractEventLoop, Broker] = {}  # the brokers of _brokers that are connected
        self._failure: tuple[float, BrokerError] | None = None
        self._checked: set[str] = set()
        self._checked_queues: set[str] = set()
        self._pending: weakref.WeakValueDictionary[str, AsyncResult[Any]] = weakref.WeakValueDictionary()
        self._watches: dict[asyncio.AbstractEventLoop, KeyWatch] = {}  # per loop, of its broker
        self._rechecks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        _APPS.add(self)

    def __repr__(self) -> str:
        return f"<Natask {self.name} servers={self.config.safe_servers}>"

    # -- tasks ------------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R]) -> Task[P, R]: ...
    @overload
    def task(
        self,
        *,
        bind: Literal[True],
        name: str | None = ...,
        queue: str | None = ...,
        max_retries: int | None = ...,
        autoretry_for: Sequence[type[BaseException]] = ...,
        retry_backoff: Seconds = ...,
        retry_backoff_max: Seconds = ...,
        retry_jitter: bool = ...,
        time_limit: Seconds | None = ...,
        expires: Seconds | None = ...,
        ignore_result: bool = ...,
        track_started: bool = ...,
    ) -> _BoundDecorator: ...
    @overload
    def task(
        self,
        *,
        bind: Literal[False] = ...,
        name: str | None = ...,
        queue: str | None = ...,
        max_retries: int | None = ...,
        autoretry_for: Sequence[type[BaseException]] = ...,
        retry_backoff: Seconds = ...,
        retry_backoff_max: Seconds = ...,
        retry_jitter: bool = ...,
        time_limit: Seconds | None = ...,
        expires: Seconds | None = ...,
        ignore_result: bool = ...,
        track_started: bool = ...,
    ) -> _Decorator: ...
    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        bind: bool = False,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = 3,
        autoretry_for: Sequence[type[BaseException]] = (),
        retry_backoff: Seconds = 1.0,
        retry_backoff_max: Seconds = 600.0,
        retry_jitter: bool = True,
        time_limit: Seconds | None = None,
        expires: Seconds | None = None,
        ignore_result: bool = False,
        track_started: bool = False,
    ) -> Any:
        """Register a function (sync or ``async def``) as a task: ``@app.task`` or ``@app.task(...)``.

        The name defaults to ``<module>.<function>``; name tasks defined in ``__main__`` explicitly
        so workers importing the module find them under the same name.
        """
        options = TaskOptions(
            queue=queue,
            max_retries=max_retries,
            autoretry_for=tuple(autoretry_for),
            retry_backoff=seconds(retry_backoff, "retry_backoff"),
            retry_backoff_max=seconds(retry_backoff_max, "retry_backoff_max"),
            retry_jitter=retry_jitter,
            time_limit=None if time_limit is None else seconds(time_limit, "time_limit"),
            expires=None if expires is None else seconds(expires, "expires"),
            ignore_result=ignore_result,
            track_started=track_started,
            bind=bind,
        )

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            if not callable(func):
                raise ConfigError(f"@app.task decorates functions, got {func!r}")
            task_name = name or self._default_name(func)
            cls: type[Task[Any, Any]] = AsyncTask if asyncio.iscoroutinefunction(func) else Task
            task = cls(self, func, task_name, options)
            task.signature  # noqa: B018 - validates bind=True functions now, not in the worker
            existing = self.tasks.get(task.name)
            if existing is not None and existing.fn is not func:
                raise ConfigError(f"two tasks are named {task.name!r}: give one of them another name=")
            self.tasks[task.name] = task
            return task

        return register(fn) if fn is not None else register

    @staticmethod
    def _default_name(func: Callable[..., Any]) -> str:
        module = getattr(func, "__module__", None) or "__main__"
        qualname = getattr(func, "__qualname__", getattr(func, "__name__", ""))
        if "<" in qualname:
            raise ConfigError(
                f"cannot derive a task name for {qualname!r} (lambda or nested function): pass name='...'"
            )
        if module == "__main__":
            warnings.warn(
                f"task {qualname!r} is defined in __main__, so its name is '__main__.{qualname}' and a "
                "worker importing your module will not find it: give it an explicit name='...'",
                stacklevel=3,
            )
        return check_task_name(f"{module}.{qualname}")

    def periodic(
        self,
        schedule: str | timedelta,
        *,
        name: str | None = None,
        tz: str | None = None,
        queue: str | None = None,
    ) -> Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a task that ``natask beat`` fires on a cron string (5 or 6 fields) or a
        ``timedelta`` interval aligned to the Unix epoch: ``@app.periodic("*/5 * * * *", name="cleanup")``."""

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            from .beat import make_entry

            task_name = name or self._default_name(fn)
            # Validate the schedule before registering anything, so a fixed retry is not a duplicate.
            entry = make_entry(schedule, Signature(self, task_name), name=task_name, tz=tz)
            if entry.name in self.periodic_entries:
                raise ConfigError(f"a periodic entry named {entry.name!r} exists already: pass another name=")
            task: Task[Any, Any] = self.task(name=task_name, queue=queue)(fn)
            self.periodic_entries[entry.name] = dataclasses.replace(entry, signature=task.s())
            return task

        return register

    def add_periodic_task(
        self,
        schedule: str | timedelta,
        signature: Signature[Any],
        name: str | None = None,
        tz: str | None = None,
    ) -> PeriodicEntry:
        """Fire ``signature`` on ``schedule`` from ``natask beat``; ``name`` identifies the entry
        (defaults to the task name) and must be unique in the app."""
        from .beat import make_entry

        entry = make_entry(schedule, signature, name=name or signature.task, tz=tz)
        if entry.name in self.periodic_entries:
            raise ConfigError(f"a periodic entry named {entry.name!r} exists already: pass another name=")
        self.periodic_entries[entry.name] = entry
        return entry

    @property
    def beat(self) -> Schedules:
        """Periodic entries stored while beats run: ``app.beat.add("ping", add.s(1, 2), every=30)``,
        ``remove``, ``enable``, ``disable``, ``list`` (see ``natask.beat.Schedules``)."""
        from .beat.schedules import Schedules

        return Schedules(self)

    def get_task(self, name: str) -> Task[Any, Any]:
        """The registered task of that name; ``TaskNotFound`` names the ones that exist."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise TaskNotFound(f"no task named {name!r} in app {self.name!r} (registered: {known})") from None

    # -- calling ----------------------------------------------------------------------------
    def _prepare(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        queue: str,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        ignore_result: bool = False,
        parent_id: str | None = None,
        root_id: str | None = None,
        links: list[Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Call:
        """Validate and encode a call in the caller's thread, so errors surface at ``.delay()``."""
        if name not in self._checked:  # names repeat: validate each once
            check_task_name(name)
            self._checked.add(name)
        if queue not in self._checked_queues:
            check_queue_name(queue)
            self._checked_queues.add(queue)
        if type(args) is not tuple and type(args) is not list and (
                isinstance(args, (str, bytes)) or not isinstance(args, Sequence)):
            raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
        if kwargs and (not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs)):
            raise TypeError("kwargs must be a dict with string keys")
        now = time.time()
        when = None if countdown is None and eta is None else _eta(now, countdown, eta)
        explicit_id = task_id is not None
        if task_id is None:
            task_id = os.urandom(16).hex()  # as unique as uuid4().hex, at a third of the cost
        elif not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
            raise invalid_task_id(task_id, "task_id")
        envelope = Envelope(
            id=task_id,
            task=name,
            args=list(args),
            kwargs=dict(kwargs),
            eta=when,
            expires=None if expires is None else _expires(now if when is None else when, expires),
            parent_id=parent_id,
            root_id=root_id,
            links=links or _NO_LINKS,
            meta=meta or _NO_META,
        )
        try:
            payload = envelope.encode()
        except EncodeError:
            raise EncodeError(
                f"cannot send {name}: {find_unencodable(args, kwargs)}. natask carries msgpack types plus "
                "datetime, date, time, timedelta, UUID, Decimal, bytes, set, tuple and dataclasses"
            ) from None
        hdrs = {HDR_MSG_ID: task_id}  # the task's name is in the subject (a header would cost ~40 B a task)
        if explicit_id:
            hdrs[HDR_CHECK_STORED] = "1"  # this id may have run before: the worker looks first
        if headers:
            for key, value in headers.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError("headers must map str to str")
                if key.lower().startswith(_RESERVED_HEADERS):
                    raise ConfigError(f"header {key!r} is reserved: natask and NATS own the 'Natask-' and "
                                      "'Nats-' headers (use task_id= for the message id)")
                hdrs[key] = value
        return Call(task_id, name, queue, payload, hdrs, when, ignore_result)

    async def _apublish(self, call: Call) -> AsyncResult[Any]:
        broker = await self._broker()
        result, subject = self._route(broker, call)
        await broker.ensure_stream()
        published = await broker.publish(subject, call.payload, call.headers)
        if published.duplicate and self._pending.get(call.task_id) is not result:
            # The stored message carries another caller's reply inbox, not ours: read the KV bucket.
            result._route = None
        return result

    async def _apublish_many(self, calls: Sequence[Call]) -> list[AsyncResult[Any]]:
        broker = await self._broker()
        results, subjects = [], []
        for call in calls:
            result, subject = self._route(broker, call)
            broker.check_size(subject, call.payload, call.headers)
            results.append(result)
            subjects.append(subject)
        await broker.ensure_stream()
        await broker.publish_many(subjects, [c.payload for c in calls], [c.headers for c in calls])
        return results

    def _route(self, broker: Broker, call: Call) -> tuple[AsyncResult[Any], str]:
        """The result handle and the subject of a call; registers the reply fast path."""
        subject = self.names.task_subject(call.queue, call.task)
        if call.eta is not None and call.eta > time.time():
            call.headers[HDR_SCHEDULE] = at_schedule(call.eta)
            call.headers[HDR_SCHEDULE_TARGET] = subject
            subject = self.names.schedule_subject(call.queue, call.task_id)
        existing = self._pending.get(call.task_id)
        if existing is not None and existing._route is broker:
            call.headers[HDR_REPLY] = f"{broker.reply_prefix}.{call.task_id}"
            return existing, subject  # the same id again: one handle, one reply
        result: AsyncResult[Any] = AsyncResult(
            self, call.task_id, call.task, ignore_result=call.ignore_result, route=broker
        )
        if not call.ignore_result:
            call.headers[HDR_REPLY] = f"{broker.reply_prefix}.{call.task_id}"
            self._pending[call.task_id] = result
        return result, subject

    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        ignore_result: bool = False,
    ) -> AsyncResult[Any]:
        """Enqueue a task by name without consulting the local registry."""
        call = self._prepare(name, args, kwargs or {}, queue=queue or self.config.default_queue,
                             countdown=countdown, eta=eta, expires=expires, task_id=task_id,
                             headers=headers, ignore_result=ignore_result)
        return self._portal.run(self._apublish(call))

    async def asend_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        ignore_result: bool = False,
    ) -> AsyncResult[Any]:
        """Async ``send_task``."""
        call = self._prepare(name, args, kwargs or {}, queue=queue or self.config.default_queue,
                             countdown=countdown, eta=eta, expires=expires, task_id=task_id,
                             headers=headers, ignore_result=ignore_result)
        return await self._apublish(call)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:  # noqa: N802 - Celery's name
        """Rebuild the handle of any task by id (results are read from the KV bucket).

        An id that is not a task id (a wildcard such as ``>`` among others) raises ``ConfigError``."""
        return AsyncResult(self, task_id)

    async def _acall(self, call: Call, timeout: float) -> Any:
        """Core NATS request-reply to the queue group: at-most-once, nothing stored."""
        broker = await self._broker()
        subject = self.names.rpc_subject(call.queue, call.task)
        try:
            data = await broker.request(subject, call.payload, call.headers, timeout)
        except NoResponders:
            raise NoWorkers(
                f"no worker listens to queue {call.queue!r} for {call.task}: start one with "
                f"`natask worker -A <module>:app -Q {call.queue}`"
            ) from None
        except TimeoutError:
            raise ResultTimeout(f"no reply from {call.task} within {timeout:g}s") from None
        record = loads(data)
        if record.get("state") == State.SUCCESS:
            return record.get("result")
        raise TaskFailed(str(record.get("exc_type", "Exception")), str(record.get("message", "")),
                         str(record.get("traceback", "")), call.task_id)

    def claim(self, key: str) -> bool:
        """Record ``key`` once, cluster-wide: True for the first caller, False ever after (until
        ``result_ttl``). The idempotency guard for side effects of at-least-once tasks."""
        return self._portal.run(self.aclaim(key))

    async def aclaim(self, key: str) -> bool:
        """Async ``claim``."""
        check_kv_key(key, "claim key")
        broker = await self._broker()
        kv = await broker.claims()
        try:
            await kv.create(key, dumps({"at": time.time()}))
        except SequenceConflict:  # the key exists
            return False
        return True

    async def _arevoke(self, task_id: str, terminate: bool) -> None:
        """Record a revoke durably; every worker keeps the set and skips (or cancels) the task."""
        check_task_id(task_id)
        broker = await self._broker()
        kv = await broker.revoked()
        await kv.put(task_id, dumps({"terminate": terminate, "at": time.time()}))

    # -- connections ------------------------------------------------------------------------
    async def _broker(self) -> Broker:
        """The connected broker of the running event loop, created on first use."""
        loop = asyncio.get_running_loop()
        broker = self._ready.get(loop)
        if broker is not None and not broker.closed:
            return broker  # the hot path: connected already
        entry = self._brokers.get(loop)
        if entry is not None and entry.done() and not entry.cancelled() and entry.exception() is None:
            broker = entry.result()
            if not broker.closed:
                self._ready[loop] = broker
                return broker
        failed = self._failure
        if failed is not None and time.monotonic() - failed[0] < _FAILURE_MEMORY:
            raise failed[1]  # the server was unreachable a moment ago: do not wait again
        with self._lock:
            for other in [lp for lp in self._brokers if lp.is_closed()]:
                del self._brokers[other]
                self._ready.pop(other, None)
                self._watches.pop(other, None)
                self._rechecks.pop(other, None)
            entry = self._brokers.get(loop)
            if entry is None or (entry.done() and (entry.cancelled() or entry.exception() is not None
                                                   or entry.result().closed)):
                entry = loop.create_task(self._connect())
                self._brokers[loop] = entry
        broker = await asyncio.shield(entry)
        self._ready[loop] = broker
        return broker

    async def _connect(self) -> Broker:
        broker = Broker(self.config, on_result=self._on_result, on_reconnect=lambda: self._on_reconnect(broker),
                        on_closed=lambda _: self._routes_lost(broker))
        try:
            await broker.connect()
        except BrokerError as e:
            self._failure = (time.monotonic(), e)
            raise
        self._failure = None
        return broker

    def _on_result(self, task_id: str, data: bytes) -> None:
        result = self._pending.get(task_id)
        if result is None:
            return
        try:
            record = loads(data)
        except Exception:
            return
        if isinstance(record, dict) and isinstance(record.get("state"), str):
            result._deliver(record)

    def _on_reconnect(self, broker: Broker) -> None:
        # Replies published while we were away are lost: read the outstanding keys (a few shared
        # passes), not a timer or a watch per waiter. The first connect has no such window: the
        # inbox is subscribed (and flushed) before any call goes out, so its interest leaves our
        # server, towards the cluster's other servers, ahead of anything that could answer.
        loop = broker.loop
        running = self._rechecks.get(loop)
        if running is not None:
            running.cancel()
        task = self._rechecks[loop] = loop.create_task(recheck(self, broker))
        task.add_done_callback(lambda t: self._rechecks.pop(loop) if self._rechecks.get(loop) is t else None)

    def _routed(self, broker: Broker) -> list[_AsyncResult[Any]]:
        """The results still outstanding whose replies come over ``broker``."""
        # valuerefs() copies in one step: another thread's loop may be adding results meanwhile.
        results = (ref() for ref in self._pending.valuerefs())
        return [r for r in results if r is not None and r._route is broker and not r._final]

    def _routes_lost(self, broker: Broker) -> None:
        """``broker`` closed: the waiters of its results wait through the KV bucket instead."""
        for result in self._routed(broker):
            result._unroute()

    def _key_watch(self, broker: Broker) -> KeyWatch:
        """The shared watch of the keys waited on without a reply route, on ``broker``'s loop."""
        watch = self._watches.get(broker.loop)
        if watch is None or watch.broker is not broker or watch.closed:
            if watch is not None:
                watch.close()
            watch = self._watches[broker.loop] = KeyWatch(broker)
        return watch

    def _stop_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the read passes and the key watch of ``loop`` (on that loop)."""
        running = self._rechecks.pop(loop, None)
        if running is not None:
            running.cancel()
        watch = self._watches.pop(loop, None)
        if watch is not None:
            watch.close()

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection of this app and stop its I/O thread; safe from any thread."""
        self._portal.stop()
        self._abandon_others()

    async def aclose(self) -> None:
        """Close the connection of the running loop, then everything else."""
        await self._close_loop_brokers()
        await asyncio.to_thread(self._portal.stop)
        self._abandon_others()

    async def _close_loop_brokers(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._brokers.pop(loop, None)
            self._ready.pop(loop, None)
        self._stop_waiting(loop)
        if entry is not None and entry.done() and not entry.cancelled() and entry.exception() is None:
            await entry.result().close()
            self._routes_lost(entry.result())
        elif entry is not None:
            entry.cancel()

    def _abandon_others(self) -> None:
        with self._lock:
            entries, self._brokers = list(self._brokers.items()), {}
            self._ready = {}
        for loop, entry in entries:
            if loop.is_closed() or not entry.done() or entry.cancelled() or entry.exception() is not None:
                continue
            broker = entry.result()
            if loop.is_running():
                loop.call_soon_threadsafe(self._stop_waiting, loop)
                asyncio.run_coroutine_threadsafe(broker.close(), loop)
            else:
                broker.abandon()
            self._routes_lost(broker)

    def __enter__(self) -> Natask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Natask:
        await self._broker()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_APPS: weakref.WeakSet[Natask] = weakref.WeakSet()


def _after_fork() -> None:
    # A forked child shares the parent's sockets: it must open connections of its own.
    for app in _APPS:
        app._lock = threading.Lock()
        app._brokers, app._ready = {}, {}
        app._watches, app._rechecks = {}, {}


os.register_at_fork(after_in_child=_after_fork)


def _eta(now: float, countdown: float | timedelta | None, eta: datetime | None) -> float | None:
    if countdown is not None and eta is not None:
        raise ConfigError("give countdown= or eta=, not both")
    if countdown is not None:
        return now + seconds(countdown, "countdown")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"eta must be a datetime, got {type(eta).__name__}")
        if eta.tzinfo is None:
            raise ConfigError("eta must be timezone-aware (e.g. datetime.now(timezone.utc) + ...)")
        return eta.timestamp()
    return None


def _expires(start: float, expires: float | timedelta | datetime | None) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise ConfigError("expires must be timezone-aware when given as a datetime")
        return expires.timestamp()
    return start + seconds(expires, "expires")


__all__ = ["Natask"]
