"""Eager execution (``Task.apply``, ``always_eager``): tasks and workflows run in-process with NO server.

The app points at a port nothing listens on with a short connect timeout: any connection attempt
would raise ``BrokerError``, so passing tests prove that eager mode never connects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from natask import EagerResult, GroupResult, Natask, chain, chord, group
from natask.errors import ConfigError
from natask.options import Request


class Boom(Exception):
    pass


@pytest.fixture
def app() -> Iterator[Natask]:
    app = Natask("eager", servers="nats://127.0.0.1:1", connect_timeout=0.2, always_eager=True)
    yield app
    app.close()


def test_delay_runs_in_process_without_a_server(app: Natask) -> None:
    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, 3)
    assert isinstance(result, EagerResult)
    assert (result.get(), result.state, result.result, result.ready(), result.successful(), result.failed()) == (
        5, "SUCCESS", 5, True, True, False)
    assert add.apply_async((1, 1), countdown=30).get() == 2  # Celery's eager mode: no countdown
    assert app.send_task(add.name, (4, 4)).get() == 8
    assert [r.get() for r in add.delay_many([(1, 2), (3, 4)])] == [3, 7]
    assert asyncio.run(add.aapply_async((5, 5))).get() == 10


def test_apply_without_always_eager_and_request(app: Natask) -> None:
    app.always_eager = False
    seen: list[Request] = []

    @app.task(name="e.who", bind=True)
    def who(self: Any, x: int) -> int:
        seen.append(self.request)
        return x * 2

    result = who.apply((21,), task_id="a" * 32, headers={"k": "v"})
    assert result.get() == 42 and result.id == "a" * 32
    assert (seen[0].id, seen[0].task, seen[0].args, seen[0].headers) == ("a" * 32, who.name, (21,), {"k": "v"})


def test_retry_runs_again_at_once_up_to_max_retries(app: Natask) -> None:
    runs: list[int] = []

    @app.task(name="e.flaky", bind=True, max_retries=3)
    def flaky(self: Any, ok_after: int) -> str:
        runs.append(self.request.retries)
        if self.request.retries < ok_after:
            raise self.retry(countdown=60)
        return "done"

    result = flaky.delay(2)
    assert (result.get(), result.retries, runs) == ("done", 2, [0, 1, 2])
    runs.clear()
    failed = flaky.delay(10)
    assert failed.failed() and runs == [0, 1, 2, 3]


def test_failure_returns_failed_result_or_raises_with_propagates(app: Natask) -> None:
    @app.task(name="e.bad")
    def bad() -> None:
        raise Boom("no")

    result = bad.delay()
    assert result.state == "FAILURE" and result.failed() and isinstance(result.result, Boom)
    assert "Boom: no" in (result.traceback or "")
    with pytest.raises(Boom):
        result.get()
    assert isinstance(result.get(propagate=False), Boom)
    app.eager_propagates = True
    with pytest.raises(Boom):
        bad.delay()
    with pytest.raises(Boom):
        bad.apply()
    assert bad.apply(throw=False).failed()


def test_async_task_runs_eagerly_from_sync_and_async_code(app: Natask) -> None:
    @app.task(name="e.double")
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert double.delay(4).get() == 8

    async def main() -> int:
        return (await double.adelay(5)).get()

    assert asyncio.run(main()) == 10


def test_canvas_runs_eagerly(app: Natask) -> None:
    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.total")
    def total(xs: list[int]) -> int:
        return sum(xs)

    assert chain(add.s(1, 1), add.s(10), add.s(100)).delay().get() == 112
    res = group(add.s(1, 10), group(add.s(1, 100), group(add.s(1, 1000), add.s(1, 2000)))).delay()
    assert isinstance(res, GroupResult) and res.get() == [11, 101, 1001, 2001]  # nested groups unrolled
    assert res.completed_count() == 4 and res.ready()
    assert chord([add.s(i, i) for i in range(3)], total.s()).delay().get() == 6
    assert (add.s(1, 1) | group(add.s(1), add.s(2)) | total.s()).delay().get() == 7


def test_links_and_errbacks_old_and_new_style(app: Natask) -> None:
    got: list[Any] = []

    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.bad")
    def bad() -> None:
        raise Boom("x")

    @app.task(name="e.record")
    def record(value: Any) -> None:
        got.append(("link", value))

    @app.task(name="e.on_fail")
    def on_fail(task_id: str) -> None:
        got.append(("old", task_id))

    @app.task(name="e.on_fail_new")
    def on_fail_new(request: Request, exc: BaseException, traceback: str) -> None:
        got.append(("new", request.id, type(exc).__name__, "Boom" in traceback))

    add.apply_async((1, 2), link=record.s())
    assert got == [("link", 3)]
    got.clear()
    failed = bad.s().on_error(on_fail.s())
    failed.link_error(on_fail_new.s())
    res = failed.delay()
    assert got == [("old", res.id), ("new", res.id, "Boom", True)]
    got.clear()
    sig = add.s(2, 2)
    assert sig.link(record.s()) == record.s()
    sig.delay()
    assert got == [("link", 4)]
    got.clear()
    g = group(add.s(1, 1), add.s(2, 2))
    g.link(record.s("first"))
    g.delay()
    assert got == [("link", "first")]  # Celery's group.link: immutable, on the first member


def test_signature_call_freeze_and_app_signature(app: Natask) -> None:
    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    assert add.s(2)(3) == 5 and add.si(1, 1)(9) == 2  # sig() calls the function here
    sig = add.signature((1, 2), queue="q1", countdown=3)
    assert (sig.args, sig.options["queue"], sig.options["countdown"]) == ((1, 2), "q1", 3)
    assert app.signature(add.name, (3, 4)).delay().get() == 7
    frozen = sig.freeze()
    assert sig.delay().id == frozen.id
    g = group(add.s(1, 1), group(add.s(2, 2)))
    handle = g.freeze()
    assert isinstance(handle, GroupResult) and len(handle) == 2
    assert [r.id for r in g.delay()] == [r.id for r in handle]  # type: ignore[union-attr]


def test_map_starmap_chunks_eagerly(app: Natask) -> None:
    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.square")
    def square(x: int) -> int:
        return x * x

    assert square.map([1, 2, 3]).delay().get() == [1, 4, 9]
    assert add.starmap([(1, 1), (2, 2)]).delay().get() == [2, 4]
    assert add.chunks([(i, i) for i in range(5)], 2).delay().get() == [[0, 2], [4, 6], [8]]
    assert add.chunks([(1, 1)], 1).group().delay().get() == [[2]]
    with pytest.raises(ConfigError):
        add.chunks([(1, 1)], 0)
    assert "natask.map" not in app.tasks and "natask.map" in app.builtins


def test_chain_stops_at_a_failure(app: Natask) -> None:
    ran: list[int] = []

    @app.task(name="e.step")
    def step(x: int) -> int:
        ran.append(x)
        if x == 2:
            raise Boom("stop")
        return x + 1

    res = chain(step.s(1), step.s(), step.s()).delay()
    assert ran == [1, 2] and res.failed() and isinstance(res.result, Boom)


def test_always_eager_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATASK_ALWAYS_EAGER", "true")
    monkeypatch.setenv("NATASK_EAGER_PROPAGATES", "0")
    app = Natask("env", servers="nats://127.0.0.1:1")
    assert (app.always_eager, app.eager_propagates) == (True, False)
    monkeypatch.setenv("NATASK_ALWAYS_EAGER", "maybe")
    with pytest.raises(ConfigError, match="NATASK_ALWAYS_EAGER"):
        Natask("env", servers="nats://127.0.0.1:1")
    with pytest.raises(ConfigError, match="always_eager"):
        Natask("env", servers="nats://127.0.0.1:1", always_eager="yes")  # type: ignore[arg-type]


def test_replace_eagerly(app: Natask) -> None:
    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.fan", bind=True)
    def fan(self: Any, n: int, how: str) -> Any:
        if how == "task":
            return self.replace(add.s(n, 1))
        if how == "chain":
            return self.replace(add.s(n, 1) | add.s(100))
        return self.replace(group(add.s(n, 1), add.s(n, 2)))

    res = fan.delay(1, "task")
    assert res.get() == 2 and res.task_name == "e.fan"
    assert fan.delay(1, "chain").get() == 102
    assert fan.delay(1, "group").get() == [2, 3]
    assert chain(fan.s(1, "task"), add.s(10)).delay().get() == 12
    with pytest.raises(RuntimeError):
        fan.replace(add.s(1, 1))  # only inside a running task
