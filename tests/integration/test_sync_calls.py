"""The sync API's loops: a thread's own loop after a few calls, the keeper of idle loops, closing,
worker threads on the I/O thread, fork."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natask import Natask
from natask.portal import KEEP_INTERVAL, OWN_LOOP_AFTER, Portal
from natask.server import NatsServer
from natask.testing import worker


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a new thread (no event loop there) and return what it returned."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join(60)
    assert box, "the thread failed"
    return box[0]


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def homes(portal: Portal) -> dict[threading.Thread, Any]:
    return dict(portal._homes)


@pytest.fixture
def sync_app(nats_server: NatsServer) -> Iterator[Natask]:
    app = Natask("sync", servers=[nats_server.url], subject_prefix="sync")
    app.task(name="s.add")(lambda x, y: x + y)
    try:
        yield app
    finally:
        app.close()


async def test_a_thread_that_keeps_calling_gets_its_own_loop_and_results_reach_any_thread(
        sync_app: Natask) -> None:
    add = sync_app.tasks["s.add"]

    def produce() -> tuple[list[str], list[int], bool]:
        results = [add.delay(i, i) for i in range(OWN_LOOP_AFTER * 2)]
        own = threading.current_thread() in homes(sync_app.client.portal)
        return [r.id for r in results], [r.get(timeout=20) for r in results], own

    async with worker(sync_app):
        ids, values, own = await asyncio.to_thread(in_thread, produce)
        assert own  # the later calls ran on the thread's own loop
        assert values == [2 * i for i in range(OWN_LOOP_AFTER * 2)]
        # Another thread reads them (no reply route there: the results bucket).
        assert await asyncio.to_thread(lambda: [sync_app.AsyncResult(i).get(timeout=10) for i in ids]) == values


def test_a_thread_making_one_call_uses_the_io_thread(sync_app: Natask) -> None:
    in_thread(lambda: sync_app.tasks["s.add"].delay(1, 2))
    assert homes(sync_app.client.portal) == {}
    assert sync_app.client.portal.loop is not None


def test_threads_beyond_the_limit_use_the_io_thread(sync_app: Natask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("natask.portal.MAX_OWN_LOOPS", 1)
    add = sync_app.tasks["s.add"]

    first_done, release = threading.Event(), threading.Event()

    def calls(wait: bool) -> bool:
        ids = [add.delay(1, 2).id for _ in range(OWN_LOOP_AFTER * 2)]
        own = len(set(ids)) == len(ids) and threading.current_thread() in homes(sync_app.client.portal)
        if wait:  # stay alive (and keep the loop) while the second thread calls
            first_done.set()
            release.wait(20)
        return own

    first: list[bool] = []
    thread = threading.Thread(target=lambda: first.append(calls(True)))
    thread.start()
    try:
        assert first_done.wait(20)
        assert in_thread(lambda: calls(False)) is False  # over the limit: the I/O thread
    finally:
        release.set()
        thread.join(20)
    assert first == [True]  # the first thread got a loop of its own


def test_an_idle_loop_keeps_its_connection(tmp_path: Path) -> None:
    # The server drops a client that leaves 2 PINGs a second apart unanswered: after ~3 s idle.
    conf = tmp_path / "ping.conf"
    conf.write_text('ping_interval: "1s"\nping_max: 2\n')
    with NatsServer(config_file=str(conf)).start() as server:
        app = Natask("idle", servers=[server.url])
        add = app.task(name="i.add")(lambda x, y: x + y)
        try:
            for _ in range(OWN_LOOP_AFTER):
                add.delay(1, 2)
            home = homes(app.client.portal)[threading.current_thread()]
            broker = app.client._ready[home.loop]
            time.sleep(3 * KEEP_INTERVAL + 3)  # the idle time is what is being tested
            add.delay(1, 2)
            assert broker.nc.stats["reconnects"] == 0 and app.client._ready[home.loop] is broker
        finally:
            app.close()


def test_the_loop_of_an_ended_thread_is_closed(sync_app: Natask) -> None:
    def calls() -> threading.Thread:
        for _ in range(OWN_LOOP_AFTER):
            sync_app.tasks["s.add"].delay(1, 2)
        return threading.current_thread()

    thread = in_thread(calls)
    home = homes(sync_app.client.portal)[thread]
    broker = sync_app.client._ready[home.loop]
    eventually(lambda: thread not in homes(sync_app.client.portal) and home.loop.is_closed())
    assert broker.closed


def test_close_closes_other_threads_loops_and_they_carry_on(sync_app: Natask) -> None:
    add = sync_app.tasks["s.add"]
    called, closed = threading.Event(), threading.Event()
    seen: list[Any] = []

    def caller() -> None:
        for _ in range(OWN_LOOP_AFTER):
            add.delay(1, 2)
        seen.append(homes(sync_app.client.portal)[threading.current_thread()])
        called.set()
        closed.wait(20)
        seen.append(add.delay(3, 4).id)  # after close(): a new loop and connection

    thread = threading.Thread(target=caller)
    thread.start()
    assert called.wait(20)
    sync_app.close()
    old = seen[0]
    assert old.loop.is_closed() and homes(sync_app.client.portal) == {}
    closed.set()
    thread.join(20)
    assert len(seen) == 2 and isinstance(seen[1], str)


def test_an_interrupted_call_leaves_the_loop_usable(sync_app: Natask) -> None:
    add = sync_app.tasks["s.add"]
    for _ in range(OWN_LOOP_AFTER):
        add.delay(1, 2)

    async def interrupted() -> None:
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sync_app.client.portal.run(interrupted())
    assert add.delay(1, 2).id


async def test_tasks_calling_the_sync_api_share_the_io_thread(sync_app: Natask) -> None:
    add = sync_app.tasks["s.add"]

    @sync_app.task(name="s.fan")
    def fan(n: int) -> list[str]:
        return [add.delay(i, i).id for i in range(n)]

    async with worker(sync_app, concurrency=4):
        ids = await (await fan.adelay(OWN_LOOP_AFTER * 3)).aget(timeout=20)
        assert len(ids) == OWN_LOOP_AFTER * 3
        assert [await sync_app.AsyncResult(i).aget(timeout=10) for i in ids] == [2 * i for i in range(len(ids))]
    assert homes(sync_app.client.portal) == {}  # no worker thread got a loop (and connection) of its own


def test_a_forked_child_makes_its_own_connections(sync_app: Natask, nats_server: NatsServer) -> None:
    for _ in range(OWN_LOOP_AFTER * 2):  # the parent has its own loop and the I/O thread running
        sync_app.tasks["s.add"].delay(1, 2)
    # The child inherits the module state, the app's included: calls there must not use the parent's.
    child = multiprocessing.get_context("fork").Process(target=_child_with_parent_app, args=(sync_app,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert sync_app.tasks["s.add"].delay(1, 2).id  # and the parent carries on


def _child_with_parent_app(app: Natask) -> None:
    for _ in range(OWN_LOOP_AFTER * 2):
        app.tasks["s.add"].delay(1, 2)
