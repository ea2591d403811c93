"""Tenants isolated by NATS accounts on one real server: each account has JetStream and its own
users, each tenant its own natask app with the same subject prefix; neither sees, runs, reads or
calls the other's tasks. Also the connect check's answers for an account without JetStream and a
user not allowed to ask."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from natask import ConfigError, Natask, NoWorkers
from natask.control import inspect
from natask.testing import worker

from .topology import Server, Topology

# What each tenant's account looks like in the server config (the README shows the same).
ACCOUNTS = """
accounts {
  TENANT_A: {
    jetstream: enabled
    users: [{user: a, password: "a-secret"}]
  }
  TENANT_B: {
    jetstream: enabled
    users: [{user: b, password: "b-secret"}]
  }
  NO_JETSTREAM: {
    users: [{user: c, password: "c-secret"}]
  }
  TENANT_D: {
    jetstream: enabled
    users: [{user: d, password: "d-secret", permissions: {publish: {deny: ["$JS.API.INFO"]}}}]
  }
}
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with Topology(tmp_path) as t:
        s = t.add("tenants", accounts=ACCOUNTS)
        await t.start()
        yield s


def tenant(server: Server, user: str, **options: object) -> Natask:
    """A tenant's app: the same name, prefix and task names for everyone; each task says whose it is."""
    app = Natask("shop", servers=[server.user_url(user, f"{user}-secret")], ack_wait=5, publish_timeout=5,
                 **options)  # type: ignore[arg-type]
    app.task(name="t.who")(lambda: user)
    app.task(name="t.secret", queue="secret")(lambda: f"{user}'s secret")
    return app


async def stored(server: Server, user: str, subjects: str) -> int:
    """Messages of the tenant's task stream on ``subjects``, asked as that tenant's user."""
    nc = await nats.connect(server.user_url(user, f"{user}-secret"))
    try:
        msg = await nc.request("$JS.API.STREAM.INFO.NATASK_TASKS", json.dumps({"subjects_filter": subjects}).encode(),
                               timeout=5)
        return sum((json.loads(msg.data)["state"].get("subjects") or {}).values())
    finally:
        await nc.close()


async def test_two_tenants_on_one_server_never_see_each_others_tasks(server: Server) -> None:
    a, b = tenant(server, "a"), tenant(server, "b")
    try:
        async with worker(a) as wa, worker(b, queues=["default", "secret"]) as wb:
            # Both run their tasks, each on its own worker.
            assert await (await a.tasks["t.who"].adelay()).aget(timeout=10) == "a"
            from_b = await b.tasks["t.who"].adelay()
            assert await from_b.aget(timeout=10) == "b"
            assert await b.tasks["t.secret"].acall() == "b's secret"
            assert (wa.processed, wb.processed) == (1, 2)  # an RPC call counts too
            # A's publish on B's queue subject lands in A's own stream, where no worker serves it.
            mine = await a.tasks["t.secret"].adelay()
            assert await stored(server, "a", "tasks.secret.>") == 1
            assert await stored(server, "b", "tasks.secret.>") == 0
            assert await mine.astate() == "PENDING"
            # A cannot read B's result, nor call B's RPC, nor reach B's workers' control subjects.
            assert await a.AsyncResult(from_b.id).astate() == "PENDING"
            assert await b.AsyncResult(from_b.id).astate() == "SUCCESS"
            with pytest.raises(NoWorkers):
                await a.tasks["t.secret"].acall()
            assert len(await inspect(a, "ping", 0.5)) == 1
            assert (wa.processed, wb.processed) == (1, 2)  # the B worker saw nothing of A's
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_account_without_jetstream_is_a_clear_error(server: Server) -> None:
    app = tenant(server, "c")
    try:
        with pytest.raises(ConfigError, match="JetStream is not enabled for this user's account"):
            await app.tasks["t.who"].adelay()
    finally:
        await app.aclose()


async def test_a_user_denied_the_connect_check_still_works_without_waiting_for_it(server: Server) -> None:
    # The server's permissions violation ends the check at once; connect_timeout is long, so waiting
    # it out instead would miss the test's bound.
    app = tenant(server, "d", connect_timeout=60)

    async def serve() -> object:
        async with worker(app):
            return await (await app.tasks["t.who"].adelay()).aget(timeout=10)

    try:
        assert await asyncio.wait_for(serve(), 30) == "d"
    finally:
        await app.aclose()
