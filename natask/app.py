"""Natask: configuration, the task registry and one ``Client`` (connections, publishing, waiting)."""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar, overload

from .canvas import GroupResult, Signature
from .client import Client
from .config import Config, Options, Seconds
from .errors import ConfigError, TaskNotFound
from .hooks import Hooks, Middleware
from .message import Call
from .naming import Names, check_task_name
from .options import OPTION_DEFAULTS, task_options
from .portal import Portal, blocking
from .result import AsyncResult
from .settings import Settings
from .shared import register_shared, set_current
from .task import AsyncTask, CallExtras, Task, builtin_tasks, class_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .beat.schedule import PeriodicEntry
    from .beat.schedules import Schedules
    from .remote import Control

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
        self.hooks = Hooks(self.tasks)
        """The registered middleware (``add_middleware``), compiled per hook point."""
        self.client: Client[AsyncResult[Any]] = Client(self.config, self.names, AsyncResult, self, self.hooks)
        """Connections, publishing and waiting (``natask.client.Client``)."""
        self._conf: Settings | None = None
        set_current(self)
        self.always_eager: bool = self.config.always_eager
        """Run calls and workflows in-process, now, with no server (``task_always_eager``)."""
        self.eager_propagates: bool = self.config.eager_propagates
        """An eager run that fails raises instead of returning a failed ``EagerResult``."""
        self.builtins: dict[str, Task[Any, Any]] = builtin_tasks(self)
        """Tasks natask provides (``natask.map``, ``natask.starmap``): workers find them; not in ``tasks``."""

    @property
    def conf(self) -> Settings:
        """Celery's settings by name (``app.conf.task_routes = {...}``, ``app.conf.update(...)``),
        each applied to this app at once (``natask.settings``, docs/celery.md)."""
        if self._conf is None:
            self._conf = Settings(self)
        return self._conf

    def finalize(self) -> None:
        """Register the tasks of ``include``, ``imports``, ``autodiscover_tasks`` and ``@shared_task``
        (imported now, once); workers and beat call it when they start."""
        if self._conf is not None:
            self._conf.import_tasks()
        register_shared(self)

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
        rate_limit: str | None = ...,
        global_rate_limit: str | None = ...,
        max_concurrency: int | None = ...,
        broadcast: bool = ...,
        soft_time_limit: Seconds | None = ...,
        priority: int = ...,
        base: type[Task[Any, Any]] | None = ...,
        dont_autoretry_for: Sequence[type[BaseException]] = ...,
        retry_kwargs: Mapping[str, Any] | None = ...,
        default_retry_delay: Seconds | None = ...,
        throws: Sequence[type[BaseException]] = ...,
        serializer: str = ...,
        typing: bool = ...,
        shadow: str | None = ...,
        store_errors_even_if_ignored: bool = ...,
        acks_late: bool = ...,
        reject_on_worker_lost: bool = ...,
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
        rate_limit: str | None = ...,
        global_rate_limit: str | None = ...,
        max_concurrency: int | None = ...,
        broadcast: bool = ...,
        soft_time_limit: Seconds | None = ...,
        priority: int = ...,
        base: type[Task[Any, Any]] | None = ...,
        dont_autoretry_for: Sequence[type[BaseException]] = ...,
        retry_kwargs: Mapping[str, Any] | None = ...,
        default_retry_delay: Seconds | None = ...,
        throws: Sequence[type[BaseException]] = ...,
        serializer: str = ...,
        typing: bool = ...,
        shadow: str | None = ...,
        store_errors_even_if_ignored: bool = ...,
        acks_late: bool = ...,
        reject_on_worker_lost: bool = ...,
    ) -> _Decorator: ...
    def task(  # noqa: PLR0913 - Celery's task options, keyword-only
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
        rate_limit: str | None = None,
        global_rate_limit: str | None = None,
        max_concurrency: int | None = None,
        broadcast: bool = False,
        soft_time_limit: Seconds | None = None,
        priority: int = 0,
        base: type[Task[Any, Any]] | None = None,
        dont_autoretry_for: Sequence[type[BaseException]] = (),
        retry_kwargs: Mapping[str, Any] | None = None,
        default_retry_delay: Seconds | None = None,
        throws: Sequence[type[BaseException]] = (),
        serializer: str = "msgpack",
        typing: bool = True,
        shadow: str | None = None,
        store_errors_even_if_ignored: bool = False,
        acks_late: bool = True,
        reject_on_worker_lost: bool = False,
    ) -> Any:
        """Register a function (sync or ``async def``) as a task: ``@app.task`` or ``@app.task(...)``.

        The name defaults to ``<module>.<function>``; name tasks defined in ``__main__`` explicitly
        so workers importing the module find them under the same name. ``base``: a ``Task``
        subclass whose ``before_start``/``on_success``/``on_failure``/``on_retry``/``after_return``
        the worker calls (Celery's class-based tasks); the other options are in ``TaskOptions``.
        """
        if base is not None and not (isinstance(base, type) and issubclass(base, Task)):
            raise ConfigError(f"base= must be a subclass of natask.Task, got {base!r}")
        given = dict(
            queue=queue, max_retries=max_retries, autoretry_for=autoretry_for, retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max, retry_jitter=retry_jitter, time_limit=time_limit,
            expires=expires, ignore_result=ignore_result, track_started=track_started, bind=bind,
            rate_limit=rate_limit, global_rate_limit=global_rate_limit, max_concurrency=max_concurrency,
            broadcast=broadcast, soft_time_limit=soft_time_limit, priority=priority,
            dont_autoretry_for=dont_autoretry_for, retry_kwargs=retry_kwargs,
            default_retry_delay=default_retry_delay, throws=throws, serializer=serializer, typing=typing,
            shadow=shadow, store_errors_even_if_ignored=store_errors_even_if_ignored, acks_late=acks_late,
            reject_on_worker_lost=reject_on_worker_lost,
        )
        inherited = class_options(base) if base is not None else {}
        for key, value in inherited.items():
            # Celery's class-based options (``class Base(Task): max_retries = 5``) under what the
            # decorator sets: a keyword left at its default takes the class's value.
            if given[key] == OPTION_DEFAULTS[key]:
                given[key] = value
        # A class attribute named like one of Task's properties (``queue``) would hide it.
        restored = {k: v for k, v in vars(Task).items() if k in inherited and isinstance(v, property)}
        options = task_options(given)

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            if not callable(func):
                raise ConfigError(f"@app.task decorates functions, got {func!r}")
            task_name = name or self._default_name(func)
            cls: type[Task[Any, Any]] = AsyncTask if asyncio.iscoroutinefunction(func) else Task
            if base is not None:
                # An async function under a sync base: AsyncTask's local call returns the coroutine.
                cls = base if cls is Task or issubclass(base, AsyncTask) else type(base.__name__, (base, AsyncTask), {})
                if restored:
                    cls = type(cls.__name__, (cls,), restored)
            task = cls(self, func, task_name, options)
            task.call_signature  # noqa: B018 - validates bind=True functions now, not in the worker
            existing = self.tasks.get(task.name)
            if existing is not None and existing.fn is not func:
                raise ConfigError(f"two tasks are named {task.name!r}: give one of them another name=")
            self.tasks[task.name] = task
            if self._conf is not None:
                self._conf.configure_task(task)
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
            from .beat.schedule import make_entry

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
        from .beat.schedule import make_entry

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

    @property
    def control(self) -> Control:
        """Remote control of the app's live workers: ``app.control.rate_limit("shop.sync", "10/s")``,
        ``inspect("registered")``, ``revoke(name="shop.*")``... (see ``natask.remote.Control``)."""
        from .remote import Control

        return Control(self)

    def get_task(self, name: str) -> Task[Any, Any]:
        """The registered task of that name; ``TaskNotFound`` names the ones that exist."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise TaskNotFound(f"no task named {name!r} in app {self.name!r} (registered: {known})") from None

    def add_middleware(self, middleware: Middleware) -> None:
        """Plug ``middleware`` (a ``natask.hooks.Middleware``) into this app's producers, workers and
        beat; its hooks run after those of middleware added before it."""
        self.hooks.add(middleware)

    # -- calling ----------------------------------------------------------------------------
    def send_task(  # noqa: PLR0913 - Celery's call options, keyword-only
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
        priority: int = 0,
        time_limit: float | None = None,
        shadow: str | None = None,
        serializer: str | None = None,
        compression: str | None = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        retry: bool = True,
        retry_policy: Mapping[str, Any] | None = None,
    ) -> AsyncResult[Any]:
        """Enqueue a task by name without consulting the local registry; the call options are
        ``apply_async``'s (``ignore_result=True`` here also keeps the worker from storing it)."""
        call = self._call_of(name, args, kwargs, countdown, eta, expires, task_id, queue, headers, ignore_result,
                             priority, CallExtras.of(time_limit, shadow, ignore_result or None, serializer,
                                                     compression, routing_key, exchange, retry, retry_policy))
        if isinstance(call, AsyncResult):
            return call  # eager: already run
        return self.client.portal.run(self.client.publish(call))

    async def asend_task(  # noqa: PLR0913 - Celery's call options, keyword-only
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
        priority: int = 0,
        time_limit: float | None = None,
        shadow: str | None = None,
        serializer: str | None = None,
        compression: str | None = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        retry: bool = True,
        retry_policy: Mapping[str, Any] | None = None,
    ) -> AsyncResult[Any]:
        """Async ``send_task``."""
        call = self._call_of(name, args, kwargs, countdown, eta, expires, task_id, queue, headers, ignore_result,
                             priority, CallExtras.of(time_limit, shadow, ignore_result or None, serializer,
                                                     compression, routing_key, exchange, retry, retry_policy))
        if isinstance(call, AsyncResult):
            return call  # eager: already run
        return await self.client.publish(call)

    def signature(self, name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                  immutable: bool = False, **options: Any) -> Signature[Any]:
        """A signature of the task ``name`` (registered here or not) with call options."""
        return Signature(self, name, args or (), kwargs, options, immutable)

    def GroupResult(self, group_id: str,  # noqa: N802 - Celery's name
                    results: Sequence[AsyncResult[Any] | GroupResult] | None = None) -> GroupResult:
        """The ``GroupResult`` of ``results``, or without them the one ``GroupResult.save()`` stored
        under ``group_id`` (``ResultError`` if none is stored)."""
        if results is not None:
            return GroupResult(self, group_id, results)
        return GroupResult.restore(self, group_id)

    def _call_of(  # noqa: PLR0913 - send_task's options, passed on
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None,
        countdown: float | timedelta | None, eta: datetime | None, expires: float | timedelta | datetime | None,
        task_id: str | None, queue: str | None, headers: Mapping[str, str] | None, ignore_result: bool,
        priority: int, extras: CallExtras | None,
    ) -> Call | AsyncResult[Any]:
        """``send_task``'s call, routed and prepared; the eager result instead in eager mode."""
        if self.always_eager and name in self.tasks:
            return self.tasks[name].apply(args, kwargs, task_id=task_id, queue=queue, headers=headers)
        kwargs = kwargs or {}
        if extras is not None:
            return extras.prepare(None, args, kwargs, countdown, eta, expires, task_id, queue, headers, None,
                                  name=name, client=self.client, priority=priority,
                                  default_queue=self.client.default_queue(name, args, kwargs))
        return self.client.prepare(name, args, kwargs, queue=queue or self.client.default_queue(name, args, kwargs),
                                   countdown=countdown, eta=eta, expires=expires, task_id=task_id,
                                   headers=headers, ignore_result=ignore_result, priority=priority)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:  # noqa: N802 - Celery's name
        """Rebuild the handle of any task by id (results are read from the KV bucket).

        An id that is not a task id (a wildcard such as ``>`` among others) raises ``ConfigError``."""
        return AsyncResult(self, task_id)

    async def aclaim(self, key: str) -> bool:
        """Async ``claim``."""
        return await self.client.claim(key)

    claim = blocking(aclaim, "Record ``key`` once, cluster-wide: True for the first caller, False ever after (until\n"
                             "``result_ttl``). The idempotency guard for side effects of at-least-once tasks.")

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def _portal(self) -> Portal:
        return self.client.portal

    def close(self) -> None:
        """Close every connection of this app and stop its I/O thread; safe from any thread."""
        self.client.close()

    async def aclose(self) -> None:
        """Close the connection of the running loop, then everything else."""
        await self.client.aclose()

    def __enter__(self) -> Natask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Natask:
        await self.client.broker()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def find_app(spec: str) -> Natask:
    """The app ``-A`` names, found as Celery finds it: ``module:attr``; else the module's ``app`` or
    ``celery`` attribute; else, for a package, the same in ``<package>.celery``; else the one app among
    the module's attributes. ``ImportError`` if the module is missing, ``LookupError`` if no app."""
    import importlib

    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        found = getattr(module, attr, None)
        if found is None:
            raise LookupError(f"module {module_name!r} has no attribute {attr!r}")
        if not isinstance(found, Natask):
            raise LookupError(f"{spec} is a {type(found).__name__}, not a natask app")
        return found
    candidates = [module]
    if hasattr(module, "__path__"):  # a package: Celery's proj/celery.py convention
        try:
            candidates.append(importlib.import_module(f"{module_name}.celery"))
        except ModuleNotFoundError as e:
            if e.name != f"{module_name}.celery":
                raise
    for mod in candidates:
        for name in ("app", "celery"):
            if isinstance(getattr(mod, name, None), Natask):
                return getattr(mod, name)  # type: ignore[no-any-return]
    for mod in candidates:
        apps = {id(v): v for v in vars(mod).values() if isinstance(v, Natask)}
        if len(apps) == 1:
            return next(iter(apps.values()))
    raise LookupError(f"no natask app in {module_name!r}: name it `app` (or `celery`), or pass -A "
                      f"{module_name}:<attribute>")


__all__ = ["Natask", "find_app"]
