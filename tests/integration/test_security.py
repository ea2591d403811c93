"""Auth, permissions and TLS against servers configured for them (throwaway CA made in the test)."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
import trustme

from natask import BrokerError, Natask, PermissionDenied
from natask.server import NatsServer
from natask.testing import worker

PRODUCER = {"user": "producer", "password": "prod-secret"}
WORKER = {"user": "worker", "password": "work-secret"}

# Per-task and per-queue permissions: what the README's deployment section shows.
PERMISSIONS = """
authorization {
  users = [
    {user: producer, password: "prod-secret", permissions: {
      publish: {allow: ["tasks.default.t.allowed", "$JS.API.>"]},
      subscribe: {allow: ["_INBOX.>"]}}},
    {user: worker, password: "work-secret", permissions: {
      publish: {allow: ["$JS.API.>", "$JS.ACK.>", "$KV.>", "_INBOX.>", "natask.dlq.>", "natask.events.>"]},
      subscribe: {allow: ["_INBOX.>", "natask.rpc.tasks.default.>", "natask.control.tasks.*"]}}},
    {user: nosub, password: "nosub-secret", permissions: {
      publish: {allow: [">"]}, subscribe: {allow: ["_INBOX.>"]}}}
  ]
}
"""


def configured(tmp_path: Path, text: str, *extra: str) -> NatsServer:
    conf = tmp_path / "server.conf"
    conf.write_text(text)
    return NatsServer(store_dir=str(tmp_path / "js"), config_file=str(conf), extra_args=extra)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    with configured(tmp_path, PERMISSIONS) as server:
        yield server


async def test_producer_may_enqueue_one_task_but_not_another(secured: NatsServer) -> None:
    producer = Natask("p", servers=[secured.url], connect_options=PRODUCER, publish_timeout=5)
    consumer = Natask("w", servers=[secured.url], connect_options=WORKER, publish_timeout=5)
    allowed = producer.task(name="t.allowed")(lambda: "ran")
    denied = producer.task(name="t.denied")(lambda: "never")
    consumer.task(name="t.allowed")(allowed.fn)
    try:
        result = await allowed.adelay()
        with pytest.raises(PermissionDenied) as info:
            await denied.adelay()
        assert info.value.subject == "tasks.default.t.denied" and "tasks.default.t.denied" in str(info.value)
        async with worker(consumer):  # a worker that may consume, and reply to the caller's inbox
            assert await result.aget(timeout=10) == "ran"
            with pytest.raises(PermissionDenied, match=r"tasks\.default\.t\.allowed"):
                await consumer.tasks["t.allowed"].adelay()  # ...but not enqueue
    finally:
        await producer.aclose()
        await consumer.aclose()


async def test_denied_subscription_is_reported_at_worker_start(secured: NatsServer) -> None:
    app = Natask("n", servers=[secured.url], connect_options={"user": "nosub", "password": "nosub-secret"})
    try:
        with pytest.raises(PermissionDenied, match=r"subscribing to natask\.control\.tasks\.\*"):
            async with worker(app):
                pass
    finally:
        await app.aclose()


async def test_wrong_password_is_a_clear_error_without_the_secret(
    secured: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    host = secured.url.removeprefix("nats://")
    app = Natask("x", servers=[f"nats://producer:hunter2@{host}"], connect_timeout=2)  # a few attempts
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(BrokerError) as info:
            await app.asend_task("t.allowed")
    finally:
        await app.aclose()
    assert "authorization" in str(info.value).lower() and "***@" in str(info.value)
    assert "hunter2" not in str(info.value) and "hunter2" not in caplog.text


async def test_user_and_password_from_the_environment(secured: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_USER", "producer")
    monkeypatch.setenv("NATS_PASSWORD", "prod-secret")
    app = Natask("env", servers=[secured.url])
    try:
        assert "prod-secret" not in repr(app) and "prod-secret" not in app.config.safe_servers
        await app.asend_task("t.allowed")
    finally:
        await app.aclose()


async def test_token_auth(tmp_path: Path) -> None:
    with configured(tmp_path, 'authorization { token: "s3cret-token" }') as server:
        app = Natask("tok", servers=[server.url], connect_options={"token": "s3cret-token"})
        add = app.task(name="t.add")(lambda x, y: x + y)
        try:
            async with worker(app):
                assert await (await add.adelay(1, 2)).aget(timeout=10) == 3
        finally:
            await app.aclose()


async def test_nkey_seed_auth(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(seed).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    with configured(tmp_path, f"authorization {{ users = [ {{nkey: {public}}} ] }}") as server:
        app = Natask("nk", servers=[server.url], connect_options={"nkeys_seed": str(seed_file)})
        add = app.task(name="t.add")(lambda x, y: x + y)
        try:
            async with worker(app):
                assert await (await add.adelay(2, 2)).aget(timeout=10) == 4
        finally:
            await app.aclose()


async def test_tls_with_a_throwaway_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    tls = f'tls {{ cert_file: "{tmp_path / "cert.pem"}", key_file: "{tmp_path / "key.pem"}" }}'
    with configured(tmp_path, tls) as server:
        url = server.url.replace("nats://", "tls://")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(ctx)
        app = Natask("tls", servers=[url], connect_options={"tls": ctx})
        add = app.task(name="t.add")(lambda x, y: x + y)
        try:
            async with worker(app):
                assert await (await add.adelay(3, 4)).aget(timeout=10) == 7
        finally:
            await app.aclose()
        untrusted = Natask("tls", servers=[url], connect_options={"tls": ssl.create_default_context()},
                           connect_timeout=1)
        try:
            with pytest.raises(BrokerError, match="cannot connect"):
                await untrusted.asend_task("t.add", [1, 2])
        finally:
            await untrusted.aclose()
