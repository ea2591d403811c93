"""Calls and results over the server's max_payload (1 MiB by default) travel through the JetStream
Object Store (a claim check), up to ``large_payload_limit``; beyond it a clear error."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

from natask import Natask, PayloadTooLarge, TaskFailed
from natask.dlq import DeadLetters
from natask.naming import HDR_OBJECT
from natask.server import NatsServer
from natask.testing import worker

BIG = 2 * 1024 * 1024
"""Twice the server's default max_payload: only the Object Store can carry it."""


def blob(seed: int, size: int = BIG) -> bytes:
    """``size`` bytes that do not compress, the same for a seed."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


@pytest.fixture
async def capped(nats_server: NatsServer) -> AsyncIterator[Natask]:
    """An app whose Object Store share stops at 1.5 MB."""
    a = Natask("test", servers=[nats_server.url], ack_wait=5, publish_timeout=5, large_payload_limit=1_500_000)
    try:
        yield a
    finally:
        await a.aclose()


async def test_large_arguments_round_trip_and_the_object_is_deleted(app: Natask) -> None:
    @app.task(name="t.digest")
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    data = blob(1)
    broker = await app.client.broker()
    assert len(data) > broker.nc.max_payload
    result = await digest.adelay(data)
    stored = await broker.get_object(f"{result.id}.args")  # the encoded call, until the task's outcome
    assert stored is not None and data in stored
    async with worker(app):
        assert await result.aget(timeout=20) == hashlib.sha256(data).hexdigest()
        results = await digest.adelay_many([(blob(2),), (blob(3),)])  # the pipelined publish too
        assert [await r.aget(timeout=20) for r in results] == [
            hashlib.sha256(blob(2)).hexdigest(), hashlib.sha256(blob(3)).hexdigest()]
    for r in (result, *results):
        assert await broker.get_object(f"{r.id}.args") is None  # deleted once the outcome was stored


async def test_large_result_round_trip(app: Natask) -> None:
    @app.task(name="t.make")
    def make(seed: int) -> bytes:
        return blob(seed)

    async with worker(app):
        result = await make.adelay(7)
        assert await result.aget(timeout=20) == blob(7)
        again = await make.adelay(8)
        await again.aget(timeout=20)
    # A handle that learns the outcome from the results bucket, not from the reply, fetches it too.
    assert await app.AsyncResult(again.id).aget(timeout=5) == blob(8)
    assert app.AsyncResult(again.id).get(timeout=5) == blob(8)


async def test_beyond_large_payload_limit(capped: Natask) -> None:
    @capped.task(name="t.echo")
    def echo(data: bytes) -> int:
        return len(data)

    @capped.task(name="t.make")
    def make() -> bytes:
        return blob(1)

    with pytest.raises(PayloadTooLarge, match="large_payload_limit=1500000"):
        await echo.adelay(blob(1))
    async with worker(capped):
        assert await (await echo.adelay(blob(1, 1_200_000))).aget(timeout=20) == 1_200_000  # under it: carried
        with pytest.raises(TaskFailed, match="large_payload_limit=1500000") as info:
            await (await make.adelay()).aget(timeout=20)
        assert info.value.exc_type == "natask.PayloadTooLarge"


async def test_zero_turns_the_object_store_off(nats_server: NatsServer) -> None:
    app = Natask("test", servers=[nats_server.url], large_payload_limit=0)
    try:
        echo = app.task(name="t.echo")(len)
        with pytest.raises(PayloadTooLarge, match="large_payload_limit=0 bytes, off"):
            await echo.adelay(blob(1))
    finally:
        await app.aclose()


async def test_a_missing_object_is_dead_lettered_once(app: Natask) -> None:
    runs: list[int] = []

    @app.task(name="t.echo")
    def echo(data: bytes) -> int:
        runs.append(len(data))
        return len(data)

    result = await echo.adelay(blob(1))
    broker = await app.client.broker()
    await broker.delete_object(f"{result.id}.args")  # expired, or deleted by hand, before a worker ran it
    async with worker(app):
        with pytest.raises(TaskFailed, match="is gone"):
            await result.aget(timeout=20)
    assert runs == []
    [entry] = await DeadLetters(app).list()
    assert entry.reason == "object missing" and entry.id == result.id and entry.headers[HDR_OBJECT]


async def test_a_large_result_feeds_the_next_step_of_a_chain(app: Natask) -> None:
    """A workflow follow-up whose argument (the parent's result) is over max_payload travels as a
    claim check too, and its object is deleted once the step ran."""
    from natask.canvas import chain

    @app.task(name="t.produce")
    def produce(seed: int) -> bytes:
        return blob(seed)

    @app.task(name="t.hash")
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    async with worker(app):
        result = await chain(produce.s(11), digest.s()).aapply_async()
        assert await result.aget(timeout=30) == hashlib.sha256(blob(11)).hexdigest()
    broker = await app.client.broker()
    assert await broker.get_object(f"{result.id}.args") is None
