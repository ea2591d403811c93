"""Canvas: signatures (a task call as data); chains, groups and chords build on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .naming import check_task_name

if TYPE_CHECKING:
    from .app import Natask
    from .result import AsyncResult

R = TypeVar("R")


class Signature(Generic[R]):
    """A task call as data: name, arguments and call options; serialisable with ``to_dict``.

    ``immutable`` signatures (``task.si(...)``) ignore a parent's result in a chain.
    """

    def __init__(
        self,
        app: Natask,
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
        self.options = dict(options or {})
        self.immutable = immutable

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}{'.si' if self.immutable else '.s'}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.task, self.args, self.immutable))

    def to_dict(self) -> dict[str, Any]:
        """The signature as plain data (what travels in messages)."""
        return {"task": self.task, "args": list(self.args), "kwargs": self.kwargs, "options": self.options,
                "immutable": self.immutable}

    @classmethod
    def from_dict(cls, app: Natask, data: Mapping[str, Any]) -> Signature[Any]:
        return cls(app, data["task"], data.get("args", ()), data.get("kwargs"), data.get("options"),
                   bool(data.get("immutable", False)))

    def set(self, **options: Any) -> Signature[R]:
        """A copy with call options (queue, countdown, expires, ...) added."""
        return Signature(self.app, self.task, self.args, self.kwargs, {**self.options, **options}, self.immutable)

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Signature[R]:
        """A copy with ``args`` prepended and ``kwargs`` merged (unless immutable)."""
        if self.immutable:
            return Signature(self.app, self.task, self.args, self.kwargs, self.options, True)
        return Signature(self.app, self.task, (*args, *self.args), {**self.kwargs, **(kwargs or {})},
                         self.options, False)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        """Enqueue this call (extra arguments as ``clone``)."""
        return self.clone(args, kwargs).apply_async()

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        return await self.clone(args, kwargs).aapply_async()

    def apply_async(self, **options: Any) -> AsyncResult[R]:
        """Enqueue with the signature's options overridden by ``options``."""
        return self.app._portal.run(self.aapply_async(**options))

    async def aapply_async(self, **options: Any) -> AsyncResult[R]:
        opts = {**self.options, **options}
        task = self.app.tasks.get(self.task)
        if task is not None:
            task.check_args(self.args, self.kwargs)
            opts.setdefault("queue", task.queue)
            opts.setdefault("ignore_result", task.options.ignore_result)
            if task.options.expires is not None:
                opts.setdefault("expires", task.options.expires)
        opts.setdefault("queue", self.app.config.default_queue)
        call = self.app._prepare(self.task, self.args, self.kwargs, **opts)
        return await self.app._apublish(call)  # type: ignore[return-value]


async def on_outcome(worker: Any, envelope: Any, record: dict[str, Any]) -> None:
    """Workflow follow-ups of a finished task (links, chain steps, chord counting).

    Called by the worker before it stores the outcome and acks. Not built yet: canvas is the
    next issue; no envelope carries links or meta until then.
    """
