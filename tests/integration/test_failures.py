"""Retries, dead letters, delays, expiry, time limits and revokes against a real server."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from zoneinfo import ZoneInfo

import nats
import pytest

from natask import Natask, Reject, Retry, TaskFailed, TaskRevoked
from natask.dlq import DeadLetters
from natask.message import dumps
from natask.server import NatsServer
from natask.testing import worker

from .helpers import KVEvents


async def test_autoretry_backs_off_then_succeeds_with_retry_count(app: Natask) -> None:
    seen: list[int] = []

    @app.task(name="t.flaky", bind=True, autoretry_for=(ConnectionError,), retry_backoff=0.05, retry_jitter=False)
    def flaky(self) -> str:  # type: ignore[no-untyped-def]
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise ConnectionError("try again")
        return "ok"

    async with worker(app):
        assert await (await flaky.adelay()).aget(timeout=20) == "ok"
    assert seen == [0, 1, 2]


async def test_retry_state_is_visible_between_attempts(app: Natask, nats_server: NatsServer) -> None:
    release = asyncio.Event()

    @app.task(name="t.later", bind=True)
    async def later(self) -> int:  # type: ignore[no-untyped-def]
        if self.request.retries == 0:
            raise self.retry(countdown=1.0, exc=TimeoutError("upstream slow"))
        return self.request.retries

    async with worker(app), KVEvents(nats_server.url, "tasks") as events:
        result = await later.adelay()
        await events.reached(result.id, "RETRY")
        observer = app.AsyncResult(result.id)
        assert observer.info["retries"] == 1 and "upstream slow" in observer.info["message"]
        release.set()
        assert await result.aget(timeout=20) == 1


async def test_exhausted_retries_are_dead_lettered_with_the_error(app: Natask) -> None:
    @app.task(name="t.hopeless", max_retries=2, autoretry_for=(ValueError,), retry_backoff=0.01, retry_jitter=False)
    def hopeless() -> None:
        raise ValueError("never works")

    async with worker(app):
        result = await hopeless.adelay()
        with pytest.raises(TaskFailed) as info:
            await result.aget(timeout=20)
    assert info.value.exc_type == "ValueError" and info.value.message == "never works"
    [entry] = await DeadLetters(app).list()
    assert entry.id == result.id and entry.reason == "max retries (2) exceeded"
    assert "never works" in entry.error and entry.attempts == 3


async def test_retry_countdown_never_starts_early(app: Natask) -> None:
    times: list[float] = []

    @app.task(name="t.patient", bind=True)
    def patient(self) -> None:  # type: ignore[no-untyped-def]
        times.append(time.time())
        if self.request.retries == 0:
            raise Retry(countdown=0.7)

    async with worker(app):
        await (await patient.adelay()).aget(timeout=20)
    assert len(times) == 2 and times[1] - times[0] >= 0.7


async def test_tasks_in_backoff_do_not_stall_the_queue(nats_server: NatsServer) -> None:
    app = Natask("stall", servers=[nats_server.url], max_ack_pending=2)
    try:
        @app.task(name="t.backoff", bind=True)
        async def backoff(self) -> int:  # type: ignore[no-untyped-def]
            if self.request.retries == 0:
                raise self.retry(countdown=5)
            return 1

        @app.task(name="t.quick")
        async def quick() -> str:
            return "quick"

        async with worker(app, concurrency=4), KVEvents(nats_server.url, "tasks") as events:
            waiting = [await backoff.adelay() for _ in range(6)]  # 3x max_ack_pending in backoff
            q = await quick.adelay()
            assert await q.aget(timeout=4) == "quick"  # done long before the 5 s backoffs end
            for r in waiting:  # the last one may still be recording its retry as quick finishes
                await events.reached(r.id, "RETRY")
            assert all(events.states[r.id][0] == "RETRY" for r in waiting)
            assert [await r.aget(timeout=30) for r in waiting] == [1] * 6
    finally:
        await app.aclose()


async def test_reject_dead_letters_without_retry(app: Natask) -> None:
    calls: list[int] = []

    @app.task(name="t.picky", autoretry_for=(Exception,))
    def picky() -> None:
        calls.append(1)
        raise Reject("bad input")

    async with worker(app):
        with pytest.raises(TaskFailed):
            await (await picky.adelay()).aget(timeout=10)
    assert calls == [1]
    [entry] = await DeadLetters(app).list()
    assert entry.reason == "rejected" and entry.error == "bad input"


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage\xff\x00",
        b"",
        dumps({"v": 1, "id": "x", "task": "t.ok", "args": [1]})[:-3],  # truncated
        dumps({"v": 99, "id": "x", "task": "t.ok"}),  # unknown wire version
        b"\xdd\xff\xff\xff\xff",  # claims a 4-billion-element array
        b"\x91" * 100_000,  # nested far too deep
        dumps([1, 2, 3]),  # not a map
        dumps({"v": 1, "id": "not a valid id", "task": "t.ok", "args": [1]}),  # would be a bad KV key
    ],
    ids=["garbage", "empty", "truncated", "version", "huge-claim", "deep", "not-a-map", "bad-id"],
)
async def test_poison_messages_are_dead_lettered_and_the_worker_keeps_going(
    app: Natask, nats_server: NatsServer, payload: bytes
) -> None:
    @app.task(name="t.ok")
    def ok(x: int) -> int:
        return x

    await app.client.publish(app.client.prepare("t.ok", [0], {}, queue="default"))  # creates the stream
    nc = await nats.connect(nats_server.url)
    dead = await nc.subscribe("natask.dlq.>")
    await nc.jetstream().publish("tasks.default.t.ok", payload, headers={"Nats-Msg-Id": "bad id:1"})
    async with worker(app):
        assert await (await ok.adelay(7)).aget(timeout=10) == 7
        await dead.next_msg(timeout=10)
    await nc.close()
    [entry] = await DeadLetters(app).list()
    assert entry.reason == "undecodable" and entry.data == payload
    assert entry.id.startswith("seq-") or entry.id == "x"


async def test_unknown_task_and_unbindable_arguments_are_dead_lettered(app: Natask) -> None:
    @app.task(name="t.two")
    def two(a: int, b: int) -> int:
        return a + b

    async with worker(app, unknown_grace=0):
        unknown = await app.asend_task("t.missing", [1])
        bad_args = await app.asend_task("t.two", [1, 2, 3])
        with pytest.raises(TaskFailed, match=r"no task named 't\.missing'") as missing:
            await unknown.aget(timeout=10)
        with pytest.raises(TaskFailed, match="too many positional arguments") as bad:
            await bad_args.aget(timeout=10)
    assert missing.value.exc_type == "natask.TaskNotFound" and bad.value.exc_type == "TypeError"
    reasons = {e.id: e.reason for e in await DeadLetters(app).list()}
    assert reasons == {unknown.id: "unknown task", bad_args.id: "arguments do not bind"}


async def test_unknown_task_waits_for_a_worker_that_knows_it(app: Natask, nats_server: NatsServer) -> None:
    """A rolling deploy: new code publishes a task the running (old) worker does not know yet. The
    message goes back to the server for a while instead of straight to the dead-letter queue, and a
    worker with the new code takes it."""
    new = Natask("new", servers=[nats_server.url])
    new.task(name="t.added")(lambda x: x * 2)
    try:
        broker = await app.client.broker()
        sent = await broker.subscribe("tasks._sched.default.>")  # the old worker hands it back
        async with worker(app):  # the old code: no t.added
            result = await app.asend_task("t.added", [21])
            await sent.next_msg(timeout=10)
        async with worker(new):
            assert await result.aget(timeout=20) == 42
        assert await DeadLetters(app).list() == []
    finally:
        await new.aclose()


async def test_dead_letter_replay_runs_the_task_again(app: Natask) -> None:
    attempts: list[int] = []

    @app.task(name="t.once_bad", max_retries=0, autoretry_for=(KeyError,))
    def once_bad(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise KeyError("first time")
        return x * 10

    async with worker(app):
        result = await once_bad.adelay(4)
        with pytest.raises(TaskFailed):
            await result.aget(timeout=10)
        dlq = DeadLetters(app)
        [entry] = await dlq.list()
        await dlq.replay(entry.id)
        assert await app.AsyncResult(result.id).aget(timeout=10) == 40
    assert attempts == [4, 4]
    assert await DeadLetters(app).list() == []


async def test_countdown_and_eta_are_held_by_the_server_and_never_early(app: Natask, nats_server: NatsServer) -> None:
    started: dict[str, float] = {}

    @app.task(name="t.stamp")
    def stamp(tag: str) -> str:
        started[tag] = time.time()
        return tag

    sent = time.time()
    r1 = await stamp.aapply_async(("countdown",), countdown=1.2)
    berlin = dt.datetime.now(ZoneInfo("Europe/Berlin")) + dt.timedelta(seconds=0.8)
    r2 = await stamp.aapply_async(("eta",), eta=berlin)
    r3 = await stamp.aapply_async(("past",), eta=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    await app.aclose()  # the producer goes away: the delays live on the server
    async with worker(app):
        assert await app.AsyncResult(r3.id).aget(timeout=10) == "past"
        assert await app.AsyncResult(r2.id).aget(timeout=10) == "eta"
        assert await app.AsyncResult(r1.id).aget(timeout=10) == "countdown"
    assert started["countdown"] >= sent + 1.2
    assert started["eta"] >= berlin.timestamp()


async def test_naive_eta_is_refused(app: Natask) -> None:
    from natask import ConfigError

    @app.task(name="t.naive")
    def naive() -> None: ...

    with pytest.raises(ConfigError, match="timezone-aware"):
        await naive.aapply_async(eta=dt.datetime.now())


async def test_expired_task_is_acked_without_running_and_revoked(app: Natask) -> None:
    ran: list[int] = []

    @app.task(name="t.stale")
    def stale() -> None:
        ran.append(1)

    result = await stale.aapply_async(expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
    async with worker(app) as w:
        with pytest.raises(TaskRevoked, match="expired"):
            await result.aget(timeout=10)
        assert w.processed == 0
    assert ran == [] and result.state == "REVOKED" and result.info == {"reason": "expired"}


async def test_time_limit_cancels_async_and_fails_sync(app: Natask) -> None:
    cancelled = asyncio.Event()

    @app.task(name="t.slow_async", time_limit=0.2)
    async def slow_async() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @app.task(name="t.slow_sync", time_limit=0.2)
    def slow_sync() -> None:
        time.sleep(1)

    async with worker(app):
        for task in (slow_async, slow_sync):
            with pytest.raises(TaskFailed) as info:
                await (await task.adelay()).aget(timeout=10)
            assert info.value.exc_type == "natask.TimeLimitExceeded"
    assert cancelled.is_set()


async def test_revoked_task_never_runs_even_across_worker_restarts(app: Natask) -> None:
    ran: list[str] = []

    @app.task(name="t.victim")
    def victim(tag: str) -> str:
        ran.append(tag)
        return tag

    doomed = await victim.adelay("doomed")
    await doomed.arevoke()
    async with worker(app):  # a worker started after the revoke still honours it
        with pytest.raises(TaskRevoked):
            await doomed.aget(timeout=10)
        assert await (await victim.adelay("fine")).aget(timeout=10) == "fine"
    assert ran == ["fine"]


async def test_revoke_terminate_cancels_a_running_async_task(app: Natask) -> None:
    started = asyncio.Event()

    @app.task(name="t.forever")
    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    async with worker(app):
        result = await forever.adelay()
        await asyncio.wait_for(started.wait(), 10)
        await result.arevoke(terminate=True)
        with pytest.raises(TaskRevoked, match="terminated"):
            await result.aget(timeout=10)
