"""Priority subjects, consumers and options, and the TTL of expiring calls (no server)."""

from __future__ import annotations

import pytest

from natask import ConfigError, Natask
from natask.client import expiry_ttl
from natask.naming import Names


def test_priority_0_keeps_the_queue_subject_and_levels_get_their_own() -> None:
    names = Names("tasks")
    assert names.task_subject("orders", "a.b") == "tasks.orders.a.b"
    assert names.priority_subject("orders", "a.b", 9) == "tasks._p9.orders.a.b"
    assert names.task_from_subject("tasks._p9.orders.a.b") == ("orders", "a.b")
    assert names.priority_from_subject("tasks._p9.orders.a.b") == 9
    assert names.priority_from_subject("tasks.orders.a.b") == 0
    assert names.priority_consumer("orders", 0) == "orders"
    assert names.priority_consumer("orders", 4) == "_p4_orders"
    assert names.level_of_consumer("_p4_orders") == ("orders", 4)


@pytest.mark.parametrize("subject", ["tasks._p0.orders.a", "tasks._p10.orders.a", "tasks._px.orders.a",
                                     "tasks._p9._sched.a", "tasks._p9.orders", "tasks._sched.orders.id"])
def test_malformed_priority_subjects_are_no_task_subjects(subject: str) -> None:
    assert Names("tasks").task_from_subject(subject) is None


@pytest.mark.parametrize("name", ["orders", "_p4", "_p0_orders", "_pa_orders", "_p4_"])
def test_only_level_consumers_read_as_levels(name: str) -> None:
    assert Names("tasks").level_of_consumer(name) is None


@pytest.mark.parametrize("bad", [-1, 10, 1.5, "9", True])
def test_a_priority_outside_0_to_9_is_refused(app: Natask, bad: object) -> None:
    with pytest.raises(ConfigError, match="priority"):
        app.task(name="p.bad", priority=bad)(lambda: None)  # type: ignore[call-overload]
    task = app.task(name="p.ok")(lambda: None)
    with pytest.raises(ConfigError, match="priority"):
        task._prepare((), None, None, None, None, None, None, None, priority=bad)  # type: ignore[arg-type]


def test_the_ttl_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    assert expiry_ttl(100.2, 99.0) == "2"
    assert expiry_ttl(100.0, 99.0) == "1"
    assert expiry_ttl(90.0, 99.0) == "1"
