"""Signatures, chains, groups and chords: workflows as data, composable with ``|``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from ..errors import ConfigError, EncodeError
from ..message import dumps, find_unencodable
from ..naming import check_task_id, check_task_name
from ..result import AsyncResult
from .eager import Eager, EagerResult, new_style_errback
from .plan import Node, new_id
from .send import GroupResult, ResultSet, launch

if TYPE_CHECKING:
    from ..client import App
    from ..options import TaskOptions

R = TypeVar("R")

CALL_OPTIONS: Final = frozenset({"queue", "countdown", "eta", "expires", "task_id", "headers", "ignore_result",
                                 "priority"})
"""Options a signature (or ``apply_async``) accepts besides ``link`` and ``link_error``."""
CALLBACK_OPTIONS: Final = frozenset({"link", "link_error"})
_FIRST_ONLY: Final = frozenset({"countdown", "eta"})
"""Container options that delay only a workflow's first messages, not every later step."""


class Canvas:
    """What signatures, chains, groups and chords share: composing with ``|`` and calling."""

    options: dict[str, Any]

    def _natask(self) -> App:
        """The app the workflow is sent with."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The workflow as plain data (``from_dict`` rebuilds it)."""
        raise NotImplementedError

    def _with_options(self, options: dict[str, Any]) -> Canvas:
        raise NotImplementedError

    def set(self, **options: Any) -> Canvas:
        """A copy with call options added: ``queue``, ``countdown``, ``eta``, ``expires``, ``task_id``,
        ``headers``, ``ignore_result``, ``link``, ``link_error``."""
        return self._with_options({**self.options, **_normalize(options)})

    def __or__(self, other: Canvas) -> Canvas:
        if not isinstance(other, Canvas):
            return NotImplemented
        return chain(self, other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Canvas) and type(other) is type(self) and self.to_dict() == other.to_dict()

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any] | GroupResult:
        """Send the workflow; ``args``/``kwargs`` go to its first task(s)."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any] | GroupResult:
        return await self.aapply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> AsyncResult[Any] | GroupResult:
        """Send the workflow with ``options`` (see ``set``) on top of its own."""
        return self._natask().client.portal.run(self.aapply_async(args, kwargs, **options))

    async def aapply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                           **options: Any) -> AsyncResult[Any] | GroupResult:
        target = self.set(**options) if options else self
        app = self._natask()
        if app.always_eager:
            return target.apply(args, kwargs)
        return await launch(app, Freezer(app).freeze(target), args, kwargs)

    def apply(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
              throw: bool | None = None, **options: Any) -> AsyncResult[Any] | GroupResult:
        """Run the workflow now, in this thread, without a server (Celery's ``apply``): results are
        ``EagerResult``s. ``throw`` (default: the app's ``eager_propagates``) raises a task's
        exception instead of returning its failed result; countdowns are not waited for."""
        target = self.set(**options) if options else self
        app = self._natask()
        node = Freezer(app).freeze(target)
        eager = Eager(app, callback_freezer(app), app.eager_propagates if throw is None else throw)
        return eager.run(node, args, kwargs)

    def freeze(self, _id: str | None = None) -> AsyncResult[Any] | GroupResult:
        """Assign the ids now (kept when the workflow is sent later) and return its result handle."""
        raise NotImplementedError

    def link(self, callback: Canvas) -> Canvas:
        """Add a callback run with this part's result when it succeeds; returns ``callback``."""
        self.options["link"] = [*self.options.get("link", ()), *callbacks(callback)]
        return callback

    def link_error(self, errback: Canvas) -> Canvas:
        """Add an errback run when this part fails; returns ``errback``."""
        self.options["link_error"] = [*self.options.get("link_error", ()), *callbacks(errback)]
        return errback

    def on_error(self, errback: Canvas) -> Canvas:
        """``link_error`` returning this signature, for chaining: ``add.s(2, 2).on_error(log.s()).delay()``."""
        self.link_error(errback)
        return self


class Signature(Canvas, Generic[R]):
    """A task call as data: name, arguments and call options; serialisable with ``to_dict``.

    ``immutable`` signatures (``task.si(...)``) ignore a parent's result in a chain.
    """

    def __init__(
        self,
        app: App,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        immutable: bool = False,
    ) -> None:
        self.app = app
        self.task = check_task_name(task)
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = _normalize(options or {})
        self.immutable = immutable

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}{'.si' if self.immutable else '.s'}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.task, self.args, self.immutable))

    def _natask(self) -> App:
        return self.app

    def to_dict(self) -> dict[str, Any]:
        """The signature as plain data (what travels in messages)."""
        return {"task": self.task, "args": list(self.args), "kwargs": self.kwargs, "options": self.options,
                "immutable": self.immutable}

    @classmethod
    def from_dict(cls, app: App, data: Mapping[str, Any]) -> Signature[Any]:
        return cls(app, data["task"], data.get("args", ()), data.get("kwargs"), data.get("options"),
                   bool(data.get("immutable", False)))

    def _with_options(self, options: dict[str, Any]) -> Signature[R]:
        return Signature(self.app, self.task, self.args, self.kwargs, options, self.immutable)

    def set(self, **options: Any) -> Signature[R]:
        """A copy with call options (queue, countdown, expires, link, link_error, ...) added."""
        return self._with_options({**self.options, **_normalize(options)})

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Signature[R]:
        """A copy with ``args`` prepended and ``kwargs`` merged (unless immutable)."""
        if self.immutable:
            return Signature(self.app, self.task, self.args, self.kwargs, self.options, True)
        return Signature(self.app, self.task, (*args, *self.args), {**self.kwargs, **(kwargs or {})},
                         self.options, False)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        """Enqueue this call (extra arguments as ``clone``)."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        return await self.aapply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> AsyncResult[R]:
        """Enqueue with the signature's options overridden by ``options``; ``link=`` / ``link_error=``
        add callbacks (``link_error`` receives the failed task's id)."""
        return self.app.client.portal.run(self.aapply_async(args, kwargs, **options))

    async def aapply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                           **options: Any) -> AsyncResult[R]:
        return await super().aapply_async(args, kwargs, **options)  # type: ignore[return-value]

    def apply(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
              throw: bool | None = None, **options: Any) -> EagerResult[R]:
        """Run the task now, in this thread (see ``Canvas.apply``)."""
        return super().apply(args, kwargs, throw=throw, **options)  # type: ignore[return-value]

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        """Call the task's function here, now, with the signature's arguments (as Celery does)."""
        task = self.app.tasks.get(self.task)
        if task is None:
            raise ConfigError(f"cannot call {self.task} here: it is not registered in this process")
        if self.immutable:
            args, kwargs = self.args, self.kwargs
        else:
            args, kwargs = (*args, *self.args), {**self.kwargs, **kwargs}
        return task(*args, **kwargs)  # type: ignore[operator, no-any-return]

    def freeze(self, _id: str | None = None) -> AsyncResult[R]:
        """Fix the task id now (``_id`` or a new one) and return its handle; sending it later uses that id."""
        task_id = _id or self.options.get("task_id") or new_id()
        self.options["task_id"] = check_task_id(task_id)
        return AsyncResult(self.app, task_id, self.task)


class chain(Canvas):  # noqa: N801 - Celery's name
    """Tasks run one after another, each receiving the previous result as its first argument
    (unless immutable). The chain's result is its last step's; a failed step stops it.

    Options of the chain are defaults for its steps; ``countdown``/``eta`` delay only the first step,
    ``link`` goes to the last step, ``link_error`` to every step, ``task_id`` names the last step.
    """

    def __init__(self, *tasks: Canvas | Iterable[Canvas], options: Mapping[str, Any] | None = None) -> None:
        flat: list[Canvas] = []
        for task in _canvas_args(tasks, "chain"):
            if isinstance(task, chain) and not task.options:
                flat.extend(task.tasks)
            else:
                flat.append(task)
        if not flat:
            raise ConfigError("a chain needs at least one task")
        self.tasks: tuple[Canvas, ...] = tuple(flat)
        self.options = _normalize(options or {})

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)

    def _natask(self) -> App:
        return self.tasks[0]._natask()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chain", "tasks": [t.to_dict() for t in self.tasks], "options": self.options}

    def _with_options(self, options: dict[str, Any]) -> chain:
        return chain(*self.tasks, options=options)

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult[Any] | GroupResult:
        """Send the chain (Celery's ``chain(...)()``)."""
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None) -> AsyncResult[Any] | GroupResult:
        for step in self.tasks[:-1]:
            step.freeze()
        return self.tasks[-1].freeze(_id or self.options.get("task_id"))


class group(Canvas):  # noqa: N801 - Celery's name
    """Tasks run in parallel; ``apply_async`` returns a ``GroupResult`` (results in order).

    Options of the group are defaults for every member (``link``/``link_error`` included);
    ``task_id`` is the group's id.
    """

    def __init__(self, *tasks: Canvas | Iterable[Canvas], options: Mapping[str, Any] | None = None,
                 app: App | None = None) -> None:
        self.tasks: tuple[Canvas, ...] = tuple(_canvas_args(tasks, "group"))
        self.options = _normalize(options or {})
        self.app = app

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def __len__(self) -> int:
        return len(self.tasks)

    def _natask(self) -> App:
        if self.app is not None:
            return self.app
        if not self.tasks:
            raise ConfigError("an empty group does not know its app: pass group([], app=app)")
        return self.tasks[0]._natask()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "group", "tasks": [t.to_dict() for t in self.tasks], "options": self.options}

    def _with_options(self, options: dict[str, Any]) -> group:
        return group(self.tasks, options=options, app=self.app)

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        """Send the group (Celery's ``group(...)()``)."""
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None) -> GroupResult:
        group_id = _id or self.options.get("task_id") or new_id()
        self.options["task_id"] = check_task_id(group_id)
        results: list[AsyncResult[Any] | ResultSet] = []
        for t in self.tasks:
            handle = t.freeze()
            if isinstance(t, group) and isinstance(handle, GroupResult):
                results.extend(handle.results)  # nested groups are unrolled, as the Freezer does
            else:
                results.append(handle)
        return GroupResult(self._natask(), group_id, results)

    def link(self, callback: Canvas) -> Canvas:
        """Celery's ``group.link``: an immutable copy of ``callback`` linked to the first member only
        (use a chord to run something after every member)."""
        if not self.tasks:
            raise ConfigError("cannot link to an empty group")
        copy = callback
        if isinstance(callback, Signature):
            copy = Signature(callback.app, callback.task, callback.args, callback.kwargs, callback.options, True)
        return self.tasks[0].link(copy)

    def apply(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
              throw: bool | None = None, **options: Any) -> GroupResult:
        """Run every member now, in this thread (see ``Canvas.apply``)."""
        return super().apply(args, kwargs, throw=throw, **options)  # type: ignore[return-value]

    def __or__(self, other: Canvas) -> Canvas:
        if not isinstance(other, Canvas):
            return NotImplemented
        return chain(self, other) if isinstance(other, group) else chord(self, other)

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> GroupResult:
        return await self.aapply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> GroupResult:
        return self._natask().client.portal.run(self.aapply_async(args, kwargs, **options))

    async def aapply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                           **options: Any) -> GroupResult:
        return await super().aapply_async(args, kwargs, **options)  # type: ignore[return-value]


_Group = group


class chunks(group):  # noqa: N801 - Celery's name
    """``task.chunks(it, n)``: the items of ``it`` (tuples of arguments) in parts of ``n``, each part one
    ``natask.starmap`` task; a group whose result is a list of lists."""

    def __init__(self, app: App, task: str, it: Iterable[Sequence[Any]], n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"chunks() needs a part size n >= 1, got {n!r}")
        items = [list(item) for item in it]
        queue = app.tasks[task].queue if task in app.tasks else None
        options = {"queue": queue} if queue else {}
        parts: list[Canvas] = [Signature(app, "natask.starmap", (task, items[i:i + n]), None, options)
                               for i in range(0, len(items), n)]
        super().__init__(parts, app=app)

    def group(self) -> _Group:
        """The plain group of the parts (Celery's ``chunks.group()``)."""
        return group(self.tasks, options=self.options, app=self.app)


class chord(Canvas):  # noqa: N801 - Celery's name
    """A group (the header) whose results, as a list in header order, go to one callback (the body)
    once every member succeeded. A failed member fails the chord: the body never runs, its
    ``link_error`` callbacks do, and the chord's result (the body's) carries the member's error.

    Options of the chord are defaults for header and body; ``countdown``/``eta`` delay only the
    header, ``link``/``link_error``/``task_id`` belong to the body.
    """

    def __init__(self, header: group | Iterable[Canvas], body: Canvas,
                 options: Mapping[str, Any] | None = None) -> None:
        self.header = header if isinstance(header, group) else group(header)
        if not isinstance(body, Canvas):
            raise TypeError(f"a chord's body must be a signature, got {type(body).__name__}")
        self.body = body
        self.options = _normalize(options or {})

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def _natask(self) -> App:
        return self.body._natask()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chord", "header": self.header.to_dict(), "body": self.body.to_dict(),
                "options": self.options}

    def _with_options(self, options: dict[str, Any]) -> chord:
        return chord(self.header, self.body, options=options)

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult[Any] | GroupResult:
        """Send the chord."""
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None) -> AsyncResult[Any] | GroupResult:
        self.header.freeze()
        return self.body.freeze(_id or self.options.get("task_id"))

    def link(self, callback: Canvas) -> Canvas:
        """Link ``callback`` to the body (Celery's rule)."""
        return self.body.link(callback)


def from_dict(app: App, data: Mapping[str, Any]) -> Canvas:
    """Rebuild a signature, chain, group or chord from ``to_dict`` data."""
    kind = data.get("kind")
    options = data.get("options")
    if kind is None:
        return Signature.from_dict(app, data)
    if kind == "chain":
        return chain([from_dict(app, t) for t in data["tasks"]], options=options)
    if kind == "group":
        return group([from_dict(app, t) for t in data["tasks"]], options=options, app=app)
    if kind == "chord":
        header = from_dict(app, data["header"])
        if not isinstance(header, group):
            raise ValueError("a chord's header must be a group")
        return chord(header, from_dict(app, data["body"]), options=options)
    raise ValueError(f"unknown canvas kind {kind!r}")


def callback_freezer(app: App) -> Callable[[Mapping[str, Any]], Node]:
    """Freezes callback data (``link``/``link_error``) that receives one value when it runs."""
    return lambda data: Freezer(app, check=False).freeze(from_dict(app, data), entry=False)


def _canvas_args(tasks: tuple[Canvas | Iterable[Canvas], ...], what: str) -> list[Canvas]:
    items: Iterable[Any] = tasks
    if len(tasks) == 1 and not isinstance(tasks[0], Canvas):
        items = tasks[0]  # group(generator) / chain([a, b])
    out = list(items)
    for item in out:
        if not isinstance(item, Canvas):
            raise TypeError(f"{what}() takes signatures (task.s(...)), got {type(item).__name__}")
    return out


def _normalize(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    for key in CALLBACK_OPTIONS:
        if key in out:
            out[key] = callbacks(out[key])
    return out


def callbacks(value: Any) -> list[dict[str, Any]]:
    """``link``/``link_error`` values as a list of canvas dicts."""
    if value is None:
        return []
    if isinstance(value, (Canvas, Mapping)):
        value = [value]
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"link/link_error take signatures, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, Canvas):
            out.append(item.to_dict())
        elif isinstance(item, Mapping):
            out.append(dict(item))
        else:
            raise TypeError(f"link/link_error take signatures, got {type(item).__name__}")
    return out


# -- freezing: ids and options resolved, arguments checked ----------------------------------------
class Freezer:
    """Turns a canvas into nodes. ``entry`` parts are published first with exactly the arguments
    given (the caller checks those); every other part receives exactly one value when it runs
    (a parent's result, a chord's result list, or a failed task's id), which is what ``check``
    validates against the task's signature."""

    def __init__(self, app: App, ids: Callable[[], str] = new_id, check: bool = True) -> None:
        self.app = app
        self.ids = ids
        self.check = check

    def freeze(self, obj: Canvas, inherited: Mapping[str, Any] | None = None, entry: bool = True) -> Node:
        inherited = inherited or {}
        if isinstance(obj, Signature):
            return self._signature(obj, inherited, entry)
        own = dict(obj.options)
        links = [*callbacks(own.pop("link", None)), *inherited.get("link", ())]
        errbacks = [*callbacks(own.pop("link_error", None)), *inherited.get("link_error", ())]
        task_id = inherited.get("task_id") or own.pop("task_id", None)
        own.pop("task_id", None)
        if task_id:
            check_task_id(task_id)  # before anything is published: it names a group's result too
        opts = {k: v for k, v in inherited.items() if k not in CALLBACK_OPTIONS and k != "task_id"}
        opts.update(own)
        later = {k: v for k, v in opts.items() if k not in _FIRST_ONLY}
        if isinstance(obj, chain):
            nodes = []
            last = len(obj.tasks) - 1
            for i, step in enumerate(obj.tasks):
                inh: dict[str, Any] = {**(opts if i == 0 else later), "link_error": errbacks}
                if i == last:
                    inh["link"] = links
                    if task_id:
                        inh["task_id"] = task_id
                nodes.append(self.freeze(step, inh, entry and i == 0))
            return {"kind": "chain", "tasks": nodes}
        if isinstance(obj, group):
            members: list[Node] = []
            for t in obj.tasks:
                member = self.freeze(t, {**opts, "link": links, "link_error": errbacks}, entry)
                # Nested groups are unrolled into one (Celery's rule): their results come flat.
                members.extend(member["tasks"] if member.get("kind") == "group" else [member])
            return {"kind": "group", "id": task_id or self.ids(), "tasks": members}
        if isinstance(obj, chord):
            header = self.freeze(obj.header, opts, entry)
            body_inh: dict[str, Any] = {**later, "link": links, "link_error": errbacks}
            if task_id:
                body_inh["task_id"] = task_id
            body = self.freeze(obj.body, body_inh, entry=False)
            return {"kind": "chord", "id": header["id"], "header": header["tasks"], "body": body}
        raise TypeError(f"cannot send {type(obj).__name__}")

    def _signature(self, sig: Signature[Any], inherited: Mapping[str, Any], entry: bool) -> Node:
        own = dict(sig.options)
        links = [*callbacks(own.pop("link", None)), *inherited.get("link", ())]
        errbacks = [*callbacks(own.pop("link_error", None)), *inherited.get("link_error", ())]
        own_id = own.pop("task_id", None)
        if own_id:
            check_task_id(own_id)
        opts = {k: v for k, v in inherited.items() if k in CALL_OPTIONS and k != "task_id"}
        opts.update(own)
        unknown = sorted(set(opts) - CALL_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) for {sig.task}: {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(CALL_OPTIONS | CALLBACK_OPTIONS))})")
        opts = {k: v for k, v in opts.items() if v is not None}
        task = self.app.tasks.get(sig.task)
        if task is not None:
            _task_defaults(opts, task.options)
            if self.check and not entry:
                task.check_args(sig.args if sig.immutable else (None, *sig.args), sig.kwargs)
        if "queue" not in opts:
            opts["queue"] = self.app.client.default_queue(sig.task, sig.args, sig.kwargs, opts)
        if self.check and not entry:
            try:
                dumps([sig.args, sig.kwargs])
            except EncodeError:
                raise EncodeError(f"cannot send {sig.task}: {find_unencodable(sig.args, sig.kwargs)}") from None
        node: Node = {"task": sig.task, "args": list(sig.args), "kwargs": dict(sig.kwargs), "options": opts,
                      "immutable": sig.immutable, "id": inherited.get("task_id") or own_id or self.ids()}
        if self.check:
            for callback in (*links, *errbacks):  # each receives one value: a result or a task id
                if callback in errbacks and new_style_errback(self.app, callback):
                    continue  # called with (request, exc, traceback) instead
                Freezer(self.app, new_id).freeze(from_dict(self.app, callback), entry=False)
        if links:
            node["link"] = links
        if errbacks:
            node["link_error"] = errbacks
        return node


def _task_defaults(opts: dict[str, Any], options: TaskOptions) -> None:
    """A registered task's own options, under those the signature and its containers give."""
    if options.queue:
        opts.setdefault("queue", options.queue)
    opts.setdefault("ignore_result", options.ignore_result)
    if options.expires is not None:
        opts.setdefault("expires", options.expires)
    if options.priority:
        opts.setdefault("priority", options.priority)
