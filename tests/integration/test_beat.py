"""HA beat against a real nats-server: several beats, one enqueue per fire time, failover, restarts."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from itertools import pairwise

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from natask import Natask
from natask.beat import TICK_SEP, TICK_TIME_FORMAT, Beat, read_state
from natask.server import NatsServer

PREFIX = "bt"
STREAM = "NATASK_BT"
ENTRIES = ("every.second", "cron-second")  # the same fire times, one as an interval, one as 6-field cron
UTC = timezone.utc


def noop() -> None: ...


def make_app(url: str, i: int) -> Natask:
    """One beat process's app: its own object, the same prefix and entries as every other."""
    app = Natask(f"beat{i}", servers=[url], subject_prefix=PREFIX, publish_timeout=5)
    tick = app.task(name="jobs.tick")(noop)
    app.add_periodic_task(timedelta(seconds=1), tick.s(), name="every.second")
    app.add_periodic_task("* * * * * *", tick.s(), name="cron-second")
    return app


def parse(task_id: str) -> tuple[str, int]:
    """(entry name, fire time as unix seconds) of a tick's task id."""
    name, stamp = task_id.rsplit(TICK_SEP, 1)
    fire = datetime.strptime(stamp, TICK_TIME_FORMAT).replace(tzinfo=UTC)
    return name.replace("/", "."), int(fire.timestamp())


class Ticks:
    """Every task message published under the prefix, as a plain core subscriber sees it."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.arrived: list[float] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        assert msg.subject == f"{PREFIX}.default.jobs.tick"
        assert msg.headers is not None
        self.ids.append(msg.headers["Nats-Msg-Id"])
        self.arrived.append(time.monotonic())
        self._changed.set()

    def fires(self, entry: str, after: float = 0) -> list[int]:
        return sorted(t for name, t in map(parse, self.ids) if name == entry and t > after)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        async def watch() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)


@asynccontextmanager
async def observer(url: str) -> AsyncIterator[tuple[Client, Ticks]]:
    nc = await nats.connect(url)
    ticks = Ticks()
    await nc.subscribe(f"{PREFIX}.>", cb=ticks.on_msg)
    try:
        yield nc, ticks
    finally:
        await nc.close()


async def stored_ids(nc: Client) -> list[str]:
    """The message ids held by the task stream (no consumer exists, so nothing was taken out)."""
    js = nc.jetstream()
    state = (await js.stream_info(STREAM)).state
    ids = []
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await js.get_msg(STREAM, seq)
        assert msg.headers is not None
        ids.append(msg.headers["Nats-Msg-Id"])
    return ids


def by_entry(ids: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {name: [] for name in ENTRIES}
    for name, fire in map(parse, ids):
        out[name].append(fire)
    return {name: sorted(fires) for name, fires in out.items()}


def assert_contiguous(fires: list[int]) -> None:
    """Each fire time once and none missing between the first and the last."""
    assert fires, "no ticks"
    assert [b - a for a, b in pairwise(fires)] == [1] * (len(fires) - 1), fires


async def stop_all(beats: Sequence[Beat], apps: Sequence[Natask]) -> None:
    await asyncio.gather(*(b.stop() for b in beats))
    for app in apps:
        await app.aclose()


@pytest.mark.parametrize("n", [2, 3])
async def test_beats_enqueue_each_fire_time_exactly_once(nats_server: NatsServer, n: int) -> None:
    apps = [make_app(nats_server.url, i) for i in range(n)]
    beats = [Beat(app) for app in apps]
    async with observer(nats_server.url) as (nc, ticks):
        try:
            await asyncio.gather(*(b.start() for b in beats))
            await ticks.wait_for(lambda: min(len(ticks.fires(e)) for e in ENTRIES) >= 6)
            assert sum(b.is_leader for b in beats) == 1
            state = await read_state(apps[0])
            assert state.leader in {b.id for b in beats}
            assert state.lease_expires is not None
            assert set(state.last_fired) == set(ENTRIES)
        finally:
            await stop_all(beats, apps)

        stored = await stored_ids(nc)
        await ticks.wait_for(lambda: len(ticks.ids) >= len(stored), timeout=5)
        # Not only stored once: published once (no beat but the leader published anything).
        assert Counter(ticks.ids).most_common(1)[0][1] == 1
        assert sorted(ticks.ids) == sorted(stored)
        fires = by_entry(stored)
        for entry in ENTRIES:
            assert len(fires[entry]) >= 6
            assert_contiguous(fires[entry])

    checker = make_app(nats_server.url, 99)
    try:
        assert (await read_state(checker)).leader is None  # the last leader released its lease on stop
    finally:
        await checker.aclose()


async def test_leader_death_follower_takes_over(nats_server: NatsServer) -> None:
    apps = [make_app(nats_server.url, i) for i in range(3)]
    beats = [Beat(app, lease_ttl=1.0) for app in apps]
    async with observer(nats_server.url) as (nc, ticks):
        try:
            await asyncio.gather(*(b.start() for b in beats))
            await ticks.wait_for(lambda: min(len(ticks.fires(e)) for e in ENTRIES) >= 3)
            leaders = [b for b in beats if b.is_leader]
            assert len(leaders) == 1
            leader = leaders[0]

            await leader.stop(release=False)  # dies mid-run: no hand-over, the lease must expire
            killed_at, killed_mono = time.time(), time.monotonic()
            assert not leader.is_leader
            await ticks.wait_for(lambda: min(len(ticks.fires(e, after=killed_at + 1)) for e in ENTRIES) >= 5)
            survivors = [b for b in beats if b is not leader]
            assert sum(b.is_leader for b in survivors) == 1
            first_after = min(at for at in ticks.arrived if at > killed_mono)
            assert first_after - killed_mono < 10  # sanity bound: lease_ttl 1 s, failover in ~1.25 s
        finally:
            await stop_all(beats, apps)

        stored = await stored_ids(nc)
        assert len(set(stored)) == len(stored)
        fires = by_entry(stored)
        for entry in ENTRIES:
            # The ticks that fell due during the failover were enqueued late: no gap at all.
            assert_contiguous(fires[entry])
            assert fires[entry][0] < killed_at < fires[entry][-1] - 4
        # A tick the dead leader published but had not yet recorded is published again and deduped.
        await ticks.wait_for(lambda: len(ticks.ids) >= len(stored), timeout=5)
        assert sum(c - 1 for c in Counter(ticks.ids).values()) <= len(ENTRIES)


@pytest.mark.parametrize(("offset", "catch_up"), [(0, 1), (3600, 0), (3600, 1), (3600, 3)])
async def test_restart_neither_replays_nor_catches_up_beyond_limit(
    nats_server: NatsServer, offset: float, catch_up: int
) -> None:
    """A beat started after all beats were down enqueues at most ``catch_up`` missed ticks per entry
    (``offset`` shifts the second beat's clock: an hour-long outage without waiting an hour)."""
    async with observer(nats_server.url) as (nc, ticks):
        first = make_app(nats_server.url, 1)
        beat = Beat(first)
        try:
            await beat.start()
            await ticks.wait_for(lambda: min(len(ticks.fires(e)) for e in ENTRIES) >= 2)
        finally:
            await stop_all([beat], [first])
        last = {entry: fires[-1] for entry, fires in by_entry(await stored_ids(nc)).items()}

        second = make_app(nats_server.url, 2)
        beat = Beat(second, catch_up=catch_up, clock=lambda: time.time() + offset)
        try:
            before = time.time() + offset
            await beat.start()
            after = time.time() + offset
            await ticks.wait_for(lambda: min(len(ticks.fires(e, after=after)) for e in ENTRIES) >= 2)
        finally:
            await stop_all([beat], [second])

        stored = await stored_ids(nc)
        await ticks.wait_for(lambda: len(ticks.ids) >= len(stored), timeout=5)
        assert Counter(ticks.ids).most_common(1)[0][1] == 1  # nothing the first beat fired was fired again
        for entry, fires in by_entry(stored).items():
            later = [f for f in fires if f > last[entry]]
            assert_contiguous(later)
            # The second beat's horizon h (its start) lies in [before, after]: it fired the latest
            # catch_up ticks up to h that the first beat had not, then every tick after h.
            lowest = max(last[entry] + 1, int(before) - catch_up + 1)
            highest = max(last[entry] + 1, int(after) - catch_up + 1)
            assert lowest <= later[0] <= highest


async def test_run_until_cancelled_hands_the_lease_over(nats_server: NatsServer) -> None:
    app = make_app(nats_server.url, 1)
    beat = Beat(app)
    async with observer(nats_server.url) as (_, ticks):
        try:
            runner = asyncio.create_task(beat.run())
            await ticks.wait_for(lambda: len(ticks.fires("every.second")) >= 1)
            assert (await read_state(app)).leader == beat.id
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
            state = await read_state(app)
            assert state.leader is None
            recorded = state.last_fired["every.second"].timestamp()
            await ticks.wait_for(lambda: recorded in ticks.fires("every.second"), timeout=5)
            assert ticks.fires("every.second")[-1] == recorded  # nothing enqueued after the last record
        finally:
            await stop_all([beat], [app])
