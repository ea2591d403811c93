"""Hostile messages and stale workers against real servers: the subject decides what runs, replies go
only to inboxes, every wire value is validated and a bad message is dead-lettered once, a final
outcome is stored once."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client

from natask import Natask, TaskFailed
from natask.dlq import DeadLetter, DeadLetters
from natask.message import dumps, loads
from natask.naming import HDR_CHECK_STORED
from natask.server import NatsServer
from natask.testing import worker

from .helpers import KVEvents, WorkerProcess


def envelope(task: str, args: list[Any] | None = None, task_id: str = "a" * 32, **extra: Any) -> bytes:
    """A version-1 task message body, as a producer (or an attacker) writes it."""
    return dumps({"v": 1, "id": task_id, "task": task, "args": args or [], "kwargs": {}, **extra})


@pytest.fixture
async def raw(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A plain nats-py connection: what an attacker with the right to publish has."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def dead_letters(app: Natask, count: int, timeout: float = 20) -> list[DeadLetter]:
    """Wait until ``count`` dead letters of the app are stored; return them."""
    broker = await app.client.broker()
    await broker.ensure_dlq()
    sub = await broker.subscribe(f"natask.dlq.{app.config.subject_prefix}.>")
    try:
        entries = await DeadLetters(app).list()
        while len(entries) < count:
            await sub.next_msg(timeout=timeout)
            entries = await DeadLetters(app).list()
    finally:
        await sub.unsubscribe()
    return entries


async def test_long_names_never_cost_the_worker_its_connection(app: Natask, raw: Client) -> None:
    @app.task(name="t.ok")
    def ok(x: int) -> int:
        return x

    long = "x" * 5000
    async with worker(app, concurrency=2) as w:
        await ok.adelay(0)  # the stream exists
        js = raw.jetstream()
        await js.publish("tasks.default.t.ok", envelope(long, [1]))  # a long name in the body
        await js.publish("tasks.default.t.ok", b"\xc1garbage", headers={"Natask-Task": long})  # ...in a header
        await js.publish("tasks.default." + "y" * 2000, envelope("y" * 2000))  # ...in the subject
        entries = await dead_letters(app, 3)
        assert await (await ok.adelay(7)).aget(timeout=10) == 7  # still consuming, still connected
        assert w.broker_.nc.is_connected
    assert sorted((e.reason, e.task) for e in entries) == [
        ("invalid subject", "_invalid"), ("undecodable", "t.ok"), ("undecodable", "t.ok")]


async def test_the_subject_decides_which_task_runs(app: Natask, raw: Client) -> None:
    """Permissions are granted per subject: a body naming another task than its subject is forged."""
    ran: list[str] = []

    @app.task(name="t.allowed")
    def allowed() -> str:
        ran.append("allowed")
        return "allowed"

    @app.task(name="t.secret", queue="admin")
    def secret() -> str:
        ran.append("secret")
        return "secret"

    async with worker(app, queues=["default", "admin"]):
        await app.asend_task("t.allowed")
        forged_id = "f" * 32
        await raw.jetstream().publish("tasks.default.t.allowed", envelope("t.secret", task_id=forged_id))
        [entry] = await dead_letters(app, 1)
        assert entry.reason == "forged" and "t.secret" in entry.error and entry.id == forged_id
        # The RPC path: the same rule, the caller gets the error.
        reply = await raw.request("natask.rpc.tasks.default.t.allowed", envelope("t.secret"), timeout=10)
        record = loads(reply.data)
        assert record["state"] == "FAILURE" and record["exc_type"] == "natask.Forged"
        assert await app.tasks["t.allowed"].acall() == "allowed"
    assert "secret" not in ran
    # Nothing is stored under the forged message's id: its sender's claims are not trusted.
    assert await app.AsyncResult(forged_id).astate() == "PENDING"


async def test_reply_subjects_cannot_write_results_or_revokes(app: Natask, raw: Client) -> None:
    @app.task(name="t.ok")
    def ok(x: int) -> int:
        return x

    async with worker(app):
        victim = await ok.adelay(1)
        assert await victim.aget(timeout=10) == 1
        target = "b" * 32
        js = raw.jetstream()
        for reply in (f"$KV.natask_results_tasks.{victim.id}", f"$KV.natask_revoked_tasks.{target}",
                      "_INBOX.>", "tasks.default.t.ok"):
            await js.publish("tasks.default.t.ok", envelope("t.ok", [666], task_id="c" * 32),
                             headers={"Natask-Reply": reply, "Nats-Msg-Id": reply})
        entries = await dead_letters(app, 4)
        assert {e.reason for e in entries} == {"forged"}
        # RPC and control answer only on inboxes, too.
        await raw.publish("natask.rpc.tasks.default.t.ok", envelope("t.ok", [667]),
                          reply=f"$KV.natask_results_tasks.{victim.id}")
        await raw.publish("natask.control.tasks.stats", b"", reply=f"$KV.natask_revoked_tasks.{target}")
        await raw.flush()
        assert await ok.acall(5) == 5  # answered after the two above (one connection, in order)
        later = await ok.aapply_async((2,), task_id=target)
        assert await later.aget(timeout=10) == 2  # not revoked
        checked = app.AsyncResult(victim.id)
        assert await checked.aget(timeout=10) == 1 and checked.worker == victim.worker


@pytest.mark.parametrize("headers, body", [
    ({"Natask-Retries": "abc"}, None),
    ({"Natask-Retries": "-1000000000"}, None),
    ({"Natask-Retries": "99999999999"}, None),
    ({}, {"eta": math.inf}),
    ({}, {"eta": 1e300}),
    ({}, {"expires": math.nan}),
    ({}, {"task": "t...ok"}),
    ({}, {"id": "a*b"}),
], ids=["retries-text", "retries-negative", "retries-huge", "eta-inf", "eta-1e300", "expires-nan", "empty-token",
        "wildcard-id"])
async def test_a_bad_value_is_dead_lettered_once(app: Natask, raw: Client, headers: dict[str, str],
                                                 body: dict[str, Any] | None) -> None:
    runs: list[int] = []

    @app.task(name="t.ok")
    def ok(x: int) -> int:
        runs.append(x)
        return x

    fields = {"v": 1, "id": "d" * 32, "task": "t.ok", "args": [1], "kwargs": {}, **(body or {})}
    data = msgpack.packb(fields)
    async with worker(app, concurrency=2):
        await app.asend_task("t.ok", [0])
        js = raw.jetstream()
        for i in range(2):  # two at once must not stall a -c 2 worker
            await js.publish("tasks.default.t.ok", data, headers={**headers, "Nats-Msg-Id": f"bad-{i}"})
        entries = await dead_letters(app, 2)
        assert await (await ok.adelay(3)).aget(timeout=10) == 3
    info = await (await app.client.broker()).js.consumer_info("NATASK_TASKS", "default")  # drained: all acked
    assert len(entries) == 2 and runs == [0, 3]
    assert info.num_redelivered == 0 and info.num_ack_pending == 0  # each handled once, none looping


async def test_a_stale_run_cannot_replace_the_first_final_outcome(nats_server: NatsServer, tmp_path: Path) -> None:
    """Worker A is frozen (SIGSTOP) past ack_wait while it runs a task; worker B runs it again and
    stores SUCCESS. A resumes, reports progress and fails: neither replaces B's outcome."""
    app = Natask("producer", servers=[nats_server.url], subject_prefix="stale")
    stale = app.task(name="it.stale", track_started=True)(lambda frozen_pid: "")
    log = tmp_path / "log"
    a = await WorkerProcess(nats_server.url, "stale", log, ack_wait=1).ready()
    b: WorkerProcess | None = None
    try:
        async with KVEvents(nats_server.url, "stale") as events:
            result = await stale.adelay(a.proc.pid)
            await events.reached(result.id, "STARTED")
            a.signal(signal.SIGSTOP)
            b = await WorkerProcess(nats_server.url, "stale", log, ack_wait=1).ready()
            assert await result.aget(timeout=20) == f"ran in {b.proc.pid}"
            a.signal(signal.SIGCONT)
            a.signal(signal.SIGTERM)  # A drains: its stale run reports progress and fails first
            assert await a.wait() == 0
        assert "late failure" in a.output()  # the stale run did finish, after B's outcome was stored
        stored = app.AsyncResult(result.id)
        assert await stored.astate() == "SUCCESS"  # neither replaced the first final outcome
        assert await stored.aget(timeout=5) == f"ran in {b.proc.pid}"
    finally:
        a.signal(signal.SIGCONT)
        for w in (a, b):
            if w is not None:
                w.signal(signal.SIGTERM)
                await w.wait()
        await app.aclose()


async def test_a_chosen_id_sent_again_after_a_server_restart_runs_once(app: Natask, nats_server: NatsServer) -> None:
    """JetStream forgets acknowledged message ids when it restarts (WorkQueue deletes acked
    messages, and its duplicate table is rebuilt from the stored ones): the worker's check of the
    stored outcome keeps a re-sent id from running twice."""
    runs: list[int] = []

    @app.task(name="t.once")
    def once(x: int) -> int:
        runs.append(x)
        return x

    ids = [f"order-{i}" for i in range(30)]
    async with worker(app):
        first = [await once.aapply_async((i,), task_id=task_id) for i, task_id in enumerate(ids)]
        assert [await r.aget(timeout=10) for r in first] == list(range(30))
    nats_server.restart()
    async with worker(app):
        again = [await once.aapply_async((i,), task_id=task_id) for i, task_id in enumerate(ids)]
        assert [await r.aget(timeout=20) for r in again] == list(range(30))  # answered from the store
    assert sorted(runs) == list(range(30))


async def test_only_redeliveries_and_chosen_ids_read_the_store_first(app: Natask, raw: Client) -> None:
    sub = await raw.subscribe("tasks.default.>")
    await raw.flush()
    add = app.task(name="t.add")(lambda x, y: x + y)
    await add.adelay(1, 2)
    await add.aapply_async((1, 2), task_id="mine")
    generated, chosen = [dict((await sub.next_msg(timeout=10)).headers or {}) for _ in range(2)]
    assert HDR_CHECK_STORED not in generated and chosen[HDR_CHECK_STORED] == "1"


async def test_a_result_too_large_fails_after_one_run(nats_server: NatsServer) -> None:
    app = Natask("test", servers=[nats_server.url], ack_wait=5, large_payload_limit=0)  # no Object Store share
    runs: list[int] = []

    @app.task(name="t.big")
    def big() -> bytes:
        runs.append(1)
        return os.urandom(2 * 1024 * 1024)

    async with worker(app):
        result = await big.adelay()
        with pytest.raises(TaskFailed, match=r"over the \d+ bytes the server.s max_payload leaves") as info:
            await result.aget(timeout=10)
        assert info.value.exc_type == "natask.PayloadTooLarge"
        with pytest.raises(TaskFailed, match="max_payload"):
            await big.acall()
    assert len(runs) == 2 and await DeadLetters(app).list() == []
    await app.aclose()


async def test_a_schedule_may_only_fire_into_its_own_queue(app: Natask, raw: Client) -> None:
    """NATS checks a schedule message's subject, not its target: the worker checks that a fired
    message came from its own queue's schedule for that task id (``Nats-Scheduler``, set by the
    server)."""
    ran: list[str] = []

    @app.task(name="t.secret", queue="admin")
    def secret() -> None:
        ran.append("secret")

    @app.task(name="t.later")
    def later() -> str:
        return "later"

    async with worker(app, queues=["default", "admin"]):
        await app.asend_task("t.later")  # the stream exists
        at = "@at 2000-01-01T00:00:00Z"  # due at once
        js = raw.jetstream()
        forged = envelope("t.secret", task_id="e" * 32)
        await js.publish(f"tasks._sched.default.{'e' * 32}", forged,
                         headers={"Nats-Schedule": at, "Nats-Schedule-Target": "tasks.admin.t.secret"})
        [entry] = await dead_letters(app, 1)
        assert entry.reason == "forged" and "tasks._sched.default" in entry.error
        # A schedule of the task's own queue and id fires as usual.
        own = envelope("t.later", task_id="f" * 32)
        await js.publish(f"tasks._sched.default.{'f' * 32}", own,
                         headers={"Nats-Schedule": at, "Nats-Schedule-Target": "tasks.default.t.later",
                                  "Natask-Reply": f"{(await app.client.broker()).reply_prefix}.{'f' * 32}"})
        assert await app.AsyncResult("f" * 32).aget(timeout=10) == "later"
    assert ran == []
