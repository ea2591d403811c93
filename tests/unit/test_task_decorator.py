"""``@app.task``: names, options, registry, local calls (no server)."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from natask import AsyncTask, ConfigError, Natask, Retry, Task, TaskNotFound
from natask.task import TaskOptions


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("t", servers="nats://127.0.0.1:1")
    yield a
    a.close()


def module_level_add(x: int, y: int) -> int:
    return x + y


async def module_level_async(x: int) -> int:
    await asyncio.sleep(0)
    return x * 10


class Holder:
    @staticmethod
    def method(x: int) -> int:
        return -x


def test_bare_decorator_default_name(app: Natask) -> None:
    task = app.task(module_level_add)
    assert isinstance(task, Task) and not isinstance(task, AsyncTask)
    assert task.name == f"{module_level_add.__module__}.module_level_add"
    assert task.name.endswith("test_task_decorator.module_level_add")
    assert app.tasks[task.name] is task
    assert app.get_task(task.name) is task


def test_default_name_uses_qualname(app: Natask) -> None:
    task = app.task(Holder.method)
    assert task.name == f"{__name__}.Holder.method"


def test_decorator_with_options(app: Natask) -> None:
    task = app.task(
        name="orders.process",
        queue="orders",
        max_retries=5,
        autoretry_for=[IOError],
        retry_backoff=timedelta(seconds=2),
        retry_backoff_max=300,
        retry_jitter=False,
        time_limit=timedelta(minutes=1),
        expires=3600,
        ignore_result=True,
    )(module_level_add)
    assert task.name == "orders.process"
    assert task.queue == "orders"
    assert task.options == TaskOptions(
        queue="orders",
        max_retries=5,
        autoretry_for=(OSError,),
        retry_backoff=2.0,
        retry_backoff_max=300.0,
        retry_jitter=False,
        time_limit=60.0,
        expires=3600.0,
        ignore_result=True,
    )


def test_decorator_with_parentheses_and_no_options(app: Natask) -> None:
    task = app.task()(module_level_add)
    assert task.name == f"{__name__}.module_level_add"
    assert task.options == TaskOptions()
    assert task.queue == "default"


def test_task_queue_defaults_to_app_default_queue() -> None:
    a = Natask("t", servers="nats://127.0.0.1:1", default_queue="bulk")
    try:
        assert a.task(name="t.x")(module_level_add).queue == "bulk"
        assert a.task(name="t.y", queue="fast")(module_level_add).queue == "fast"
    finally:
        a.close()


def test_async_def_gives_async_task(app: Natask) -> None:
    task = app.task(module_level_async)
    assert isinstance(task, AsyncTask)
    assert task.is_async
    assert not app.task(name="t.sync")(module_level_add).is_async


def test_main_module_task_warns(app: Natask) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def job(x):\n    return x\n", namespace)
    fn = namespace["job"]
    assert fn.__module__ == "__main__"
    with pytest.warns(UserWarning, match="__main__") as record:
        task = app.task(fn)
    assert "name=" in str(record[0].message)
    assert task.name == "__main__.job"


def test_main_module_task_with_explicit_name_does_not_warn(app: Natask) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def job(x):\n    return x\n", namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task = app.task(name="jobs.job")(namespace["job"])
    assert task.name == "jobs.job"


def test_duplicate_name_with_another_function_is_rejected(app: Natask) -> None:
    app.task(name="dup.name")(module_level_add)
    with pytest.raises(ConfigError, match=r"dup\.name"):
        app.task(name="dup.name")(Holder.method)
    assert app.tasks["dup.name"].fn is module_level_add


def test_registering_the_same_function_twice_is_fine(app: Natask) -> None:
    first = app.task(name="same.fn")(module_level_add)
    second = app.task(name="same.fn")(module_level_add)
    assert first.fn is second.fn is module_level_add
    assert list(app.tasks) == ["same.fn"]


def test_registries_are_per_app() -> None:
    a = Natask("a", servers="nats://127.0.0.1:1")
    b = Natask("b", servers="nats://127.0.0.1:1")
    try:
        a.task(name="x.y")(module_level_add)
        assert "x.y" not in b.tasks
        b.task(name="x.y")(Holder.method)  # same name in another app: no conflict
    finally:
        a.close()
        b.close()


def test_decorating_a_non_callable_fails(app: Natask) -> None:
    with pytest.raises(ConfigError):
        app.task(name="t.x")(42)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "options,words",
    [
        ({"max_retries": -1}, "max_retries"),
        ({"autoretry_for": (int,)}, "autoretry_for"),
        ({"autoretry_for": ("ValueError",)}, "autoretry_for"),
        ({"time_limit": -1}, "time_limit"),
        ({"expires": -5}, "expires"),
        ({"retry_backoff": -1}, "retry_backoff"),
        ({"queue": "_private"}, "queue"),
    ],
)
def test_invalid_options_raise_config_error(app: Natask, options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        app.task(name="t.bad", **options)(module_level_add)
    assert "t.bad" not in app.tasks


def test_local_call_sync(app: Natask) -> None:
    add = app.task(name="t.add")(module_level_add)
    assert add(2, 3) == 5
    assert add(x=4, y=5) == 9


async def test_local_call_async(app: Natask) -> None:
    task = app.task(name="t.async")(module_level_async)
    coro = task(4)
    assert asyncio.iscoroutine(coro)
    assert await coro == 40


def test_local_call_bind_passes_the_task_as_self(app: Natask) -> None:
    @app.task(name="t.bound", bind=True)
    def bound(self: Any, x: int) -> tuple[Any, int]:
        return self, x

    me, x = bound(7)
    assert me is bound
    assert x == 7


async def test_local_call_async_bind(app: Natask) -> None:
    @app.task(name="t.abound", bind=True)
    async def abound(self: Any, x: int) -> tuple[str, int]:
        return self.name, x

    assert isinstance(abound, AsyncTask)
    assert await abound(3) == ("t.abound", 3)


def test_bind_without_self_is_rejected_at_decoration(app: Natask) -> None:
    def no_params() -> None:
        pass

    with pytest.raises(ConfigError, match="bind=True"):
        app.task(name="t.noself", bind=True)(no_params)


def test_bound_signature_hides_self(app: Natask) -> None:
    @app.task(name="t.sig", bind=True)
    def sig(self: Any, a: int, b: str = "x") -> None:
        pass

    assert list(sig.call_signature.parameters) == ["a", "b"]


def test_task_keeps_doc_and_wraps(app: Natask) -> None:
    def documented(x: int) -> int:
        """Doubles x."""
        return 2 * x

    task = app.task(name="t.doc")(documented)
    assert task.__doc__ == "Doubles x."
    assert task.__wrapped__ is documented
    assert repr(task) == "<Task t.doc>"


def test_get_task_unknown_names_the_registered_ones(app: Natask) -> None:
    app.task(name="t.known")(module_level_add)
    with pytest.raises(TaskNotFound) as info:
        app.get_task("t.unknown")
    assert "t.unknown" in str(info.value)
    assert "t.known" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_request_outside_a_worker_is_an_error(app: Natask) -> None:
    task = app.task(name="t.req")(module_level_add)
    with pytest.raises(RuntimeError, match=r"t\.req"):
        task.request  # noqa: B018


def test_retry_raises_a_retry(app: Natask) -> None:
    task = app.task(name="t.retry")(module_level_add)
    err = ValueError("boom")
    with pytest.raises(Retry) as info:
        task.retry(exc=err, countdown=5)  # raises by itself, as Celery's
    retry = info.value
    assert retry.exc is err and retry.countdown == 5
    assert "boom" in str(retry)
    with pytest.raises(ConfigError, match="throw=False"):
        task.retry(throw=False)


def test_signatures_from_task(app: Natask) -> None:
    task = app.task(name="t.s")(module_level_add)
    s = task.s(1, y=2)
    assert (s.task, s.args, s.kwargs, s.immutable) == ("t.s", (1,), {"y": 2}, False)
    si = task.si(1, 2)
    assert (si.task, si.args, si.immutable) == ("t.s", (1, 2), True)


def test_options_set_on_a_base_class_apply_under_the_decorator(app: Natask) -> None:
    """Celery's class-based options: ``class Base(Task)`` attributes are the task's defaults; a
    keyword given to the decorator wins; a subclass's attribute wins over its parent's."""

    class Base(Task[Any, Any]):
        autoretry_for = (IOError,)
        max_retries = 5
        retry_backoff = True
        queue = "emails"

    class Child(Base):
        max_retries = 7

    plain = app.task(name="t.base_plain", base=Base)(module_level_add)
    assert plain.options.autoretry_for == (IOError,) and plain.options.max_retries == 5
    assert plain.options.retry_backoff == 1.0 and plain.options.queue == "emails" and plain.queue == "emails"
    given = app.task(name="t.base_given", base=Base, max_retries=1, queue="other")(module_level_add)
    assert given.options.max_retries == 1 and given.queue == "other"
    child = app.task(name="t.base_child", base=Child)(module_async := module_level_async)
    assert isinstance(child, AsyncTask) and child.options.max_retries == 7 and child.fn is module_async
    with pytest.raises(ConfigError, match="max_retries must be >= 0"):

        class Bad(Task[Any, Any]):
            max_retries = -1

        app.task(name="t.base_bad", base=Bad)(module_level_add)
