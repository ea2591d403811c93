"""Planning a workflow without I/O: a frozen workflow as plain data (``Node``), its ids, and its
expansion into the messages to publish now, each carrying what runs after it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

Node = dict[str, Any]
"""A frozen workflow part as plain data (ids assigned, options resolved): what messages carry."""

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
