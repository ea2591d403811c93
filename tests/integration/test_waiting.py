"""Waiting for results costs nothing while nothing happens: many waiters, a reconnect while they
wait, and waits without a reply route, on a real nats-server."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
import pytest
from nats.aio.msg import Msg

from natask import Natask
from natask.message import dumps
from natask.server import NatsServer
from natask.testing import worker

from .faultproxy import FaultProxy

QUIET = 6.0
"""Seconds of waiting with nothing happening, longer than any periodic check a waiter ever had (5 s)."""


class ApiLog:
    """The JetStream API requests of every client, seen by a subscriber on ``$JS.API.>`` (the
    server hands it a copy of each request) on a connection of its own."""

    def __init__(self, bucket: str) -> None:
        self.reads: Counter[str] = Counter()  # direct gets of a results key, by key
        self.watches = 0  # consumers created on the results bucket
        self.seen = asyncio.Condition()
        self._get = f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}."
        self._create = f"$JS.API.CONSUMER.CREATE.KV_{bucket}"
        self.nc: nats.NATS | None = None

    async def start(self, url: str) -> ApiLog:
        self.nc = await nats.connect(url)
        await self.nc.subscribe("$JS.API.>", cb=self._on_request)
        await self.nc.flush()
        return self

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def _on_request(self, msg: Msg) -> None:
        if msg.subject.startswith(self._get):
            self.reads[msg.subject[len(self._get):]] += 1
        elif msg.subject.startswith(self._create):
            self.watches += 1
        async with self.seen:
            self.seen.notify_all()

    async def wait_read(self, key: str, count: int) -> None:
        async with self.seen:
            await asyncio.wait_for(self.seen.wait_for(lambda: self.reads[key] >= count), 20)

    async def wait_watches(self, count: int) -> None:
        async with self.seen:
            await asyncio.wait_for(self.seen.wait_for(lambda: self.watches >= count), 20)


def define_gated(app: Natask, gates: dict[str, asyncio.Event]) -> None:
    @app.task(name="t.gated")
    async def gated(gate: str, value: int) -> int:
        await gates[gate].wait()
        return value


async def test_many_waiters_complete_and_waiting_reads_nothing(app: Natask, nats_server: NatsServer) -> None:
    n = 2000
    gates = {"open": asyncio.Event()}
    define_gated(app, gates)
    api = await ApiLog(app.names.results_bucket).start(nats_server.url)
    try:
        async with worker(app, concurrency=2):
            results = await app.tasks["t.gated"].adelay_many([("open", i) for i in range(n)])
            waits = [asyncio.create_task(r.aget()) for r in results]
            await asyncio.sleep(0)  # every wait runs its first step, which registers it
            assert all(len(r._waiters) == 1 for r in results)
            # A waiter is a future: no timer per waiter on the loop (there used to be a 5 s check each).
            assert len(asyncio.get_running_loop()._scheduled) < n // 10  # type: ignore[attr-defined]
            await asyncio.sleep(QUIET)  # nothing happens: nothing is read
            assert sum(api.reads.values()) == 0 and api.watches == 0
            gates["open"].set()
            assert await asyncio.wait_for(asyncio.gather(*waits), 120) == list(range(n))
        assert sum(api.reads.values()) == 0 and api.watches == 0  # every result came over the inbox
    finally:
        await api.close()


async def test_a_reconnect_reads_each_outstanding_key_and_later_replies_use_the_inbox(
    nats_server: NatsServer,
) -> None:
    n = 10
    gates = {"gap": asyncio.Event(), "after": asyncio.Event()}
    async with FaultProxy(nats_server.port) as proxy:
        producer = Natask("producer", servers=[proxy.url])
        runner = Natask("runner", servers=[nats_server.url])  # the worker keeps its connection
        for app in (producer, runner):
            define_gated(app, gates)
        replied: list[str] = []
        on_result = producer.client._on_result

        def spy(task_id: str, data: bytes) -> None:
            replied.append(task_id)
            on_result(task_id, data)

        producer.client._on_result = spy  # type: ignore[method-assign]
        bucket = producer.names.results_bucket
        api = await ApiLog(bucket).start(nats_server.url)
        stores = await nats.connect(nats_server.url)
        stored: set[str] = set()
        gap_stored = asyncio.Event()

        async def on_store(msg: Msg) -> None:
            stored.add(msg.subject.rsplit(".", 1)[-1])
            if stored >= {r.id for r in in_gap}:
                gap_stored.set()

        try:
            gated = producer.tasks["t.gated"]
            in_gap = [await gated.adelay("gap", i) for i in range(n)]
            after = [await gated.adelay("after", i) for i in range(n)]
            await stores.subscribe(f"$KV.{bucket}.>", cb=on_store)
            await stores.flush()
            async with worker(runner, concurrency=2 * n):
                waits = [asyncio.create_task(r.aget(timeout=60)) for r in in_gap + after]
                proxy.freeze()  # the producer hears nothing from now on
                gates["gap"].set()
                await asyncio.wait_for(gap_stored.wait(), 20)  # stored; the replies wait in the proxy
                await proxy.cut()  # and are lost with the connection
                proxy.thaw()
                assert await asyncio.wait_for(asyncio.gather(*waits[:n]), 30) == list(range(n))
                assert all(api.reads[r.id] <= 1 for r in in_gap)  # each found with at most one read
                assert not set(replied) & {r.id for r in in_gap}
                gates["after"].set()
                assert await asyncio.wait_for(asyncio.gather(*waits[n:]), 30) == list(range(n))
            assert {r.id for r in after} <= set(replied)  # over the resubscribed inbox
            assert api.watches == 0  # no consumer per waiter
        finally:
            await stores.close()
            await api.close()
            await producer.aclose()
            await runner.aclose()


async def test_a_result_stored_after_the_first_read_pass_with_its_reply_lost_is_found(
    nats_server: NatsServer,
) -> None:
    async with FaultProxy(nats_server.port) as proxy:
        app = Natask("producer", servers=[proxy.url])
        api = await ApiLog(app.names.results_bucket).start(nats_server.url)
        try:
            # No worker: the record is written below as a worker whose reply was lost would store it.
            result = await app.asend_task("t.nobody")
            waiting = asyncio.create_task(result.aget(timeout=60))
            await proxy.cut()
            await api.wait_read(result.id, 1)  # the first pass after the reconnect: nothing yet
            nc = await nats.connect(nats_server.url)
            try:
                kv = await nc.jetstream().key_value(app.names.results_bucket)
                await kv.put(result.id, dumps({"state": "SUCCESS", "result": 7}))
            finally:
                await nc.close()
            assert await waiting == 7  # found by a later pass
            assert api.reads[result.id] == 2 and api.watches == 0
        finally:
            await api.close()
            await app.aclose()


async def test_waits_without_a_reply_route_share_a_few_watch_consumers(app: Natask, nats_server: NatsServer) -> None:
    n, dropped = 300, 100
    gates = {"open": asyncio.Event(), "done": asyncio.Event()}
    gates["done"].set()
    define_gated(app, gates)
    other = Natask("other", servers=[nats_server.url])  # another process: no reply route
    api = await ApiLog(app.names.results_bucket).start(nats_server.url)
    try:
        async with worker(app, concurrency=2):
            gated = app.tasks["t.gated"]
            finished = [await gated.adelay("done", i) for i in range(3)]
            for r in finished:
                await r.aget(timeout=20)
            # A lone wait for a finished task: one read, no consumer.
            for r in finished:
                assert await other.AsyncResult(r.id).aget(timeout=20) == r.info
            assert api.watches == 0 and all(api.reads[r.id] == 1 for r in finished)

            results = await gated.adelay_many([("open", i) for i in range(n)])
            await other.client.broker()
            waits = [asyncio.create_task(other.AsyncResult(r.id).aget(timeout=60)) for r in results]
            await asyncio.sleep(0)
            watch = other.client._watches[asyncio.get_running_loop()]
            joined = watch.keys
            for w in waits[-dropped:]:  # waiters that give up leave the watch
                w.cancel()
            await asyncio.gather(*waits[-dropped:], return_exceptions=True)
            assert watch.keys == joined - dropped
            gates["open"].set()
            assert await asyncio.wait_for(asyncio.gather(*waits[:-dropped]), 60) == list(range(n - dropped))
        # A few consumers for all of them (n keys at 128 a consumer), not one per waiter.
        assert api.watches <= n // 128 + 3
        assert watch.keys == 0 and watch.consumers == 0  # nothing left behind
    finally:
        await api.close()
        await other.aclose()


async def test_a_wait_goes_on_through_the_bucket_when_its_connection_is_closed_for_good(
    nats_server: NatsServer,
) -> None:
    gates = {"open": asyncio.Event()}
    async with FaultProxy(nats_server.port) as proxy:
        producer = Natask("producer", servers=[proxy.url])
        runner = Natask("runner", servers=[nats_server.url])
        for app in (producer, runner):
            define_gated(app, gates)
        try:
            result = await producer.tasks["t.gated"].adelay("open", 5)
            waiting = asyncio.create_task(result.aget(timeout=30))
            # nats-py reads this before anything the server sends later (the reply), and gives up.
            proxy.inject_to_clients(b"-ERR 'Unknown Protocol Operation'\r\n")
            async with worker(runner):
                gates["open"].set()
                assert await waiting == 5
            assert result._route is None
        finally:
            await producer.aclose()
            await runner.aclose()


async def test_the_watch_merges_consumers_past_its_limit_and_loses_no_key(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("natask.waiting.MAX_SHARDS", 2)
    monkeypatch.setattr("natask.waiting.SHARD_KEYS", 4)
    app = Natask("reader", servers=[nats_server.url])
    api = await ApiLog(app.names.results_bucket).start(nats_server.url)
    try:
        broker = await app.client.broker()
        kv = await broker.results()
        watch = app.client.key_watch(broker)
        ids = [f"id-{i}" for i in range(9)]
        waits = []
        for i, task_id in enumerate(ids):  # one at a time: each arrival starts a consumer
            waits.append(asyncio.create_task(app.AsyncResult(task_id).aget(timeout=30)))
            await api.wait_watches(i + 1)
            assert watch.consumers <= 3
        # 1 and 2 got a consumer each; from 3 on each joined the least used one, restarting it,
        # until both held 4 keys; 9 got a third.
        assert watch.keys == 9 and watch.consumers == 3
        for i, task_id in enumerate(ids):
            await kv.put(task_id, dumps({"state": "SUCCESS", "result": i}))
        assert await asyncio.wait_for(asyncio.gather(*waits), 30) == list(range(9))
        assert watch.keys == 0 and watch.consumers == 0
    finally:
        await api.close()
        await app.aclose()


async def test_a_wait_ends_when_the_app_closes_instead_of_reconnecting(nats_server: NatsServer) -> None:
    """A result still waited on (over its reply route, or through the key watch) when the app is
    closed on that loop stops with ``ResultError``; it used to open a new connection and wait on,
    and a CLI stopped with Ctrl-C left that connection's tasks pending behind it."""
    from natask import ResultError

    app = Natask("closing", servers=[nats_server.url], subject_prefix="closing")
    slow = app.task(name="t.never")(lambda: None)  # no worker runs it
    nc = await nats.connect(nats_server.url)
    try:
        routed = await slow.adelay()
        watching = await nc.subscribe("$JS.API.CONSUMER.CREATE.>")
        by_id = app.AsyncResult("w" * 32)
        waits = [asyncio.create_task(routed.aget(timeout=60)), asyncio.create_task(by_id.aget(timeout=60))]
        while by_id.id.encode() not in (await watching.next_msg(timeout=20)).data:
            pass  # the by-id wait watches its key now
        await app.aclose()
        for wait in waits:
            with pytest.raises(ResultError, match="closed while waiting"):
                await asyncio.wait_for(wait, 10)
        assert app.client.connected(asyncio.get_running_loop()) is None  # no new connection
    finally:
        await nc.close()
        await app.aclose()
