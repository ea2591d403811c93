"""Middleware hooks and Celery's signals, against a real server and worker."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from natask import Natask, Reject, TaskFailed, TaskRevoked, signals
from natask.canvas import Signature
from natask.hooks import Middleware, Outcome, WorkerInfo
from natask.message import Call
from natask.naming import HDR_MSG_ID
from natask.options import Request
from natask.server import NatsServer
from natask.testing import worker

from .helpers import WorkerProcess


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
    for sig in signals.ALL:
        for receiver, sender in sig.receivers:
            sig.disconnect(receiver, sender=sender)


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


# -- the worker's points ---------------------------------------------------------------------------
TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("trace", default="-")


class WorkerRecorder(Middleware):
    """Every worker point, sync and async mixed; sets a context variable the task reads."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self.seen.append(("start", worker.ident))

    async def on_worker_stop(self, worker: WorkerInfo) -> None:
        self.seen.append(("stop", worker.ident))

    async def before_task(self, request: Request) -> None:
        TRACE.set("trace-" + request.id)
        self.seen.append(("before", request.task, tuple(request.args)))

    def after_task(self, request: Request, outcome: Outcome) -> None:
        self.seen.append(("after", request.task, outcome.state, outcome.result,
                          type(outcome.exception).__name__ if outcome.exception else None, TRACE.get()))

    def on_retry(self, request: Request, exception: BaseException | None, countdown: float) -> None:
        self.seen.append(("retry", request.task, str(exception), countdown >= 0))

    async def on_dead_letter(self, request: Request | None, reason: str, subject: str) -> None:
        self.seen.append(("dead", request.task if request else None, reason, subject))

    def on_revoked(self, request: Request, terminated: bool, expired: bool) -> None:
        self.seen.append(("revoked", request.id, terminated, expired))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [s for s in self.seen if s[0] == kind]


async def test_worker_points_in_order_with_context_for_sync_and_async_tasks(app: Natask) -> None:
    rec = WorkerRecorder()
    app.add_middleware(rec)

    @app.task(name="w.sync")
    def sync_task(x: int) -> str:
        return f"{x}:{TRACE.get()}"  # on a worker thread: the hook's context came along

    @app.task(name="w.async")
    async def async_task(x: int) -> str:
        return f"{x}:{TRACE.get()}"

    async with worker(app) as w:
        r1 = await sync_task.adelay(1)
        assert await r1.aget(timeout=10) == f"1:trace-{r1.id}"
        r2 = await async_task.adelay(2)
        assert await r2.aget(timeout=10) == f"2:trace-{r2.id}"
        ident = w.ident
    # after_task runs once a run is settled, which may be after the caller got its reply: the next
    # task's before_task may come first. Each task's own points are in order, inside start..stop.
    assert rec.seen[0] == ("start", ident) and rec.seen[-1] == ("stop", ident)
    for r, name, arg in ((r1, "w.sync", 1), (r2, "w.async", 2)):
        own = [s for s in rec.seen if s[0] in ("before", "after") and s[1] == name]
        assert own == [("before", name, (arg,)),
                       ("after", name, "SUCCESS", f"{arg}:trace-{r.id}", None, f"trace-{r.id}")]


async def test_failure_retry_dead_letter_and_revoke_points(app: Natask) -> None:
    rec = WorkerRecorder()
    app.add_middleware(rec)
    attempts: list[int] = []

    @app.task(name="w.boom", max_retries=0)
    def boom() -> None:
        raise ValueError("boom")

    @app.task(name="w.flaky", max_retries=2, retry_backoff=0, autoretry_for=(KeyError,))
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise KeyError("once")
        return "ok"

    @app.task(name="w.never")
    def never() -> None:
        raise AssertionError("a revoked task ran")

    revoked = app.AsyncResult("0" * 32)
    await revoked.arevoke()  # before the worker starts: it reads the revokes as it starts
    await never.aapply_async(task_id="0" * 32)
    async with worker(app, unknown_grace=0):
        with pytest.raises(TaskFailed):
            await (await boom.adelay()).aget(timeout=10)
        assert await (await flaky.adelay()).aget(timeout=10) == "ok"
        with pytest.raises(TaskRevoked):
            await revoked.aget(timeout=10)
        unknown = await app.asend_task("w.unknown", (1,))
        with pytest.raises(TaskFailed):
            await unknown.aget(timeout=10)
    boom_after = [s for s in rec.of("after") if s[1] == "w.boom"]
    assert [s[2:5] for s in boom_after] == [("FAILURE", None, "ValueError")]
    assert rec.of("retry") == [("retry", "w.flaky", "'once'", True)]
    flaky_after = [s[2] for s in rec.of("after") if s[1] == "w.flaky"]
    assert sorted(flaky_after) == ["RETRY", "SUCCESS"]  # the retry's own run may settle first
    assert rec.of("revoked") == [("revoked", "0" * 32, False, False)]
    assert rec.of("dead") == [("dead", "w.unknown", "unknown task", app.names.task_subject("default", "w.unknown"))]


class RaisingEverywhere(Middleware):
    def before_task(self, request: Request) -> None:
        raise RuntimeError("before")

    async def after_task(self, request: Request, outcome: Outcome) -> None:
        raise RuntimeError("after")

    def on_worker_start(self, worker: WorkerInfo) -> None:
        raise RuntimeError("start")


async def test_raising_worker_hooks_lose_nothing(app: Natask, caplog: pytest.LogCaptureFixture) -> None:
    app.add_middleware(RaisingEverywhere())

    @app.task(name="w.add")
    def add(x: int, y: int) -> int:
        return x + y

    with caplog.at_level(logging.ERROR, logger="natask.hooks"):
        async with worker(app):
            results = [await add.adelay(i, i) for i in range(5)]
            assert [await r.aget(timeout=10) for r in results] == [0, 2, 4, 6, 8]
    stored = await (await (await app.client.broker()).results()).get(results[0].id)
    assert stored is not None  # stored and acked as without the hooks
    failed = [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "natask.hooks"]
    assert failed.count("middleware hook before_task") == 5 and failed.count("middleware hook after_task") == 5
    assert "middleware hook on_worker_start" in failed


async def test_task_signals_with_celery_arguments(app: Natask, clean_signals: None) -> None:
    got: list[tuple[Any, ...]] = []

    @app.task(name="sig.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="sig.fail", max_retries=0)
    def fail() -> None:
        raise ValueError("nope")

    @signals.task_prerun.connect
    def prerun(sender: Any, task_id: str, task: Any, args: Any, kwargs: Any, **kw: Any) -> None:
        got.append(("prerun", sender.name, task is sender, tuple(args)))

    @signals.task_postrun.connect
    def postrun(sender: Any, retval: Any, state: str, **kw: Any) -> None:
        got.append(("postrun", sender.name, state, retval if state == "SUCCESS" else type(retval).__name__))

    @signals.task_success.connect(sender="sig.add")
    def success(sender: Any, result: Any, **kw: Any) -> None:
        got.append(("success", sender.name, result))

    @signals.task_failure.connect(sender=fail)
    def failure(sender: Any, task_id: str, exception: BaseException, traceback: str, **kw: Any) -> None:
        got.append(("failure", sender.name, str(exception), "ValueError" in traceback))

    worker_events: list[str] = []
    for name in ("worker_init", "worker_ready", "worker_shutting_down", "worker_shutdown"):
        getattr(signals, name).connect(lambda sender, _n=name, **kw: worker_events.append(_n))

    async with worker(app):
        assert await (await add.adelay(2, 3)).aget(timeout=10) == 5
        with pytest.raises(TaskFailed):
            await (await fail.adelay()).aget(timeout=10)
    # Per task in order (a task's postrun may come after the next task's prerun: it runs once settled).
    assert [g for g in got if g[1] == "sig.add"] == [
        ("prerun", "sig.add", True, (2, 3)), ("success", "sig.add", 5), ("postrun", "sig.add", "SUCCESS", 5)]
    assert [g for g in got if g[1] == "sig.fail"] == [
        ("prerun", "sig.fail", True, ()), ("failure", "sig.fail", "nope", True),
        ("postrun", "sig.fail", "FAILURE", "ValueError")]
    assert worker_events == ["worker_init", "worker_ready", "worker_shutting_down", "worker_shutdown"]


async def test_revoked_unknown_and_rejected_signals(app: Natask, clean_signals: None) -> None:
    got: list[tuple[Any, ...]] = []
    signals.task_revoked.connect(lambda sender, request, terminated, expired, **kw: got.append(
        ("revoked", request.id, terminated, expired)))
    signals.task_unknown.connect(lambda sender, name, id, **kw: got.append(("unknown", name, id)))
    signals.task_rejected.connect(lambda sender, message, exc, **kw: got.append(("rejected", message.task, exc)))

    @app.task(name="sig.reject")
    def reject() -> None:
        raise Reject("not for us")

    @app.task(name="sig.late")
    def late() -> None:
        raise AssertionError("an expired task ran")

    async with worker(app, unknown_grace=0):
        expired = await late.aapply_async(expires=datetime.now(timezone.utc) - timedelta(seconds=5))
        with pytest.raises(TaskRevoked):
            await expired.aget(timeout=10)
        unknown = await app.asend_task("sig.nobody")
        with pytest.raises(TaskFailed):
            await unknown.aget(timeout=10)
        rejected = await reject.adelay()
        with pytest.raises(TaskFailed):
            await rejected.aget(timeout=10)
    assert got == [("revoked", expired.id, False, True), ("unknown", "sig.nobody", unknown.id),
                   ("rejected", "sig.reject", "rejected")]


async def test_before_tick_and_beat_init(app: Natask, clean_signals: None) -> None:
    from natask.beat import Beat

    ticked: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue()

    class Ticks(Middleware):
        async def before_tick(self, entry: str, task: str, fire_time: float) -> None:
            await ticked.put((entry, task, fire_time))

    app.add_middleware(Ticks())
    inits: list[Any] = []
    signals.beat_init.connect(lambda sender, **kw: inits.append(sender))
    app.add_periodic_task(timedelta(seconds=1), Signature(app, "b.ping"), name="ping")
    beat = Beat(app)
    await beat.start()
    try:
        entry, task, fire_time = await asyncio.wait_for(ticked.get(), 10)
    finally:
        await beat.stop()
    assert (entry, task) == ("ping", "b.ping") and fire_time == int(fire_time)  # aligned to the second
    assert inits == [beat]


async def test_log_levels_celery_style(app: Natask, caplog: pytest.LogCaptureFixture) -> None:
    @app.task(name="l.ok")
    def ok() -> int:
        return 42

    @app.task(name="l.bad", max_retries=0)
    def bad() -> None:
        raise ValueError("bad input")

    @app.task(name="l.flaky", max_retries=1, retry_backoff=0, autoretry_for=(KeyError,))
    def flaky() -> None:
        raise KeyError("again")

    with caplog.at_level(logging.INFO, logger="natask.worker"):
        async with worker(app):
            good = await ok.adelay()
            await good.aget(timeout=10)
            failing = await bad.adelay()
            with pytest.raises(TaskFailed):
                await failing.aget(timeout=10)
            retried = await flaky.adelay()
            with pytest.raises(TaskFailed):
                await retried.aget(timeout=10)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "natask.worker"]
    assert (logging.INFO, f"task l.ok[{good.id}] received") in lines
    assert any(level == logging.INFO and msg.startswith(f"task l.ok[{good.id}] succeeded in ") and msg.endswith(": 42")
               for level, msg in lines)
    failure = [r for r in caplog.records if r.getMessage() == f"task l.bad[{failing.id}] failed: ValueError: bad input"]
    assert failure and failure[0].levelno == logging.ERROR and failure[0].exc_info is not None  # traceback attached
    assert any(level == logging.WARNING and msg.startswith(f"task l.flaky[{retried.id}] retry 1 in ")
               for level, msg in lines)


async def test_received_and_retry_signals(app: Natask, clean_signals: None) -> None:
    got: list[tuple[Any, ...]] = []
    signals.task_received.connect(lambda sender, request, **kw: got.append(("received", request.task)))
    signals.task_retry.connect(lambda sender, request, reason, einfo, **kw: got.append(
        ("retry", sender.name, str(reason), "KeyError" in einfo)))

    @app.task(name="sig.flaky", max_retries=1, retry_backoff=0, autoretry_for=(KeyError,))
    def flaky() -> str:
        if not got or got.count(("received", "sig.flaky")) == 1:
            raise KeyError("once")
        return "ok"

    async with worker(app):
        assert await (await flaky.adelay()).aget(timeout=10) == "ok"
    assert got == [("received", "sig.flaky"), ("retry", "sig.flaky", "'once'", True), ("received", "sig.flaky")]


async def test_worker_process_init_runs_in_each_child(nats_server: NatsServer, tmp_path: Path) -> None:
    log = tmp_path / "signals.log"
    proc = await WorkerProcess(nats_server.url, "sig", log, concurrency=1, extra=["--processes", "2"],
                               app="tests.integration.signalapp:app").ready(processes=2)
    try:
        pids = {line.split()[1] for line in log.read_text().splitlines() if line.startswith("process_init ")}
    finally:
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert len(pids) == 2 and str(proc.proc.pid) not in pids  # once in each child, not in the supervisor
