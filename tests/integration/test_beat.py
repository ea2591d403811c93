"""HA beat against a real nats-server: several beats, one enqueue per fire time, failover, restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from itertools import pairwise

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from natask import Natask
from natask.beat import TICK_SEP, TICK_TIME_FORMAT, Beat, bucket_name, read_state, tick_id
from natask.beat import leader as beat_leader
from natask.beat.leader import LEASE_KEY
from natask.beat.records import RECORD_PREFIX, Records, record_time
from natask.broker import Broker, Published
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


# -- at scale: many entries, pipelined batches, a lease kept through long passes ----------------------------
MANY = 500


def make_many(url: str, i: int, n: int = MANY) -> Natask:
    """A beat process's app with ``n`` one-second interval entries (``many.e000``...)."""
    app = Natask(f"beat{i}", servers=[url], subject_prefix=PREFIX, publish_timeout=5)
    tick = app.task(name="jobs.tick")(noop)
    for k in range(n):
        app.add_periodic_task(timedelta(seconds=1), tick.s(), name=f"many.e{k:03d}")
    return app


def fires_of(ids: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, fire in map(parse, ids):
        out.setdefault(name, []).append(fire)
    return {name: sorted(fires) for name, fires in out.items()}


async def recorded(url: str, n: int = MANY) -> dict[str, int]:
    """Each entry's recorded last fire time (unix seconds), read by a fresh app."""
    checker = make_many(url, 99, n)
    try:
        return {name: int(fire.timestamp()) for name, fire in (await read_state(checker)).last_fired.items()}
    finally:
        await checker.aclose()


def hold(broker: Broker, monkeypatch: pytest.MonkeyPatch,
         gate: Callable[[], Awaitable[None]], after: Callable[[], Awaitable[None]] | None = None) -> None:
    """Make ``broker``'s publishes of ticks (one by one or pipelined) wait for ``gate`` first and for
    ``after`` once acknowledged: a slow pass, or a beat dying between its PubAcks and its records."""
    publish, publish_many = broker.publish, broker.publish_many

    async def one(subject: str, payload: bytes, headers: dict[str, str]) -> Published:
        if subject.startswith(f"{PREFIX}."):
            await gate()
        return await publish(subject, payload, headers)

    async def many(subjects: Sequence[str], payloads: Sequence[bytes], headers: Sequence[dict[str, str]]) -> None:
        if subjects[0].startswith(f"{PREFIX}."):
            await gate()
        await publish_many(subjects, payloads, headers)
        if after is not None:
            await after()

    monkeypatch.setattr(broker, "publish", one)
    monkeypatch.setattr(broker, "publish_many", many)


async def test_many_entries_each_fire_time_enqueued_once_and_recorded(nats_server: NatsServer) -> None:
    apps = [make_many(nats_server.url, i) for i in range(2)]
    beats = [Beat(app) for app in apps]
    async with observer(nats_server.url) as (nc, ticks):
        try:
            await asyncio.gather(*(b.start() for b in beats))
            await ticks.wait_for(lambda: len(ticks.ids) >= 4 * MANY)
        finally:
            await stop_all(beats, apps)  # the leader records its last batch, then releases the lease

        stored = await stored_ids(nc)
        await ticks.wait_for(lambda: len(ticks.ids) >= len(stored), timeout=5)
        assert Counter(ticks.ids).most_common(1)[0][1] == 1  # published once, not only stored once
        assert sorted(ticks.ids) == sorted(stored)
        fires = fires_of(stored)
        assert len(fires) == MANY
        for entry_fires in fires.values():
            assert_contiguous(entry_fires)
        assert await recorded(nats_server.url) == {name: entry_fires[-1] for name, entry_fires in fires.items()}


async def test_the_lease_is_kept_through_a_pass_longer_than_its_ttl(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = make_app(nats_server.url, 1), make_app(nats_server.url, 2)
    leader, follower = Beat(first, lease_ttl=1.0), Beat(second, lease_ttl=1.0)
    held, release = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        held.set()
        await release.wait()

    hold(await first.client.broker(), monkeypatch, slow)
    async with observer(nats_server.url) as (nc, ticks):
        try:
            await leader.start()
            await asyncio.wait_for(held.wait(), 10)  # the leader's first pass is stuck publishing
            await follower.start()
            watcher = await (await nc.jetstream().key_value(bucket_name(first))).watch(LEASE_KEY)
            holders: list[str] = []
            while len(holders) < 7:  # the lease as it stands, then 6 renewals: 2 x lease_ttl into the pass
                entry = await watcher.updates(timeout=10)
                if entry is not None:
                    holders.append(json.loads(entry.value or b"{}")["holder"])
            await watcher.stop()
            assert set(holders) == {leader.id}  # the follower, watching all along, never took over
            assert leader.is_leader and not follower.is_leader
            release.set()
            await ticks.wait_for(lambda: min(len(ticks.fires(e)) for e in ENTRIES) >= 3)
            assert leader.is_leader and not follower.is_leader
        finally:
            release.set()
            await stop_all([leader, follower], [first, second])
        stored = await stored_ids(nc)
        assert len(set(stored)) == len(stored)
        for entry_fires in by_entry(stored).values():
            assert_contiguous(entry_fires)


async def test_a_leader_whose_lease_is_taken_stops_publishing_its_batch(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(nats_server.url, 1)
    beat = Beat(app, lease_ttl=1.0)
    held, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck() -> None:
        if held.is_set():
            return  # only the first batch hangs (a server that never acknowledges it)
        held.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    hold(await app.client.broker(), monkeypatch, stuck)
    nc = await nats.connect(nats_server.url)
    try:
        await beat.start()
        await asyncio.wait_for(held.wait(), 10)
        # Another beat takes the lease (as one that saw it unrenewed would): the leader's next renewal
        # fails, and its batch in flight is cancelled once its lease has run out by its own clock.
        kv = await nc.jetstream().key_value(bucket_name(app))
        lease = await kv.get(LEASE_KEY)
        await kv.update(LEASE_KEY, json.dumps({"holder": "intruder", "expires": 0}).encode(), last=lease.revision)
        await asyncio.wait_for(cancelled.wait(), 10)
        assert any("while ticks were being published" in r.getMessage() for r in caplog.records)
        assert (await read_state(app)).last_fired == {}  # nothing of the cancelled batch was recorded
    finally:
        await beat.stop()
        await app.aclose()
        await nc.close()


async def test_a_leader_dying_between_a_batch_and_its_records_skips_and_doubles_nothing(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, batch = 200, 50
    monkeypatch.setattr(beat_leader, "TICK_BATCH", batch)  # 4 batches per pass
    apps = [make_many(nats_server.url, i, n) for i in range(2)]
    beats = [Beat(app, lease_ttl=1.0) for app in apps]
    died = asyncio.Event()
    victims: list[int] = []

    async def go() -> None:
        pass

    def dies_after_sixth_batch(i: int) -> Callable[[], Awaitable[None]]:
        calls = 0

        async def die() -> None:
            nonlocal calls
            calls += 1
            if calls == 6 and not died.is_set():  # the second pass's second batch was acknowledged
                victims.append(i)
                died.set()
                await asyncio.Event().wait()  # ... and its records are never written

        return die

    for i, app in enumerate(apps):
        hold(await app.client.broker(), monkeypatch, go, dies_after_sixth_batch(i))

    def fired_after(t: float) -> dict[str, list[int]]:
        return fires_of([task_id for task_id in ticks.ids if parse(task_id)[1] > t])

    async with observer(nats_server.url) as (nc, ticks):
        try:
            await asyncio.gather(*(b.start() for b in beats))
            await asyncio.wait_for(died.wait(), 20)
            killed_at = time.time()
            await beats[victims[0]].stop(release=False)
            # The survivor takes over: every entry fires twice more after the failover.
            await ticks.wait_for(lambda: len(later := fired_after(killed_at + 2)) == n
                                 and min(map(len, later.values())) >= 2)
        finally:
            await stop_all(beats, apps)

        stored = await stored_ids(nc)
        fires = fires_of(stored)
        assert len(fires) == n
        for entry_fires in fires.values():
            assert_contiguous(entry_fires)  # nothing skipped, nothing stored twice
            assert entry_fires[0] < killed_at < entry_fires[-1]
        await ticks.wait_for(lambda: len(ticks.ids) >= len(stored), timeout=5)
        # Only what the dead leader's pass had acknowledged but not recorded yet (its first two
        # batches) was sent again, and deduplicated by the stream.
        assert 0 < sum(c - 1 for c in Counter(ticks.ids).values()) <= 2 * batch
        assert await recorded(nats_server.url, n) == {name: entry_fires[-1] for name, entry_fires in fires.items()}


async def test_pipelined_records_keep_the_later_time_and_survive_a_deleted_bucket(nats_server: NatsServer) -> None:
    app = make_app(nats_server.url, 1)
    nc = await nats.connect(nats_server.url)
    t = [datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in range(10)]

    def rec(name: str, fire: datetime) -> tuple[str, datetime, str]:
        return name, fire, tick_id(name, fire)

    async def stored(name: str) -> datetime | None:
        return record_time((await raw.get(RECORD_PREFIX + name)).value)

    try:
        records = Records(await Beat(app)._open())
        raw = await nc.jetstream().key_value(bucket_name(app))
        await records.write([rec("a", t[2]), rec("b", t[4])])
        assert (await stored("a"), await stored("b")) == (t[2], t[4])
        # Another beat (it led meanwhile) wrote both keys: a later time is kept, an earlier one replaced.
        await raw.put(RECORD_PREFIX + "a", json.dumps({"fire": int(t[5].timestamp())}).encode())
        await raw.put(RECORD_PREFIX + "b", json.dumps({"fire": int(t[1].timestamp())}).encode())
        await records.write([rec("a", t[3]), rec("b", t[6])])
        assert (await stored("a"), await stored("b")) == (t[5], t[6])
        await records.write([rec("a", t[7])])  # the revision adopted from the conflict is current
        assert await stored("a") == t[7]
        await nc.jetstream().delete_key_value(bucket_name(app))
        await records.write([rec("c", t[8])])  # no stream answers: written alone, the bucket recreated
        raw = await nc.jetstream().key_value(bucket_name(app))
        assert await stored("c") == t[8]
    finally:
        await app.aclose()
        await nc.close()


async def test_a_leader_whose_lease_lapsed_fires_again_once_it_renews_it(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(nats_server.url, 1)
    beat = Beat(app, lease_ttl=1.0)
    renew = beat._lease
    stalled, hung, resume = False, asyncio.Event(), asyncio.Event()

    async def lease(kv: object) -> None:  # a renewal that hangs (a server that does not answer)
        if stalled:
            hung.set()
            await resume.wait()
        await renew(kv)  # type: ignore[arg-type]

    forget, dropped = beat._forget, asyncio.Event()

    async def forgetting() -> None:  # the firing loop saw the lease run out and dropped its timetable
        if beat._timetable is not None:
            dropped.set()
        await forget()

    monkeypatch.setattr(beat, "_lease", lease)
    monkeypatch.setattr(beat, "_forget", forgetting)
    async with observer(nats_server.url) as (_, ticks):
        try:
            await beat.start()
            await ticks.wait_for(lambda: min(len(ticks.fires(e)) for e in ENTRIES) >= 2)
            stalled = True
            await asyncio.wait_for(hung.wait(), 10)
            await asyncio.wait_for(dropped.wait(), 10)  # by the leader's own clock: it stopped firing
            assert not beat.is_leader
            stalled = False
            resume.set()  # the renewal goes through (no other beat took the lease): firing resumes
            resumed = time.time()
            await ticks.wait_for(lambda: min(len(ticks.fires(e, after=resumed + 1)) for e in ENTRIES) >= 2)
        finally:
            resume.set()
            await stop_all([beat], [app])
