"""Signatures as data: to_dict/from_dict, clone, set, repr (no server)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest

from natask import ConfigError, Natask
from natask.canvas import Signature
from natask.message import dumps, loads


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("t", servers="nats://127.0.0.1:1")
    yield a
    a.close()


def test_to_dict(app: Natask) -> None:
    s: Signature[Any] = Signature(app, "t.add", (1, 2), {"z": 3}, {"queue": "fast"})
    assert s.to_dict() == {
        "task": "t.add",
        "args": [1, 2],
        "kwargs": {"z": 3},
        "options": {"queue": "fast"},
        "immutable": False,
    }


@pytest.mark.parametrize("immutable", [False, True])
def test_round_trip_through_dict_and_wire(app: Natask, immutable: bool) -> None:
    s: Signature[Any] = Signature(
        app, "t.add", (1, date(2024, 1, 2)), {"z": (3, 4)}, {"countdown": 5}, immutable=immutable
    )
    back = Signature.from_dict(app, loads(dumps(s.to_dict())))
    assert back == s
    assert back.args == (1, date(2024, 1, 2))
    assert back.kwargs == {"z": (3, 4)}
    assert back.options == {"countdown": 5}
    assert back.immutable is immutable
    assert back.app is app


def test_from_dict_minimal(app: Natask) -> None:
    s = Signature.from_dict(app, {"task": "t.x"})
    assert (s.task, s.args, s.kwargs, s.options, s.immutable) == ("t.x", (), {}, {}, False)


def test_from_dict_validates_task_name(app: Natask) -> None:
    with pytest.raises(ConfigError):
        Signature.from_dict(app, {"task": "bad name"})


def test_equality_distinguishes_fields(app: Natask) -> None:
    base: Signature[Any] = Signature(app, "t.add", (1,), {"a": 1})
    assert base == Signature(app, "t.add", [1], {"a": 1})
    assert base != Signature(app, "t.add", (2,), {"a": 1})
    assert base != Signature(app, "t.add", (1,), {"a": 2})
    assert base != Signature(app, "t.other", (1,), {"a": 1})
    assert base != Signature(app, "t.add", (1,), {"a": 1}, immutable=True)
    assert base != Signature(app, "t.add", (1,), {"a": 1}, {"queue": "q"})
    assert base != "t.add"


def test_clone_prepends_args_and_merges_kwargs(app: Natask) -> None:
    s: Signature[Any] = Signature(app, "t.add", (3,), {"a": 1, "b": 2}, {"queue": "q"})
    c = s.clone((1, 2), {"b": 20, "c": 30})
    assert c.args == (1, 2, 3)
    assert c.kwargs == {"a": 1, "b": 20, "c": 30}
    assert c.options == {"queue": "q"}
    assert c.immutable is False
    # the original is untouched
    assert s.args == (3,) and s.kwargs == {"a": 1, "b": 2}


def test_clone_of_immutable_ignores_new_arguments(app: Natask) -> None:
    s: Signature[Any] = Signature(app, "t.add", (3,), {"a": 1}, immutable=True)
    c = s.clone((1, 2), {"b": 2})
    assert c.args == (3,)
    assert c.kwargs == {"a": 1}
    assert c.immutable is True
    assert c is not s


def test_clone_copies_containers(app: Natask) -> None:
    s: Signature[Any] = Signature(app, "t.add", (), {"a": 1}, {"queue": "q"})
    c = s.clone()
    c.kwargs["a"] = 99
    c.options["queue"] = "other"
    assert s.kwargs == {"a": 1}
    assert s.options == {"queue": "q"}


def test_set_adds_options_without_mutating(app: Natask) -> None:
    s: Signature[Any] = Signature(app, "t.add", (1,), options={"queue": "q"})
    t = s.set(countdown=10, queue="fast")
    assert t.options == {"queue": "fast", "countdown": 10}
    assert s.options == {"queue": "q"}
    assert (t.args, t.immutable) == ((1,), False)


def test_repr(app: Natask) -> None:
    assert repr(Signature(app, "t.add", (1, "x"), {"k": None})) == "t.add.s(1, 'x', k=None)"
    assert repr(Signature(app, "t.add", (), immutable=True)) == "t.add.si()"


def test_task_s_and_si_match_signature(app: Natask) -> None:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    assert add.s(1, y=2) == Signature(app, "t.add", (1,), {"y": 2})
    assert add.si(1, 2) == Signature(app, "t.add", (1, 2), immutable=True)
    assert repr(add.si(1, 2)) == "t.add.si(1, 2)"


def test_hashable_and_consistent_with_equality(app: Natask) -> None:
    a: Signature[Any] = Signature(app, "t.add", (1,))
    b: Signature[Any] = Signature(app, "t.add", [1])
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
