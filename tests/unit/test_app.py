"""The app object without a server: no I/O or threads until used, close(), the public names."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import natask
from natask import AsyncResult, BrokerError, Natask
from natask.broker import Broker
from natask.message import Call

CHECK_API = Path("/work/shared/check_api.py")
NOT_BUILT_YET = {"natask.chain", "natask.group", "natask.chord"}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any attempt to open a connection."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args))
        raise AssertionError("natask tried to connect")

    async def refuse_async(*args: Any, **kwargs: Any) -> Any:
        refuse(*args)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(asyncio, "open_connection", refuse_async)
    monkeypatch.setattr(Broker, "connect", refuse_async)
    return attempts


def natask_threads() -> list[threading.Thread]:
    """The app's own I/O threads (task threads of workers from earlier tests may still be winding down)."""
    return [t for t in threading.enumerate() if t.name.startswith("natask-io")]


def test_constructing_and_decorating_does_no_io_and_starts_no_thread(no_network: list[str]) -> None:
    before = set(threading.enumerate())
    app = Natask("shop", servers="nats://127.0.0.1:1")

    @app.task(name="shop.add")
    def add(x: int, y: int) -> int:
        return x + y

    sig = add.s(1, 2)
    result = app.AsyncResult("0" * 32)
    assert add(1, 2) == 3
    assert sig.task == "shop.add"
    assert result.id == "0" * 32
    assert set(threading.enumerate()) - before == set()  # no new thread
    assert natask_threads() == []
    assert app.client.portal.loop is None
    app.close()
    assert set(threading.enumerate()) - before == set()  # no new thread
    assert no_network == []


def test_close_without_connection_is_idempotent(no_network: list[str]) -> None:
    before = set(threading.enumerate())
    app = Natask("shop", servers="nats://127.0.0.1:1")
    app.close()
    app.close()
    with Natask("shop2", servers="nats://127.0.0.1:1") as other:
        assert isinstance(other, Natask)
    assert set(threading.enumerate()) - before == set()  # no new thread
    assert no_network == []


async def test_aclose_without_connection(no_network: list[str]) -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1")
    await app.aclose()
    await app.aclose()
    assert natask_threads() == []
    assert no_network == []


def test_close_from_another_thread(no_network: list[str]) -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1")
    errors: list[BaseException] = []

    def closer() -> None:
        try:
            app.close()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=closer)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert errors == []


def test_sync_call_uses_a_daemon_io_thread_that_close_stops(
    monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1")
    seen: list[str] = []

    async def apublish(call: Call) -> AsyncResult[Any]:
        seen.append(threading.current_thread().name)
        return AsyncResult(app, call.task_id, call.task)

    monkeypatch.setattr(app.client, "publish", apublish)
    add = app.task(name="shop.add")(lambda x, y: x + y)
    try:
        result = add.delay(1, 2)
        assert isinstance(result, AsyncResult)
        assert seen and seen[0] != threading.current_thread().name
        (io_thread,) = natask_threads()
        assert io_thread.daemon
    finally:
        app.close()
    assert natask_threads() == []
    assert not io_thread.is_alive()
    # usable again after close: a new I/O thread starts on demand, and close() stops it again
    add.delay(3, 4)
    assert len(seen) == 2
    app.close()
    assert natask_threads() == []
    assert no_network == []


def test_sync_call_works_inside_a_running_event_loop(monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1")

    async def apublish(call: Call) -> AsyncResult[Any]:
        return AsyncResult(app, call.task_id, call.task)

    monkeypatch.setattr(app.client, "publish", apublish)
    add = app.task(name="shop.add")(lambda x, y: x + y)

    async def main() -> str:
        return str(add.delay(1, 2).id)  # sync API called from a coroutine: must not deadlock

    try:
        assert len(asyncio.run(main())) == 32
        assert len(asyncio.run(main())) == 32  # a second loop in a row
    finally:
        app.close()


def test_repr_names_the_app() -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1")
    try:
        assert repr(app) == "<Natask shop servers=nats://127.0.0.1:1>"
    finally:
        app.close()


async def test_unreachable_server_raises_broker_error_within_connect_timeout() -> None:
    app = Natask("shop", servers="nats://127.0.0.1:1", connect_timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1"):
            await asyncio.wait_for(app.client.broker(), 5)
        assert time.monotonic() - started < 4
    finally:
        await app.aclose()
        await asyncio.sleep(0)


# -- public names (SPEC; /work/shared/check_api.py) -------------------------------------------

TOP_LEVEL = [
    "Natask", "chain", "group", "chord",
    "NataskError", "EncodeError", "DecodeError", "PayloadTooLarge", "TaskNotFound", "BrokerError",
    "PermissionDenied", "NoWorkers", "ResultError", "ResultTimeout", "TaskFailed", "TaskRevoked",
    "Retry", "Reject", "TimeLimitExceeded",
]  # fmt: skip
APP = ["task", "periodic", "add_periodic_task", "send_task", "asend_task", "AsyncResult", "close", "aclose"]
TASK = ["delay", "adelay", "apply_async", "aapply_async", "delay_many", "adelay_many", "call", "acall",
        "apply_call", "aapply_call", "s", "si", "name"]  # fmt: skip
RESULT = ["id", "state", "info", "ready", "successful", "failed", "get", "aget", "revoke", "forget"]


def test_top_level_names() -> None:
    missing = {f"natask.{n}" for n in TOP_LEVEL if not hasattr(natask, n)}
    assert missing <= NOT_BUILT_YET
    for name in natask.__all__:
        assert hasattr(natask, name), name


def test_error_tree() -> None:
    assert issubclass(natask.ResultTimeout, TimeoutError)
    assert issubclass(natask.ResultTimeout, natask.ResultError)
    assert issubclass(natask.TaskFailed, natask.ResultError)
    assert issubclass(natask.PermissionDenied, natask.BrokerError)
    assert issubclass(natask.NoWorkers, natask.BrokerError)
    for name in ("Retry", "Reject", "TimeLimitExceeded"):
        assert issubclass(getattr(natask, name), natask.TaskControl)
    for name in TOP_LEVEL[4:]:
        if hasattr(natask, name):
            assert issubclass(getattr(natask, name), natask.NataskError), name


def test_app_and_result_names() -> None:
    app = Natask("api", servers="nats://127.0.0.1:1")
    try:
        assert [n for n in APP if not hasattr(app, n)] == []
        # on the class: `state`/`info` are properties that read the result store
        assert [n for n in RESULT if n != "id" and not hasattr(AsyncResult, n)] == []
        assert app.AsyncResult("x" * 32).id == "x" * 32
    finally:
        app.close()


def test_task_names() -> None:
    app = Natask("api", servers="nats://127.0.0.1:1")
    try:
        task = app.task(name="api_check.add")(lambda x, y: x + y)
        assert [n for n in TASK if not hasattr(task, n)] == []
    finally:
        app.close()


@pytest.mark.skipif(not CHECK_API.exists(), reason="no /work/shared/check_api.py")
def test_check_api_script() -> None:
    env = {**os.environ, "NATASK_CONNECT_TIMEOUT": "1"}
    env.pop("NATS_URL", None)
    proc = subprocess.run(
        [sys.executable, str(CHECK_API)], capture_output=True, text=True, timeout=8, env=env, check=False
    )
    missing = {line.split("missing: ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("missing: ")}
    assert "of the SPEC's public names missing" in proc.stdout, proc.stdout + proc.stderr
    assert missing <= NOT_BUILT_YET, proc.stdout
    assert proc.returncode == (1 if missing else 0)
