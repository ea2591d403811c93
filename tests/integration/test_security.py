"""Auth, permissions and TLS against servers configured for them (throwaway CA made in the test)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import nats
import nkeys
import pytest
import trustme

from natask import BrokerError, Natask, PermissionDenied, Reject, TaskFailed, TaskRevoked, chain, chord
from natask.control import inspect, queues
from natask.dlq import DeadLetters
from natask.events import EventStream
from natask.server import NatsServer
from natask.testing import worker

PRODUCER = {"user": "producer", "password": "prod-secret"}
WORKER = {"user": "worker", "password": "work-secret"}

# Per-task and per-queue permissions, wide JetStream API rights: how PermissionDenied surfaces.
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


# -- the README's minimal grants ---------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
WEB = {"user": "web", "password": "web-secret", "inbox_prefix": "_INBOX.web"}
ORDERS_WORKER = {"user": "orders_worker", "password": "worker-secret", "inbox_prefix": "_INBOX.orders_worker"}
ADMIN = {"user": "admin", "password": "admin-secret"}
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "?([^"\s]+)"?', re.IGNORECASE)


def readme_grants() -> str:
    """The ``authorization`` block of the README's Deployment section, with the test's passwords
    and an operator user with full rights."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deployment"):]
    block = section[section.index("```\nauthorization {") + 4:]
    block = block[:block.index("\n```")]
    block = block.replace('"$WEB_PASSWORD"', '"web-secret"').replace('"$WORKER_PASSWORD"', '"worker-secret"')
    return block.replace("users = [", 'users = [\n    {user: admin, password: "admin-secret"},', 1)


def readme_canvas_grants() -> str:
    """The README's grants plus ``orders_canvas``: the orders worker with the README's chord lines
    and the right to publish its follow-up task ``orders.merge``."""
    text = (ROOT / "README.md").read_text()
    start = text.index("- **Canvas.**")
    bullet = text[start:text.index("\n- ", start)]
    extra = [x for x in re.findall(r"`([^`]+)`", bullet) if x.startswith("$")] + ["tasks.orders.orders.merge"]
    grants = readme_grants()
    start = grants.index("{user: orders_worker")
    user = grants[start:grants.index("}}}", start) + 3]
    canvas = user.replace("orders_worker,", "orders_canvas,", 1).replace(
        '"natask.events.tasks.>",', '"natask.events.tasks.>", ' + ", ".join(f'"{x}"' for x in extra) + ",", 1)
    assert canvas.count("orders_canvas") == 1 and "tasks.orders.orders.merge" in canvas
    return grants.replace(user, user + ",\n" + canvas, 1)


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[NatsServer]:
    with configured(tmp_path, readme_grants()) as server:
        yield server


def violations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if _VIOLATION.search(r.getMessage())]


async def test_readme_grants_let_the_producer_and_the_worker_do_their_jobs(
    deployed: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="natask")
    url = [deployed.url]
    web = Natask("web", servers=url, connect_options=WEB, publish_timeout=5)
    elsewhere = Natask("web", servers=url, connect_options=WEB, publish_timeout=5)  # another producer process
    admin = Natask("ops", servers=url, connect_options=ADMIN)
    orders = Natask("orders", servers=url, connect_options=ORDERS_WORKER, ack_wait=1, publish_timeout=5)
    runs: Counter[str] = Counter()

    @orders.task(name="orders.process", queue="orders", bind=True)
    async def process(self, what: str) -> str:  # type: ignore[no-untyped-def]
        runs[what] += 1
        if what == "retry" and self.request.retries == 0:
            raise self.retry(countdown=0.1)  # through the schedule subject
        if what == "reject":
            raise Reject("refused")  # dead-lettered
        if what == "slow":
            self.update_state("PROGRESS", {"what": what})
            await asyncio.sleep(2.5)  # longer than ack_wait: in_progress keeps the lease
        return what

    submit = web.task(name="orders.process", queue="orders")(lambda what: what)
    revoked_id = "revoked-before-start"
    try:
        await admin.AsyncResult(revoked_id).arevoke()
        async with worker(orders, queues=["orders"]) as w, EventStream(admin, "task-succeeded") as events:
            first = await submit.adelay("fast")
            assert await first.aget(timeout=10) == "fast"  # over the producer's inbox
            many = await submit.adelay_many([("b",), ("c",)])
            assert [await r.aget(timeout=10) for r in many] == ["b", "c"]
            assert await submit.acall("rpc") == "rpc"
            assert await (await submit.adelay("retry")).aget(timeout=10) == "retry"
            assert await (await submit.adelay("slow")).aget(timeout=10) == "slow"
            assert runs["retry"] == 2 and runs["slow"] == 1
            rejected = await submit.adelay("reject")
            with pytest.raises(TaskFailed):
                await rejected.aget(timeout=10)
            assert rejected.id in [e.id for e in await DeadLetters(admin).list()]
            with pytest.raises(TaskRevoked):
                await (await submit.aapply_async(("never",), task_id=revoked_id)).aget(timeout=10)
            assert runs["never"] == 0
            # Another producer process reads the result by id: a direct get, then a KV watch.
            assert await elsewhere.AsyncResult(first.id).astate() == "SUCCESS"
            assert await elsewhere.AsyncResult(first.id).aget(timeout=10) == "fast"
            assert [r["worker"] for r in await inspect(admin, "ping", 1.0)] == [w.ident]
            assert [q.name for q in await queues(orders)] == ["orders"]  # --metrics-port queue depths

            async def succeeded(task_id: str) -> None:
                async for event in events:
                    if event.get("id") == task_id:
                        return

            await asyncio.wait_for(succeeded(first.id), 10)
    finally:
        for app in (web, elsewhere, admin, orders):
            await app.aclose()
    assert violations(caplog) == []


async def test_readme_canvas_lines_let_a_worker_send_follow_ups(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="natask")
    with configured(tmp_path, readme_canvas_grants()) as server:
        web = Natask("web", servers=[server.url], connect_options=WEB, publish_timeout=5)
        orders = Natask("orders", servers=[server.url], publish_timeout=5,
                        connect_options={**ORDERS_WORKER, "user": "orders_canvas"})
        orders.task(name="orders.process", queue="orders")(lambda x: x * 10)
        orders.task(name="orders.merge", queue="orders")(lambda xs: sorted(xs) if isinstance(xs, list) else [xs])
        process = web.task(name="orders.process", queue="orders")(lambda x: x)
        merge = web.task(name="orders.merge", queue="orders")(lambda xs: xs)
        try:
            async with worker(orders, queues=["orders"]):
                assert await (await chain(process.s(1), merge.s()).adelay()).aget(timeout=10) == [10]
                both = await chord([process.s(2), process.s(3)], merge.s()).adelay()
                assert await both.aget(timeout=10) == [20, 30]
        finally:
            await web.aclose()
            await orders.aclose()
    assert violations(caplog) == []


async def test_a_follow_up_the_worker_may_not_publish_fails_the_workflow(deployed: NatsServer) -> None:
    """Without the canvas lines the worker cannot send a chain's next step: the chain fails with
    PermissionDenied (once, not a redelivery loop), instead of its get() waiting forever."""
    web = Natask("web", servers=[deployed.url], connect_options=WEB, publish_timeout=5)
    orders = Natask("orders", servers=[deployed.url], publish_timeout=5, connect_options=ORDERS_WORKER)
    orders.task(name="orders.process", queue="orders")(lambda x: x * 10)
    process = web.task(name="orders.process", queue="orders")(lambda x: x)
    merge = web.task(name="orders.merge", queue="orders")(lambda xs: xs)
    try:
        async with worker(orders, queues=["orders"]):
            with pytest.raises(TaskFailed) as failed:
                await (await chain(process.s(1), merge.s()).adelay()).aget(timeout=20)
        assert failed.value.exc_type == "natask.PermissionDenied" and "orders.merge" in failed.value.message
    finally:
        await web.aclose()
        await orders.aclose()


async def _denied(url: str, user: dict[str, str], publish: Sequence[str] = (),
                  subscribe: Sequence[str] = ()) -> set[str]:
    """The subjects of ``publish`` and ``subscribe`` the server refused to ``user`` (raw nats-py,
    which lowercases the server's error line)."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(url, user=user["user"], password=user["password"],
                            inbox_prefix=user.get("inbox_prefix", "_INBOX"), error_cb=on_error,
                            allow_reconnect=False)
    try:
        for subject in publish:
            await nc.publish(subject, b"{}", reply=nc.new_inbox())
        for subject in subscribe:
            await nc.subscribe(subject)
        # The second PING leaves after every PUB/SUB: its PONG follows every -ERR they caused.
        await nc.flush(timeout=5)
        await nc.flush(timeout=5)
    finally:
        await nc.close()
    return {m.group(2) for e in errors if (m := _VIOLATION.search(e))}


PRODUCER_DENIED_PUBLISH = [
    "tasks.orders.orders.other", "tasks.default.shop.add", "tasks._sched.orders.x",  # other tasks, delays
    "$JS.API.STREAM.PURGE.NATASK_TASKS", "$JS.API.STREAM.DELETE.NATASK_TASKS", "$JS.API.STREAM.UPDATE.NATASK_TASKS",
    "$JS.API.STREAM.CREATE.NATASK_TASKS", "$JS.API.STREAM.CREATE.EVIL",
    "$JS.API.DIRECT.GET.NATASK_TASKS", "$JS.API.DIRECT.GET.NATASK_TASKS.tasks.orders.orders.process",
    "$JS.API.STREAM.MSG.GET.NATASK_TASKS", "$JS.API.STREAM.MSG.DELETE.NATASK_TASKS",
    "$JS.API.STREAM.LIST", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.NATASK_DLQ",
    "$JS.API.DIRECT.GET.NATASK_DLQ", "$JS.API.STREAM.PURGE.NATASK_DLQ",
    "$JS.API.CONSUMER.CREATE.NATASK_TASKS", "$JS.API.CONSUMER.CREATE.NATASK_TASKS.orders.tasks.orders.>",
    "$JS.API.CONSUMER.MSG.NEXT.NATASK_TASKS.orders", "$JS.API.CONSUMER.DELETE.NATASK_TASKS.orders",
    "$JS.ACK.NATASK_TASKS.orders.1.1.1.1.1",
    "$JS.API.DIRECT.GET.KV_natask_results_tasks", "$JS.API.STREAM.MSG.GET.KV_natask_results_tasks",
    "$JS.API.STREAM.PURGE.KV_natask_results_tasks", "$JS.API.STREAM.DELETE.KV_natask_results_tasks",
    "$KV.natask_results_tasks.some-task", "$KV.natask_revoked_tasks.some-task",
    "natask.dlq.tasks.orders.orders.process", "natask.events.tasks.task-succeeded", "natask.control.tasks.ping",
    "_INBOX.orders_worker.x",
]
PRODUCER_DENIED_SUBSCRIBE = ["_INBOX.>", "_INBOX.orders_worker.>", "tasks.>", "$KV.natask_results_tasks.>",
                             "natask.events.>", "natask.rpc.tasks.orders.>"]
WORKER_DENIED_PUBLISH = [
    "tasks.orders.orders.process", "tasks.default.shop.add", "tasks._sched.default.x",
    "$JS.API.STREAM.PURGE.NATASK_TASKS", "$JS.API.STREAM.DELETE.NATASK_TASKS", "$JS.API.STREAM.UPDATE.NATASK_TASKS",
    "$JS.API.STREAM.PURGE.NATASK_DLQ", "$JS.API.STREAM.DELETE.NATASK_DLQ",
    "$JS.API.STREAM.PURGE.KV_natask_results_tasks", "$JS.API.STREAM.DELETE.KV_natask_results_tasks",
    "$JS.API.STREAM.CREATE.EVIL", "$JS.API.STREAM.LIST", "$JS.API.STREAM.NAMES",
    "$JS.API.DIRECT.GET.NATASK_TASKS", "$JS.API.STREAM.MSG.GET.NATASK_TASKS", "$JS.API.STREAM.MSG.GET.NATASK_DLQ",
    "$JS.API.CONSUMER.DELETE.NATASK_TASKS.orders", "$JS.API.CONSUMER.CREATE.NATASK_TASKS",
    "$JS.API.CONSUMER.CREATE.NATASK_TASKS.default.tasks.default.>", "$JS.API.CONSUMER.MSG.NEXT.NATASK_TASKS.default",
    "$JS.ACK.NATASK_TASKS.default.1.1.1.1.1", "natask.dlq.tasks.default.shop.add",
    "natask.rpc.tasks.orders.orders.process",
]
WORKER_DENIED_SUBSCRIBE = ["_INBOX.>", "_INBOX.web.>", "tasks.>", "natask.rpc.tasks.default.>", "natask.dlq.>"]


async def test_readme_producer_grant_denies_everything_else(deployed: NatsServer) -> None:
    allowed_publish = ["$JS.API.STREAM.INFO.NATASK_TASKS", "tasks.orders.orders.process",
                       "$JS.API.DIRECT.GET.KV_natask_results_tasks.$KV.natask_results_tasks.some-task"]
    denied = await _denied(deployed.url, WEB, [*allowed_publish, *PRODUCER_DENIED_PUBLISH],
                           ["_INBOX.web.>", *PRODUCER_DENIED_SUBSCRIBE])
    assert denied == {s.lower() for s in (*PRODUCER_DENIED_PUBLISH, *PRODUCER_DENIED_SUBSCRIBE)}


async def test_readme_worker_grant_denies_enqueueing_and_destroying(deployed: NatsServer) -> None:
    allowed_publish = ["$JS.API.STREAM.INFO.NATASK_TASKS", "$JS.API.CONSUMER.MSG.NEXT.NATASK_TASKS.orders",
                       "tasks._sched.orders.some-task", "_INBOX.web.x"]
    denied = await _denied(deployed.url, ORDERS_WORKER, [*allowed_publish, *WORKER_DENIED_PUBLISH],
                           ["_INBOX.orders_worker.>", "natask.rpc.tasks.orders.>", *WORKER_DENIED_SUBSCRIBE])
    assert denied == {s.lower() for s in (*WORKER_DENIED_PUBLISH, *WORKER_DENIED_SUBSCRIBE)}


async def test_readme_producer_cannot_purge_or_read_the_task_stream(deployed: NatsServer) -> None:
    admin = Natask("ops", servers=[deployed.url], connect_options=ADMIN)
    web = Natask("web", servers=[deployed.url], connect_options=WEB, publish_timeout=2)
    submit = web.task(name="orders.process", queue="orders")(lambda what: what)
    try:
        await (await admin.client.broker()).ensure_stream()
        await submit.adelay("kept")
        js = (await web.client.broker()).nc.jetstream(timeout=1)
        for call in (lambda: js.purge_stream("NATASK_TASKS"),
                     lambda: js.delete_stream("NATASK_TASKS"),
                     lambda: js.get_msg("NATASK_TASKS", seq=1, direct=True),
                     lambda: js.get_msg("NATASK_TASKS", seq=1)):
            with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
                await call()
        info = await (await admin.client.broker()).js.stream_info("NATASK_TASKS")
        assert info.state.messages == 1
    finally:
        await web.aclose()
        await admin.aclose()


async def test_readme_producer_without_the_stream_is_told_which_grant_is_missing(deployed: NatsServer) -> None:
    web = Natask("web", servers=[deployed.url], connect_options=WEB, publish_timeout=2)
    try:
        with pytest.raises(PermissionDenied, match=r"\$JS\.API\.STREAM\.CREATE\.NATASK_TASKS"):
            await web.asend_task("orders.process", ["x"], queue="orders")
    finally:
        await web.aclose()


async def test_result_reads_cannot_be_scoped_to_one_id_by_nats_permissions(deployed: NatsServer) -> None:
    """What the README warns about: a literal ``*`` in a published subject matches the grant's
    ``*``, so the direct-get grant also returns the newest result of any task."""
    admin = Natask("ops", servers=[deployed.url], connect_options=ADMIN)
    try:
        kv = await (await admin.client.broker()).results()
        await kv.put("mine", b"my result")
        await kv.put("someone-elses", b"their result")
        nc = await nats.connect(deployed.url, user=WEB["user"], password=WEB["password"],
                                inbox_prefix=WEB["inbox_prefix"])
        try:
            msg = await nc.request("$JS.API.DIRECT.GET.KV_natask_results_tasks.$KV.natask_results_tasks.*", b"",
                                   timeout=5)
        finally:
            await nc.close()
        assert msg.data == b"their result"
    finally:
        await admin.aclose()
