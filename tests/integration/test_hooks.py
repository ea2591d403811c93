"""Middleware hooks and Celery's signals, against a real server and worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from natask import Natask, signals
from natask.hooks import Middleware
from natask.message import Call
from natask.naming import HDR_MSG_ID


class Recorder(Middleware):
    def __init__(self, seen: list[tuple[str, Any]]) -> None:
        self.seen = seen

    def before_publish(self, call: Call) -> None:
        call.headers["X-Trace"] = "t-" + call.task_id
        self.seen.append(("before_publish", call.task))

    async def after_publish(self, call: Call) -> None:  # an async hook beside a sync one
        self.seen.append(("after_publish", call.headers.get("X-Trace")))


class Raising(Middleware):
    def before_publish(self, call: Call) -> None:
        raise RuntimeError("broken hook")


@pytest.fixture
def clean_signals() -> Iterator[None]:
    yield
    for signal in signals.ALL:
        for receiver, sender in signal.receivers:
            signal.disconnect(receiver, sender=sender)


async def test_publish_hooks_run_in_order_and_may_add_headers(app: Natask) -> None:
    seen: list[tuple[str, Any]] = []
    app.add_middleware(Recorder(seen))

    @app.task(name="h.add")
    def add(x: int, y: int) -> int:
        return x + y

    result = await add.adelay(1, 2)
    assert seen == [("before_publish", "h.add"), ("after_publish", "t-" + result.id)]
    broker = await app.client.broker()
    msg = await broker.js.get_msg(app.names.stream, 1)
    assert msg.headers is not None and msg.headers["X-Trace"] == "t-" + result.id
    assert msg.headers[HDR_MSG_ID] == result.id

    seen.clear()
    results = await add.adelay_many([(1, 1), (2, 2)])
    assert [s[0] for s in seen] == ["before_publish"] * 2 + ["after_publish"] * 2
    assert [s[1] for s in seen[2:]] == ["t-" + r.id for r in results]


async def test_a_raising_hook_is_logged_and_the_task_is_published(app: Natask,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, Any]] = []
    app.add_middleware(Raising())
    app.add_middleware(Recorder(seen))  # runs after the raising one
    with caplog.at_level(logging.ERROR, logger="natask.hooks"):
        result = await app.asend_task("h.any", (1,))
    assert "before_publish" in caplog.text and "broken hook" in caplog.text
    assert seen[0] == ("before_publish", "h.any")
    info = await (await app.client.broker()).js.stream_info(app.names.stream)
    assert info.state.messages == 1 and result.id


async def test_no_middleware_leaves_every_point_empty(app: Natask) -> None:
    assert not any(getattr(app.hooks, p) for p in ("before_publish", "after_publish", "before_task", "after_task"))
    app.add_middleware(Recorder([]))
    assert len(app.hooks.before_publish) == 1 and len(app.hooks.after_publish) == 1
    assert not app.hooks.before_task  # not overridden by Recorder: costs nothing


def test_add_middleware_refuses_other_objects(app: Natask) -> None:
    with pytest.raises(TypeError, match=r"natask\.hooks\.Middleware"):
        app.add_middleware(object())  # type: ignore[arg-type]


async def test_publish_signals_with_a_sender_filter(app: Natask, clean_signals: None) -> None:
    got: list[tuple[str, Any, str]] = []

    @signals.before_task_publish.connect(sender="s.wanted")
    def before(sender: Any, headers: dict[str, str], routing_key: str, **kwargs: Any) -> None:
        headers["X-Seen"] = "1"
        got.append(("before", sender, routing_key))

    def after(sender: Any, **kwargs: Any) -> None:
        got.append(("after", sender, kwargs["routing_key"]))

    signals.after_task_publish.connect(after)
    assert app.hooks.before_publish and app.hooks.after_publish
    await app.asend_task("s.other", queue="q1")
    await app.asend_task("s.wanted", queue="q2")
    assert got == [("after", "s.other", "q1"), ("before", "s.wanted", "q2"), ("after", "s.wanted", "q2")]
    broker = await app.client.broker()
    assert (await broker.js.get_msg(app.names.stream, 2)).headers.get("X-Seen") == "1"  # type: ignore[union-attr]

    assert signals.after_task_publish.disconnect(after)
    signals.before_task_publish.disconnect(before, sender="s.wanted")
    assert not app.hooks.before_publish and not app.hooks.after_publish  # no receivers: no cost


def test_setup_logging_receivers_replace_natasks_logging_setup(clean_signals: None) -> None:
    from natask.logs import setup_logging

    root = logging.getLogger()
    before = list(root.handlers)
    calls: list[dict[str, Any]] = []
    signals.setup_logging.connect(lambda sender, **kw: calls.append(kw))
    setup_logging("debug", "json")
    assert calls and calls[0]["loglevel"] == "DEBUG" and calls[0]["format"] == "json"
    assert root.handlers == before  # natask configured nothing


def test_after_setup_logger_sees_the_configured_root_logger(clean_signals: None) -> None:
    from natask.logs import setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    got: list[Any] = []
    signals.after_setup_logger.connect(lambda sender, logger, **kw: got.append((logger, kw["loglevel"])))
    try:
        setup_logging("warning")
        assert got == [(root, "WARNING")]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
