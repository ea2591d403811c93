"""A full JetStream store fails a call at once with ``StorageFull`` naming the cause, instead of
retrying for ``publish_timeout`` and then blaming the stream's availability (real nats-servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import pytest

from natask import BrokerError, Natask, StorageFull
from natask.server import NatsServer


def server_with(tmp_path: Path, config: str) -> Iterator[NatsServer]:
    path = tmp_path / "server.conf"
    path.write_text(config)
    server = NatsServer(store_dir=str(tmp_path / "js"), config_file=str(path))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[NatsServer]:
    """A server whose JetStream may use 1 MB of disk in all."""
    yield from server_with(tmp_path, "jetstream { max_file_store: 1MB }\n")


@pytest.fixture
def tiny_account(tmp_path: Path) -> Iterator[NatsServer]:
    """A server whose only account may store 1 MB (user ``a``, password ``a``)."""
    yield from server_with(tmp_path, "accounts { A { jetstream { max_file: 1MB, max_mem: 1MB }, "
                                     "users [{user: a, password: a}] } }\n")


async def fill(app: Natask) -> None:
    """Publish messages no worker consumes into the app's stream until JetStream refuses even
    small ones (large ones first, then smaller ones into what is left)."""
    broker = await app.client.broker()
    await broker.ensure_stream()
    js = broker.nc.jetstream()
    for size in (65536, 4096, 256, 16):
        with pytest.raises(nats.js.errors.APIError):
            for _ in range(1000):
                await js.publish(f"{app.config.subject_prefix}.filler.t.fill", b"x" * size)


def assert_names_the_cause(error: StorageFull, err_code: int, cause: str) -> None:
    text = str(error)
    assert isinstance(error, BrokerError)
    assert error.err_code == err_code and cause in text
    assert "not acknowledged" not in text and "available?" not in text  # not the publish-timeout message
    assert "max_file_store" in text and "drain" in text  # what to do about it


@pytest.mark.timeout(20)  # far below publish_timeout=30: the refusal is final at once
async def test_delay_on_a_full_server_store_raises_storage_full_at_once(tiny_store: NatsServer) -> None:
    app = Natask("full", servers=[tiny_store.url], publish_timeout=30)
    add = app.task(name="t.add")(lambda x, y: x + y)
    try:
        await fill(app)
        with pytest.raises(StorageFull) as info:
            await add.adelay(1, 2)
        assert_names_the_cause(info.value, 10023, "insufficient resources")
        with pytest.raises(StorageFull):
            await asyncio.to_thread(add.delay, 1, 2)
        with pytest.raises(StorageFull):
            await add.adelay_many([(1, 2), (3, 4)])
        with pytest.raises(StorageFull):  # a new bucket cannot be created either
            await app.AsyncResult("some-task").arevoke()
    finally:
        await app.aclose()


@pytest.mark.timeout(20)
async def test_a_write_into_a_bucket_at_its_limit_raises_storage_full(nats_server: NatsServer) -> None:
    app = Natask("limited", servers=[nats_server.url], publish_timeout=30)
    try:
        await app.AsyncResult("first").arevoke()
        broker = await app.client.broker()
        # An operator capped the bucket (KV buckets discard new: a write over the cap is refused).
        info = await broker.js.stream_info(f"KV_{app.names.revoked_bucket}")
        info.config.max_msgs = 2
        await broker.js.update_stream(info.config)
        await app.AsyncResult("second").arevoke()
        with pytest.raises(StorageFull) as raised:
            await app.AsyncResult("third").arevoke()
        assert raised.value.err_code == 10077 and "maximum messages exceeded" in str(raised.value)
    finally:
        await app.aclose()


@pytest.mark.timeout(20)
async def test_delay_over_the_account_limit_raises_storage_full(tiny_account: NatsServer) -> None:
    app = Natask("account", servers=[f"nats://a:a@127.0.0.1:{tiny_account.port}"], publish_timeout=30)
    add = app.task(name="t.add")(lambda x, y: x + y)
    try:
        await fill(app)
        with pytest.raises(StorageFull) as info:
            await add.adelay(1, 2)
        assert_names_the_cause(info.value, 10002, "resource limits exceeded for account")
    finally:
        await app.aclose()


def test_storage_full_is_a_public_broker_error() -> None:
    import natask

    assert "StorageFull" in natask.__all__ and issubclass(natask.StorageFull, natask.BrokerError)
    error = StorageFull("full", 10023)
    assert error.err_code == 10023 and str(error) == "full"


async def test_a_queue_drains_when_results_cannot_be_stored(nats_server: NatsServer) -> None:
    """The policy: an outcome that cannot be stored for lack of storage is dropped (the caller still
    gets the reply), the task is acked and never reruns, and the worker shows the condition."""
    from natask.dlq import DeadLetters
    from natask.metrics import health
    from natask.testing import worker

    app = Natask("drain", servers=[nats_server.url], publish_timeout=30)
    runs: list[int] = []

    @app.task(name="t.count")
    def count(i: int) -> int:
        runs.append(i)
        return i

    try:
        async with worker(app) as w:
            assert await (await count.adelay(-1)).aget(timeout=10) == -1  # stored: the bucket is at its cap
            broker = await app.client.broker()
            info = await broker.js.stream_info(f"KV_{app.names.results_bucket}")
            info.config.max_msgs = 1
            await broker.js.update_stream(info.config)
            results = [await count.adelay(i) for i in range(20)]
            assert [await r.aget(timeout=10) for r in results] == list(range(20))  # over the caller's inbox
        # (leaving the block drained the worker: every task was settled)
        report = health(w)
        consumer = await broker.js.consumer_info(app.names.stream, "default")
        assert sorted(runs) == list(range(-1, 20))  # each ran once: no rerun loop
        assert w.results_not_stored == 20 and report["results_not_stored"] == 20
        assert report["storage_full_since"] is not None
        assert consumer.num_redelivered == 0 and consumer.num_pending == 0 and consumer.num_ack_pending == 0
        assert await DeadLetters(app).list() == []
    finally:
        await app.aclose()
