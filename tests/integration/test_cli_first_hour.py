"""The command line as a new user meets it: status, result exit codes, Ctrl-C, connecting, server, two apps."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import nats
import pytest

from natask import Natask
from natask.control import queues
from natask.message import dumps
from natask.server import NatsServer, free_port

from .helpers import WorkerProcess
from .test_cli import APP, natask_cli
from .test_operator_surface import Cli


async def test_status_lists_stranded_queues_and_counts_priority_levels_in(nats_server: NatsServer) -> None:
    app = Natask("cli-test", servers=[nats_server.url], subject_prefix="st")
    try:
        broker = await app.client.broker()
        await broker.ensure_stream()
        await broker.ensure_consumer("busy")  # as a worker consuming "busy" creates it
        await app.asend_task("it.add", [1, 2], queue="busy")
        await app.asend_task("it.add", [3, 4], queue="busy", priority=5)  # consumer _p5_busy
        await app.asend_task("it.add", [5, 6], queue="orphans")
        await app.asend_task("it.add", [7, 8], queue="orphans")
        await app.asend_task("it.add", [9, 9], queue="levels", priority=3)  # only the producer's level consumer

        out = await natask_cli(nats_server.url, "status", "--json", "-A", APP, prefix="st")
        assert out.returncode == 0, out.stderr
        listed = {q["name"]: q for q in json.loads(out.stdout)["queues"]}
        assert set(listed) == {"busy", "levels", "orphans"}
        assert (listed["busy"]["pending"], listed["busy"]["stranded"], listed["busy"]["consumed"]) == (2, 0, True)
        assert (listed["orphans"]["pending"], listed["orphans"]["stranded"]) == (2, 2)
        assert (listed["levels"]["pending"], listed["levels"]["stranded"]) == (1, 1)
        assert [q.__dict__ for q in await queues(app)] == list(listed.values())  # the dashboard's source

        text = await natask_cli(nats_server.url, "-A", APP, "status", prefix="st")  # -A before the command
        [orphans] = [line for line in text.stdout.splitlines() if line.strip().startswith("orphans")]
        assert "pending=2" in orphans
        assert "STRANDED: 2 task(s) no worker consumes (start one with -Q orphans)" in orphans
        [busy] = [line for line in text.stdout.splitlines() if line.strip().startswith("busy")]
        assert "STRANDED" not in busy
    finally:
        await app.aclose()


async def test_result_wait_exits_3_for_revoked_and_4_for_a_timeout(nats_server: NatsServer) -> None:
    app = Natask("cli-test", servers=[nats_server.url], subject_prefix="res")
    try:
        revoked = "a" * 32
        await (await (await app.client.broker()).results()).put(revoked, dumps({"state": "REVOKED"}))
        out = await natask_cli(nats_server.url, "result", revoked, "--wait", "-A", APP, prefix="res")
        assert (out.returncode, out.stdout.strip()) == (3, "REVOKED"), out.stderr

        out = await natask_cli(nats_server.url, "result", "b" * 32, "--wait", "--timeout", "0.2", "-A", APP,
                               prefix="res")
        assert out.returncode == 4 and "no result for task" in out.stderr and "Traceback" not in out.stderr
    finally:
        await app.aclose()


async def test_ctrl_c_during_result_wait_exits_130_without_a_traceback(nats_server: NatsServer) -> None:
    task_id = "c" * 32
    nc = await nats.connect(nats_server.url)
    try:
        watching = await nc.subscribe("$JS.API.CONSUMER.>")  # the waiting command's watch of the result key
        cli = await Cli.start(nats_server.url, "result", task_id, "--wait", "-A", APP, prefix="ctrlc")
        while task_id.encode() not in (await watching.next_msg(timeout=20)).data:
            pass
        assert cli.proc.pid is not None
        os.kill(cli.proc.pid, signal.SIGINT)
        code, rest = await cli.finish()
        assert code == 130 and "Traceback" not in rest, rest
    finally:
        await nc.close()


async def test_connecting_says_so_and_the_worker_waits_for_its_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    worker = await Cli.start(url, "worker", "-A", APP, "--connect-timeout", "60", prefix="late")
    try:
        await worker.stderr_until("connecting to NATS at")
        await worker.stderr_until("Trying again for")  # no server yet: it keeps trying instead of exiting
        with NatsServer(port=port):
            await worker.stderr_until("registered task(s): ")
            banner = "".join(worker.stderr)
            assert "queues default; concurrency 32; threads pool" in banner
            assert re.search(r"registered task\(s\): .*it\.add", banner)
            worker.proc.send_signal(signal.SIGTERM)
            code, _ = await worker.finish()
            assert code == 0
    finally:
        if worker.proc.returncode is None:
            worker.proc.kill()
            await worker.proc.wait()


async def test_an_http_url_gets_the_fix_not_a_traceback() -> None:
    out = await natask_cli("http://127.0.0.1:8222", "status", "-A", APP)
    assert out.returncode == 1 and "is an HTTP URL" in out.stderr and "nats://HOST:4222" in out.stderr
    assert "Traceback" not in out.stderr


async def test_server_on_a_busy_port_says_so_in_one_line(nats_server: NatsServer) -> None:
    out = await natask_cli(nats_server.url, "server", "-p", str(nats_server.port))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"Error: port {nats_server.port} on 127.0.0.1 is in use (another nats-server?): stop that one, or pick "
        "another port (-p 0: any free port)"]


async def test_server_removes_its_temp_dir_on_sigterm() -> None:
    cli = await Cli.start("nats://127.0.0.1:1", "server", "-p", "0")
    await cli.stdout_line()
    await cli.stderr_until("data in ")
    store = re.search(r"data in (\S+);", cli.stderr[-1])
    assert store is not None and await asyncio.to_thread(os.path.isdir, store.group(1))
    cli.proc.send_signal(signal.SIGTERM)
    code, _ = await cli.finish()
    assert code == 0 and not await asyncio.to_thread(os.path.exists, store.group(1))


async def test_a_worker_warns_once_when_it_meets_another_apps_tasks(nats_server: NatsServer, tmp_path: Path) -> None:
    app = Natask("billing", servers=[nats_server.url], subject_prefix="shared")
    w = await WorkerProcess(nats_server.url, "shared", tmp_path / "log", extra=["--unknown-grace", "0"]).ready()
    try:
        await app.asend_task("it.missing")  # this app's module: a task of newer code, no warning
        await app.asend_task("billing.charge", [10])
        await app.asend_task("billing.refund", [10])
        line = await asyncio.to_thread(w.wait_for_line, "is another app sending")
        assert "task billing.charge is not one of app 'itest''s tasks" in line and "'shared'" in line
        await asyncio.to_thread(w.wait_for_line, "billing.refund")  # its unknown-task line
    finally:
        w.signal(signal.SIGTERM)
        await w.wait()
        await app.aclose()
    assert sum("is another app sending" in line for line in w.lines) == 1, w.output()


@pytest.mark.parametrize("args", [["status"], ["call", "it.add", "--args", "[1, 2]"]])
async def test_a_command_without_a_server_fails_with_the_reason(args: list[str]) -> None:
    out = await natask_cli(f"nats://127.0.0.1:{free_port()}", *args, "-A", APP)
    assert out.returncode == 1 and "cannot connect to NATS" in out.stderr and "Traceback" not in out.stderr


async def test_empty_listings_say_so(nats_server: NatsServer) -> None:
    dead = await natask_cli(nats_server.url, "dlq", "list", "-A", APP, prefix="empty")
    assert dead.returncode == 0 and dead.stdout == "" and dead.stderr.strip() == "no dead letters"
    beat = await natask_cli(nats_server.url, "-A", APP, "beat", "--list", prefix="empty")
    assert beat.returncode == 0 and beat.stdout.startswith("no periodic entries"), beat.stderr
