"""Planning a workflow without I/O: freeze it (ids, options, argument checks) and expand it into
the messages to publish now, each carrying what runs after it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigError, EncodeError
from ..message import dumps, find_unencodable
from ..naming import check_task_id
from .signature import CALL_OPTIONS, CALLBACK_OPTIONS, Canvas, Signature, callbacks, chain, chord, from_dict, group

if TYPE_CHECKING:
    from ..app import Natask

Node = dict[str, Any]
"""A frozen workflow part as plain data (ids assigned, options resolved): what messages carry."""

_FIRST_ONLY: Final = frozenset({"countdown", "eta"})
"""Container options that delay only a workflow's first messages, not every later step."""


def new_id() -> str:
    return os.urandom(16).hex()


def derived_id(seed: str) -> str:
    """A task id that is a pure function of ``seed`` (same length and alphabet as a random one), so a
    redelivered message re-publishes its callbacks under the same ids."""
    return hashlib.blake2b(seed.encode(), digest_size=16).hexdigest()


def seeded_ids(seed: str) -> Callable[[], str]:
    """Successive ids derived from ``seed``."""
    count = 0

    def next_id() -> str:
        nonlocal count
        count += 1
        return derived_id(f"{seed}/{count}")

    return next_id


# -- freezing: ids and options resolved, arguments checked ----------------------------------------
class Freezer:
    """Turns a canvas into nodes. ``entry`` parts are published first with exactly the arguments
    given (the caller checks those); every other part receives exactly one value when it runs
    (a parent's result, a chord's result list, or a failed task's id), which is what ``check``
    validates against the task's signature."""

    def __init__(self, app: Natask, ids: Callable[[], str] = new_id, check: bool = True) -> None:
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
            members = [self.freeze(t, {**opts, "link": links, "link_error": errbacks}, entry) for t in obj.tasks]
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
            opts.setdefault("queue", task.queue)
            opts.setdefault("ignore_result", task.options.ignore_result)
            if task.options.expires is not None:
                opts.setdefault("expires", task.options.expires)
            if self.check and not entry:
                task.check_args(sig.args if sig.immutable else (None, *sig.args), sig.kwargs)
        opts.setdefault("queue", self.app.config.default_queue)
        if self.check and not entry:
            try:
                dumps([sig.args, sig.kwargs])
            except EncodeError:
                raise EncodeError(f"cannot send {sig.task}: {find_unencodable(sig.args, sig.kwargs)}") from None
        node: Node = {"task": sig.task, "args": list(sig.args), "kwargs": dict(sig.kwargs), "options": opts,
                      "immutable": sig.immutable, "id": inherited.get("task_id") or own_id or self.ids()}
        if self.check:
            for callback in (*links, *errbacks):  # each receives one value: a result or a task id
                Freezer(self.app, new_id).freeze(from_dict(self.app, callback), entry=False)
        if links:
            node["link"] = links
        if errbacks:
            node["link_error"] = errbacks
        return node


# -- expanding: which messages a node sends now ---------------------------------------------------
@dataclass
class Step:
    """One message to publish: a signature node, its final arguments and what runs after it."""

    sig: Node
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rest: list[Node]
    member: dict[str, Any] | None

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self.rest:
            meta["chain"] = self.rest
        if self.member is not None:
            meta["chord"] = self.member
        errbacks = self.sig.get("link_error")
        if errbacks:
            meta["errbacks"] = errbacks
        return meta


def expand(node: Node, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
           rest: Sequence[Node] = (), member: dict[str, Any] | None = None) -> list[Step]:
    """The messages that start ``node`` given ``args``/``kwargs`` (a parent's result); ``rest`` are
    the chain steps after it and ``member`` the chord it completes a member of, carried along."""
    kwargs = dict(kwargs or {})
    kind = node.get("kind")
    if kind is None:
        if node.get("immutable"):
            call_args, call_kwargs = tuple(node["args"]), dict(node["kwargs"])
        else:
            call_args, call_kwargs = (*args, *node["args"]), {**node["kwargs"], **kwargs}
        return [Step(node, call_args, call_kwargs, list(rest), member)]
    if kind == "chain":
        steps = node["tasks"]
        return expand(steps[0], args, kwargs, [*steps[1:], *rest], member)
    if kind == "group":
        if not rest and member is None:
            return [step for m in node["tasks"] for step in expand(m, args, kwargs)]
        # A group followed by more work is a chord without a body: its list goes on.
        return _expand_chord(node["id"], node["tasks"], None, args, kwargs, rest, member)
    if kind == "chord":
        return _expand_chord(node["id"], node["header"], node["body"], args, kwargs, rest, member)
    raise ValueError(f"unknown canvas kind {kind!r}")


def _expand_chord(chord_id: str, header: Sequence[Node], body: Node | None, args: Sequence[Any],
                  kwargs: Mapping[str, Any], rest: Sequence[Node], up: dict[str, Any] | None) -> list[Step]:
    if not header:  # nothing to wait for: the body gets [] at once
        if body is not None:
            return expand(body, ([],), {}, rest, up)
        if rest:
            return expand(rest[0], ([],), {}, rest[1:], up)
        raise ConfigError("an empty group cannot end a chord header member")
    steps = []
    for i, h in enumerate(header):
        member = {"id": chord_id, "i": i, "n": len(header), "body": body, "rest": list(rest), "up": up}
        steps.extend(expand(h, args, kwargs, (), member))
    return steps


def walk(node: Node) -> Iterator[Node]:
    """Every signature node inside ``node`` (not its callbacks)."""
    kind = node.get("kind")
    if kind is None:
        yield node
    elif kind in ("chain", "group"):
        for t in node["tasks"]:
            yield from walk(t)
    elif kind == "chord":
        for t in node["header"]:
            yield from walk(t)
        yield from walk(node["body"])


def leaves(node: Node) -> list[Node]:
    """The signature nodes whose results make up the node's result."""
    kind = node.get("kind")
    if kind is None:
        return [node]
    if kind == "chain":
        return leaves(node["tasks"][-1])
    if kind == "group":
        return [leaf for t in node["tasks"] for leaf in leaves(t)]
    return leaves(node["body"])
