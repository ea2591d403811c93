"""Eager execution: a task or a whole workflow run now, in the calling thread, with no server
(``Task.apply``, ``Canvas.apply`` and ``task_always_eager``), as Celery's ``apply`` does.

A workflow runs from its frozen form (``Node``), so eager and sent workflows share ids, options and
argument rules; only the transport differs. Countdowns are not waited for and retries run at once
(Celery's eager semantics)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import traceback as tb
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..errors import ConfigError, Retry, TaskControl, failure_record
from ..options import Request, current_request
from ..result import AsyncResult
from ..retry import Action, decide
from ..states import State
from .plan import Node, leaves
from .send import GroupResult, ResultSet

if TYPE_CHECKING:
    from ..client import App

R = TypeVar("R")

Freeze = Callable[[Mapping[str, Any]], Node]
"""Freezes a callback's canvas dict (``link``/``link_error`` data) into a node."""


class Replaced(TaskControl):
    """Raised by ``Task.replace``: the running task ends and ``sig`` (a canvas dict) takes its place."""

    def __init__(self, sig: Mapping[str, Any]) -> None:
        super().__init__(f"replaced by {sig.get('task') or sig.get('kind')}")
        self.sig = dict(sig)


def replacement(sig: Mapping[str, Any], accumulate: str, queue: str | None = None) -> dict[str, Any]:
    """The canvas that takes a replaced task's place: a group becomes a chord whose body (the
    ``accumulate`` built-in) returns the group's list, so one task's result stands for it."""
    if sig.get("kind") == "group":
        return {"kind": "chord", "header": dict(sig), "options": {},
                "body": {"task": accumulate, "args": [], "kwargs": {}, "options": {"queue": queue} if queue else {},
                         "immutable": False}}
    if sig.get("kind") == "chain" and not sig.get("tasks"):
        raise ConfigError("cannot replace a task with an empty chain")
    return dict(sig)


class EagerResult(AsyncResult[R], Generic[R]):
    """The outcome of a task run eagerly (``Task.apply``, ``task_always_eager``): an ``AsyncResult``
    that is final at once and needs no server.

    As in Celery, ``get()`` of a failed run raises the task's own exception (not ``TaskFailed``)."""

    __slots__ = ("_children", "_exc", "_parent", "_traceback")

    def __init__(self, app: App, task_id: str, task_name: str | None, state: str, value: Any = None,
                 exc: BaseException | None = None, traceback: str | None = None, retries: int = 0) -> None:
        super().__init__(app, task_id, task_name)
        record: dict[str, Any] = {"state": state, "retries": retries}
        if state == State.SUCCESS:
            record["result"] = value
        elif exc is not None:
            record.update(failure_record(exc, traceback_text=False))
        self._record = record
        self._exc = exc
        self._traceback = traceback
        self._parent: AsyncResult[Any] | None = None
        self._children: list[AsyncResult[Any]] = []

    def __repr__(self) -> str:
        return f"<EagerResult {self.id} {self.state}>"

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failed run (None otherwise)."""
        return self._traceback

    @property
    def parent(self) -> AsyncResult[Any] | None:
        """The previous step of an eager chain."""
        return self._parent

    @property
    def children(self) -> list[AsyncResult[Any]]:
        """What this run's success started eagerly (next chain step, links)."""
        return list(self._children)

    def _unwrap(self, propagate: bool) -> Any:
        if self._exc is None:
            return super()._unwrap(propagate)
        if propagate:
            raise self._exc
        return self._exc

    def _info(self, record: Mapping[str, Any] | None) -> Any:
        return self._exc if self._exc is not None else super()._info(record)

    def maybe_throw(self, propagate: bool = True) -> None:
        """Raise the task's own exception if it failed."""
        if propagate and self._exc is not None:
            raise self._exc

    async def aforget(self) -> None:
        """Nothing is stored for an eager run: nothing to forget."""

    async def arevoke(self, terminate: bool = False) -> None:
        """An eager run is already over: revoking it does nothing (as in Celery)."""


def _failed(handle: AsyncResult[Any] | ResultSet) -> BaseException | None:
    """The exception of a failed eager handle (the first one of a group), else None."""
    if isinstance(handle, ResultSet):
        for member in handle.results:
            exc = _failed(member)
            if exc is not None:
                return exc
        return None
    return handle._exc if isinstance(handle, EagerResult) else None


def _value(handle: AsyncResult[Any] | ResultSet) -> Any:
    if isinstance(handle, ResultSet):
        return [_value(r) for r in handle.results]
    assert handle._record is not None
    return handle._record.get("result")


class Eager:
    """Runs frozen workflow nodes in this thread."""

    def __init__(self, app: App, freeze: Freeze, throw: bool, retries: int = 0) -> None:
        self.app = app
        self.freeze = freeze
        self.throw = throw
        self.retries = retries  # the first run's count (``Task.apply(retries=)``)

    def run(self, node: Node, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
            parent: AsyncResult[Any] | None = None) -> AsyncResult[Any] | GroupResult:
        """Run ``node`` with a parent's ``args``/``kwargs``; its result handle (a chain's is its last step's)."""
        kind = node.get("kind")
        if kind is None:
            return self.task(node, args, kwargs or {}, parent)
        if kind == "chain":
            handle: AsyncResult[Any] | GroupResult | None = None
            steps = node["tasks"]
            for step in steps:
                if handle is None:
                    handle = self.run(step, args, kwargs, parent)
                else:
                    exc = _failed(handle)
                    if exc is not None:
                        return self.skipped(steps[-1], exc)
                    last = handle if isinstance(handle, AsyncResult) else None
                    handle = self.run(step, (_value(handle),), {}, last)
                    if last is not None and isinstance(last, EagerResult) and isinstance(handle, AsyncResult):
                        last._children.append(handle)
            assert handle is not None
            return handle
        if kind == "group":
            return GroupResult(self.app, node["id"], [self.run(m, args, kwargs, parent) for m in node["tasks"]])
        if kind == "chord":
            header = GroupResult(self.app, node["id"], [self.run(m, args, kwargs, parent) for m in node["header"]])
            exc = _failed(header)
            if exc is not None:
                failed_id = next((r.id for r in header._flat() if isinstance(r, EagerResult) and r._exc is exc),
                                 node["id"])
                for leaf in leaves(node["body"]):
                    for errback in leaf.get("link_error") or []:
                        self.errback(errback, failed_id, exc, None)
                return self.skipped(node["body"], exc)
            return self.run(node["body"], (_value(header),), {})
        raise ValueError(f"unknown canvas kind {kind!r}")

    def skipped(self, node: Node, exc: BaseException) -> AsyncResult[Any] | GroupResult:
        """The handle of a part that never runs because ``exc`` stopped the workflow before it."""
        kind = node.get("kind")
        if kind == "group":
            return GroupResult(self.app, node["id"], [self.skipped(m, exc) for m in node["tasks"]])
        if kind is not None:
            return self.skipped(node["tasks"][-1] if kind == "chain" else node["body"], exc)
        return EagerResult(self.app, node["id"], node["task"], State.FAILURE.value, exc=exc)

    def task(self, node: Node, args: Sequence[Any], kwargs: Mapping[str, Any],
             parent: AsyncResult[Any] | None) -> EagerResult[Any]:
        if node.get("immutable"):
            args, kwargs = tuple(node["args"]), dict(node["kwargs"])
        else:
            args, kwargs = (*args, *node["args"]), {**node["kwargs"], **kwargs}
        name = node["task"]
        task: Any = self.app.tasks.get(name) or self.app.builtins.get(name)
        if task is None:
            raise ConfigError(f"cannot run {name} eagerly: it is not registered in this process "
                              "(import the module that defines it)")
        task.check_args(args, kwargs)
        opts = node["options"]
        outer = current_request.get()
        retries, self.retries = self.retries, 0
        while True:
            request = Request(node["id"], name, retries, args, kwargs, opts.get("queue", ""),
                              parent_id=outer.id if outer else None,
                              root_id=(outer.root_id or outer.id) if outer else None,
                              headers=dict(opts.get("headers") or {}))
            try:
                value = call(task, args, kwargs, request)
            except Replaced as replaced:
                return self.replace(node, replaced, request, parent)
            except Exception as exc:
                decision = decide(exc, task.options, retries)
                if decision.action is Action.RETRY:
                    retries += 1  # Celery's eager retry: at once, the countdown is not waited for
                    continue
                cause = (exc.exc or exc) if isinstance(exc, Retry) else exc
                text = "".join(tb.format_exception(type(cause), cause, cause.__traceback__))
                result: EagerResult[Any] = EagerResult(self.app, node["id"], name, State.FAILURE.value, exc=cause,
                                                       traceback=text, retries=retries)
                result._parent = parent
                for errback in node.get("link_error") or []:
                    self.errback(errback, node["id"], cause, text, request)
                if self.throw:
                    raise cause from None
                return result
            break
        result = EagerResult(self.app, node["id"], name, State.SUCCESS.value, value, retries=retries)
        result._parent = parent
        for link in node.get("link") or []:
            child = self.run(self.freeze(link), (value,), {}, result)
            if isinstance(child, AsyncResult):
                result._children.append(child)
        return result

    def replace(self, node: Node, replaced: Replaced, request: Request,
                parent: AsyncResult[Any] | None) -> EagerResult[Any]:
        """Run the replacement now with the replaced task's callbacks; its outcome under the task's id."""
        sig = replacement(replaced.sig, "natask.accumulate")
        data = {**sig, "options": {**sig.get("options", {}), "link": node.get("link") or [],
                                   "link_error": node.get("link_error") or []}}
        token = current_request.set(request)  # the replacement's tasks are the replaced task's children
        try:
            handle = self.run(self.freeze(data), (), {}, parent)
        finally:
            current_request.reset(token)
        exc = _failed(handle)
        if exc is not None:
            return EagerResult(self.app, node["id"], node["task"], State.FAILURE.value, exc=exc,
                               traceback=getattr(handle, "traceback", None))
        result: EagerResult[Any] = EagerResult(self.app, node["id"], node["task"], State.SUCCESS.value, _value(handle))
        result._parent = parent
        return result

    def errback(self, data: Mapping[str, Any], task_id: str, exc: BaseException, text: str | None,
                request: Request | None = None) -> None:
        """Run an errback: Celery's new style ``(request, exc, traceback)`` when its task takes more
        than one positional argument, else with the failed task's id."""
        node = self.freeze(data)
        if new_style_errback(self.app, data):
            task: Any = self.app.tasks[node["task"]]
            req = request or Request(task_id, str(node["task"]))
            args = (req, exc, text, *node["args"])
            call(task, args, node["kwargs"], Request(node["id"], node["task"], 0, args, node["kwargs"]))
            return
        self.run(node, (task_id,), {})


def new_style_errback(app: App, data: Mapping[str, Any]) -> bool:
    """True if the errback ``data`` (a signature's dict) is called Celery's new way, ``(request, exc,
    traceback)``: a task registered here taking more than one positional parameter (Celery's rule)."""
    if data.get("kind") is not None:
        return False
    task: Any = app.tasks.get(data.get("task", ""))
    if task is None:
        return False
    params = task.call_signature.parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > 1 or any(p.kind is p.VAR_POSITIONAL for p in params)


def call(task: Any, args: Sequence[Any], kwargs: Mapping[str, Any], request: Request) -> Any:
    """Run the task's function with ``request`` as the current request; an ``async def`` task runs
    to completion on a loop of its own."""
    fn = task.fn
    if task.options.bind:
        args = (task, *args)
    token = current_request.set(request)
    try:
        if not task.is_async:
            return fn(*args, **kwargs)
        return run_coroutine(fn(*args, **kwargs))
    finally:
        current_request.reset(token)


def run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion from sync code: here, or on a thread when a loop runs here."""
    if not inspect.iscoroutine(coro):
        return coro
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code (aapply_async in eager mode): a loop of its own on another thread.
    context = contextvars.copy_context()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = context.run(asyncio.run, coro)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="natask-eager")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
