"""Tasks: ``@app.task`` turns a function into a ``Task[P, R]`` with typed calling methods."""

from __future__ import annotations

import dataclasses
import inspect
import time
import typing
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, ParamSpec, TypeVar

from .canvas.eager import Eager, EagerResult, Replaced, run_coroutine
from .canvas.signature import Canvas, Freezer, Signature, callback_freezer, chunks, group
from .config import check_queue_name
from .errors import ConfigError, ExceptionInfo, MaxRetriesExceededError, Retry, TaskNotFound
from .message import COMPRESSIONS, Call, PublishRetry
from .naming import HDR_IGNORE_RESULT, HDR_SHADOW, HDR_TIME_LIMIT, check_task_name
from .options import OPTION_DEFAULTS, SERIALIZERS, Request, TaskOptions, current_request

__all__ = ["AsyncTask", "Request", "Task", "TaskOptions", "current_request"]

if TYPE_CHECKING:
    from .client import App
    from .result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")


Args = Sequence[Any]
Kwargs = Mapping[str, Any]


class Task(Generic[P, R]):
    """A registered task. Call it to run locally; ``delay``/``apply_async`` to enqueue."""

    def __init__(self, app: App, fn: Callable[..., Any], name: str, options: TaskOptions) -> None:
        self.app = app
        self._client = app.client  # the calling methods' one lookup
        self.fn = fn
        self.name = check_task_name(name)
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self._call_signature: inspect.Signature | None = None
        self._arity = -1  # number of plain positional parameters; -1 when binding needs inspect
        self._dataclass_params: dict[str, type] | None = None
        cls = type(self)
        if cls is not Task and cls is not AsyncTask and any(
                getattr(cls, hook) is not getattr(Task, hook) for hook in HANDLERS):
            # The worker calls the handlers only of tasks that have some: none costs nothing.
            self.options = options = dataclasses.replace(options)
            object.__setattr__(options, "hooked", True)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    @property
    def queue(self) -> str:
        """The queue this task goes to unless a call says otherwise (or ``task_routes`` routes it)."""
        return self.options.queue or self.app.config.default_queue

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.options.bind:
            return self.fn(self, *args, **kwargs)  # type: ignore[no-any-return]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]

    # -- argument checks --------------------------------------------------------------------
    @property
    def call_signature(self) -> inspect.Signature:
        """The function's parameters as callers see them (without ``self`` for ``bind=True``)."""
        if self._call_signature is None:
            sig = inspect.signature(self.fn)
            params = list(sig.parameters.values())
            if self.options.bind:
                if not params:
                    raise ConfigError(f"task {self.name} has bind=True but takes no 'self' argument")
                params = params[1:]
            self._call_signature = sig.replace(parameters=params)
            simple = all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params)
            self._arity = len(params) if simple else -1
        return self._call_signature

    def check_args(self, args: Args, kwargs: Kwargs) -> inspect.BoundArguments | None:
        """Bind a call's arguments to the signature; ``TypeError`` names what does not fit.

        Returns None on the fast path: plain positional parameters, called positionally.
        """
        if not kwargs and len(args) == self._arity:
            return None
        try:
            return self.call_signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}{self.call_signature}: {e}") from None

    def bind_call(self, args: Args, kwargs: Kwargs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Bind a received call and rebuild dataclass arguments the annotations name."""
        if self._dataclass_params is None:
            self._dataclass_params = _dataclass_params(self.fn)
        self.call_signature  # noqa: B018 - computes the fast-path arity
        if not self._dataclass_params and not kwargs and len(args) == self._arity:
            return tuple(args), {}
        try:
            bound = self.call_signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}{self.call_signature}: {e}") from None
        for param, cls in self._dataclass_params.items():
            value = bound.arguments.get(param)
            if isinstance(value, dict):
                bound.arguments[param] = _revive(cls, value)
        return bound.args, bound.kwargs

    # -- enqueue ----------------------------------------------------------------------------
    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Enqueue a call; returns its ``AsyncResult`` once the server acknowledged it."""
        if self.app.always_eager:
            return self.apply(args, kwargs)
        call = self._prepare(args, kwargs, None, None, None, None, None, None)
        client = self._client
        if self.options.broadcast:
            return client.portal.run(client.broadcast(call))
        return client.portal.run(client.publish(call))

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Celery's Django helper: ``delay`` once the current database transaction commits (at once
        outside one; never if it rolls back), so the worker finds the rows the call refers to.
        Needs Django (``django.db.transaction.on_commit``)."""
        _on_commit(self.name, lambda: self.delay(*args, **kwargs))

    def apply_async_on_commit(self, args: Args = (), kwargs: Kwargs | None = None, **options: Any) -> None:
        """``apply_async`` once the current database transaction commits (as ``delay_on_commit``)."""
        _on_commit(self.name, lambda: self.apply_async(args, kwargs, **options))

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Async ``delay``."""
        return await self.aapply_async(args, kwargs)

    def apply_async(  # noqa: PLR0913 - Celery's call options, keyword-only
        self,
        args: Args = (),
        kwargs: Kwargs | None = None,
        *,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        queue: str | None = None,
        headers: Mapping[str, str] | None = None,
        link: Canvas | Sequence[Canvas] | None = None,
        link_error: Canvas | Sequence[Canvas] | None = None,
        soft_time_limit: float | None = None,
        priority: int | None = None,
        time_limit: float | None = None,
        shadow: str | None = None,
        ignore_result: bool | None = None,
        serializer: str | None = None,
        compression: str | None = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        retry: bool = True,
        retry_policy: Mapping[str, Any] | None = None,
    ) -> AsyncResult[R]:
        """Enqueue with options; see SPEC §2. ``link`` runs on success with the result,
        ``link_error`` on failure with the failed task's id."""
        if self.app.always_eager:  # Celery's eager mode: no countdown, eta or expiry, no time limits
            return self.apply(args, kwargs, task_id=task_id, queue=queue, headers=headers, link=link,
                              link_error=link_error)
        extras = CallExtras.of(time_limit, shadow, ignore_result, serializer, compression, routing_key, exchange,
                               retry, retry_policy)
        if _as_workflow(link, link_error, soft_time_limit, extras):
            return self.s(*args, **(kwargs or {})).apply_async(
                countdown=countdown, eta=eta, expires=expires, task_id=task_id, queue=queue, headers=headers,
                link=link, link_error=link_error, priority=priority)
        call = self._prepare(args, kwargs, countdown, eta, expires, task_id, queue, headers, soft_time_limit,
                             priority, extras)
        client = self._client
        if self.options.broadcast:
            return client.portal.run(client.broadcast(call))
        return client.portal.run(client.publish(call))

    async def aapply_async(  # noqa: PLR0913 - Celery's call options, keyword-only
        self,
        args: Args = (),
        kwargs: Kwargs | None = None,
        *,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        queue: str | None = None,
        headers: Mapping[str, str] | None = None,
        link: Canvas | Sequence[Canvas] | None = None,
        link_error: Canvas | Sequence[Canvas] | None = None,
        soft_time_limit: float | None = None,
        priority: int | None = None,
        time_limit: float | None = None,
        shadow: str | None = None,
        ignore_result: bool | None = None,
        serializer: str | None = None,
        compression: str | None = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        retry: bool = True,
        retry_policy: Mapping[str, Any] | None = None,
    ) -> AsyncResult[R]:
        """Async ``apply_async``."""
        if self.app.always_eager:  # Celery's eager mode: no countdown, eta or expiry, no time limits
            return self.apply(args, kwargs, task_id=task_id, queue=queue, headers=headers, link=link,
                              link_error=link_error)
        extras = CallExtras.of(time_limit, shadow, ignore_result, serializer, compression, routing_key, exchange,
                               retry, retry_policy)
        if _as_workflow(link, link_error, soft_time_limit, extras):
            return await self.s(*args, **(kwargs or {})).aapply_async(
                countdown=countdown, eta=eta, expires=expires, task_id=task_id, queue=queue, headers=headers,
                link=link, link_error=link_error, priority=priority)
        call = self._prepare(args, kwargs, countdown, eta, expires, task_id, queue, headers, soft_time_limit,
                             priority, extras)
        if self.options.broadcast:
            return await self._client.broadcast(call)  # type: ignore[no-any-return]
        return await self._client.publish(call)  # type: ignore[no-any-return]

    def delay_many(self, arglist: Iterable[Args | Kwargs]) -> list[AsyncResult[R]]:
        """Pipelined bulk enqueue: each item is a tuple of positional arguments (or a dict of
        keyword arguments); one ``AsyncResult`` each, in order."""
        if self.options.broadcast:
            raise ConfigError(f"{self.name} is a broadcast task: send it with delay() or apply_async()")
        if self.app.always_eager:
            return [self.apply(*_item_args(item)) for item in arglist]
        calls = [self._prepare_item(item) for item in arglist]
        client = self._client
        return client.portal.run(client.publish_many(calls))

    async def adelay_many(self, arglist: Iterable[Args | Kwargs]) -> list[AsyncResult[R]]:
        """Async ``delay_many``."""
        if self.options.broadcast:
            raise ConfigError(f"{self.name} is a broadcast task: send it with delay() or apply_async()")
        calls = [self._prepare_item(item) for item in arglist]
        return await self._client.publish_many(calls)

    def _prepare_item(self, item: Args | Kwargs) -> Call:
        if type(item) is tuple:
            return self._prepare(item, None, None, None, None, None, None, None)
        if isinstance(item, Mapping):
            return self._prepare((), item, None, None, None, None, None, None)
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
            raise TypeError(f"delay_many() takes tuples of arguments, got {type(item).__name__}: wrap it in a tuple")
        return self._prepare(item, None, None, None, None, None, None, None)

    def _prepare(  # noqa: PLR0913 - the call options, passed on
        self,
        args: Args,
        kwargs: Kwargs | None,
        countdown: float | timedelta | None,
        eta: datetime | None,
        expires: float | timedelta | datetime | None,
        task_id: str | None,
        queue: str | None,
        headers: Mapping[str, str] | None,
        soft_time_limit: float | None = None,
        priority: int | None = None,
        extras: CallExtras | None = None,
    ) -> Call:
        kwargs = kwargs or {}
        if self.options.typing:
            self.check_args(args, kwargs)
        if extras is not None:
            return extras.prepare(self, args, kwargs, countdown, eta, expires, task_id, queue, headers,
                                  soft_time_limit, priority=self.options.priority if priority is None else priority)
        return self._client.prepare(
            self.name,
            args,
            kwargs,
            queue=queue or self.options.queue or self._client.default_queue(self.name, args, kwargs),
            countdown=countdown,
            eta=eta,
            expires=expires if expires is not None else self.options.expires,
            task_id=task_id,
            headers=headers,
            ignore_result=self.options.ignore_result,
            soft_time_limit=soft_time_limit,
            priority=self.options.priority if priority is None else priority,
            serializer=self.options.serializer,
        )

    # -- eager -----------------------------------------------------------------------------
    def apply(  # noqa: PLR0913 - Celery's apply options, keyword-only
        self,
        args: Args = (),
        kwargs: Kwargs | None = None,
        *,
        task_id: str | None = None,
        retries: int = 0,
        throw: bool | None = None,
        queue: str | None = None,
        headers: Mapping[str, str] | None = None,
        link: Canvas | Sequence[Canvas] | None = None,
        link_error: Canvas | Sequence[Canvas] | None = None,
    ) -> EagerResult[R]:
        """Run the task now, in this thread, without a server (Celery's ``apply``); ``self.request``
        is set, ``self.retry()`` runs it again at once (up to ``max_retries``), ``link``/``link_error``
        run eagerly too. ``throw`` (default: the app's ``eager_propagates``) raises the task's exception
        instead of returning a failed ``EagerResult``; ``retries`` is the first run's retry count."""
        options = {k: v for k, v in (("task_id", task_id), ("queue", queue), ("headers", headers),
                                     ("link", link), ("link_error", link_error)) if v is not None}
        sig: Signature[R] = Signature(self.app, self.name, args, kwargs, options)
        node = Freezer(self.app).freeze(sig)
        app = self.app
        eager = Eager(app, callback_freezer(app), app.eager_propagates if throw is None else throw, retries)
        return eager.run(node)  # type: ignore[return-value]

    # -- RPC --------------------------------------------------------------------------------
    def call(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on a worker over core NATS request-reply and return the result (no persistence,
        at-most-once); ``NoWorkers`` at once when no worker listens, ``TaskFailed`` if it raised."""
        return self.apply_call(args, kwargs)

    async def acall(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Async ``call``."""
        return await self.aapply_call(args, kwargs)

    def apply_call(self, args: Args = (), kwargs: Kwargs | None = None, *, timeout: float = 30.0,
                   queue: str | None = None) -> R:
        """``call`` with options: ``timeout`` (seconds, then ``ResultTimeout``) and ``queue``."""
        call = self._prepare(args, kwargs, None, None, None, None, queue, None)
        client = self._client
        return client.portal.run(client.call(call, timeout))  # type: ignore[no-any-return]

    async def aapply_call(self, args: Args = (), kwargs: Kwargs | None = None, *, timeout: float = 30.0,
                          queue: str | None = None) -> R:
        """Async ``apply_call``."""
        call = self._prepare(args, kwargs, None, None, None, None, queue, None)
        return await self._client.call(call, timeout)  # type: ignore[no-any-return]

    # -- canvas -----------------------------------------------------------------------------
    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature of this task with (partial) arguments."""
        return Signature(self.app, self.name, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """An immutable signature: a chain will not pass it the previous result."""
        return Signature(self.app, self.name, args, kwargs, immutable=True)

    def signature(self, args: Args = (), kwargs: Kwargs | None = None, *, immutable: bool = False,
                  **options: Any) -> Signature[R]:
        """A signature with call options (Celery's ``task.signature(args, kwargs, **options)``)."""
        return Signature(self.app, self.name, args or (), kwargs, options, immutable)

    def map(self, it: Iterable[Any]) -> Signature[list[R]]:
        """One task (``natask.map``) that calls this one with each item of ``it`` in turn, in one
        worker, and returns the list of results (Celery's ``task.map``)."""
        return Signature(self.app, MAP_TASK, (self.name, list(it)), None, {"queue": self.queue})

    def starmap(self, it: Iterable[Args]) -> Signature[list[R]]:
        """As ``map``, each item being a tuple of positional arguments (``natask.starmap``)."""
        return Signature(self.app, STARMAP_TASK, (self.name, [list(item) for item in it]), None,
                         {"queue": self.queue})

    def chunks(self, it: Iterable[Args], n: int) -> group:
        """Split ``it`` (tuples of arguments) into parts of ``n`` items, each part one ``starmap`` task,
        sent as a group: the result is a list of lists (Celery's ``task.chunks``)."""
        return chunks(self.app, self.name, it, n)

    # -- inside a running task --------------------------------------------------------------
    @property
    def request(self) -> Request:
        """The current call's request; only valid while the task runs in a worker."""
        req = current_request.get()
        if req is None or req.task != self.name:
            raise RuntimeError(f"{self.name}.request is only available while the task runs in a worker")
        return req

    def update_state(self, state: str, meta: Any = None) -> None:
        """Record a custom state (e.g. ``"PROGRESS"``) with ``meta``, readable through
        ``AsyncResult.state`` / ``.info`` while the task runs; safe from sync and async tasks."""
        if not isinstance(state, str) or not state:
            raise ValueError("update_state needs a non-empty state name")
        request = self.request
        if request.report is None:
            raise RuntimeError("update_state is only available while the task runs in a worker")
        request.report(state, meta)

    def replace(self, sig: Canvas) -> typing.NoReturn:
        """End this run and put ``sig`` in its place (Celery's ``Task.replace``): the task's result is
        ``sig``'s (a group's list of results), a chain this task is in goes on after ``sig``, and the
        task's links and errbacks move to ``sig``. Raises at once; ``return self.replace(...)`` reads well."""
        self.request  # noqa: B018 - only inside a running task
        if not isinstance(sig, Canvas):
            raise TypeError(f"replace() takes a signature, chain, group or chord, got {type(sig).__name__}")
        raise Replaced(sig.to_dict())

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        *,
        eta: datetime | None = None,
        throw: bool = True,
    ) -> NoReturn:
        """Retry this run later, as Celery's: raises ``Retry`` (``raise self.retry(...)`` works too),
        after ``countdown`` seconds or at ``eta`` (default: ``default_retry_delay``, else the backoff).
        With no retries left (``max_retries``, else the task's) it raises ``exc`` if given, else
        ``MaxRetriesExceededError``: the task fails with it. ``throw=False`` is not supported (a
        retry always ends the run)."""
        if not throw:
            raise ConfigError("self.retry(throw=False) is not supported: the retry is published when the run "
                              "ends with the raised Retry")
        if eta is not None:
            if countdown is not None:
                raise ConfigError("give countdown= or eta=, not both")
            if not isinstance(eta, datetime) or eta.tzinfo is None:
                raise ConfigError("eta must be a timezone-aware datetime")
            countdown = max(0.0, eta.timestamp() - time.time())
        request = current_request.get()
        if request is not None and request.task == self.name:
            limit = max_retries if max_retries is not None else self.options.max_retries
            if limit is not None and request.retries >= limit:
                if exc is not None:
                    raise exc
                raise MaxRetriesExceededError(
                    f"{self.name}[{request.id}] has no retries left ({request.retries} of max_retries={limit})",
                    request.id, request.retries)
        retry = Retry(exc=exc, countdown=countdown)
        retry.max_retries = max_retries  # type: ignore[attr-defined]
        raise retry

    # -- handlers of a ``base=`` class (Celery's names); the worker calls them only when overridden --
    def before_start(self, task_id: str, args: Args, kwargs: Kwargs) -> Any:
        """Called by the worker before the run starts."""

    def on_success(self, retval: Any, task_id: str, args: Args, kwargs: Kwargs) -> Any:
        """Called by the worker after the task returned ``retval``."""

    def on_failure(self, exc: BaseException, task_id: str, args: Args, kwargs: Kwargs, einfo: ExceptionInfo) -> Any:
        """Called by the worker after the task failed with ``exc`` (no retry left or none asked)."""

    def on_retry(self, exc: BaseException, task_id: str, args: Args, kwargs: Kwargs, einfo: ExceptionInfo) -> Any:
        """Called by the worker when the run raised and a retry is published."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Args, kwargs: Kwargs,
                     einfo: ExceptionInfo | None) -> Any:
        """Called by the worker after the outcome is settled (``status``: SUCCESS, FAILURE or RETRY;
        ``retval``: the result or the exception)."""


def class_options(base: type[Task[Any, Any]]) -> dict[str, Any]:
    """The task options a ``base=`` class sets as plain class attributes (Celery's
    ``class Base(Task): max_retries = 5; autoretry_for = (IOError,)``), nearest class first."""
    found: dict[str, Any] = {}
    for cls in base.__mro__:
        if cls in (Task, AsyncTask) or not issubclass(cls, Task):
            continue
        for key, value in vars(cls).items():
            if key in OPTION_DEFAULTS and key not in found and not callable(value) \
                    and not isinstance(value, (property, staticmethod, classmethod)):
                found[key] = value
    return found


HANDLERS: Final = ("before_start", "on_success", "on_failure", "on_retry", "after_return")
"""The methods of a ``base=`` class the worker calls (sync, or ``async def``: awaited)."""


def _as_workflow(link: object, link_error: object, soft_time_limit: float | None, extras: CallExtras | None) -> bool:
    """Whether a call with ``link``/``link_error`` goes out as a workflow; the options workflows do
    not carry yet are refused there."""
    if link is None and link_error is None:
        return False
    if soft_time_limit is not None or extras is not None:
        raise ConfigError("soft_time_limit, time_limit, shadow, ignore_result, serializer, compression and "
                          "retry/retry_policy are "
                          "not carried by workflows yet: set them on the task (@app.task(...)) or call without "
                          "link/link_error")
    return True


@dataclass(frozen=True)
class CallExtras:
    """The rarer call options of one ``apply_async``/``send_task`` (None when a call gives none,
    so the common call pays one check)."""

    time_limit: float | None
    shadow: str | None
    ignore_result: bool | None
    serializer: str | None
    compression: str | None
    routing_key: str | None
    retry: PublishRetry | None

    @classmethod
    def of(cls,  # noqa: PLR0913 - Celery's call options, passed on
           time_limit: float | None, shadow: str | None, ignore_result: bool | None, serializer: str | None,
           compression: str | None, routing_key: str | None, exchange: str | None, retry: bool,
           retry_policy: Mapping[str, Any] | None) -> CallExtras | None:
        """Validated extras, or None when none is given."""
        if exchange is not None:
            raise ConfigError(f"exchange={exchange!r}: natask has no exchanges; a task goes to a queue: pass "
                              "queue= (or routing_key=, taken as a queue name)")
        policy = None if retry is True and retry_policy is None else publish_retry(retry, retry_policy)
        if (time_limit is None and shadow is None and ignore_result is None and serializer is None
                and compression is None and routing_key is None and policy is None):
            return None
        if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                       or not 0 < time_limit < float("inf")):
            raise ConfigError(f"time_limit must be a number of seconds > 0, got {time_limit!r:.40}")
        if shadow is not None and (not isinstance(shadow, str) or not shadow or len(shadow) > MAX_SHADOW
                                   or not shadow.isprintable()):
            raise ConfigError(f"shadow must be a printable name of at most {MAX_SHADOW} characters, got {shadow!r:.40}")
        if serializer is not None and serializer not in SERIALIZERS:
            raise ConfigError(f"serializer must be one of {', '.join(SERIALIZERS)}, got {serializer!r:.40}")
        if compression is not None and compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)} (or None), "
                              f"got {compression!r:.40}")
        if routing_key is not None:
            check_queue_name(routing_key)
        return cls(time_limit, shadow, ignore_result, serializer, compression, routing_key, policy)

    def prepare(self, task: Task[Any, Any] | None,  # noqa: PLR0913 - the call options, passed on
                args: Args, kwargs: Kwargs, countdown: float | timedelta | None,
                eta: datetime | None, expires: float | timedelta | datetime | None, task_id: str | None,
                queue: str | None, headers: Mapping[str, str] | None, soft_time_limit: float | None,
                *, name: str = "", client: Any = None, default_queue: str = "", priority: int = 0) -> Call:
        """The call, prepared with these extras (``task`` None: ``send_task`` by ``name``)."""
        if queue is not None and self.routing_key is not None and queue != self.routing_key:
            raise ConfigError(f"queue={queue!r} and routing_key={self.routing_key!r} disagree: pass one")
        queue = queue or self.routing_key
        stored = task is None or not task.options.ignore_result
        ignore = self.ignore_result if self.ignore_result is not None else not stored
        extra: dict[str, str] = {}
        if self.time_limit is not None:
            extra[HDR_TIME_LIMIT] = repr(float(self.time_limit))
        if self.shadow is not None:
            extra[HDR_SHADOW] = self.shadow
        if ignore and stored:
            extra[HDR_IGNORE_RESULT] = "1"  # the worker must not store what this call ignores
        if task is not None:
            name, client = task.name, task._client
            default_queue = task.options.queue or client.default_queue(name, args, kwargs)
            serializer = self.serializer or task.options.serializer
            expires = expires if expires is not None else task.options.expires
        else:
            serializer = self.serializer or "msgpack"
        return client.prepare(  # type: ignore[no-any-return]
            name, args, kwargs, queue=queue or default_queue, countdown=countdown, eta=eta, expires=expires,
            task_id=task_id, headers=headers, ignore_result=ignore, soft_time_limit=soft_time_limit,
            serializer=serializer, compression=self.compression, extra=extra, priority=priority, retry=self.retry)


_RETRY_POLICY: Final = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.2}
"""Celery's ``retry_policy`` keys and defaults."""


def publish_retry(retry: object, policy: Mapping[str, Any] | None) -> PublishRetry | None:
    """Celery's ``retry``/``retry_policy`` call options as publish retries: ``retry=False`` publishes
    once; a policy publishes up to ``max_retries + 1`` times, pausing ``interval_start``, then
    ``interval_step`` longer each time up to ``interval_max`` (all within ``duplicate_window``, so a
    retry never enqueues twice); ``max_retries=None`` retries until ``publish_timeout`` (None
    returned: natask's own retrying)."""
    if not isinstance(retry, bool):
        raise ConfigError(f"retry must be True or False, got {retry!r:.40}")
    if not retry:
        return PublishRetry(1)
    if not isinstance(policy, Mapping):
        raise ConfigError(f"retry_policy must be a dict like {{'max_retries': 3, 'interval_start': 0}}, "
                          f"got {policy!r:.60}")
    unknown = set(policy) - set(_RETRY_POLICY)
    if unknown:
        raise ConfigError(f"retry_policy takes {', '.join(_RETRY_POLICY)}, got {', '.join(sorted(map(str, unknown)))}"
                          " (natask retries every broker error that can pass: no retry_errors)")
    values = {**_RETRY_POLICY, **policy}
    limit = values["max_retries"]
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_PUBLISH_RETRIES:
        raise ConfigError(f"retry_policy max_retries must be an int from 0 to {MAX_PUBLISH_RETRIES} or None, "
                          f"got {limit!r:.40}")
    pauses = []
    for key in ("interval_start", "interval_step", "interval_max"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
            raise ConfigError(f"retry_policy {key} must be a number of seconds from 0 to 3600, got {value!r:.40}")
        pauses.append(float(value))
    return PublishRetry(limit + 1, *pauses)


MAX_PUBLISH_RETRIES: Final = 1000
"""Most publish retries a call's ``retry_policy`` may ask for."""
MAX_SHADOW: Final = 200
"""Longest ``shadow`` name a call may carry (a header)."""


class AsyncTask(Task[P, R]):
    """A task whose function is ``async def``: a local call returns a coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:  # type: ignore[override]
        if self.options.bind:
            return self.fn(self, *args, **kwargs)  # type: ignore[no-any-return]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]


MAP_TASK: Final = "natask.map"
"""The built-in task behind ``Task.map``."""
STARMAP_TASK: Final = "natask.starmap"
"""The built-in task behind ``Task.starmap`` and ``Task.chunks``."""
ACCUMULATE_TASK: Final = "natask.accumulate"
"""The built-in body that returns a group's list when ``Task.replace`` is given a group."""


def builtin_tasks(app: App) -> dict[str, Task[Any, Any]]:
    """The tasks natask provides in every app (workers find them; ``app.tasks`` does not list them)."""

    def xmap(task: str, it: list[Any]) -> list[Any]:
        return _each(app, task, [(item,) for item in it])

    def xstarmap(task: str, it: list[list[Any]]) -> list[Any]:
        return _each(app, task, [tuple(item) for item in it])

    def accumulate(values: list[Any]) -> list[Any]:
        return values

    return {MAP_TASK: Task(app, xmap, MAP_TASK, TaskOptions()),
            STARMAP_TASK: Task(app, xstarmap, STARMAP_TASK, TaskOptions()),
            ACCUMULATE_TASK: Task(app, accumulate, ACCUMULATE_TASK, TaskOptions())}


def _each(app: App, name: str, items: list[tuple[Any, ...]]) -> list[Any]:
    task: Any = app.tasks.get(name)
    if task is None:
        raise TaskNotFound(f"{name} is not registered in this worker: import the module that defines it")
    values = [task(*item) for item in items]
    if task.is_async:
        return run_coroutine(_in_turn(values))  # type: ignore[no-any-return]
    return values


async def _in_turn(coros: list[Any]) -> list[Any]:
    return [await c for c in coros]


def _item_args(item: Args | Kwargs) -> tuple[Args, Kwargs | None]:
    if isinstance(item, Mapping):
        return (), item
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
        raise TypeError(f"delay_many() takes tuples of arguments, got {type(item).__name__}: wrap it in a tuple")
    return item, None


def _dataclass_params(fn: Callable[..., Any]) -> dict[str, type]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: no revival
        return {}
    return {name: cls for name, cls in hints.items()
            if name != "return" and isinstance(cls, type) and dataclasses.is_dataclass(cls)}


def _revive(cls: type, value: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a decoded dict, recursing into dataclass-typed fields."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    fields = {f.name for f in dataclasses.fields(cls)}
    data = {}
    for key, item in value.items():
        if key not in fields:
            raise TypeError(f"{cls.__qualname__} has no field {key!r}")
        sub = hints.get(key)
        if isinstance(item, dict) and isinstance(sub, type) and dataclasses.is_dataclass(sub):
            item = _revive(sub, item)
        data[key] = item
    return cls(**data)


def _on_commit(name: str, send: Callable[[], object]) -> None:
    """Run ``send`` when Django's current transaction commits (Celery's ``delay_on_commit``)."""
    try:
        from django.db import transaction  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise ConfigError(f"{name}: delay_on_commit()/apply_async_on_commit() enqueue in Django's "
                          "transaction.on_commit, and Django is not installed: call delay()/apply_async()") from None
    transaction.on_commit(send)
