"""Pipelined publishing (``delay_many``, canvas fan-out): every message stored once, in order,
whatever the acks say."""

from __future__ import annotations

import pytest

from natask import BrokerError, Natask
from natask.broker import PIPELINE, Broker
from natask.naming import HDR_MSG_ID
from natask.server import NatsServer


async def _stored(broker: Broker) -> list[bytes]:
    info = await broker.js.stream_info(broker.names.stream)
    msgs = [await broker.js.get_msg(broker.names.stream, seq) for seq in range(1, info.state.messages + 1)]
    return [m.data or b"" for m in msgs]


async def test_more_than_a_pipeline_of_messages_are_stored_once_in_order(app: Natask) -> None:
    broker = await app.client.broker()
    await broker.ensure_stream()
    n = PIPELINE * 2 + 123  # the sender waits for acks twice
    subject = app.names.task_subject("bulk", "t.bulk")
    await broker.publish_many([subject] * n, [str(i).encode() for i in range(n)],
                              [{HDR_MSG_ID: f"bulk-{i}"} for i in range(n)])
    assert await _stored(broker) == [str(i).encode() for i in range(n)]


async def test_a_repeated_message_id_is_stored_once_and_is_no_error(app: Natask) -> None:
    broker = await app.client.broker()
    await broker.ensure_stream()
    subject = app.names.task_subject("bulk", "t.bulk")
    ids = ["a", "b", "a", "c", "b"]
    await broker.publish_many([subject] * 5, [i.encode() for i in ids], [{HDR_MSG_ID: i} for i in ids])
    assert await _stored(broker) == [b"a", b"b", b"c"]


async def test_a_refused_message_is_published_again_alone_and_its_error_surfaces(nats_server: NatsServer) -> None:
    app = Natask("refused", servers=[nats_server.url], publish_timeout=1)
    try:
        broker = await app.client.broker()
        await broker.ensure_stream()
        good = app.names.task_subject("bulk", "t.bulk")
        # No stream captures this subject: the server answers "no responders" (503), not a PubAck.
        with pytest.raises(BrokerError, match="not acknowledged within 1s"):
            await broker.publish_many([good, "nowhere.at.all", good], [b"1", b"2", b"3"],
                                      [{HDR_MSG_ID: "m1"}, {HDR_MSG_ID: "m2"}, {HDR_MSG_ID: "m3"}])
        assert await _stored(broker) == [b"1", b"3"]  # the others are stored, once
    finally:
        await app.aclose()


async def test_the_task_stream_keeps_message_ids_for_the_duplicate_window(nats_server: NatsServer) -> None:
    app = Natask("w", servers=[nats_server.url], duplicate_window=45)
    try:
        await app.asend_task("t.x")
        info = await (await app.client.broker()).js.stream_info(app.names.stream)
        assert info.config.duplicate_window == 45
    finally:
        await app.aclose()
