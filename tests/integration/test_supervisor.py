"""``natask worker --processes N`` and ``--max-tasks-per-child``."""

from __future__ import annotations

import collections
import signal
from pathlib import Path

from natask import Natask
from natask.dlq import DeadLetters
from natask.server import NatsServer

from .helpers import WorkerProcess, log_lines
from .workerapp import add, crash


def producer(url: str, prefix: str) -> Natask:
    app = Natask("producer", servers=[url], subject_prefix=prefix)
    app.task(name=add.name)(add.fn)
    app.task(name=crash.name, max_retries=1)(crash.fn)
    return app


async def test_processes_share_work_and_drain_together(nats_server: NatsServer, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    app = producer(nats_server.url, "sup")
    sup = await WorkerProcess(nats_server.url, "sup", log, concurrency=2,
                              extra=["--processes", "2"]).ready(processes=2)
    try:
        results = await app.tasks["it.add"].adelay_many([(i, 0) for i in range(100)])
        assert [await r.aget(timeout=30) for r in results] == list(range(100))
        assert len({r.worker for r in results}) == 2  # both children took tasks
    finally:
        sup.signal(signal.SIGTERM)
        code = await sup.wait()
        await app.aclose()
    assert code == 0
    assert sup.output().count("stopped after") == 2  # each child drained and said so


async def test_crashed_child_is_restarted(nats_server: NatsServer, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    app = producer(nats_server.url, "sup")
    sup = await WorkerProcess(nats_server.url, "sup", log, ack_wait=1, extra=["--processes", "2"]).ready()
    try:
        broker = await app.client.broker()
        await broker.ensure_dlq()
        dead = await broker.subscribe("natask.dlq.sup.>")
        result = await app.tasks["it.crash"].adelay("boom")
        await dead.next_msg(timeout=60)  # two crashes, two restarts, then dead-lettered
        [entry] = await DeadLetters(app).list()
        assert entry.id == result.id
        crash_pids = [line.split()[-1] for line in log_lines(log) if line.startswith("crash boom")]
        assert len(crash_pids) == 2 and crash_pids[0] != crash_pids[1]
        assert await app.tasks["it.add"].adelay(1, 2) and "exited with 3; restarting" in sup.output()
    finally:
        sup.signal(signal.SIGTERM)
        assert await sup.wait() == 0
        await app.aclose()


async def test_max_tasks_per_child_recycles_the_process(nats_server: NatsServer, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    app = producer(nats_server.url, "sup")
    sup = await WorkerProcess(nats_server.url, "sup", log, concurrency=1,
                              extra=["--max-tasks-per-child", "4"]).ready()
    try:
        for i in range(10):  # one at a time, so each child runs exactly its quota
            assert await (await app.tasks["it.add"].adelay(i, i)).aget(timeout=30) == 2 * i
    finally:
        sup.signal(signal.SIGTERM)
        assert await sup.wait() == 0
        await app.aclose()
    per_pid = collections.Counter(line.split()[-1] for line in log_lines(log))
    assert sorted(per_pid.values()) == [2, 4, 4]


async def test_worker_command_with_the_process_pool_runs_def_tasks_in_children(nats_server: NatsServer,
                                                                              tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    app = producer(nats_server.url, "pool")
    sup = await WorkerProcess(nats_server.url, "pool", log, concurrency=2, extra=["--pool", "processes"]).ready()
    try:
        results = await app.tasks["it.add"].adelay_many([(i, 1) for i in range(6)])
        assert [await r.aget(timeout=30) for r in results] == [i + 1 for i in range(6)]
    finally:
        sup.signal(signal.SIGTERM)
        code = await sup.wait()
        await app.aclose()
    assert code == 0
    pids = {int(line.split()[-1]) for line in log.read_text().splitlines()}
    assert pids and sup.proc.pid not in pids  # run by the pool's children, not the worker process
    assert "processes pool" in sup.output()
