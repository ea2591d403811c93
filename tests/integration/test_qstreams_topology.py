"""Queues with streams of their own across NATS topologies, on real servers (``Topology``): placed
per queue in a super-cluster, RPC answered by the caller's cluster, a mirror promoted after the
primary cluster is lost, and an edge-local queue on a leaf node that keeps working while the leaf is
cut off from its hub."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from natask import Natask
from natask.failover import add_mirror, promote
from natask.testing import worker

from .topology import Topology

QUEUES: dict[str, Any] = {"eu": {"placement": {"cluster": "west"}}, "us": {"placement": {"tags": ["region:east"]}}}
"""Queue ``eu`` placed by cluster in west, ``us`` by tag in east."""


def super_cluster(t: Topology) -> None:
    """Cluster east (one server, tag region:east) and west (two, region:west) joined by gateways."""
    t.add("east1", cluster="east", gateway="east", tags=["region:east"])
    t.add("west1", cluster="west", gateway="west", tags=["region:west"])
    t.add("west2", cluster="west", gateway="west", tags=["region:west"])


def shop(url: str, **options: Any) -> Natask:
    options.setdefault("queue_options", QUEUES)
    return Natask("shop", servers=[url], stream_per_queue=True, publish_timeout=10, ack_wait=5, **options)


async def api(url: str, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JetStream API request's JSON answer, from a connection to ``url``."""
    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=5)
        return json.loads(msg.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


def answer(label: str) -> Callable[[], str]:
    """A task body that says who ran it."""
    return lambda: label


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Ask the server again until ``check`` holds (its state changes without an event to await)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the server never reached the state"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_queues_are_placed_per_queue_and_run_with_producer_and_worker_in_other_clusters(tmp_path: Path) -> None:
    async with Topology(tmp_path) as t:
        super_cluster(t)
        await t.start()
        producer, west = shop(t["east1"].url), shop(t["west2"].url)
        try:
            for app in (producer, west):
                app.task(name="geo.add", queue="eu")(lambda x, y: x + y)
            add = producer.tasks["geo.add"]
            results = [await add.aapply_async((1, 2), queue="eu"), await add.aapply_async((3, 4), queue="us")]
            for stream, cluster in (("NATASK_TASKS_q_eu", "west"), ("NATASK_TASKS_q_us", "east")):
                info = await api(t["west1"].url, f"$JS.API.STREAM.INFO.{stream}")
                assert info["cluster"]["name"] == cluster, stream
            async with worker(west, queues=["eu", "us"]):  # the producer is in east, the worker in west
                assert [await r.aget(timeout=20) for r in results] == [3, 7]
        finally:
            await asyncio.gather(producer.aclose(), west.aclose())


@pytest.mark.timeout(120)
async def test_rpc_is_answered_by_a_worker_of_the_callers_cluster(tmp_path: Path) -> None:
    async with Topology(tmp_path) as t:
        super_cluster(t)
        await t.start()
        apps = {label: shop(t[server].url) for label, server in
                (("east", "east1"), ("west", "west1"), ("east caller", "east1"), ("west caller", "west2"))}
        try:
            for label, app in apps.items():
                app.task(name="geo.where", queue="eu")(answer(label))
            async with worker(apps["east"], queues=["eu"]), worker(apps["west"], queues=["eu"]):
                # NATS hands a queue-group message to a member in the publisher's cluster first.
                for caller, near in (("east caller", "east"), ("west caller", "west")):
                    where = apps[caller].tasks["geo.where"]
                    answers = Counter([await where.aapply_call((), {}, timeout=10) for _ in range(20)])
                    assert answers == {near: 20}, caller
        finally:
            await asyncio.gather(*(app.aclose() for app in apps.values()))


@pytest.mark.timeout(120)
async def test_a_worker_moves_a_queue_stream_whose_placement_changed(tmp_path: Path) -> None:
    async with Topology(tmp_path) as t:
        super_cluster(t)
        await t.start()
        before = shop(t["west1"].url)
        after = shop(t["west1"].url, queue_options={"us": {"placement": {"cluster": "west"}}})
        try:
            task = before.task(name="geo.echo", queue="us")(lambda s: s)
            after.task(name="geo.echo", queue="us")(lambda s: s)
            queued = await task.adelay("kept")
            info = await api(t["west1"].url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_us")
            assert info["cluster"]["name"] == "east"

            async def moved() -> bool:
                info = await api(t["west1"].url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_us")
                return info.get("cluster", {}).get("name") == "west" and info["state"]["messages"] == 1

            # What a worker does first when it starts: create or configure the queue's consumer.
            await (await after.client.broker()).ensure_consumer("us")
            await until(moved)
            async with worker(after, queues=["us"]):
                assert await queued.aget(timeout=20) == "kept"  # the move kept the queued task
        finally:
            await asyncio.gather(before.aclose(), after.aclose())


@pytest.mark.timeout(180)
async def test_a_mirror_promoted_after_its_primary_cluster_is_lost_runs_the_rest_and_nothing_twice(
        tmp_path: Path) -> None:
    # Queue us lives in east (one server); its mirror in west (two): west keeps the JetStream meta
    # group's majority when east is lost, which deleting the lost stream and promoting need.
    async with Topology(tmp_path) as t:
        super_cluster(t)
        await t.start()
        after = {"us": {"placement": {"cluster": "west"}}}  # step 4: the queue's placement, where it lives now
        ops, east, west = shop(t["west1"].url), shop(t["east1"].url), shop(t["west2"].url, queue_options=after)
        done: list[int] = []
        flaky_runs: list[int] = []
        blocked = asyncio.Event()

        async def record(i: int) -> int:
            if i == 6 and not done.count(6) and not blocked.is_set():
                blocked.set()  # in flight when the primary is lost: never acked
                await asyncio.Event().wait()
            done.append(i)
            return i

        def flaky(self: Any) -> str:
            flaky_runs.append(self.request.retries)
            if not self.request.retries:
                raise self.retry(countdown=5)  # fires (and is mirrored) after the east worker stopped
            return "second try"

        for app in (ops, east, west):
            app.task(name="dr.record", queue="us")(record)
            app.task(name="dr.flaky", queue="us", bind=True)(flaky)
        try:
            broker = await ops.client.broker()  # the app's buckets and dead letters live in west
            await broker.results()
            await broker.revoked()
            await broker.ensure_dlq()
            sent = [await ops.tasks["dr.flaky"].adelay()]  # queued before the mirror exists, and after
            sent += [await ops.tasks["dr.record"].adelay(i) for i in range(6)]
            mirror = await add_mirror(ops, "us", placement={"cluster": "west"})  # step 1
            assert mirror == "NATASK_TASKS_mirror_us"
            info = await api(t["west1"].url, f"$JS.API.STREAM.INFO.{mirror}")
            assert info["cluster"]["name"] == "west" and info["config"]["mirror"]["name"] == "NATASK_TASKS_q_us"
            sent += [await ops.tasks["dr.record"].adelay(i) for i in range(6, 12)]

            async def mirrored(count: int, subject: str = "tasks.us.>") -> bool:
                info = await api(t["west1"].url, f"$JS.API.STREAM.INFO.{mirror}", {"subjects_filter": subject})
                return sum((info["state"].get("subjects") or {}).values()) >= count

            await until(lambda: mirrored(13))
            primary = await api(t["west1"].url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_us")
            assert primary["state"]["messages"] == 13  # copied, not taken: the queue's consumer holds them
            async with worker(east, queues=["us"], concurrency=1, grace=0):
                await blocked.wait()  # flaky and records 0..5 ran (in order), 6 is running
            assert (sorted(done), flaky_runs) == (list(range(6)), [0])
            await until(lambda: mirrored(2, "tasks.us.dr.flaky"))  # its retry fired into the queue: mirrored
            t.stop("east1", kill=True)  # step 2: the primary cluster is lost

            promoted = await promote(ops, "us")  # step 3
            assert (promoted.stream, promoted.waiting, promoted.finished, promoted.superseded) == (mirror, 7, 6, 1)
            sent.append(await ops.tasks["dr.record"].adelay(100))  # producers publish to the promoted stream
            async with worker(west, queues=["us"]):  # step 4
                assert [await r.aget(timeout=30) for r in sent] == ["second try", *range(12), 100]
            assert sorted(done) == [*range(12), 100] and flaky_runs == [0, 1]  # each task ran to its end once
        finally:
            await asyncio.gather(ops.aclose(), east.aclose(), west.aclose())


@pytest.mark.timeout(120)
async def test_an_edge_local_queue_lives_on_the_leaf_and_keeps_working_while_the_hub_is_down(tmp_path: Path) -> None:
    async with Topology(tmp_path) as t:
        hub = t.add("hub", domain="hub", leaf_listen=True)
        t.add("edge", domain="edge", leaf_remotes=[hub])
        await t.start()
        options = {"jetstream_domain": "hub", "queue_options": {"edge": {"jetstream_domain": "edge"}}}
        central, local = shop(hub.url, **options), shop(t["edge"].url, **options)
        ran: list[tuple[str, str]] = []
        changed = asyncio.Event()

        # Results live in the hub: from the leaf, tasks that store none run whatever the link does.
        def job(where: str, tag: str) -> None:
            ran.append((where, tag))
            changed.set()

        async def reach(n: int) -> None:
            while len(ran) < n:
                changed.clear()
                await changed.wait()

        async def leaf_queue_empty() -> bool:  # acked: gone from the leaf's work queue
            return (await api(t["edge"].url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_edge"))["state"]["messages"] == 0

        for app in (central, local):
            app.task(name="edge.job", ignore_result=True)(job)
        try:
            await central.tasks["edge.job"].aapply_async(("hub", "from the hub"), queue="central")
            await central.tasks["edge.job"].aapply_async(("edge", "from the hub"), queue="edge")
            info = await api(t["edge"].url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_edge")  # the leaf's own JetStream
            assert info["config"]["name"] == "NATASK_TASKS_q_edge" and info["state"]["messages"] == 1
            info = await api(hub.url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_central")
            assert info["state"]["messages"] == 1
            assert (await api(hub.url, "$JS.API.STREAM.INFO.NATASK_TASKS_q_edge"))["error"]["err_code"] == 10059
            async with worker(local, queues=["edge", "central"]):  # one worker on the leaf serves both
                await reach(2)
                assert sorted(ran) == [("edge", "from the hub"), ("hub", "from the hub")]
                t.stop("hub")  # the leaf is cut off
                for i in range(3):
                    await local.tasks["edge.job"].aapply_async(("edge", f"hub down {i}"), queue="edge")
                await reach(5)
                assert sorted(ran[2:]) == [("edge", f"hub down {i}") for i in range(3)]
                await until(leaf_queue_empty)
        finally:
            await asyncio.gather(central.aclose(), local.aclose())
