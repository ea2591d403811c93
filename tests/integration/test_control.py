"""Remote control against real servers: ``app.control`` and ``natask control``/``natask inspect``
change and show live workers; hostile control requests get error replies, never a crash."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import nats
import pytest

from natask import Natask, TaskFailed, TaskRevoked, Worker
from natask.server import NatsServer
from natask.testing import worker

from .helpers import ROOT, WorkerProcess
from .test_heal import revoked_on


async def test_inspect_shows_what_the_worker_holds(nats_server: NatsServer) -> None:
    url = nats_server.url.replace("nats://", "nats://someone:secret@")
    app = Natask("ctl", servers=[url], ack_wait=5, connect_options={"password": "hunter2"})
    started, release = asyncio.Event(), asyncio.Event()

    @app.task(name="ctl.hold")
    async def hold() -> None:
        started.set()
        await release.wait()

    @app.task(name="ctl.add")
    def add(x: int, y: int) -> int:
        return x + y

    try:
        async with worker(app) as w:
            running = await hold.adelay()
            await started.wait()
            await app.control.arevoke("gone-1")
            await revoked_on(w, "gone-1")  # the worker learns revokes through its watch
            control = app.control
            [registered] = await control.ainspect("registered")
            # (plus any @shared_task a module imported earlier registered on every app, as Celery does)
            assert {"ctl.add", "ctl.hold"} <= set(registered["registered"]["items"])
            [queues] = await control.ainspect("active_queues")
            assert [q["name"] for q in queues["queues"]] == ["default"]
            [scheduled] = await control.ainspect("scheduled")
            assert scheduled["scheduled"] == [] and "server" in scheduled["note"]
            [reserved] = await control.ainspect("reserved")
            assert reserved["reserved"] == []
            [revoked] = await control.ainspect("revoked")
            assert "gone-1" in revoked["revoked"]["items"]
            [query] = await control.ainspect("query_task", ids=[running.id, "gone-1", "unknown-1"])
            assert query["tasks"][running.id]["state"] == "active"
            assert query["tasks"]["gone-1"]["state"] == "revoked"
            assert "unknown-1" not in query["tasks"]
            [conf] = await control.ainspect("conf")
            text = json.dumps(conf)
            assert "secret" not in text and "hunter2" not in text
            assert conf["conf"]["app"]["connect_options"] == {"password": "***"}
            assert conf["conf"]["worker"]["queues"] == ["default"]
            release.set()
            await running.aget(timeout=10)
    finally:
        await app.aclose()


async def test_rate_limit_set_at_runtime_paces_the_next_starts(app: Natask) -> None:
    ran: list[float] = []

    @app.task(name="ctl.tick")
    def tick() -> None:
        ran.append(time.time())

    async with worker(app) as w:
        [reply] = await app.control.arate_limit("ctl.tick", "1/m")
        assert reply == {"worker": w.ident, "ok": True, "task": "ctl.tick", "rate_limit": "1/m"}
        waits = [asyncio.ensure_future((await tick.adelay()).aget(timeout=20)) for _ in range(2)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            # One start a minute: the other one was reserved a minute on and waits on the server.
            assert len(ran) == 1
            assert w.gate is not None and w.gate.limits.local["ctl.tick"] >= ran[0] + 59
        finally:
            for wait in waits:
                wait.cancel()
        [reply] = await app.control.arate_limit("ctl.tick", None)
        assert reply["ok"] and app.tasks["ctl.tick"].options.rate_limit is None


async def test_time_limit_set_at_runtime_stops_a_long_task(app: Natask) -> None:
    @app.task(name="ctl.long", max_retries=0)
    async def long() -> None:
        await asyncio.sleep(30)

    async with worker(app):
        [reply] = await app.control.atime_limit("ctl.long", 0.2, soft=0.1)
        assert reply["ok"] and reply["time_limit"] == 0.2 and reply["soft_time_limit"] == 0.1
        with pytest.raises(TaskFailed):
            await (await long.adelay()).aget(timeout=20)


async def test_add_and_cancel_consumer(app: Natask) -> None:
    @app.task(name="ctl.where")
    def where() -> str:
        return "ran"

    async with worker(app) as w:
        [reply] = await app.control.aadd_consumer("extra")
        assert reply["ok"] and reply["changed"] and reply["queues"] == ["default", "extra"]
        assert await (await where.aapply_async(queue="extra")).aget(timeout=10) == "ran"
        [reply] = await app.control.acancel_consumer("extra")
        assert reply["ok"] and w.queues == ["default"]
        [queues] = await app.control.ainspect("active_queues")
        assert [q["name"] for q in queues["queues"]] == ["default"]
        [reply] = await app.control.acancel_consumer("default")
        assert "only queue" in reply["error"]
        assert await (await where.adelay()).aget(timeout=10) == "ran"  # still consuming


async def test_pool_grow_and_shrink_show_in_stats(app: Natask) -> None:
    async with worker(app, concurrency=2):
        [reply] = await app.control.apool_grow(3)
        assert reply["concurrency"] == 5
        [stats] = await app.control.ainspect("stats")
        assert stats["concurrency"] == 5
        [reply] = await app.control.apool_shrink(4)
        assert reply["concurrency"] == 1
        [reply] = await app.control.apool_shrink(1)
        assert "below 1" in reply["error"]


async def test_destination_selects_workers(app: Natask) -> None:
    one, two = Worker(app, concurrency=1), Worker(app, concurrency=1)
    one.ident, two.ident = "host:1", "host:2"  # in one process both would be host:pid
    await one.start()
    await two.start()
    try:
        replies = await app.control.apool_grow(1, destination=["host:2"], timeout=10)
        assert [r["worker"] for r in replies] == ["host:2"]
        assert (one.concurrency, two.concurrency) == (1, 2)
        pings = await app.control.ainspect("ping")
        assert [r["worker"] for r in pings] == ["host:1", "host:2"]
    finally:
        await one.stop()
        await two.stop()


async def test_shutdown_stops_the_worker(app: Natask) -> None:
    w = Worker(app, concurrency=1)
    await w.start()
    run = asyncio.ensure_future(w.run())
    [reply] = await app.control.ashutdown()
    assert reply["shutdown"] is True
    await asyncio.wait_for(run, 30)


async def test_revoke_by_name_and_glob_covers_tasks_sent_before(app: Natask) -> None:
    @app.task(name="shop.pay")
    def pay() -> str:
        return "paid"

    @app.task(name="shop.ship")
    def ship() -> str:
        return "shipped"

    @app.task(name="mail.send")
    def send() -> str:
        return "sent"

    before = [await pay.adelay(), await ship.adelay(), await send.adelay()]
    await app.control.arevoke(name="shop.*")
    after = await pay.adelay()
    async with worker(app):
        for revoked in before[:2]:
            with pytest.raises(TaskRevoked):
                await revoked.aget(timeout=10)
        assert await before[2].aget(timeout=10) == "sent"
        assert await after.aget(timeout=10) == "paid"  # sent after the revoke: runs


async def test_revoke_by_name_terminates_running_tasks(app: Natask) -> None:
    started = asyncio.Event()

    @app.task(name="shop.slow", max_retries=0)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    async with worker(app):
        running = await slow.adelay()
        await started.wait()
        await app.control.arevoke(name="shop.slow", terminate=True)
        with pytest.raises(TaskRevoked):
            await running.aget(timeout=20)


@pytest.mark.parametrize(("command", "body", "error"), [
    ("rate_limit", b"\xc1", "not a msgpack map"),
    ("rate_limit", msgpack.packb([1, 2]), "must be a map"),
    ("rate_limit", msgpack.packb({"args": [1]}), "'args' must be a map"),
    ("ping", msgpack.packb({"destination": "host:1"}), "'destination' must be a list"),
    ("nope", b"", "unknown command 'nope'"),
    ("rate_limit", msgpack.packb({"args": {"task": "ctl.x", "rate": 5}}), "'rate' must be a string"),
    ("rate_limit", msgpack.packb({"args": {"task": "ctl.x", "rate": "fast"}}), "rate_limit must look like"),
    ("rate_limit", msgpack.packb({"args": {"task": "no.such", "rate": "1/s"}}), "no task named"),
    ("time_limit", msgpack.packb({"args": {"task": "ctl.x", "hard": float("nan")}}), "'hard' must be seconds"),
    ("time_limit", msgpack.packb({"args": {"task": "ctl.x"}}), "takes 'hard'"),
    ("add_consumer", msgpack.packb({"args": {"queue": "a b"}}), "queue"),
    ("add_consumer", msgpack.packb({"args": {"queue": 7}}), "'queue' must be a queue name"),
    ("pool_grow", msgpack.packb({"args": {"n": -1}}), "'n' must be an int"),
    ("pool_shrink", msgpack.packb({"args": {"n": "2"}}), "'n' must be an int"),
    ("query_task", msgpack.packb({"args": {"ids": ["a.b"]}}), "query_task takes 'ids'"),
    ("query_task", msgpack.packb({"args": {"ids": ["x"] * 101}}), "query_task takes 'ids'"),
])
async def test_hostile_control_requests_get_errors(app: Natask, command: str, body: bytes, error: str) -> None:
    @app.task(name="ctl.x")
    def x() -> None:
        return None

    async with worker(app) as w:
        nc = await nats.connect(app.config.servers[0])
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(app.names.control_subject(command), body, reply=inbox)
            reply = msgpack.unpackb((await sub.next_msg(timeout=10)).data)
        finally:
            await nc.close()
        assert reply["worker"] == w.ident and error in reply["error"], reply
        [pong] = await app.control.ainspect("ping")  # still answering
        assert pong["pong"] is True
        assert w.concurrency == 8 and w.queues == ["default"]


def natask_cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"NATS_URL": url, "NATASK_TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "natask", *args, "-A", "tests.integration.workerapp:app"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


async def test_cli_controls_a_worker_process(nats_server: NatsServer, tmp_path: Path) -> None:
    url, prefix = nats_server.url, "ctlcli"
    proc = await WorkerProcess(url, prefix, tmp_path / "log", concurrency=2).ready()
    try:
        out = await asyncio.to_thread(natask_cli, url, prefix, "inspect", "registered", "--json")
        assert out.returncode == 0, out.stderr
        [reply] = json.loads(out.stdout)
        assert "it.add" in reply["registered"]["items"]
        ident = reply["worker"]
        out = await asyncio.to_thread(natask_cli, url, prefix, "control", "pool_grow", "3", "--destination", ident)
        assert out.returncode == 0 and "\"concurrency\": 5" in out.stdout, out.stdout + out.stderr
        out = await asyncio.to_thread(natask_cli, url, prefix, "control", "rate_limit", "it.add", "fast")
        assert out.returncode == 1 and "rate must look like" in out.stderr
        out = await asyncio.to_thread(natask_cli, url, prefix, "control", "cancel_consumer", "default")
        assert out.returncode == 1 and "only queue" in out.stdout
        out = await asyncio.to_thread(natask_cli, url, prefix, "control", "shutdown")
        assert out.returncode == 0, out.stdout + out.stderr
        assert await proc.wait(30) == 0
    finally:
        proc.kill()
