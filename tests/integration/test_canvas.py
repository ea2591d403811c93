"""Canvas against a real nats-server: chains, groups, chords, link/link_error, duplicates and restarts."""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
from typing import Any

import nats
import nats.aio.msg
import pytest

from natask import AsyncResult, GroupResult, Natask, TaskFailed, TaskRevoked, chain, chord, group
from natask.message import loads
from natask.naming import HDR_CHECK_STORED, HDR_MSG_ID, HDR_REPLY
from natask.server import NatsServer
from natask.testing import worker


class Calls:
    """What the test tasks were called with; lets a test await the n-th call."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait(self, n: int, timeout: float = 20) -> list[Any]:
        async def until() -> None:
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)
        return self.items


def arithmetic(app: Natask) -> tuple[Any, Any, Any]:
    @app.task(name="t.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="t.tsum")
    async def tsum(values: list[int]) -> int:
        return sum(values)

    return add, mul, tsum


async def results_subscription(url: str, on_state: Any) -> Any:
    """A core subscriber on the results bucket: calls ``on_state(task_id, state)`` per write."""
    nc = await nats.connect(url)

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        on_state(msg.subject.rsplit(".", 1)[-1], loads(msg.data)["state"])

    await nc.subscribe("$KV.natask_results_tasks.>", cb=on_msg)
    await nc.flush()
    return nc


# -- chains -----------------------------------------------------------------------------------------
async def test_chain_passes_each_result_on_and_returns_the_last_steps(app: Natask) -> None:
    add, mul, _ = arithmetic(app)

    async with worker(app):
        result = await chain(add.s(1, 2), add.s(3), mul.s(10)).adelay()
        assert await result.aget(timeout=20) == 60
        # the `|` form, arguments given at delay() going to the first step
        piped = await (add.s(1) | add.s(3) | mul.s(10)).adelay(2)
        assert await piped.aget(timeout=20) == 60
        # an immutable step ignores its parent's result
        immutable = await (add.s(1, 2) | add.si(5, 5) | mul.s(2)).adelay()
        assert await immutable.aget(timeout=20) == 20
    # a chain's result is typed AsyncResult | GroupResult (a chain may end in a group): narrow it
    assert isinstance(result, AsyncResult)
    assert result.successful() and result.info == 60
    # the chain's result is its last step's: parent links lead back to the first step
    assert result.task_name == "t.mul"
    second = result.parent
    assert second is not None and second.state == "SUCCESS" and second.info == 6
    first = second.parent
    assert first is not None and first.info == 3
    assert [c.id for c in first.children] == [second.id]
    assert [c.id for c in second.children] == [result.id]


async def test_chain_with_a_group_in_the_middle_collects_its_results(app: Natask) -> None:
    add, _, tsum = arithmetic(app)

    async with worker(app):
        result = await chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s()).adelay()
        assert await result.aget(timeout=20) == 7  # (2+1) + (2+2)
        ending = await chain(add.s(1, 1), group(add.s(10), add.s(20))).adelay()
        assert isinstance(ending, GroupResult)
        assert await ending.aget(timeout=20) == [12, 22]


async def test_nested_workflows_chord_inside_a_chain_and_chains_inside_a_header(app: Natask) -> None:
    add, _, tsum = arithmetic(app)

    async with worker(app):
        header = [add.s(1), chain(add.s(2), add.s(3))]  # each gets 2: 2+1, (2+2)+3
        result = await chain(add.s(1, 1), chord(header, tsum.s()), add.s(100)).adelay()
        assert await result.aget(timeout=20) == 110


async def test_countdown_on_a_later_step_delays_it_after_its_parent(app: Natask) -> None:
    add, _, _ = arithmetic(app)
    done_at: list[float] = []

    @app.task(name="t.stamp")
    async def stamp(value: int) -> int:
        done_at.append(time.time())
        return value

    async with worker(app):
        started = time.time()
        result = await chain(add.s(1, 1), stamp.s().set(countdown=0.5)).adelay()
        assert await result.aget(timeout=20) == 2
    assert done_at[0] - started >= 0.5


async def test_revoked_step_revokes_the_chain_result(app: Natask) -> None:
    add, _, _ = arithmetic(app)
    ran = Calls()

    @app.task(name="t.after")
    async def after(x: int) -> int:
        ran.add(x)
        return x

    expired = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    async with worker(app):
        result = await chain(add.s(1, 1).set(expires=expired), after.s()).adelay()
        with pytest.raises(TaskRevoked, match="expired"):
            await result.aget(timeout=20)
    assert isinstance(result, AsyncResult)
    assert result.state == "REVOKED" and ran.items == []


async def test_failed_step_stops_the_chain_and_fails_its_result(app: Natask) -> None:
    add, _, _ = arithmetic(app)
    ran = Calls()
    errors = Calls()

    @app.task(name="t.boom")
    def boom(x: int) -> int:
        raise ValueError(f"boom at {x}")

    @app.task(name="t.after")
    async def after(x: int) -> int:
        ran.add(x)
        return x

    @app.task(name="t.on_error")
    async def on_error(task_id: str) -> None:
        errors.add(task_id)

    async with worker(app):
        result = await chain(add.s(1, 1), boom.s(), after.s(), after.s()).aapply_async(link_error=on_error.s())
        with pytest.raises(TaskFailed) as info:
            await result.aget(timeout=20)
        (failed_id,) = await errors.wait(1)
    assert info.value.exc_type == "ValueError"
    assert info.value.message == "boom at 2"
    assert "boom at 2" in info.value.traceback
    assert isinstance(result, AsyncResult) and result.state == "FAILURE"
    assert ran.items == []  # the steps after the failure never ran
    failed = app.AsyncResult(failed_id)
    error = await failed.aget(propagate=False, timeout=5)  # the failed step's own stored outcome
    assert isinstance(error, TaskFailed) and error.message == "boom at 2"
    assert errors.items == [failed_id]  # called once, with the failed task's id


async def test_link_and_link_error_on_a_signature(app: Natask) -> None:
    add, _, _ = arithmetic(app)
    linked = Calls()
    errors = Calls()

    @app.task(name="t.record")
    async def record(value: int, tag: str) -> None:
        linked.add((value, tag))

    @app.task(name="t.fail")
    def fail() -> None:
        raise KeyError("nope")

    @app.task(name="t.on_error")
    async def on_error(task_id: str) -> None:
        errors.add(task_id)

    async with worker(app):
        ok = await add.s(2, 2).aapply_async(link=record.s("first"))
        assert await ok.aget(timeout=20) == 4
        assert await linked.wait(1) == [(4, "first")]
        bad = await fail.s().set(link=record.s("never"), link_error=on_error.s()).adelay()
        with pytest.raises(TaskFailed, match="KeyError"):
            await bad.aget(timeout=20)
        assert await errors.wait(1) == [bad.id]
    assert linked.items == [(4, "first")]


# -- groups -----------------------------------------------------------------------------------------
async def test_group_results_in_order_and_completed_count(app: Natask) -> None:
    add, _, _ = arithmetic(app)

    @app.task(name="t.slow_first")
    async def slow_first(i: int) -> int:
        await asyncio.sleep(0.05 * (5 - i))  # later members finish first
        return i

    @app.task(name="t.boom")
    def boom(x: int) -> int:
        raise ValueError(f"boom {x}")

    pending = await group(add.s(i, i) for i in range(10)).adelay()
    assert len(pending) == 10 and len({r.id for r in pending}) == 10
    assert await pending.acompleted_count() == 0
    assert not await pending.aready()
    async with worker(app):
        assert await pending.aget(timeout=20) == [2 * i for i in range(10)]
        assert await pending.acompleted_count() == 10
        assert await pending.aready() and await pending.asuccessful()
        ordered = await group([slow_first.s(i) for i in range(5)]).adelay()
        assert await ordered.aget(timeout=20) == [0, 1, 2, 3, 4]
        mixed = await group(add.s(1, 1), boom.s(7), add.s(2, 2)).adelay()
        with pytest.raises(TaskFailed, match="boom 7"):
            await mixed.aget(timeout=20)
        values = await mixed.aget(timeout=20, propagate=False)
    assert values[0] == 2 and values[2] == 4 and isinstance(values[1], TaskFailed)
    assert await mixed.afailed() and not await mixed.asuccessful()
    assert await mixed.acompleted_count() == 2


async def test_group_of_a_thousand_async_tasks(app: Natask) -> None:
    @app.task(name="t.sq")
    async def sq(x: int) -> int:
        return x * x

    result = await group(sq.s(i) for i in range(1000)).adelay()
    async with worker(app, concurrency=64):
        assert await result.aget(timeout=60) == [i * i for i in range(1000)]
    assert await result.acompleted_count() == 1000


# -- chords -----------------------------------------------------------------------------------------
async def test_chord_callback_gets_the_header_results_in_order(app: Natask) -> None:
    runs = Calls()

    @app.task(name="t.late")
    async def late(i: int) -> int:
        await asyncio.sleep(0.02 * (6 - i))  # later members finish first
        return i * 10

    @app.task(name="t.collect")
    async def collect(values: list[int], tag: str) -> list[int]:
        runs.add((values, tag))
        return values

    async with worker(app):
        result = await chord([late.s(i) for i in range(6)], collect.s("x")).adelay()
        assert await result.aget(timeout=20) == [0, 10, 20, 30, 40, 50]
        piped = await (group(late.s(i) for i in range(3)) | collect.s("y")).adelay()
        assert await piped.aget(timeout=20) == [0, 10, 20]
        empty = await chord(group([], app=app), collect.s("z")).adelay()
        assert await empty.aget(timeout=20) == []
    assert runs.items == [([0, 10, 20, 30, 40, 50], "x"), ([0, 10, 20], "y"), ([], "z")]
    assert isinstance(result, AsyncResult)
    assert result.parent is not None  # the member whose completion fired the callback


async def test_chord_with_a_failing_member_fails_without_running_the_callback(app: Natask) -> None:
    runs = Calls()
    errors = Calls()

    @app.task(name="t.part")
    async def part(i: int) -> int:
        if i == 2:
            raise ValueError(f"part {i} broke")
        return i

    @app.task(name="t.collect")
    async def collect(values: list[int]) -> list[int]:
        runs.add(values)
        return values

    @app.task(name="t.on_error")
    async def on_error(task_id: str) -> None:
        errors.add(task_id)

    async with worker(app):
        result = await chord([part.s(i) for i in range(5)], collect.s()).aapply_async(link_error=on_error.s())
        with pytest.raises(TaskFailed) as info:
            await result.aget(timeout=20)
        (failed_id,) = await errors.wait(1)
        # a second failing chord: the errback runs once however many members fail
        twice = await chord([part.s(2), part.s(2)], collect.s()).aapply_async(link_error=on_error.s())
        with pytest.raises(TaskFailed):
            await twice.aget(timeout=20)
        await errors.wait(2)
        sentinel = await chord([part.s(1)], collect.s()).adelay()  # runs after any stray errback would
        assert await sentinel.aget(timeout=20) == [1]
    assert info.value.exc_type == "ValueError" and info.value.message == "part 2 broke"
    assert isinstance(result, AsyncResult) and result.failed()
    assert app.AsyncResult(failed_id).state == "FAILURE"
    assert runs.items == [[1]]  # only the sentinel's callback ran
    assert len(errors.items) == 2


async def test_header_member_delivered_twice_enqueues_the_callback_once(app: Natask, nats_server: NatsServer) -> None:
    attempts: collections.Counter[int] = collections.Counter()
    zero_twice = asyncio.Event()
    runs = Calls()

    @app.task(name="t.part")
    async def part(i: int) -> int:
        attempts[i] += 1
        if i == 0 and attempts[0] == 2:
            zero_twice.set()
        if i == 2:
            # Finish only after member 0 finished twice: a completion counter would fire early.
            await asyncio.wait_for(zero_twice.wait(), 20)
        return i + 100

    @app.task(name="t.collect")
    async def collect(values: list[int]) -> list[int]:
        runs.add(values)
        return values

    result = await chord([part.s(i) for i in range(3)], collect.s()).adelay()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    callback_publishes: list[tuple[str, str]] = []

    async def on_callback(msg: nats.aio.msg.Msg) -> None:
        body = loads(msg.data)
        callback_publishes.append((body["id"], body["parent_id"]))

    await nc.subscribe("tasks.default.t.collect", cb=on_callback)
    members = [await js.get_msg("NATASK_TASKS", seq=seq) for seq in (1, 2, 3)]

    async def redeliver(member: Any, msg_id: str) -> None:
        """Publish a copy of a member's message under another message id (what a duplicate looks like),
        without the check for a stored outcome: as if both copies ran at once, which the check cannot
        prevent."""
        headers = {k: v for k, v in (member.headers or {}).items() if k not in (HDR_REPLY, HDR_CHECK_STORED)}
        headers[HDR_MSG_ID] = msg_id
        await js.publish(member.subject, member.data, headers=headers)

    try:
        await redeliver(members[0], "dup-1")
        async with worker(app):
            assert await result.aget(timeout=20) == [100, 101, 102]
        # (leaving the block drained the worker: every follow-up of phase one is done)
        assert attempts == {0: 2, 1: 1, 2: 1}
        # Two deliveries of member 0 finishing together may both publish the callback: the same
        # id (Nats-Msg-Id) makes JetStream store it once.
        assert {callback for callback, _ in callback_publishes} == {result.id}
        published = len(callback_publishes)
        # Long after the callback ran (and its message was acked), the member whose completion
        # fired the chord runs again: it must recognise the chord as sent, not publish again.
        (winner,) = {parent for _, parent in callback_publishes}
        (message,) = [m for m in members if (m.headers or {}).get(HDR_MSG_ID) == winner]
        index = members.index(message)
        rerun = asyncio.Event()
        sub = await results_subscription(nats_server.url, lambda tid, state: rerun.set() if tid == winner else None)
        async with worker(app):
            await redeliver(message, "dup-2")
            await asyncio.wait_for(rerun.wait(), 20)
        await sub.close()
        await nc.flush()
        assert attempts[index] == (3 if index == 0 else 2)
        assert runs.items == [[100, 101, 102]]
        assert len(callback_publishes) == published  # the late duplicate published nothing (KV guard)
    finally:
        await nc.close()


async def test_worker_stopped_mid_chord_loses_nothing_and_fires_once(app: Natask, nats_server: NatsServer) -> None:
    attempts: collections.Counter[int] = collections.Counter()
    sleeping = Calls()
    runs = Calls()
    successes = Calls()

    @app.task(name="t.part")
    async def part(i: int) -> int:
        attempts[i] += 1
        if i >= 2 and attempts[i] == 1:
            sleeping.add(i)
            await asyncio.sleep(3600)  # cancelled when the worker stops
        return i * 10

    @app.task(name="t.collect")
    async def collect(values: list[int]) -> list[int]:
        runs.add(values)
        return values

    sub = await results_subscription(nats_server.url,
                                     lambda tid, state: successes.add(tid) if state == "SUCCESS" else None)
    try:
        result = await chord([part.s(i) for i in range(4)], collect.s()).adelay()
        async with worker(app, grace=0):
            await sleeping.wait(2)
            await successes.wait(2)  # members 0 and 1 finished and are recorded in the chord
        assert runs.items == []
        async with worker(app):
            assert await result.aget(timeout=20) == [0, 10, 20, 30]
            await runs.wait(1)
        assert attempts[2] >= 2 and attempts[3] >= 2  # at least once: cancelled, then run again
        assert runs.items == [[0, 10, 20, 30]]
    finally:
        await sub.close()
