"""Celery's task options, self.retry(), Ignore and expires, against a real server (issue 18)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any, ClassVar

import pytest

from natask import (
    BrokerError,
    ConfigError,
    EncodeError,
    ExceptionInfo,
    Ignore,
    Natask,
    Task,
    TaskFailed,
    TaskRevoked,
)
from natask.dlq import DeadLetters
from natask.hooks import Middleware, Outcome
from natask.options import Request
from natask.server import NatsServer
from natask.testing import worker


class Recording(Task[Any, Any]):
    """A base class recording which handler ran, with what."""

    calls: ClassVar[list[tuple[Any, ...]]] = []
    done: ClassVar[asyncio.Event | None] = None

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.calls.append(("before_start", tuple(args)))

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self.calls.append(("on_success", retval))

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo) -> None:
        assert isinstance(einfo, ExceptionInfo) and "boom" in einfo.traceback
        self.calls.append(("on_failure", type(exc).__name__))

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo) -> None:
        self.calls.append(("on_retry", type(exc).__name__))

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: ExceptionInfo | None) -> None:
        self.calls.append(("after_return", status))
        if status != "RETRY" and self.done is not None:
            self.done.set()


async def test_base_class_handlers_run_in_order_on_success(app: Natask) -> None:
    Recording.calls, Recording.done = [], asyncio.Event()

    @app.task(name="t.based", base=Recording)
    def based(x: int) -> int:
        return x * 2

    assert isinstance(based, Recording) and based.options.hooked

    async with worker(app):
        assert await (await based.adelay(21)).aget(timeout=20) == 42
        await Recording.done.wait()
    assert Recording.calls == [("before_start", (21,)), ("on_success", 42), ("after_return", "SUCCESS")]


async def test_base_class_handlers_on_retry_then_failure_with_an_async_task(app: Natask) -> None:
    Recording.calls, Recording.done = [], asyncio.Event()

    @app.task(name="t.based_fail", base=Recording, autoretry_for=(ValueError,), max_retries=1,
              retry_kwargs={"countdown": 0})
    async def based_fail() -> None:
        raise ValueError("boom")

    async with worker(app):
        with pytest.raises(TaskFailed):
            await (await based_fail.adelay()).aget(timeout=20)
        await Recording.done.wait()
    assert Recording.calls == [("before_start", ()), ("on_retry", "ValueError"), ("after_return", "RETRY"),
                               ("before_start", ()), ("on_failure", "ValueError"), ("after_return", "FAILURE")]


def test_a_task_without_a_base_has_no_handlers_to_call(app: Natask) -> None:
    plain = app.task(name="t.plain")(lambda: 1)
    assert not plain.options.hooked
    with pytest.raises(ConfigError, match=r"subclass of natask\.Task"):
        app.task(name="t.bad_base", base=object)(lambda: 1)  # type: ignore[call-overload]


async def test_self_retry_raises_by_itself_then_max_retries_exceeded(app: Natask) -> None:
    seen: list[int] = []

    @app.task(name="t.retrier", bind=True, max_retries=2)
    def retrier(self) -> None:  # type: ignore[no-untyped-def]
        seen.append(self.request.retries)
        self.retry(countdown=0)  # no raise: retry() raises by itself
        raise AssertionError("not reached")

    async with worker(app):
        with pytest.raises(TaskFailed) as info:
            await (await retrier.adelay()).aget(timeout=20)
    assert info.value.exc_type == "natask.MaxRetriesExceededError"
    assert seen == [0, 1, 2]
    assert await DeadLetters(app).list() == []  # a task failure, not a dead letter


async def test_self_retry_with_exc_raises_that_exc_when_retries_run_out(app: Natask) -> None:
    @app.task(name="t.retry_exc", bind=True, max_retries=0)
    def retry_exc(self) -> None:  # type: ignore[no-untyped-def]
        try:
            raise KeyError("gone")
        except KeyError as e:
            raise self.retry(exc=e, countdown=0) from None

    async with worker(app):
        with pytest.raises(TaskFailed) as info:
            await (await retry_exc.adelay()).aget(timeout=20)
    assert info.value.exc_type == "KeyError"


async def test_ignore_acks_without_storing_or_retrying(app: Natask) -> None:
    ended: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    class Ended(Middleware):
        async def after_task(self, request: Request, outcome: Outcome) -> None:
            await ended.put((request.task, outcome.state))

    app.add_middleware(Ended())

    @app.task(name="t.ignored", autoretry_for=(Exception,))
    def ignored() -> None:
        raise Ignore()

    async with worker(app):
        result = await ignored.adelay()
        assert await ended.get() == ("t.ignored", "IGNORED")
    # The worker closed its connection (acks flushed): nothing waits for an ack or came back.
    broker = await app.client.broker()
    info = await broker.js.consumer_info("NATASK_TASKS", "default")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0 and ended.empty()
    assert await app.AsyncResult(result.id).astate() == "PENDING"


async def test_dont_autoretry_for_and_retry_kwargs(app: Natask) -> None:
    seen: list[str] = []

    @app.task(name="t.picky", autoretry_for=(Exception,), dont_autoretry_for=(KeyError,),
              retry_kwargs={"max_retries": 1, "countdown": 0})
    def picky(kind: str) -> None:
        seen.append(kind)
        raise KeyError(kind) if kind == "key" else ValueError(kind)

    async with worker(app):
        with pytest.raises(TaskFailed, match="KeyError"):
            await (await picky.adelay("key")).aget(timeout=20)
        assert seen == ["key"]
        with pytest.raises(TaskFailed, match="ValueError"):
            await (await picky.adelay("value")).aget(timeout=20)
    assert seen == ["key", "value", "value"]
    [entry] = await DeadLetters(app).list()
    assert entry.reason == "max retries (1) exceeded"


async def test_throws_logs_expected_errors_at_info_without_traceback(
        app: Natask, caplog: pytest.LogCaptureFixture) -> None:
    @app.task(name="t.expected", throws=(LookupError,), shadow="shown.name")
    def expected() -> None:
        raise LookupError("no such user")

    caplog.set_level(logging.INFO, logger="natask.worker")
    async with worker(app):
        with pytest.raises(TaskFailed, match="LookupError"):
            await (await expected.adelay()).aget(timeout=20)
    [record] = [r for r in caplog.records if "expected LookupError" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "shown.name" in record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_json_serializer_round_trip_and_its_limits(app: Natask) -> None:
    @app.task(name="t.json", serializer="json")
    def as_json(items: list[int], label: str = "") -> str:
        return f"{label}{sum(items)}"

    async with worker(app):
        assert await (await as_json.adelay([1, 2, 3], label="sum=")).aget(timeout=20) == "sum=6"
    with pytest.raises(EncodeError, match="as json"):
        await as_json.adelay({1, 2})  # a set: msgpack carries it, JSON does not
    with pytest.raises(ConfigError, match="serializer"):
        app.task(name="t.pickle", serializer="pickle")(lambda: 1)


async def test_typing_false_skips_the_argument_check_at_call_time(app: Natask) -> None:
    @app.task(name="t.untyped", typing=False)
    def untyped(x: int) -> int:
        return x

    @app.task(name="t.typed")
    def typed(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        await typed.adelay(1, 2)  # type: ignore[call-arg]
    async with worker(app):
        with pytest.raises(TaskFailed, match="TypeError"):
            await (await untyped.adelay(1, 2)).aget(timeout=20)  # type: ignore[call-arg]


async def test_store_errors_even_if_ignored(app: Natask) -> None:
    @app.task(name="t.quiet", ignore_result=True, store_errors_even_if_ignored=True)
    def quiet(fail: bool) -> int:
        if fail:
            raise ValueError("stored anyway")
        return 1

    async with worker(app):
        ok = await quiet.adelay(False)
        failed = await quiet.adelay(True)
        with pytest.raises(TaskFailed, match="stored anyway"):
            await app.AsyncResult(failed.id).aget(timeout=20)
        assert await app.AsyncResult(ok.id).astate() == "PENDING"  # successes still not stored


def test_acks_late_and_reject_on_worker_lost(app: Natask) -> None:
    task = app.task(name="t.late", acks_late=True, reject_on_worker_lost=True)(lambda: 1)
    assert task.options.acks_late and task.options.reject_on_worker_lost
    with pytest.raises(ConfigError, match="acks_late=False"):
        app.task(name="t.early", acks_late=False)(lambda: 1)


async def test_expires_counts_from_the_call_not_the_eta(app: Natask) -> None:
    ran: list[int] = []

    @app.task(name="t.stale_later")
    def stale_later() -> None:
        ran.append(1)

    async with worker(app):
        result = await stale_later.aapply_async(countdown=1.0, expires=0.5)
        with pytest.raises(TaskRevoked):
            await result.aget(timeout=20)
    assert ran == []


async def test_result_attributes(nats_server: NatsServer) -> None:
    app = Natask("test", servers=[nats_server.url], result_extended=True)
    try:
        @app.task(name="t.attrs", bind=True)
        def attrs(self, x: int, *, fail: bool = False) -> int:  # type: ignore[no-untyped-def]
            if fail:
                raise ValueError("bad x")
            if self.request.retries == 0:
                self.retry(countdown=0)
            return x + 1

        async with worker(app):
            ok = await attrs.aapply_async((1,), {"fail": False})
            bad = await attrs.aapply_async((2,), {"fail": True})
            assert await ok.aget(timeout=20) == 2
            with pytest.raises(TaskFailed):
                await bad.aget(timeout=20)
        seen = app.AsyncResult(ok.id)  # read from the results bucket
        await seen.aget(timeout=20)
        assert seen.name == "t.attrs" and seen.retries == 1 and seen.result == 2
        assert seen.args == [1] and seen.kwargs == {"fail": False} and seen.queue == "default"
        assert isinstance(seen.date_done, dt.datetime) and seen.date_done.tzinfo is not None
        assert seen.traceback is None
        seen.maybe_throw()  # succeeded: nothing to raise
        failed = app.AsyncResult(bad.id)
        await failed.aget(timeout=20, propagate=False)
        assert failed.traceback is not None and "ValueError: bad x" in failed.traceback
        with pytest.raises(TaskFailed, match="bad x"):
            failed.maybe_throw()
        assert await asyncio.to_thread(ok.wait, 10) == 2
        assert await asyncio.to_thread(lambda: [value for _, value in ok.collect(10)]) == [2]
        called: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        ok.then(lambda r: loop.call_soon_threadsafe(called.put_nowait, r.result))
        assert await called.get() == 2
    finally:
        await app.aclose()


async def test_args_are_not_stored_without_result_extended(app: Natask) -> None:
    @app.task(name="t.plainargs")
    def plainargs(x: int) -> int:
        return x

    async with worker(app):
        result = await plainargs.adelay(5)
        assert await result.aget(timeout=20) == 5
    seen = app.AsyncResult(result.id)
    await seen.aget(timeout=20)
    assert seen.args is None and seen.kwargs is None and seen.queue is None and seen.name == "t.plainargs"


async def test_call_options_time_limit_shadow_and_routing_key(
        app: Natask, caplog: pytest.LogCaptureFixture) -> None:
    @app.task(name="t.slow")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    caplog.set_level(logging.INFO, logger="natask.worker")
    async with worker(app, queues=["default", "other"]):
        with pytest.raises(TaskFailed, match="TimeLimitExceeded"):
            await (await slow.aapply_async((30,), time_limit=0.2)).aget(timeout=20)
        result = await slow.aapply_async((0,), shadow="slow[report-7]", routing_key="other")
        assert await result.aget(timeout=20) == "done"
        by_name = await app.asend_task("t.slow", (0,), shadow="by-name", time_limit=5)
        assert await by_name.aget(timeout=20) == "done"
    assert any("slow[report-7]" in r.getMessage() and result.id in r.getMessage() for r in caplog.records)
    assert any("by-name" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="no exchanges"):
        await slow.aapply_async((0,), exchange="tasks")
    with pytest.raises(ConfigError, match="retry_policy takes max_retries"):
        await slow.aapply_async((0,), retry_policy={"retry_errors": (OSError,)})
    with pytest.raises(ConfigError, match="invalid queue name"):
        await slow.aapply_async((0,), routing_key="a.b")
    with pytest.raises(ConfigError, match="disagree"):
        await slow.aapply_async((0,), routing_key="other", queue="default")


async def test_call_ignore_result_stores_nothing(app: Natask) -> None:
    ran = asyncio.Event()

    @app.task(name="t.fire")
    def fire() -> int:
        ran.set()
        return 1

    @app.task(name="t.after")
    def after() -> int:
        return 2

    async with worker(app, concurrency=1):
        ignored = await fire.aapply_async(ignore_result=True)
        await ran.wait()
        assert await (await after.adelay()).aget(timeout=20) == 2
    assert await app.AsyncResult(ignored.id).astate() == "PENDING"


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
async def test_call_compression_and_serializer(app: Natask, compression: str) -> None:
    @app.task(name="t.big")
    def big(text: str, n: int = 1) -> int:
        return len(text) * n

    text = "natask " * 10_000
    async with worker(app):
        assert await (await big.aapply_async((text,), compression=compression)).aget(timeout=20) == len(text)
        call = await big.aapply_async((text,), {"n": 2}, compression=compression, serializer="json")
        assert await call.aget(timeout=20) == 2 * len(text)
    with pytest.raises(ConfigError, match="compression"):
        await big.aapply_async(("x",), compression="lzma")


async def test_call_retry_and_retry_policy_bound_the_publish_attempts(nats_server: NatsServer) -> None:
    """Celery's ``retry=False`` publishes once and ``retry_policy`` max_retries+1 times, where natask would
    otherwise retry until ``publish_timeout`` (here far longer): the error names the attempts made."""
    app = Natask("test", servers=[nats_server.url], publish_timeout=100)

    @app.task(name="t.once")
    def once() -> int:
        return 1

    try:
        await once.adelay()  # connected, the stream made
        nats_server.stop()
        with pytest.raises(BrokerError, match=r"after 1 attempt\(s\).*retry=False"):
            await once.aapply_async(retry=False)
        with pytest.raises(BrokerError, match=r"after 2 attempt\(s\).*retry=policy"):
            await once.aapply_async(retry_policy={"max_retries": 1, "interval_start": 0})
    finally:
        nats_server.start()
        await app.aclose()
