"""Live periodic schedules against a real nats-server: entries stored in the schedules bucket reach
running beats (Python and CLI), keep one message per fire time, survive hostile values and restarts."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

import msgpack
import nats
import pytest
from nats.aio.msg import Msg

from natask import ConfigError, Natask, TaskNotFound
from natask.beat import TICK_SEP, TICK_TIME_FORMAT, Beat
from natask.message import loads
from natask.server import NatsServer

from .helpers import ROOT

PREFIX = "lv"
UTC = timezone.utc


def noop(*args: object, **kwargs: object) -> None: ...


def beat_app(url: str, i: int = 0) -> Natask:
    """A beat process's app: one code-defined entry firing every second."""
    app = Natask(f"live{i}", servers=[url], subject_prefix=PREFIX, publish_timeout=5)
    tick = app.task(name="jobs.tick")(noop)
    app.add_periodic_task(timedelta(seconds=1), tick.s(), name="code.tick")
    return app


class Ticks:
    """Every task message published under the prefix (a core subscriber sees duplicates too)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, list[object]]] = []  # (entry, fire time, args)
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        name, stamp = (msg.headers or {})["Nats-Msg-Id"].rsplit(TICK_SEP, 1)
        fire = int(datetime.strptime(stamp, TICK_TIME_FORMAT).replace(tzinfo=UTC).timestamp())
        self.seen.append((name.replace("/", "."), fire, list(loads(msg.data)["args"])))
        self._changed.set()

    def fires(self, entry: str) -> list[int]:
        return [fire for name, fire, _ in self.seen if name == entry]

    def args(self, entry: str, after: float) -> list[list[object]]:
        return [args for name, fire, args in self.seen if name == entry and fire > after]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        async def watch() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)

    async def after(self, entry: str, when: float, n: int = 1) -> None:
        """Wait until ``entry`` fired ``n`` times after unix time ``when``."""
        await self.wait_for(lambda: len([f for f in self.fires(entry) if f > when]) >= n)


class BeatLog(logging.Handler):
    """The beat's log lines, awaitable: a leader logs each change it applies."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []  # (unix time when logged, message)
        self.loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.time(), record.getMessage()))
        self.loop.call_soon_threadsafe(self._changed.set)

    def line(self, *parts: str, timeout: float = 20) -> Awaitable[float]:
        """Wait for a line logged from now on holding every part; the unix time it was logged."""
        start = len(self.lines)

        async def watch() -> float:
            while True:
                for at, line in self.lines[start:]:
                    if all(p in line for p in parts):
                        return at
                self._changed.clear()
                await self._changed.wait()

        return asyncio.ensure_future(asyncio.wait_for(watch(), timeout))


@asynccontextmanager
async def observed(url: str) -> AsyncIterator[tuple[Ticks, BeatLog]]:
    nc = await nats.connect(url)
    ticks, log = Ticks(), BeatLog()
    logger = logging.getLogger("natask.beat")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    try:
        await nc.subscribe(f"{PREFIX}.>", cb=ticks.on_msg)
        await nc.flush()
        yield ticks, log
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
        await nc.close()


async def leading(beat: Beat, log: BeatLog) -> None:
    """Start ``beat`` and wait until it leads: from then on it logs each change it applies."""
    lead = log.line("is now the leader")
    await beat.start()
    await lead


async def test_add_change_disable_enable_remove_reach_a_running_beat(nats_server: NatsServer) -> None:
    app, producer = beat_app(nats_server.url), Natask("producer", servers=[nats_server.url], subject_prefix=PREFIX)
    beat = Beat(app, lease_ttl=1)
    async with observed(nats_server.url) as (ticks, log):
        try:
            await leading(beat, log)
            added = log.line("'live.one' now fires")
            await producer.beat.aadd("live.one", "jobs.tick", every=1, args=[1])
            start = await added
            await ticks.after("live.one", start)
            assert ticks.args("live.one", 0) and all(a == [1] for a in ticks.args("live.one", 0))

            changed = log.line("'live.one' now fires")
            await producer.beat.aadd("live.one", "jobs.tick", every=2, args=[2])
            at = await changed
            await ticks.after("live.one", at, 2)
            assert all(a == [2] for a in ticks.args("live.one", at + 1))
            assert all(f % 2 == 0 for f in ticks.fires("live.one") if f > at + 1)

            disabled = log.line("'live.one' removed or disabled")
            await producer.beat.adisable("live.one")
            off = await disabled
            await ticks.after("code.tick", off, 3)  # code-defined entries are unaffected
            assert max(ticks.fires("live.one")) <= off  # nothing fired after the change was applied
            assert [i.enabled for i in await producer.beat.alist() if i.name == "live.one"] == [False]

            enabled = log.line("'live.one' now fires")
            await producer.beat.aenable("live.one")
            on = await enabled
            await ticks.after("live.one", on)

            removed = log.line("'live.one' removed or disabled")
            await producer.beat.aremove("live.one")
            gone = await removed
            await ticks.after("code.tick", gone, 3)
            assert max(ticks.fires("live.one")) <= gone
            assert [i.name for i in await producer.beat.alist()] == []  # the producer defines no entry

            # The code-defined entry: never removed through the bucket; disabled by an override.
            with pytest.raises(ConfigError, match="defined in the app's code"):
                await app.beat.aremove("code.tick")
            with pytest.raises(ConfigError, match="defined in the app's code"):
                await app.beat.aadd("code.tick", "jobs.tick", every=5)
            disabled = log.line("'code.tick' removed or disabled")
            await app.beat.adisable("code.tick")
            off = await disabled
            assert [(i.source, i.enabled) for i in await app.beat.alist()] == [("code", False)]
            enabled = log.line("'code.tick' now fires")
            await app.beat.aenable("code.tick")
            on = await enabled
            await ticks.after("code.tick", on)
            assert not [f for f in ticks.fires("code.tick") if off < f <= on - 1]
            assert [(i.source, i.enabled) for i in await app.beat.alist()] == [("code", True)]
        finally:
            await beat.stop()
            await app.aclose()
            await producer.aclose()
    ids = Counter((name, fire) for name, fire, _ in ticks.seen)
    assert max(ids.values()) == 1  # one beat: each fire time published once


async def test_two_beats_and_changes_one_message_per_fire_time(nats_server: NatsServer) -> None:
    apps = [beat_app(nats_server.url, i) for i in range(2)]
    beats = [Beat(a, lease_ttl=1) for a in apps]
    async with observed(nats_server.url) as (ticks, log):
        try:
            lead = log.line("is now the leader")
            await asyncio.gather(*(b.start() for b in beats))
            await lead
            added = log.line("'live.two' now fires")
            await apps[0].beat.aadd("live.two", apps[0].tasks["jobs.tick"].s(1), every=1)
            start = await added
            await ticks.after("live.two", start, 2)
            for n in range(2, 5):  # changes from either app, each reaching the leader
                changed = log.line("'live.two' now fires")
                await apps[n % 2].beat.aadd("live.two", "jobs.tick", every=1, args=[n])
                at = await changed
                await ticks.after("live.two", at, 2)
            removed = log.line("'live.two' removed or disabled")
            await apps[1].beat.aremove("live.two")
            gone = await removed
            await ticks.after("code.tick", gone, 2)
        finally:
            await asyncio.gather(*(b.stop() for b in beats))
            for a in apps:
                await a.aclose()
    fires = ticks.fires("live.two")
    assert len(fires) == len(set(fires))  # one message per fire time, whichever beat led
    assert fires == list(range(fires[0], fires[-1] + 1))  # none missed while it was being changed


async def test_hostile_values_are_skipped_with_one_log_line_and_the_beat_keeps_ticking(
    nats_server: NatsServer,
) -> None:
    app = beat_app(nats_server.url)
    nc = await nats.connect(nats_server.url)
    kv = await nc.jetstream().create_key_value(bucket=app.names.schedules_bucket)
    good = {"v": 1, "kind": "entry", "enabled": True, "created": 1.0, "updated": 1.0, "task": "jobs.tick",
            "args": [], "kwargs": {}, "queue": None, "every": 1, "cron": None, "tz": None}
    hostile = {
        "not.msgpack": b"\xc1\xff",
        "not.a.map": msgpack.packb([1, 2]),
        "bad.version": msgpack.packb({**good, "v": 99}),
        "bad.task": msgpack.packb({**good, "task": "a b>"}),
        "bad.cron": msgpack.packb({**good, "every": None, "cron": "61 * * * *"}),
        "bad.tz": msgpack.packb({**good, "every": None, "cron": "* * * * *", "tz": "Mars/Olympus"}),
        "both": msgpack.packb({**good, "cron": "* * * * *"}),
        "bad.every": msgpack.packb({**good, "every": 0}),
        "bad.queue": msgpack.packb({**good, "queue": "_x.y"}),
        "bad.args": msgpack.packb({**good, "args": {"a": 1}}),
        "bad.enabled": msgpack.packb({**good, "enabled": "yes"}),
        "too.big": msgpack.packb({**good, "args": ["x" * 70_000]}),
        "bad=name": msgpack.packb(good),
    }
    for key, value in hostile.items():
        await kv.put(key, value)
    beat = Beat(app, lease_ttl=1)
    async with observed(nats_server.url) as (ticks, log):
        try:
            await leading(beat, log)
            added = log.line("'live.good' now fires")
            await kv.put("live.good", msgpack.packb(good))
            start = await added
            await ticks.after("live.good", start, 2)
            await kv.put("bad.cron", b"\x00")  # a new bad revision is logged again, once
            await log.line("'bad.cron'", "is skipped")
            await ticks.after("code.tick", time.time(), 2)
        finally:
            await beat.stop()
            await app.aclose()
            await nc.close()
    for key in hostile:
        skipped = [line for _, line in log.lines if f"{key!r}" in line and "is skipped" in line]
        assert len(skipped) == (2 if key == "bad.cron" else 1), (key, skipped)
    assert {name for name, _, _ in ticks.seen} == {"code.tick", "live.good"}


async def test_a_deleted_bucket_or_a_restarted_server_restarts_the_watch(nats_server: NatsServer) -> None:
    app = beat_app(nats_server.url)
    beat = Beat(app, lease_ttl=1)
    async with observed(nats_server.url) as (ticks, log):
        try:
            await leading(beat, log)
            added = log.line("'live.kept' now fires")
            await app.beat.aadd("live.kept", "jobs.tick", every=1)
            await ticks.after("live.kept", await added)

            # A server restart: the stored entries stay in the (file) store and keep firing; a change
            # made after it still reaches the beat through the restarted watch.
            nats_server.stop()
            nats_server.start()
            restarted = time.time()
            await ticks.after("live.kept", restarted, 2)
            added = log.line("'live.after' now fires")
            await app.beat.aadd("live.after", "jobs.tick", every=1)
            await ticks.after("live.after", await added)

            # A deleted bucket: its entries are gone (the beat mirrors the bucket), code-defined ones
            # keep firing, and entries stored in the recreated bucket reach the beat.
            nc = await nats.connect(nats_server.url)
            removed = log.line("'live.kept' removed or disabled")
            await nc.jetstream().delete_key_value(app.names.schedules_bucket)
            await nc.close()
            gone = await removed
            added = log.line("'live.new' now fires")
            await app.beat.aadd("live.new", "jobs.tick", every=1)
            await ticks.after("live.new", await added)
            await ticks.after("code.tick", gone, 2)
            assert max(ticks.fires("live.kept")) <= gone
            infos = await app.beat.alist()
            assert [(i.name, i.source) for i in infos] == [("code.tick", "code"), ("live.new", "stored")]
            # The recreated bucket keeps its settings (a watch must not recreate it with the results' TTL).
            nc = await nats.connect(nats_server.url)
            status = await (await nc.jetstream().key_value(app.names.schedules_bucket)).status()
            assert not status.ttl
            await nc.close()
        finally:
            await beat.stop()
            await app.aclose()


async def natask_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": url, "NATASK_TEST_PREFIX": PREFIX, "PYTHONPATH": str(ROOT)}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "natask", *args], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )


async def test_cli_edits_reach_a_running_beat(nats_server: NatsServer) -> None:
    app_spec = "tests.integration.workerapp:app"
    app = Natask("live-cli", servers=[nats_server.url], subject_prefix=PREFIX, publish_timeout=5)
    app.task(name="it.add")(noop)
    beat = Beat(app, lease_ttl=1)
    async with observed(nats_server.url) as (ticks, log):
        try:
            await leading(beat, log)
            empty = await natask_cli(nats_server.url, "beat", "--list", "-A", app_spec)
            assert empty.returncode == 0, empty.stderr
            assert "no periodic entries" in empty.stdout

            added = log.line("'cli.add' now fires")
            done = await natask_cli(nats_server.url, "beat", "add", "cli.add", "it.add", "--every", "1",
                                    "--args", "[1, 2]", "-A", app_spec)
            assert done.returncode == 0, done.stderr
            await ticks.after("cli.add", await added)
            assert ticks.args("cli.add", 0)[0] == [1, 2]

            listed = await natask_cli(nats_server.url, "beat", "-A", app_spec, "--list")
            assert listed.returncode == 0, listed.stderr
            [line] = listed.stdout.splitlines()
            assert line.startswith("cli.add  every 1s  next ") and line.endswith("stored  it.add")

            disabled = log.line("'cli.add' removed or disabled")
            assert (await natask_cli(nats_server.url, "beat", "disable", "cli.add", "-A", app_spec)).returncode == 0
            off = await disabled
            listed = await natask_cli(nats_server.url, "beat", "--list", "-A", app_spec)
            assert "disabled  stored" in listed.stdout
            enabled = log.line("'cli.add' now fires")
            assert (await natask_cli(nats_server.url, "beat", "enable", "cli.add", "-A", app_spec)).returncode == 0
            on = await enabled
            await ticks.after("cli.add", on)
            assert not [f for f in ticks.fires("cli.add") if off < f <= on - 1]
            removed = log.line("'cli.add' removed or disabled")
            assert (await natask_cli(nats_server.url, "beat", "remove", "cli.add", "-A", app_spec)).returncode == 0
            await removed

            for args, reason in [
                (["add", "x", "it.ad", "--every", "1"], "did you mean 'it.add'?"),
                (["add", "x", "it.add", "--every", "1", "--args", "[1,"], "--args must be JSON"),
                (["add", "x", "it.add", "--every", "1", "--kwargs", "[]"], "--kwargs must be a JSON object"),
                (["add", "x", "it.add"], "exactly one of --every"),
                (["add", "x", "it.add", "--cron", "* * *", "--args", "[1, 2]"], "has 3 fields"),
                (["add", "x", "it.add", "--cron", "* * * * *", "--tz", "Mars/Olympus", "--args", "[1, 2]"],
                 "unknown time zone"),
                (["add", "x", "it.add", "--every", "1", "--args", "[1]"], "arguments do not fit"),
                (["remove", "cli.ad"], "no stored periodic entry named 'cli.ad'"),
                (["enable", "nope"], "no periodic entry named 'nope'"),
            ]:
                failed = await natask_cli(nats_server.url, "beat", *args, "-A", app_spec)
                assert failed.returncode == 2, (args, failed.stdout, failed.stderr)
                assert reason in failed.stderr, (args, failed.stderr)
                assert "Traceback" not in failed.stderr
        finally:
            await beat.stop()
            await app.aclose()


async def test_python_api_refuses_mistakes_before_storing(nats_server: NatsServer) -> None:
    app = beat_app(nats_server.url)
    try:
        with pytest.raises(TaskNotFound, match=r"did you mean 'jobs\.tick'"):
            await app.beat.aadd("x", "jobs.tik", every=1)
        with pytest.raises(ConfigError, match="exactly one of every="):
            await app.beat.aadd("x", "jobs.tick", every=1, cron="* * * * *")
        with pytest.raises(ConfigError, match="not both"):
            await app.beat.aadd("x", app.tasks["jobs.tick"].s(1), every=1, args=[2])
        with pytest.raises(ConfigError, match="no stored periodic entry named 'x'"):
            await app.beat.aremove("x")
        assert [i.name for i in await app.beat.alist()] == ["code.tick"]
        entry = await app.beat.aadd("x", app.tasks["jobs.tick"].s(1).set(queue="other"), cron="0 3 * * *",
                                    tz="Europe/Berlin")
        assert entry.tz == "Europe/Berlin" and entry.signature.options["queue"] == "other"
        [_, info] = await app.beat.alist()
        assert (info.name, info.source, info.enabled, info.args, info.queue) == ("x", "stored", True, (1,), "other")
        assert info.schedule == "0 3 * * * (Europe/Berlin)" and info.next_fire is not None
    finally:
        await app.aclose()


async def test_a_watched_bucket_is_healed_with_the_settings_it_was_made_with(nats_server: NatsServer) -> None:
    app = Natask("heal", servers=[nats_server.url], subject_prefix=PREFIX, result_ttl=60)
    name = app.names.schedules_bucket
    nc = await nats.connect(nats_server.url)
    try:
        broker = await app.client.broker()
        await broker.bucket(name, ttl=None, direct=False)
        watch = broker.watch(name)  # opens the bucket again, without settings
        assert await anext(watch) is None
        await nc.jetstream().delete_key_value(name)
        assert await anext(watch) is None  # the watch restarted, on the bucket it recreated
        await watch.aclose()
        status = await (await nc.jetstream().key_value(name)).status()
        assert not status.ttl  # not the results' TTL: stored entries never expire
    finally:
        await nc.close()
        await app.aclose()
