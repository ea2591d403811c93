"""Names on the server (SPEC §1 table) and task-name validation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from natask import ConfigError, Natask
from natask.naming import DLQ_STREAM, Names, check_task_name


@pytest.fixture
def names() -> Names:
    return Names("tasks")


def test_task_subject(names: Names) -> None:
    assert names.task_subject("orders", "orders.process") == "tasks.orders.orders.process"


def test_stream(names: Names) -> None:
    assert names.stream == "NATASK_TASKS"
    assert names.stream_subjects == ["tasks.>"]
    assert Names("shop-eu_1").stream == "NATASK_SHOP-EU_1"


def test_queue_consumer_and_filter(names: Names) -> None:
    assert names.consumer("orders") == "orders"
    assert names.queue_filter("orders") == "tasks.orders.>"


def test_schedule_subject(names: Names) -> None:
    assert names.schedule_subject("orders", "abc123") == "tasks._sched.orders.abc123"


def test_rpc_subject(names: Names) -> None:
    assert names.rpc_subject("orders", "orders.process") == "natask.rpc.tasks.orders.orders.process"


def test_dlq(names: Names) -> None:
    assert DLQ_STREAM == "NATASK_DLQ"
    assert names.dlq_subject("orders", "orders.process") == "natask.dlq.tasks.orders.orders.process"


def test_results_bucket(names: Names) -> None:
    assert names.results_bucket == "natask_results_tasks"


def test_task_subject_is_captured_by_stream_and_queue_filter(names: Names) -> None:
    subject = names.task_subject("orders", "orders.process")
    assert subject.startswith(names.stream_subjects[0][:-1])
    assert subject.startswith(names.queue_filter("orders")[:-1])
    assert not subject.startswith(names.queue_filter("order")[:-1])


def test_schedule_subject_is_in_stream_but_not_in_any_queue(names: Names) -> None:
    subject = names.schedule_subject("orders", "abc")
    assert subject.startswith(names.stream_subjects[0][:-1])
    assert not subject.startswith(names.queue_filter("orders")[:-1])


def test_rpc_and_dlq_subjects_are_not_captured_by_the_task_stream(names: Names) -> None:
    prefix = names.stream_subjects[0][:-1]
    assert not names.rpc_subject("orders", "x").startswith(prefix)
    assert not names.dlq_subject("orders", "x").startswith(prefix)


def test_task_from_subject_keeps_dots_in_task_name(names: Names) -> None:
    assert names.task_from_subject("tasks.orders.orders.process") == ("orders", "orders.process")


def test_app_names_follow_subject_prefix() -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1", subject_prefix="shop")
    try:
        assert app.names.stream == "NATASK_SHOP"
        assert app.names.task_subject("default", "a.b") == "shop.default.a.b"
        assert app.names.results_bucket == "natask_results_shop"
    finally:
        app.close()


def test_subject_prefix_natask_is_rejected() -> None:
    with pytest.raises(ConfigError, match="subject_prefix"):
        Natask("shop", servers="nats://127.0.0.1:1", subject_prefix="natask").close()


# -- task names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orders.process", "a", "A-b_c.d-e.F1", "x.y.z.w", "__main__.f"])
def test_check_task_name_accepts(name: str) -> None:
    assert check_task_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a b", "orders process", "a.*", "*", "a.>", ">", "a..b", ".a", "a.", "a\tb", "a/b", "ä", "a:b", None, 5],
)
def test_check_task_name_rejects(name: Any) -> None:
    with pytest.raises(ConfigError, match="invalid task name"):
        check_task_name(name)


@pytest.fixture
def offline_app() -> Iterator[Natask]:
    app = Natask("t", servers="nats://127.0.0.1:1")
    yield app
    app.close()


@pytest.mark.parametrize("name", ["bad name", "orders.*", "a..b", "orders.>", ""])
def test_decorator_rejects_invalid_names(offline_app: Natask, name: str) -> None:
    with pytest.raises(ConfigError):
        offline_app.task(name=name)(lambda: None)
    assert offline_app.tasks == {}


def test_lambda_without_name_is_rejected(offline_app: Natask) -> None:
    with pytest.raises(ConfigError, match="name="):
        offline_app.task(lambda x: x)
    assert offline_app.tasks == {}


def test_nested_function_without_name_is_rejected(offline_app: Natask) -> None:
    def inner() -> None:
        pass

    with pytest.raises(ConfigError, match="name="):
        offline_app.task(inner)


@pytest.mark.parametrize("queue", ["_sched", "_x", "a.b", "a b", "*", ""])
def test_task_queue_names_are_validated(offline_app: Natask, queue: str) -> None:
    with pytest.raises(ConfigError, match="queue"):
        offline_app.task(name="t.x", queue=queue)(lambda: None)
