"""Scale-out on a real three-node JetStream cluster with ``stream_replicas=3`` (SPEC §8): losing any
one server, the stream leader included, loses no task and fails no call.

Each test pins who leads what (leader step-down with a preferred server) and which node each client
connects to first, then SIGKILLs a node, so the same failure is exercised on every run. Elections take
~5-11 s on nats-server 2.15; every wait below is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from natask import Natask
from natask.beat import TICK_SEP, TICK_TIME_FORMAT, Beat, bucket_name
from natask.naming import DLQ_STREAM
from natask.testing import worker

from .cluster import NatsCluster

log = logging.getLogger("tests.cluster")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    c = NatsCluster(tmp_path / "cluster")
    await c.start()
    try:
        yield c
    finally:
        await asyncio.to_thread(c.close)


def make_app(cluster: NatsCluster, name: str, prefix: str, first: int | None = None, **kw: object) -> Natask:
    """An app with every node's URL and ``stream_replicas=3``; ``first`` pins the node it connects to."""
    urls = cluster.urls
    options: dict[str, object] = {}
    if first is not None:
        urls = [urls[first]] + [u for j, u in enumerate(urls) if j != first]
        options["dont_randomize"] = True
    return Natask(name, servers=urls, subject_prefix=prefix, stream_replicas=3, connect_options=options,
                  **kw)  # type: ignore[arg-type]


def counting_task(app: Natask, seen: Counter[int], total: int, done: asyncio.Event,
                  ran: asyncio.Event | None = None) -> None:
    """``t.count(i)``: records each run of ``i`` and sets ``ran``; sets ``done`` once every ``i < total`` ran."""

    @app.task(name="t.count", ignore_result=True)
    async def count(i: int) -> None:
        seen[i] += 1
        if ran is not None:
            ran.set()
        if len(seen) == total:
            done.set()


async def test_streams_buckets_and_consumers_get_three_replicas(cluster: NatsCluster) -> None:
    app = make_app(cluster, "r3", "rthree")
    add = app.task(name="t.add")(lambda x, y: x + y)
    try:
        async with worker(app):
            assert await (await add.adelay(2, 3)).aget(timeout=20) == 5
        names = app.names
        for stream in (names.stream, DLQ_STREAM, f"KV_{names.results_bucket}", f"KV_{names.revoked_bucket}"):
            info = await cluster.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None and info.cluster.leader
            placed = [info.cluster.leader, *(r.name for r in info.cluster.replicas or [])]
            assert sorted(placed) == ["n0", "n1", "n2"], stream
        broker = await app.client.broker()
        consumer = await broker.js.consumer_info(names.stream, names.consumer("default"))
        assert consumer.config.num_replicas == 3
    finally:
        await app.aclose()


@pytest.mark.parametrize("worker_on", [0, 1], ids=["worker-on-killed-node", "worker-on-survivor"])
async def test_stream_leader_killed_under_load_loses_no_task_and_fails_no_call(
    cluster: NatsCluster, worker_on: int, caplog: pytest.LogCaptureFixture
) -> None:
    total, producers = 500, 5
    seen: Counter[int] = Counter()
    all_done = asyncio.Event()
    # Node 0 leads the task stream and the queue's consumer and is the producer's server. A worker on
    # node 0 loses its connection too; one on node 1 keeps it while the consumer leader under it dies.
    producer = make_app(cluster, "producer", "load", first=0, ack_wait=5)
    consumer = make_app(cluster, "worker", "load", first=worker_on, ack_wait=5)
    counting_task(producer, seen, total, all_done)
    counting_task(consumer, seen, total, all_done)
    count = producer.tasks["t.count"]
    failures: list[BaseException] = []
    published = 0
    midway = asyncio.Event()
    try:
        async with worker(consumer, concurrency=16) as w:
            await cluster.move_leader(producer.names.stream, 0, consumers=[producer.names.consumer("default")])
            broker = await producer.client.broker()
            assert broker.nc.connected_url is not None and broker.nc.connected_url.port == cluster.nodes[0].port

            async def produce(k: int) -> None:
                nonlocal published
                for i in range(k, total, producers):
                    try:
                        await count.adelay(i)
                        published += 1
                        if published == 150:
                            midway.set()
                    except Exception as e:  # counted: the test fails on any
                        failures.append(e)

            producing = asyncio.gather(*(produce(k) for k in range(producers)))
            await asyncio.wait_for(midway.wait(), 30)  # the kill lands mid-load
            cluster.kill(0)
            killed, at_kill, ran_at_kill = time.monotonic(), published, len(seen)
            await asyncio.wait_for(producing, 45)
            producers_done = time.monotonic()
            await asyncio.wait_for(all_done.wait(), 45)
            log.info("killed with %d published, %d ran; producers done %.1fs after the kill, every task ran "
                     "%.1fs after; %d duplicate runs; new stream leader n%d; worker processed %d",
                     at_kill, ran_at_kill, producers_done - killed, time.monotonic() - killed,
                     sum(seen.values()) - len(seen), await cluster.stream_leader(producer.names.stream),
                     w.processed)
        assert failures == []
        assert 0 < at_kill < total
        assert set(seen) == set(range(total))  # at-least-once: duplicates allowed, losses not
        # An election is a few seconds of "no leader": natask must wait it out, not spin and log.
        noisy = Counter(r.getMessage()[:80] for r in caplog.records
                        if r.name.startswith("natask") and r.levelno >= logging.WARNING)
        warnings = sum(noisy.values())
        assert warnings < 50, f"{warnings} warnings, most common: {noisy.most_common(3)}"
    finally:
        await producer.aclose()
        await consumer.aclose()


async def test_idle_worker_resumes_when_its_consumer_leader_dies(cluster: NatsCluster) -> None:
    seen: Counter[int] = Counter()
    done, ran = asyncio.Event(), asyncio.Event()
    producer = make_app(cluster, "producer", "idle", first=2, ack_wait=5)
    consumer = make_app(cluster, "worker", "idle", first=1, ack_wait=5)
    counting_task(producer, seen, 2, done, ran)
    counting_task(consumer, seen, 2, done, ran)
    count = producer.tasks["t.count"]
    try:
        async with worker(consumer, concurrency=4):
            await cluster.move_leader(producer.names.stream, 0, consumers=[producer.names.consumer("default")])
            await count.adelay(0)
            await asyncio.wait_for(ran.wait(), 20)
            # Idle now: the worker's pull requests wait on node 0, the consumer leader, which dies.
            cluster.kill(0)
            killed = time.monotonic()
            await count.adelay(1)
            published = time.monotonic()
            await asyncio.wait_for(done.wait(), 40)
            log.info("published %.1fs after the kill, ran %.1fs after the kill",
                     published - killed, time.monotonic() - killed)
    finally:
        await producer.aclose()
        await consumer.aclose()


async def test_results_and_get_keep_working_when_the_results_leader_dies(cluster: NatsCluster) -> None:
    gate = asyncio.Event()

    def define(app: Natask) -> None:
        @app.task(name="t.gated")
        async def gated(tag: str) -> str:
            if tag != "before":
                await gate.wait()
            return tag

    # Node 0 leads the results bucket and is the caller's server; the worker and the task stream and
    # consumer leaders sit on node 1, so only results are in the way of the failure.
    caller = make_app(cluster, "caller", "res", first=0, ack_wait=5)
    runner = make_app(cluster, "runner", "res", first=1, ack_wait=5)
    reader = make_app(cluster, "reader", "res", first=2, ack_wait=5)  # another process: no reply route
    for app in (caller, runner, reader):
        define(app)
    gated = caller.tasks["t.gated"]
    bucket = f"KV_{caller.names.results_bucket}"
    try:
        async with worker(runner):
            before = await gated.adelay("before")
            assert await before.aget(timeout=20) == "before"
            await cluster.move_leader(bucket, 0)
            await cluster.move_leader(caller.names.stream, 1, consumers=[caller.names.consumer("default")])
            pending = await gated.adelay("during")
            waiting = asyncio.create_task(pending.aget(timeout=45))
            cluster.kill(0)
            killed = time.monotonic()
            # A finished task read by id from another app while the bucket elects a new leader.
            assert await reader.AsyncResult(before.id).aget(timeout=45) == "before"
            read_at = time.monotonic()
            gate.set()  # finishes after the kill: its result is stored through the election
            assert await waiting == "during"  # the caller lost its connection: it reads the bucket
            got_at = time.monotonic()
            after = await gated.adelay("after")
            assert await after.aget(timeout=30) == "after"
            assert await reader.AsyncResult(pending.id).aget(timeout=30) == "during"
            log.info("read by id %.1fs after the kill, the waiting get returned %.1fs after; new leader n%d",
                     read_at - killed, got_at - killed, await cluster.stream_leader(bucket))
    finally:
        for app in (caller, runner, reader):
            await app.aclose()


async def test_restarted_node_catches_up_and_then_serves_the_stream(cluster: NatsCluster) -> None:
    total = 300
    seen: Counter[int] = Counter()
    all_done = asyncio.Event()
    producer = make_app(cluster, "producer", "catch", first=0)
    consumer = make_app(cluster, "worker", "catch", first=1)
    counting_task(producer, seen, total, all_done)
    counting_task(consumer, seen, total, all_done)
    count = producer.tasks["t.count"]
    stream = producer.names.stream
    try:
        for i in range(100):  # no worker yet: the tasks stay in the stream
            await count.adelay(i)
        await cluster.move_leader(stream, 2)
        cluster.kill(2)
        for i in range(100, total):  # the first of these through the election
            await count.adelay(i)
        cluster.restart(2)  # from the loop's thread: PR_SET_PDEATHSIG follows the spawning thread
        await cluster.wait_listening(2)
        started = time.monotonic()
        state = await cluster.wait_caught_up(2, stream, timeout=30)
        log.info("node 2 caught up %.1fs after it answered again: %s", time.monotonic() - started, state)
        assert state["messages"] == total
        # Node 2 leads again and serves every task from its own copy.
        await cluster.move_leader(stream, 2)
        async with worker(consumer, concurrency=16):
            await asyncio.wait_for(all_done.wait(), 30)
        assert set(seen) == set(range(total))
    finally:
        await producer.aclose()
        await consumer.aclose()


async def test_beat_keeps_firing_once_per_tick_when_the_node_of_its_lease_dies(cluster: NatsCluster) -> None:
    prefix = "cbeat"

    def beat_app(i: int) -> Natask:
        app = make_app(cluster, f"beat{i}", prefix, first=i)
        tick = app.task(name="jobs.tick")(_noop)
        app.add_periodic_task(timedelta(seconds=1), tick.s(), name="every.second")
        return app

    apps = [beat_app(0), beat_app(1)]  # the leading beat on the node that dies, a follower on a survivor
    beats = [Beat(app, lease_ttl=2.0) for app in apps]
    arrived: list[tuple[float, str]] = []  # (monotonic, tick id) as a core subscriber on node 2 sees them
    changed = asyncio.Event()

    async def on_tick(msg: Msg) -> None:
        assert msg.headers is not None
        arrived.append((time.monotonic(), msg.headers["Nats-Msg-Id"]))
        changed.set()

    async def until(predicate: Callable[[], bool], timeout: float) -> None:
        async def watch() -> None:
            while not predicate():
                changed.clear()
                await changed.wait()

        await asyncio.wait_for(watch(), timeout)

    nc = await nats.connect(cluster.url(2))
    await nc.subscribe(f"{prefix}.default.>", cb=on_tick)
    stream = apps[0].names.stream
    try:
        await beats[0].start()
        await until(lambda: len(arrived) >= 2, 30)
        assert beats[0].is_leader
        await beats[1].start()
        await cluster.move_leader(f"KV_{bucket_name(apps[0])}", 0)
        await cluster.move_leader(stream, 0)
        cluster.kill(0)
        killed = time.monotonic()
        await until(lambda: sum(at > killed for at, _ in arrived) >= 5, 45)
        leading = [i for i, b in enumerate(beats) if b.is_leader]
        assert len(leading) == 1
        resumed = min(at for at, _ in arrived if at > killed) - killed
        await asyncio.gather(*(b.stop() for b in beats))

        js = nc.jetstream()
        info = await cluster.stream_info(stream)
        stored = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            assert msg.headers is not None
            stored.append(msg.headers["Nats-Msg-Id"])
        fires = sorted(map(_fire_time, stored))
        gaps = [(a, b) for a, b in pairwise(fires) if b - a > 1]
        log.info("first tick %.1fs after the kill; %d ticks stored, %d published (%d again, deduplicated); "
                 "leader now beat%d; gaps %s", resumed, len(stored), len(arrived),
                 len(arrived) - len({i for _, i in arrived}), leading[0], gaps)
        assert len(set(stored)) == len(stored)  # each fire time enqueued once, across the failover
    finally:
        for beat in beats:
            await beat.stop()
        await nc.close()
        for app in apps:
            await app.aclose()


async def test_first_call_of_a_new_app_during_the_stream_leader_election_succeeds(cluster: NatsCluster) -> None:
    setup = make_app(cluster, "setup", "fresh", first=1)
    setup.task(name="t.add")(lambda x, y: x + y)
    try:
        await setup.tasks["t.add"].adelay(1, 2)  # creates the stream
        await cluster.move_leader(setup.names.stream, 0)
    finally:
        await setup.aclose()
    # A process that starts while the stream elects a new leader: its first delay() checks the
    # stream, then publishes; both must ride out the election like any publish (SPEC §2).
    fresh = make_app(cluster, "fresh", "fresh", first=1)
    add = fresh.task(name="t.add")(lambda x, y: x + y)
    try:
        cluster.kill(0)
        killed = time.monotonic()
        result = await add.adelay(2, 3)
        log.info("the first delay() of a new app returned %.1fs after the kill", time.monotonic() - killed)
        async with worker(fresh):
            assert await result.aget(timeout=30) == 5
    finally:
        await fresh.aclose()


async def test_worker_started_during_a_failover_comes_up(cluster: NatsCluster) -> None:
    setup = make_app(cluster, "setup", "boot", first=1)
    setup.task(name="t.add")(lambda x, y: x + y)
    names = setup.names
    try:
        async with worker(setup):  # creates the streams, buckets and the consumer
            assert await (await setup.tasks["t.add"].adelay(1, 2)).aget(timeout=20) == 3
        for stream in (names.stream, DLQ_STREAM, f"KV_{names.results_bucket}", f"KV_{names.revoked_bucket}"):
            await cluster.move_leader(stream, 0)
    finally:
        await setup.aclose()
    # A worker (re)started by its supervisor right as node 0 dies: every stream it opens is electing.
    app = make_app(cluster, "boot", "boot", first=1)
    add = app.task(name="t.add")(lambda x, y: x + y)
    try:
        cluster.kill(0)
        killed = time.monotonic()
        async with worker(app):
            log.info("worker started %.1fs after the kill", time.monotonic() - killed)
            assert await (await add.adelay(2, 3)).aget(timeout=30) == 5
    finally:
        await app.aclose()


def _noop() -> None: ...

def _fire_time(tick: str) -> int:
    stamp = tick.rsplit(TICK_SEP, 1)[1]
    return int(datetime.strptime(stamp, TICK_TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp())
