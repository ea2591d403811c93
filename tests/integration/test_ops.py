"""Operating natask: inspect, status, purge, events, metrics, health, logs, call/result CLI."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from pathlib import Path

from natask import Natask
from natask.control import inspect, purge, queues, status
from natask.events import EventStream
from natask.logs import JsonFormatter, TaskContextFilter
from natask.metrics import serve
from natask.server import NatsServer
from natask.testing import worker

from .helpers import WorkerProcess
from .test_cli import APP, natask_cli


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_inspect_answers_while_every_thread_is_busy(app: Natask) -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    @app.task(name="t.block")
    def block() -> None:
        started.release()
        release.wait(20)

    async with worker(app, concurrency=2) as w:
        results = [await block.adelay() for _ in range(2)]
        for _ in range(2):
            await asyncio.to_thread(started.acquire)
        try:
            [pong] = await inspect(app, "ping", timeout=0.5)
            [stats] = await inspect(app, "stats", timeout=0.5)
            [active] = await inspect(app, "active", timeout=0.5)
        finally:
            release.set()
        assert pong == {"worker": w.ident, "pong": True}
        assert stats["running"] == 2 and stats["concurrency"] == 2 and stats["queues"] == ["default"]
        assert sorted(t["id"] for t in active["active"]) == sorted(r.id for r in results)
        assert {t["name"] for t in active["active"]} == {"t.block"}
        for r in results:
            await r.aget(timeout=10)


async def test_status_and_purge(app: Natask) -> None:
    @app.task(name="t.slow", queue="reports")
    def slow() -> None: ...

    async with worker(app, queues=["reports"]):
        pass  # creates the queue's consumer
    for _ in range(5):
        await slow.adelay()
    await app.asend_task("t.missing", queue="reports")
    [q] = await queues(app)
    assert (q.name, q.pending, q.in_flight) == ("reports", 6, 0)
    info = await status(app, timeout=0.3)
    assert info["queues"][0]["pending"] == 6 and info["dlq"] == 0 and info["workers"] == []
    assert await purge(app, "reports") == 6
    [q] = await queues(app)
    assert q.pending == 0


async def test_events_follow_task_lifecycle(app: Natask) -> None:
    @app.task(name="t.ev")
    def ev(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    seen: list[dict[str, object]] = []
    stream = await EventStream(app).__aenter__()

    async def collect() -> None:
        async for event in stream:  # the kinds travel on subjects of their own: in any order
            seen.append(event)
            if {"task-started", "task-succeeded", "task-failed"} <= {e["type"] for e in seen}:
                return

    collector = asyncio.create_task(collect())
    async with worker(app) as w:
        ok = await ev.adelay(1)
        bad = await ev.adelay(-1)
        await ok.aget(timeout=10)
        await asyncio.wait_for(collector, 10)
    await stream.__aexit__()
    kinds = [(e["type"], e.get("id")) for e in seen if str(e["type"]).startswith("task-")]
    assert ("task-started", ok.id) in kinds and ("task-succeeded", ok.id) in kinds
    assert ("task-failed", bad.id) in kinds
    assert all(e["worker"] == w.ident for e in seen)


async def test_metrics_and_health_endpoints(app: Natask) -> None:
    @app.task(name="t.m")
    async def m(x: int) -> int:
        return x

    async with worker(app) as w:
        [server] = await serve(w, metrics_port=0, health_port=None, host="127.0.0.1")
        health = (await serve(w, metrics_port=None, health_port=0, host="127.0.0.1"))[0]
        try:
            for i in range(3):
                await (await m.adelay(i)).aget(timeout=10)
            code, body = await http_get(server.port, "/metrics")
            assert code == 200
            assert 'natask_tasks_total{outcome="succeeded",task="t.m"} 3.0' in body
            assert 'natask_task_duration_seconds_count{task="t.m"} 3.0' in body
            code, body = await http_get(health.port, "/health")
            assert code == 200 and json.loads(body)["connected"] is True
            assert (await http_get(health.port, "/nope"))[0] == 404
            await w.stop()
            code, body = await http_get(health.port, "/health")
            assert code == 503 and json.loads(body)["consuming"] is False
        finally:
            await server.stop()
            await health.stop()


async def test_log_lines_during_a_task_carry_its_id_and_name(app: Natask) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TaskContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("user.code")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    @app.task(name="t.talk")
    def talk() -> None:
        logger.info("inside the task")

    @app.task(name="t.atalk")
    async def atalk() -> None:
        logger.info("inside the async task")

    try:
        async with worker(app):
            r1, r2 = await talk.adelay(), await atalk.adelay()
            await r1.aget(timeout=10)
            await r2.aget(timeout=10)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {(x["message"], x.get("task_id"), x.get("task_name")) for x in lines} == {
        ("inside the task", r1.id, "t.talk"),
        ("inside the async task", r2.id, "t.atalk"),
        ("outside", None, None),
    }


async def test_call_and_result_commands(nats_server: NatsServer, tmp_path: Path) -> None:
    w = await WorkerProcess(nats_server.url, "cli", tmp_path / "log").ready()
    try:
        out = await natask_cli(nats_server.url, "call", "it.add", "--args", "[20, 22]", "-A", APP)
        task_id = out.stdout.strip()
        assert out.returncode == 0 and len(task_id) == 32 and task_id.isalnum()  # only the id
        got = await natask_cli(nats_server.url, "result", task_id, "--wait", "--timeout", "20", "-A", APP)
        assert got.stdout.strip() == "42"
        got = await natask_cli(nats_server.url, "result", task_id, "--json", "-A", APP)
        assert json.loads(got.stdout)["state"] == "SUCCESS"
        bad = await natask_cli(nats_server.url, "call", "it.add", "--args", "{", "-A", APP)
        assert bad.returncode == 2 and "must be JSON" in bad.stderr
        shown = await natask_cli(nats_server.url, "status", "-A", APP)
        assert "default" in shown.stdout and "processed=1" in shown.stdout
        pinged = await natask_cli(nats_server.url, "inspect", "ping", "-A", APP)
        assert pinged.stdout.strip().endswith(": pong")
    finally:
        w.signal(15)
        await w.wait()
    started = time.monotonic()
    nobody = await natask_cli(nats_server.url, "inspect", "ping", "--timeout", "0.3", "-A", APP)
    assert nobody.returncode == 1 and "no worker answered" in nobody.stderr
    assert time.monotonic() - started < 30
