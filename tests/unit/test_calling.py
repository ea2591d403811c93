"""Calling a task without a server: validation and encoding happen at ``.delay()``, before any I/O.

``_apublish`` is replaced by a recorder, so a call that wrongly got past validation is seen (and
never tries to connect)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from natask import AsyncResult, ConfigError, EncodeError, Natask
from natask.message import Call, Envelope
from natask.naming import HDR_MSG_ID, HDR_TASK


@dataclass
class Address:
    street: str
    zip: str


@dataclass
class User:
    id: int
    name: str
    address: Address
    tags: list[str] = field(default_factory=list)


@dataclass
class Order:
    order_id: uuid.UUID
    user: User
    lines: tuple[int, ...] = ()


class Offline:
    """An app whose publishes are recorded instead of sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.app = Natask("t", servers="nats://127.0.0.1:1")
        self.published: list[Call] = []

        async def apublish(call: Call) -> AsyncResult[Any]:
            self.published.append(call)
            return AsyncResult(self.app, call.task_id, call.task)

        async def apublish_many(calls: list[Call]) -> list[AsyncResult[Any]]:
            return [await apublish(c) for c in calls]

        monkeypatch.setattr(self.app.client, "publish", apublish)
        monkeypatch.setattr(self.app.client, "publish_many", apublish_many)

    def envelopes(self) -> list[Envelope]:
        return [Envelope.decode(c.payload, c.headers) for c in self.published]


@pytest.fixture
def off(monkeypatch: pytest.MonkeyPatch) -> Iterator[Offline]:
    o = Offline(monkeypatch)
    yield o
    o.app.close()


def prepare(task: Any, *args: Any, **kwargs: Any) -> Call:
    call: Call = task._prepare(args, kwargs, None, None, None, None, None, None)
    return call


# -- EncodeError ----------------------------------------------------------------------------


def test_unencodable_kwarg_fails_at_delay_naming_it(off: Offline) -> None:
    @off.app.task(name="t.greet")
    def greet(user: Any) -> None:
        pass

    with pytest.raises(EncodeError) as info:
        greet.delay(user=object())
    assert "'user'" in str(info.value)
    assert "t.greet" in str(info.value)
    assert off.published == []


def test_unencodable_positional_fails_naming_it(off: Offline) -> None:
    @off.app.task(name="t.pair")
    def pair(a: Any, user: Any) -> None:
        pass

    with pytest.raises(EncodeError) as info:
        pair.delay(1, object())
    message = str(info.value)
    assert "positional argument 1" in message or "'user'" in message
    assert "object" in message
    assert off.published == []


def test_unencodable_value_nested_in_a_container_names_the_argument(off: Offline) -> None:
    @off.app.task(name="t.items")
    def items(ok: int, items: list[Any]) -> None:
        pass

    with pytest.raises(EncodeError, match="'items'"):
        items.delay(1, items=[1, {"deep": {1, 2, object()}}])
    assert off.published == []


async def test_unencodable_fails_at_adelay_too(off: Offline) -> None:
    @off.app.task(name="t.agreet")
    async def agreet(user: Any) -> None:
        pass

    with pytest.raises(EncodeError, match="'user'"):
        await agreet.adelay(user=lambda: None)
    assert off.published == []


def test_encode_error_is_also_a_type_error(off: Offline) -> None:
    @off.app.task(name="t.te")
    def te(x: Any) -> None:
        pass

    with pytest.raises(TypeError):
        prepare(te, x=object())


def test_send_task_encodes_before_io(off: Offline) -> None:
    with pytest.raises(EncodeError, match="'blob'"):
        off.app.send_task("any.task", kwargs={"blob": object()})
    assert off.published == []


# -- TypeError: arguments that do not bind ---------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs",
    [((), {}), ((1,), {}), ((1, 2, 3), {}), ((1,), {"x": 2}), ((1, 2), {"z": 3})],
    ids=["none", "missing", "extra", "twice", "unknown-kw"],
)
def test_arguments_that_do_not_bind_fail_at_delay(off: Offline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    @off.app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match=r"t\.add") as info:
        add.delay(*args, **kwargs)
    assert not isinstance(info.value, EncodeError)
    assert off.published == []


def test_delay_many_checks_every_item_before_publishing(off: Offline) -> None:
    @off.app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match=r"t\.add"):
        add.delay_many([(1, 2), (3, 4), (5,)])
    with pytest.raises(TypeError, match="tuple"):
        add.delay_many([(1, 2), "ab"])  # type: ignore[list-item]
    with pytest.raises(EncodeError):
        add.delay_many([(1, 2), (3, object())])
    assert off.published == []


def test_delay_many_publishes_one_call_per_item_in_order(off: Offline) -> None:
    @off.app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    results = add.delay_many([(1, 2), {"x": 3, "y": 4}, [5, 6]])
    envs = off.envelopes()
    assert [r.id for r in results] == [e.id for e in envs]
    assert len({r.id for r in results}) == 3
    assert [(e.args, e.kwargs) for e in envs] == [([1, 2], {}), ([], {"x": 3, "y": 4}), ([5, 6], {})]


def test_bind_task_skips_self_when_binding(off: Offline) -> None:
    @off.app.task(name="t.bound", bind=True)
    def bound(self: Any, order_id: int) -> int:
        return order_id

    call = prepare(bound, 42)
    assert Envelope.decode(call.payload).args == [42]
    with pytest.raises(TypeError, match=r"t\.bound"):
        prepare(bound)
    with pytest.raises(TypeError, match=r"t\.bound"):
        prepare(bound, 1, 2)
    assert bound.bind_call([5], {}) == ((5,), {})


def test_send_task_never_consults_the_registry(off: Offline) -> None:
    @off.app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    off.app.send_task("t.add", args=(1, 2, 3))  # would not bind locally; send_task does not check
    off.app.send_task("elsewhere.task", args=(1,), queue="other")
    (first, second) = off.published
    assert (first.task, first.queue) == ("t.add", "default")
    assert (second.task, second.queue) == ("elsewhere.task", "other")
    assert Envelope.decode(first.payload).args == [1, 2, 3]


# -- what a call puts on the wire -----------------------------------------------------------


def test_delay_encodes_an_envelope_with_headers(off: Offline) -> None:
    @off.app.task(name="orders.process", queue="orders")
    def process(order_id: int, note: str = "") -> None:
        pass

    result = process.delay(7, note="rush")
    (call,) = off.published
    env = Envelope.decode(call.payload, call.headers)
    assert result.id == call.task_id == env.id
    assert env.task == "orders.process"
    assert (env.args, env.kwargs) == ([7], {"note": "rush"})
    assert call.queue == "orders"
    assert call.headers[HDR_MSG_ID] == env.id
    assert set(call.headers) == {HDR_MSG_ID}  # the version travels in the body, the name in the subject
    assert env.eta is None and env.expires is None


def test_task_ids_are_unique(off: Offline) -> None:
    @off.app.task(name="t.x")
    def x() -> None:
        pass

    ids = {prepare(x).task_id for _ in range(50)}
    assert len(ids) == 50


def test_apply_async_options(off: Offline) -> None:
    @off.app.task(name="t.opt", queue="orders")
    def opt(a: int) -> None:
        pass

    before = time.time()
    opt.apply_async((1,), countdown=30, expires=60, task_id="my-id-1", queue="fast", headers={"X-Trace": "abc"})
    after = time.time()
    (call,) = off.published
    env = Envelope.decode(call.payload)
    assert call.task_id == env.id == call.headers[HDR_MSG_ID] == "my-id-1"
    assert call.queue == "fast"
    assert env.eta is not None and before + 30 <= env.eta <= after + 30
    assert call.eta == env.eta
    assert env.expires is not None and before + 60 <= env.expires <= after + 60  # counted from the call (Celery)
    assert call.headers["X-Trace"] == "abc"


def test_eta_and_expires_as_datetimes(off: Offline) -> None:
    @off.app.task(name="t.eta")
    def f() -> None:
        pass

    eta = datetime(2040, 1, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)
    expires = eta + timedelta(hours=1)
    f.apply_async(eta=eta, expires=expires)
    env = Envelope.decode(off.published[0].payload)
    assert env.eta == eta.timestamp()
    assert env.expires == expires.timestamp()


def test_task_expires_option_is_the_default(off: Offline) -> None:
    @off.app.task(name="t.exp", expires=100)
    def f() -> None:
        pass

    before = time.time()
    env = Envelope.decode(prepare(f).payload)
    assert env.expires is not None and before + 100 <= env.expires <= time.time() + 100


@pytest.mark.parametrize(
    "options,error,words",
    [
        ({"countdown": 5, "eta": datetime(2040, 1, 1, tzinfo=timezone.utc)}, ConfigError, "countdown"),
        ({"eta": datetime(2040, 1, 1)}, ConfigError, "timezone-aware"),
        ({"expires": datetime(2040, 1, 1)}, ConfigError, "timezone-aware"),
        ({"countdown": -1}, ConfigError, "countdown"),
        ({"task_id": "a:1"}, ConfigError, "task_id"),
        ({"task_id": "a.b"}, ConfigError, "task_id"),
        ({"task_id": "a b"}, ConfigError, "task_id"),
        ({"queue": "_sched"}, ConfigError, "queue"),
        ({"headers": {"X": 1}}, TypeError, "headers"),
    ],
)
def test_invalid_call_options_fail_before_io(
    off: Offline, options: dict[str, Any], error: type[Exception], words: str
) -> None:
    @off.app.task(name="t.bad")
    def f() -> None:
        pass

    with pytest.raises(error, match=words):
        f.apply_async(**options)
    assert off.published == []


def test_user_headers_cannot_override_natask_headers(off: Offline) -> None:
    @off.app.task(name="t.h")
    def f() -> None:
        pass

    for reserved in (HDR_MSG_ID, HDR_TASK, "nats-rollup", "Natask-Reply"):
        with pytest.raises(ConfigError, match="reserved"):
            f.apply_async(task_id="real", headers={reserved: "forged"})
    f.apply_async(task_id="real", headers={"X-Request": "r-1"})
    call = off.published[0]
    assert call.headers[HDR_MSG_ID] == "real" and call.headers["X-Request"] == "r-1"


def test_signature_delay_checks_registered_task_args(off: Offline) -> None:
    @off.app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match=r"t\.add"):
        add.s(1, 2, 3).delay()
    add.s(1).delay(2)  # clone prepends: (2, 1)
    assert Envelope.decode(off.published[0].payload).args == [2, 1]


# -- dataclasses ----------------------------------------------------------------------------


def place(order: Order, note: Any = None) -> tuple[Order, Any]:
    return order, note


def untyped(order, note=None):  # type: ignore[no-untyped-def]
    return order, note


def make_order() -> Order:
    return Order(uuid.UUID(int=3), User(1, "ann", Address("Main St 1", "10115"), ["vip"]), (1, 2))


def test_dataclass_argument_revives_when_annotated(off: Offline) -> None:
    task = off.app.task(name="t.place")(place)
    order = make_order()
    env = Envelope.decode(prepare(task, order, note=Address("x", "y")).payload)
    assert isinstance(env.args[0], dict)  # on the wire a dataclass is a map
    args, kwargs = task.bind_call(env.args, env.kwargs)
    revived = args[0]
    assert isinstance(revived, Order)
    assert isinstance(revived.user, User)
    assert isinstance(revived.user.address, Address)
    assert revived == order
    assert args[1] == {"street": "x", "zip": "y"}  # annotated Any: stays a dict
    assert kwargs == {}


def test_dataclass_argument_revives_when_passed_by_keyword(off: Offline) -> None:
    task = off.app.task(name="t.place")(place)
    order = make_order()
    env = Envelope.decode(prepare(task, order=order).payload)
    assert env.kwargs["order"]["user"]["name"] == "ann"
    args, _ = task.bind_call(env.args, env.kwargs)
    assert isinstance(args[0], Order)
    assert args[0] == order


def test_dataclass_stays_a_dict_when_not_annotated(off: Offline) -> None:
    task = off.app.task(name="t.untyped")(untyped)
    env = Envelope.decode(prepare(task, make_order()).payload)
    args, _ = task.bind_call(env.args, env.kwargs)
    assert isinstance(args[0], dict)
    assert args[0]["user"]["address"] == {"street": "Main St 1", "zip": "10115"}
    assert args[0]["order_id"] == uuid.UUID(int=3)


def test_dataclass_revival_rejects_unknown_fields(off: Offline) -> None:
    task = off.app.task(name="t.place")(place)
    with pytest.raises(TypeError, match="nope"):
        task.bind_call([{"order_id": uuid.UUID(int=1), "user": None, "nope": 1}], {})


def test_bind_call_reports_unbindable_received_calls(off: Offline) -> None:
    task = off.app.task(name="t.place")(place)
    with pytest.raises(TypeError, match=r"t\.place"):
        task.bind_call([], {"zzz": 1})
