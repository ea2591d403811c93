"""Workers and producers on leaf nodes, against real servers on loopback: a hub with JetStream
domain ``hub``; a leaf node without JetStream reaching it through ``$JS.hub.API``
(``jetstream_domain="hub"``); a leaf node with JetStream of its own (domain ``edge``) whose app
uses the hub's streams. Tasks, results (the reply inbox and the KV bucket), RPC, events, control,
revokes, priorities, delays and claim checks all cross the leaf connection."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest

from natask import ConfigError, Natask, TaskRevoked
from natask.beat import Beat
from natask.control import inspect
from natask.events import EventStream
from natask.testing import worker

from .test_security import ORDERS_WORKER, WEB, readme_grants, violations
from .topology import Server, Topology

BIG = 1_500_000
"""Bytes of an argument over the servers' 1 MiB max_payload: it travels as a claim check."""


@pytest.fixture
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    """A hub (domain ``hub``), a leaf node without JetStream and one with its own (domain ``edge``)."""
    async with Topology(tmp_path) as t:
        hub = t.add("hub", domain="hub", leaf_listen=True)
        t.add("leaf", js=False, leaf_remotes=[hub])
        t.add("edge", domain="edge", leaf_remotes=[hub])
        await t.start()
        yield t


def make_app(server: Server, **options: object) -> Natask:
    app = Natask("leafy", servers=[server.url], ack_wait=5, publish_timeout=10, **options)  # type: ignore[arg-type]
    app.task(name="t.where")(lambda tag: f"ran {tag}")
    app.task(name="t.size")(lambda data: len(data))
    return app


async def streams_on(server: Server, domain: str) -> list[str]:
    """The stream names of ``domain``'s JetStream, asked through ``server``."""
    nc = await nats.connect(server.url)
    try:
        msg = await nc.request(f"$JS.{domain}.API.STREAM.NAMES", b"", timeout=5)
        return sorted(json.loads(msg.data).get("streams") or [])
    finally:
        await nc.close()


async def serve_across(worker_app: Natask, hub_app: Natask, leaf_producer: Natask) -> None:
    """A worker of ``worker_app`` serves producers on both sides of the leaf connection."""
    where = leaf_producer.tasks["t.where"]
    size = leaf_producer.tasks["t.size"]
    from_hub = hub_app.tasks["t.where"]
    await leaf_producer.AsyncResult("revoked-on-the-leaf").arevoke()
    async with worker(worker_app) as w, EventStream(hub_app, "task-succeeded") as events:
        # Results over each producer's reply inbox (the fast path) ...
        on_hub = await from_hub.adelay("hub")
        on_leaf = await where.adelay("leaf")
        assert await on_hub.aget(timeout=10) == "ran hub"
        assert await on_leaf.aget(timeout=10) == "ran leaf"
        # ... and from the results bucket, read by id from the other side.
        assert await leaf_producer.AsyncResult(on_hub.id).aget(timeout=10) == "ran hub"
        assert await hub_app.AsyncResult(on_leaf.id).aget(timeout=10) == "ran leaf"
        assert await leaf_producer.AsyncResult(on_hub.id).astate() == "SUCCESS"
        # Waiting by id on a task not finished yet: a watch of the bucket through the domain.
        later = await from_hub.aapply_async(("later",), countdown=0.3)  # a schedule message
        assert await leaf_producer.AsyncResult(later.id).aget(timeout=10) == "ran later"
        # A priority level: its consumer is created through the domain, the worker learns of it
        # from the hub's advisory.
        assert await (await where.aapply_async(("urgent",), priority=5)).aget(timeout=10) == "ran urgent"
        # A claim check: the argument goes through the hub's Object Store.
        assert await (await size.adelay(b"x" * BIG)).aget(timeout=10) == BIG
        # RPC from both sides to the worker's queue group.
        assert await from_hub.acall("rpc") == "ran rpc"
        assert await where.acall("rpc") == "ran rpc"
        # The revoke written from the leaf before the worker started reached its revoked-bucket watch.
        with pytest.raises(TaskRevoked):
            await (await from_hub.aapply_async(("never",), task_id="revoked-on-the-leaf")).aget(timeout=10)
        # Control and events across the leaf connection.
        assert [r["worker"] for r in await inspect(hub_app, "ping", 1.0)] == [w.ident]
        assert [r["worker"] for r in await inspect(leaf_producer, "ping", 1.0)] == [w.ident]

        async def succeeded(task_id: str) -> None:
            async for event in events:
                if event.get("id") == task_id:
                    return

        await asyncio.wait_for(succeeded(on_leaf.id), 10)


async def test_a_worker_on_a_leaf_without_jetstream_serves_the_hubs_queues(topology: Topology) -> None:
    hub_app = make_app(topology["hub"], large_payload_limit=2 * BIG)
    leaf_app = make_app(topology["leaf"], jetstream_domain="hub", large_payload_limit=2 * BIG)
    try:
        await serve_across(leaf_app, hub_app, leaf_app)
    finally:
        await hub_app.aclose()
        await leaf_app.aclose()
    assert "NATASK_TASKS" in await streams_on(topology["hub"], "hub")


async def test_a_worker_on_the_hub_serves_a_producer_on_the_leaf(topology: Topology) -> None:
    hub_app = make_app(topology["hub"], large_payload_limit=2 * BIG)
    leaf_app = make_app(topology["leaf"], jetstream_domain="hub", large_payload_limit=2 * BIG)
    try:
        await serve_across(hub_app, hub_app, leaf_app)
    finally:
        await hub_app.aclose()
        await leaf_app.aclose()


async def test_an_app_on_a_leaf_with_its_own_jetstream_uses_the_hubs_streams(topology: Topology) -> None:
    hub_app = make_app(topology["hub"], large_payload_limit=2 * BIG)
    edge_app = make_app(topology["edge"], jetstream_domain="hub", large_payload_limit=2 * BIG)
    try:
        await serve_across(edge_app, hub_app, edge_app)
    finally:
        await hub_app.aclose()
        await edge_app.aclose()
    assert "NATASK_TASKS" in await streams_on(topology["hub"], "hub")
    assert await streams_on(topology["edge"], "edge") == []  # nothing natask owns landed on the edge


async def test_buckets_are_read_and_written_through_the_domain(topology: Topology) -> None:
    app = make_app(topology["leaf"], jetstream_domain="hub")
    try:
        broker = await app.client.broker()
        bucket = await broker.bucket("leafy_kv", ttl=None)
        assert await bucket.write_many([("a", b"1", 0), ("b", b"2", 0)]) == [1, 2]  # pipelined CAS writes
        assert await bucket.value("a") == b"1"  # a direct get on the connection's own inbox
        await bucket.put("c", b"3")
        assert (await bucket.get("c")) == (await bucket.last("c"))[1]
        assert sorted(await bucket.keys()) == ["a", "b", "c"]
    finally:
        await app.aclose()
    assert "KV_leafy_kv" in await streams_on(topology["hub"], "hub")


async def test_a_beat_on_a_leaf_fires_into_the_hubs_stream(topology: Topology) -> None:
    app = make_app(topology["leaf"], jetstream_domain="hub")
    fired = asyncio.Queue[int]()
    tick = app.task(name="t.tick")(lambda: fired.put_nowait(1))
    app.add_periodic_task(1.0, tick.s(), name="leaf.tick")
    beat = Beat(app, lease_ttl=1)  # its lease and fire-time records live in the hub's buckets
    try:
        async with worker(app):
            await beat.start()
            try:
                for _ in range(2):
                    await asyncio.wait_for(fired.get(), 10)
                assert beat.is_leader
            finally:
                await beat.stop()
    finally:
        await app.aclose()


async def test_a_worker_on_a_leaf_without_a_domain_fails_at_once_with_what_to_set(topology: Topology) -> None:
    # connect_timeout is long: the error comes from the server's "no responders", not a timeout.
    app = make_app(topology["leaf"], connect_timeout=60)
    try:
        with pytest.raises(ConfigError, match=r"\$JS\.API\.INFO.*jetstream_domain \(NATASK_JS_DOMAIN\)"):
            await asyncio.wait_for(worker(app).__aenter__(), 30)
        with pytest.raises(ConfigError, match="start nats-server with -js"):
            await asyncio.wait_for(app.tasks["t.where"].adelay("x"), 30)
    finally:
        await app.aclose()


async def test_a_wrong_domain_is_a_clear_error(topology: Topology) -> None:
    app = make_app(topology["leaf"], jetstream_domain="hubb", connect_timeout=0.5)
    try:
        with pytest.raises(ConfigError, match=r"JetStream API of domain 'hubb' \(\$JS\.hubb\.API\.INFO\)"):
            await app.tasks["t.where"].adelay("x")
    finally:
        await app.aclose()


async def test_a_leaf_that_maps_its_account_to_the_hubs_domain_needs_no_app_setting(tmp_path: Path) -> None:
    # nats-server's default_js_domain sends the account's plain $JS.API (and $KV) to the hub's domain.
    async with Topology(tmp_path) as t:
        hub = t.add("hub", domain="hub", leaf_listen=True)
        leaf = t.add("leaf", js=False, leaf_remotes=[hub], extra='default_js_domain: {"$G": "hub"}')
        await t.start()
        hub_app, leaf_app = make_app(hub), make_app(leaf)
        try:
            async with worker(leaf_app):
                assert await (await hub_app.tasks["t.where"].adelay("hub")).aget(timeout=10) == "ran hub"
                on_leaf = await leaf_app.tasks["t.where"].adelay("leaf")
                assert await hub_app.AsyncResult(on_leaf.id).aget(timeout=10) == "ran leaf"
        finally:
            await hub_app.aclose()
            await leaf_app.aclose()
        assert "NATASK_TASKS" in await streams_on(hub, "hub")


async def test_the_servers_own_domain_name_works_on_the_hub_too(topology: Topology) -> None:
    # $JS.hub.API answers on the hub itself: one configuration for every app of the domain.
    app = make_app(topology["hub"], jetstream_domain="hub")
    try:
        async with worker(app):
            assert await (await app.tasks["t.where"].adelay("hub")).aget(timeout=10) == "ran hub"
    finally:
        await app.aclose()


async def test_a_server_without_jetstream_is_a_clear_error(tmp_path: Path) -> None:
    async with Topology(tmp_path) as t:
        plain = t.add("plain", js=False)
        await t.start()
        app = make_app(plain)
        try:
            with pytest.raises(ConfigError, match=r"nothing answers the JetStream API.*start nats-server with -js"):
                await app.tasks["t.where"].adelay("x")
        finally:
            await app.aclose()



def domain_grants(domain: str) -> str:
    """The README's minimal grants for users of a leaf node whose apps use ``domain``: the JetStream
    API under ``$JS.<domain>.API``, and KV writes through it."""
    return readme_grants().replace('"$JS.API.', f'"$JS.{domain}.API.').replace('"$KV.', f'"$JS.{domain}.API.$KV.')


async def test_the_readme_grants_with_the_domain_prefix_work_on_a_leaf(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="natask")
    async with Topology(tmp_path) as t:
        hub = t.add("hub", domain="hub", leaf_listen=True)
        leaf = t.add("leaf", js=False, leaf_remotes=[hub], extra=domain_grants("hub"))
        await t.start()
        url = [leaf.url]
        web = Natask("web", servers=url, connect_options=WEB, publish_timeout=5, jetstream_domain="hub")
        elsewhere = Natask("web", servers=url, connect_options=WEB, publish_timeout=5, jetstream_domain="hub")
        orders = Natask("orders", servers=url, connect_options=ORDERS_WORKER, publish_timeout=5,
                        jetstream_domain="hub")
        orders.task(name="orders.process", queue="orders")(lambda what: what)
        submit = web.task(name="orders.process", queue="orders")(lambda what: what)
        try:
            async with worker(orders, queues=["orders"]):
                first = await submit.adelay("fast")
                assert await first.aget(timeout=10) == "fast"
                assert [await r.aget(timeout=10) for r in await submit.adelay_many([("b",), ("c",)])] == ["b", "c"]
                assert await submit.acall("rpc") == "rpc"
                assert await elsewhere.AsyncResult(first.id).aget(timeout=10) == "fast"
        finally:
            for app in (web, elsewhere, orders):
                await app.aclose()
    assert violations(caplog) == []
