"""Observers and operators against hostile wire data, on a real server: wildcard ids, a real dead
letter buried under junk ones, malformed events and dead-letter headers, escape sequences aimed at
the operator's terminal. Each CLI command runs in its own process, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import msgpack
import nats
import pytest
from nats.aio.msg import Msg

from natask import ConfigError, Natask, Reject, TaskFailed
from natask.dashboard import MAX_DEAD_LETTERS, Dashboard
from natask.dlq import DeadLetterNotFound, DeadLetters
from natask.naming import (
    HDR_DLQ_ATTEMPTS,
    HDR_DLQ_ERROR,
    HDR_DLQ_ID,
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TIME,
    HDR_REPLAYS,
    HDR_TASK,
)
from natask.server import NatsServer
from natask.testing import worker

from .helpers import ROOT
from .test_dashboard import http

APP = "tests.integration.workerapp:app"


async def cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m natask ARGS -A <the test app with this prefix>`` in its own process."""
    env = {**os.environ, "NATS_URL": url, "NATASK_TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "natask", *args, "-A", APP], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60)


@pytest.fixture
async def url(nats_server: NatsServer) -> AsyncIterator[str]:
    yield nats_server.url


# -- item 6: ids --------------------------------------------------------------------------------
async def test_a_wildcard_id_is_refused_and_every_stored_result_survives(url: str) -> None:
    app = Natask("obs", servers=[url], subject_prefix="ids")
    add = app.task(name="o.add")(lambda x, y: x + y)
    try:
        async with worker(app):
            results = [await add.adelay(i, i) for i in range(3)]
            assert [await r.aget(timeout=10) for r in results] == [0, 2, 4]
        for bad in (">", "*", "o.>"):
            with pytest.raises(ConfigError, match=f"invalid task id {re.escape(repr(bad))}"):
                await app.AsyncResult(bad).aforget()  # deleted every stored result
            with pytest.raises(ConfigError, match="invalid task id"):
                await app.AsyncResult(bad).astate()  # raised nats-py's InvalidKeyError
        with pytest.raises(ConfigError, match="invalid claim key"):
            await app.aclaim(">")
        kv = await (await app.client.broker()).results()
        assert sorted(await kv.keys()) == sorted(r.id for r in results)
        assert [await app.AsyncResult(r.id).aget(timeout=5) for r in results] == [0, 2, 4]
    finally:
        await app.aclose()


# -- item 7: a dead letter under 10,000 junk ones -------------------------------------------------
@pytest.mark.timeout(240)
async def test_a_real_dead_letter_is_listed_first_shown_and_replayed_under_ten_thousand_junk_ones(
        url: str) -> None:
    app = Natask("obs", servers=[url], subject_prefix="obs")
    runs: list[str] = []

    @app.task(name="o.picky")
    def picky(order: str) -> str:
        runs.append(order)
        if len(runs) == 1:
            raise Reject("not today")
        return f"done {order}"

    try:
        broker = await app.client.broker()
        await broker.ensure_dlq()
        n = 10_000
        junk_headers = [{HDR_DLQ_ID: f"seq-{i}", HDR_DLQ_REASON: "junk"} if i % 2 else {} for i in range(n)]
        await broker.publish_many(["natask.dlq.obs.default.junk"] * n, [b"junk"] * n, junk_headers)
        async with worker(app):
            real = await picky.adelay("o-1")
            with pytest.raises(TaskFailed):
                await real.aget(timeout=20)  # stored after the dead letter was published

        listed = await cli(url, "obs", "dlq", "list", "--limit", "5")
        assert listed.returncode == 0, listed.stderr
        first = listed.stdout.splitlines()
        assert len(first) == 5 and first[0].startswith(f"{real.id}  rejected  o.picky"), first
        assert all(re.match(r"seq-\d+  (junk|\?)  ", line) for line in first[1:]), first
        more = re.search(r"natask dlq list -A \S+ --limit 5 --before (\d+)$", listed.stderr.strip())
        assert more, listed.stderr
        older = await cli(url, "obs", "dlq", "list", "--limit", "5", "--before", more.group(1))
        second = older.stdout.splitlines()
        seqs = [int(line.split()[0][4:]) for line in first[1:] + second]
        assert len(second) == 5 and seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 9
        assert int(more.group(1)) == seqs[3]

        shown = await cli(url, "obs", "dlq", "show", real.id)
        assert shown.returncode == 0 and "reason: rejected" in shown.stdout and "not today" in shown.stdout

        dash = Dashboard(app, port=0)
        await dash.read()
        dead = dash.state()["summary"]["dead_letters"]
        assert dead["total"] == n + 1 and len(dead["entries"]) == MAX_DEAD_LETTERS
        assert dead["entries"][0]["id"] == real.id and dead["entries"][0]["args"] == "('o-1')"

        replayed = await cli(url, "obs", "dlq", "replay", real.id)
        assert replayed.stdout.strip() == f"replayed {real.id} to obs.default.o.picky", replayed.stderr
        async with worker(app):
            assert await app.AsyncResult(real.id).aget(timeout=20) == "done o-1"
        assert runs == ["o-1", "o-1"]
        with pytest.raises(DeadLetterNotFound):
            await DeadLetters(app).get(real.id)
        assert await DeadLetters(app).count() == n
    finally:
        await app.aclose()


async def test_show_and_replay_find_a_dead_letter_without_the_index_and_despite_bad_headers(url: str) -> None:
    """Entries written by another hand (no index entry, a stale one) are found by a scan; headers
    that do not parse (a replay count of ``abc``) neither break the listing nor the replay."""
    app = Natask("obs", servers=[url], subject_prefix="dlqx")
    ran: list[str] = []
    app.task(name="o.echo")(lambda x: ran.append(x) or x)
    try:
        broker = await app.client.broker()
        await broker.ensure_dlq()
        await broker.ensure_stream()
        calls = [app.client.prepare("o.echo", [tag], {}, queue="default") for tag in ("a", "b")]
        for call in calls:
            await broker.publish("natask.dlq.dlqx.default.o.echo", call.payload, {
                HDR_TASK: "o.echo", HDR_DLQ_ID: call.task_id, HDR_DLQ_REASON: "unknown task",
                HDR_DLQ_SUBJECT: "dlqx.default.o.echo", HDR_REPLAYS: "abc", HDR_DLQ_ATTEMPTS: "many",
                HDR_DLQ_TIME: "nan"})
        await broker.publish("natask.dlq.dlqx.default.o.echo", b"", {"Status": "404"})  # fooled nats-py's get_msg
        index = await broker.dlq_index()
        await index.put(calls[1].task_id, b"1")  # stale: sequence 1 holds another entry
        dlq = DeadLetters(app)
        entries = await dlq.list()
        assert [e.id for e in entries][1:] == [calls[1].task_id, calls[0].task_id]
        assert entries[1].attempts == 0 and entries[1].time == 0.0 and entries[1].replays == 0

        assert (await dlq.get(calls[0].task_id)).seq == entries[2].seq  # not indexed: scanned for
        assert (await dlq.get(calls[1].task_id)).seq == entries[1].seq  # stale index: scanned for
        assert (await dlq.get(f"seq-{entries[0].seq}")).data == b""  # a placeholder: read by sequence
        for missing in ("nope", "seq-999999", ">", "a.b"):
            with pytest.raises(DeadLetterNotFound):
                await dlq.get(missing)

        async with worker(app):
            await dlq.replay(calls[0].task_id)  # a malformed Natask-Replays made it unreplayable
            assert await app.AsyncResult(calls[0].task_id).aget(timeout=10) == "a"
            async with Dashboard(app, port=0) as dash:
                path = f"/api/dlq/{calls[1].task_id}/replay"
                status, _, body = await http(dash.url, "POST", path, {"X-Natask-Dashboard": "1"})
                assert status == 200, body  # the dashboard closed the connection instead
                missing = await http(dash.url, "POST", "/api/dlq/%3E/replay", {"X-Natask-Dashboard": "1"})
                assert missing[0] == 404 and b"no dead letter" in missing[2]
            assert await app.AsyncResult(calls[1].task_id).aget(timeout=10) == "b"
        assert sorted(ran) == ["a", "b"]
        assert [e.id for e in await dlq.list()] == [f"seq-{entries[0].seq}"]
        assert await dlq.purge() == 1 and await dlq.list() == []
        assert (await broker.js.stream_info("KV_natask_dlq_dlqx")).state.messages == 0  # the index too
    finally:
        await app.aclose()


async def test_pages_walk_one_apps_dead_letters_of_a_shared_stream_newest_first(url: str) -> None:
    mine = Natask("obs", servers=[url], subject_prefix="mine")
    other = Natask("obs", servers=[url], subject_prefix="other")
    try:
        broker = await mine.client.broker()
        await broker.ensure_dlq()
        # Mine and another app's interleaved, then a long run of the other app's: windows must grow.
        subjects = [f"natask.dlq.{'mine' if i % 3 == 0 else 'other'}.default.t" for i in range(600)]
        subjects += ["natask.dlq.other.default.t"] * 5000
        await broker.publish_many(subjects, [b"x"] * len(subjects), [{HDR_DLQ_REASON: str(i)} for i in
                                                                    range(len(subjects))])
        dlq = DeadLetters(mine)
        expected = [str(i) for i in range(600) if i % 3 == 0][::-1]
        seen: list[str] = []
        before = None
        while True:
            entries, before = await dlq.page(limit=7, before=before)
            seen += [e.reason for e in entries]
            if before is None:
                break
        assert seen == expected
        assert await dlq.count() == 200 and await DeadLetters(other).count() == 5400
        assert [e.reason for e in await dlq.list(limit=3)] == expected[:3]
        assert await dlq.purge() == 200 and await DeadLetters(other).count() == 5400
        assert await dlq.page() == ([], None)
    finally:
        await mine.aclose()
        await other.aclose()


async def test_a_worker_that_may_not_write_the_index_still_dead_letters(tmp_path: Path) -> None:
    conf = tmp_path / "server.conf"
    conf.write_text("""authorization { users = [
      {user: w, password: w, permissions: {
        publish: {allow: [">"], deny: ["$KV.natask_dlq_tasks.>", "$JS.API.STREAM.*.KV_natask_dlq_tasks"]},
        subscribe: {allow: [">"]}}}]}""")
    with NatsServer(store_dir=str(tmp_path / "js"), config_file=str(conf)) as server:
        app = Natask("obs", servers=[server.url], connect_options={"user": "w", "password": "w"})
        app.task(name="o.no")(lambda: (_ for _ in ()).throw(Reject("no")))
        try:
            async with worker(app):
                result = await app.asend_task("o.no")
                with pytest.raises(TaskFailed, match="no"):
                    await result.aget(timeout=15)  # the index write gives up after INDEX_WAIT
            entry = await DeadLetters(app).get(result.id)  # the index is unreadable too: scanned for
            assert (entry.id, entry.reason) == (result.id, "rejected")
        finally:
            await app.aclose()


# -- item 9: malformed events; item 10: escape sequences ------------------------------------------
def _events(kind: str, rows: list[list[object]], worker: str = "w:1") -> bytes:
    return msgpack.packb({"worker": worker, "type": kind, "events": rows}, use_bin_type=True)  # type: ignore[no-any-return]


async def test_natask_events_drops_malformed_events_and_escapes_the_rest(url: str) -> None:
    env = {**os.environ, "NATS_URL": url, "NATASK_TEST_PREFIX": "evt", "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "natask", "events", "-A", APP, "-n", "1", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    nc = await nats.connect(url)
    try:
        # One message, the bad row first: whenever the subscriber starts, it sees the bad row first.
        batch = _events("task-failed", [["soon", "a1", "o.add", None],  # a string ts crashed `natask events`
                                        [1.0, "a2", "o.add", {"exc_type": "E", "message": "\x1b[31mred\nline"}]])
        done = asyncio.ensure_future(proc.communicate())

        async def send() -> None:
            while not done.done():  # until the command has subscribed, read one event and exited
                await nc.publish("natask.events.evt.task-failed", batch)
                await asyncio.wait({done}, timeout=0.2)

        await asyncio.wait_for(send(), 30)
        out, err = done.result()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await nc.close()
    assert proc.returncode == 0, err.decode()
    when = datetime.fromtimestamp(1.0)  # events print local times, after a line naming the day
    assert out.decode().splitlines() == [
        f"-- {when:%Y-%m-%d} {when.astimezone().tzname()}",
        f"{when:%H:%M:%S}.000  w:1  task-failed      o.add[a2]  exc_type=E message=\\x1b[31mred\\nline"]


async def test_cli_output_of_wire_data_is_escaped_and_odd_values_do_not_crash_it(url: str) -> None:
    app = Natask("obs", servers=[url], subject_prefix="esc")
    app.task(name="o.paint")(lambda: "\x1b[2Jcleared")
    try:
        broker = await app.client.broker()
        await broker.ensure_dlq()
        await broker.publish("natask.dlq.esc.default.o.x", b"\x1b[31m", {
            HDR_DLQ_ID: "esc1", HDR_DLQ_REASON: "bad\x1b[31m\nreason", HDR_DLQ_ERROR: "\x1b[2Jerror\nforged line",
            HDR_TASK: "o.x\x1b[31m", HDR_DLQ_SUBJECT: "esc.default.o.x\x1b]0;title\x07"})
        listed = await cli(url, "esc", "dlq", "list")
        assert listed.returncode == 0, listed.stderr
        [line] = listed.stdout.splitlines()
        assert line.startswith("esc1  bad\\x1b[31m") and "\\x1b[2Jerror" in line and "\x1b" not in line, line
        shown = await cli(url, "esc", "dlq", "show", "esc1")
        assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\x07" not in shown.stdout
        assert "subject: esc.default.o.x\\x1b]0;title\\x07" in shown.stdout

        async with worker(app):
            painted = await app.asend_task("o.paint")
            assert await painted.aget(timeout=10) == "\x1b[2Jcleared"
        result = await cli(url, "esc", "result", painted.id)
        assert result.stdout == "\\x1b[2Jcleared\n"

        # Whoever answers on the control subject writes what `status` and `inspect` print.
        async def forged(msg: Msg) -> None:
            await nc.publish(msg.reply, msgpack.packb({
                "worker": "evil\x1b[2J", "queues": 5, "uptime": "long", "concurrency": None,
                "active": [{"id": "\x1b[31m", "name": 3, "runtime": "slow"}, "junk"]}))

        nc = await nats.connect(url)
        try:
            await nc.subscribe("natask.control.esc.*", cb=forged)
            await nc.flush()
            status = await cli(url, "esc", "status")
            active = await cli(url, "esc", "inspect", "active")
        finally:
            await nc.close()
        assert status.returncode == 0, status.stderr
        assert "evil\\x1b[2J" in status.stdout and "uptime=?s" in status.stdout and "\x1b" not in status.stdout
        assert active.returncode == 0, active.stderr
        assert active.stdout.splitlines() == ["evil\\x1b[2J: 1 running", "  \\x1b[31m  3  ?s"]
    finally:
        await app.aclose()


async def test_the_dashboard_keeps_its_event_subscription_through_malformed_events(url: str) -> None:
    app = Natask("obs", servers=[url], subject_prefix="dev")
    app.task(name="o.add")(lambda x, y: x + y)
    nc = await nats.connect(url)
    try:
        async with Dashboard(app, port=0, refresh=0.2) as dash:
            async with worker(app):
                result = await app.asend_task("o.add", [1, 2])
                assert await result.aget(timeout=10) == 3
                rows = [[1.0, result.id, "o.add", {"retries": "abc"}], [2.0, result.id, "o.add", {"retries": 3}]]
                # One message, the bad row first: a ValueError on it ended the subscription (and lost
                # the good row) every time. Sent until the dashboard's subscription has taken one.
                async def send() -> None:
                    while dash.model.task(result.id) is None or dash.model.rows[result.id].retries != 3:
                        await nc.publish("natask.events.dev.task-started", _events("task-started", rows))
                        await nc.publish("natask.events.dev.worker-online",
                                         _events("worker-online", [[1.0, None, None, {"queues": 5}]], "evil:1"))
                        await nc.flush()
                        await asyncio.sleep(0.1)

                await asyncio.wait_for(send(), 20)
            assert "evil:1" not in dash.model.workers and dash.summary()["dropped"] >= 2
            json.dumps(dash.state(), allow_nan=False)
    finally:
        await nc.close()
        await app.aclose()
