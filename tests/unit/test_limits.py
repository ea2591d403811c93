"""Flow-limit options checked at decoration, and the worker's rate reservations (no server)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from natask import ConfigError, Natask
from natask.message import dumps
from natask.naming import HDR_RATE_START, HDR_RETRIES, HDR_SCHEDULER
from natask.options import TaskOptions, parse_rate
from natask.worker.delivery import Delivery
from natask.worker.limits import Limits, _leases


@pytest.mark.parametrize(("given", "per_second"), [
    ("100/m", 100 / 60), ("10/s", 10.0), ("7200/h", 2.0), ("5", 5.0), (5, 5.0), (2.5, 2.5), (" 3 / s ", 3.0),
    ("0", None), ("", None), (None, None), ("0/m", None), (".5/s", 0.5),
])
def test_rates_read_as_celery_does(given: Any, per_second: float | None) -> None:
    assert parse_rate(given) == pytest.approx(per_second) if per_second else parse_rate(given) is None


@pytest.mark.parametrize("given", ["x", "10/d", "-1/s", "1/", "/s", "1" * 400, True, [1], "10/min"])
def test_a_malformed_rate_is_refused_at_decoration(given: Any) -> None:
    app = Natask("limits")
    with pytest.raises(ConfigError, match="rate_limit must"):
        app.task(name="t.x", rate_limit=given)(lambda: None)
    with pytest.raises(ConfigError, match="global_rate_limit must"):
        app.task(name="t.y", global_rate_limit=given)(lambda: None)


@pytest.mark.parametrize("given", [0, -1, 1.5, "2", True, 10_001])
def test_max_concurrency_must_be_a_positive_int(given: Any) -> None:
    with pytest.raises(ConfigError, match="max_concurrency must be an int"):
        TaskOptions(max_concurrency=given)


def test_broadcast_tasks_take_no_limits() -> None:
    with pytest.raises(ConfigError, match="broadcast=True"):
        TaskOptions(broadcast=True, max_concurrency=2)


def test_broadcast_tasks_are_not_sent_in_bulk() -> None:
    task = Natask("limits").task(name="t.b", broadcast=True)(lambda: None)
    with pytest.raises(ConfigError, match="broadcast task"):
        task.delay_many([()])


def test_only_tasks_with_a_limit_are_limited() -> None:
    assert not TaskOptions().limited and not TaskOptions(broadcast=True).limited
    assert TaskOptions(rate_limit="1/s").limited and TaskOptions(max_concurrency=1).limited
    assert TaskOptions(global_rate_limit="1/h").limited and not TaskOptions(rate_limit="0").limited


@pytest.mark.parametrize(("given", "match"), [
    ({"orders": {"max_ack_pending": 0}}, "from 1 to"), ({"orders": {"max_ack_pending": "5"}}, "must be an int"),
    ({"orders": {"prefetch": 5}}, "unknown queue option"), ({"_x": {}}, "invalid queue name"),
    ({"orders": 5}, "must be a dict"), ([("orders", {})], "must map queue names"),
])
def test_queue_options_are_validated(given: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Natask("q", queue_options=given)


def test_queue_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATASK_QUEUE_OPTIONS", '{"orders": {"max_ack_pending": 7}}')
    assert Natask("q").config.queue_options["orders"]["max_ack_pending"] == 7
    monkeypatch.setenv("NATASK_QUEUE_OPTIONS", "{oops")
    with pytest.raises(ConfigError, match="must be JSON"):
        Natask("q")


async def test_local_reservations_are_one_interval_apart() -> None:
    app = Natask("limits")
    task = app.task(name="t.paced", rate_limit="4/s")(lambda: None)
    limits = Limits(None, None)  # type: ignore[arg-type]  # local limits touch no broker
    starts = [await limits.reserve(task) for _ in range(5)]
    assert all(s is not None for s in starts)
    gaps = [b - a for a, b in itertools.pairwise(starts)]  # type: ignore[operator]
    assert gaps == pytest.approx([0.25] * 4)


class _Msg:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.data = b""


@pytest.mark.parametrize(("headers", "trusted"), [
    ({HDR_RATE_START: "100.5/0", HDR_SCHEDULER: "s"}, 100.5),
    ({HDR_RATE_START: "100.5/0", HDR_SCHEDULER: "s", HDR_RETRIES: "0"}, 100.5),
    ({HDR_RATE_START: "100.5/0"}, None),  # not fired by a schedule: published with it
    ({HDR_RATE_START: "100.5/0", HDR_SCHEDULER: "s", HDR_RETRIES: "1"}, None),  # a retry reserves again
    ({HDR_RATE_START: "nan/0", HDR_SCHEDULER: "s"}, None),
    ({HDR_RATE_START: "soon", HDR_SCHEDULER: "s"}, None),
])
def test_a_reservation_is_kept_only_by_the_scheduled_message_it_was_made_for(
        headers: dict[str, str], trusted: float | None) -> None:
    limits = Limits(None, None)  # type: ignore[arg-type]
    assert limits.reserved(Delivery(_Msg(headers))) == trusted  # type: ignore[arg-type]


def test_cap_leases_read_from_the_wire_are_validated() -> None:
    assert _leases(b"") == {} and _leases(b"\xc1") == {} and _leases(dumps([1, 2])) == {}
    assert _leases(dumps({"a": 1.5, "b": "x", "c": True, "d": float("inf"), "e": 2})) == {"a": 1.5, "e": 2.0}
