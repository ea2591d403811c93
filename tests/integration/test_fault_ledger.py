"""The fault layer: two worker processes, each behind its own fault proxy, under load while one
has its connections cut again and again and the other is frozen past ``ack_wait`` mid-task.

A ledger (every run appends ``ran <task id> <pid>``) and a replay of every record stored in the
results bucket check the promises: nothing is lost, a success the caller saw is the stored one and
really ran, and a task's final outcome is stored once with nothing stored after it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from natask import AsyncResult, Natask
from natask.message import loads
from natask.server import NatsServer

from .faultproxy import FaultProxy
from .helpers import WorkerProcess, log_lines

PREFIX = "ledger"
BATCH = 100
"""Tasks enqueued per phase of the run (three phases)."""
RUN_TIME = 0.02
"""Seconds each load task takes."""
ACK_WAIT = 2.0
FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


class StoredRecords:
    """Every record the results bucket stores, in order, per task: an ordered consumer from the
    bucket's first message (the bucket keeps one revision per key; its consumer sees each one)."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.last_seq = 0
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.last_seq = msg.metadata.sequence.stream
        if msg.data:
            self.records.setdefault(msg.subject.rsplit(".", 1)[-1], []).append(loads(msg.data))
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        async def reached() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), timeout)

    def finished(self, ids: list[str]) -> int:
        return sum(1 for i in ids if any(r["state"] in FINAL for r in self.records.get(i, ())))

    def started_by(self, task_id: str, pid: int) -> bool:
        return any(r["state"] == "STARTED" and str(r.get("info", {}).get("worker", "")).endswith(f":{pid}")
                   for r in self.records.get(task_id, ()))


async def test_cuts_and_a_freeze_under_load_lose_nothing_and_store_each_outcome_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    ledger, hold = tmp_path / "ledger.log", tmp_path / "release-hold"
    app = Natask("producer", servers=[nats_server.url], subject_prefix=PREFIX, publish_timeout=30)
    stored = StoredRecords()
    nc = await nats.connect(nats_server.url)
    workers: list[WorkerProcess] = []
    try:
        broker = await app.client.broker()
        await broker.results()  # the bucket exists before anything is stored: we see every record
        await nc.jetstream().subscribe(f"$KV.{app.names.results_bucket}.>", cb=stored.on_msg,
                                       ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        async with FaultProxy(nats_server.port) as proxy_a, FaultProxy(nats_server.port) as proxy_b:
            b = await WorkerProcess(proxy_b.url, PREFIX, ledger, ack_wait=ACK_WAIT).ready()
            workers.append(b)
            # B takes the held task first: it runs until the test releases it.
            held = await app.asend_task("it.ledger", (0,), {"hold": str(hold)})
            await stored.until(lambda: stored.started_by(held.id, b.proc.pid))
            a = await WorkerProcess(proxy_a.url, PREFIX, ledger, ack_wait=ACK_WAIT).ready()
            workers.append(a)
            results: list[AsyncResult[Any]] = [held]

            async def enqueue() -> list[str]:
                batch = [await app.asend_task("it.ledger", (RUN_TIME,)) for _ in range(BATCH)]
                results.extend(batch)
                return [r.id for r in batch]

            async def cut_a() -> None:
                accepted = proxy_a.accepted
                assert await proxy_a.cut() >= 1
                await proxy_a.wait_accepted(accepted + 1)  # A reconnected through the proxy

            first = await enqueue()
            await stored.until(lambda: stored.finished(first) >= BATCH // 4)
            await cut_a()
            second = await enqueue()
            await stored.until(lambda: stored.finished(second) >= BATCH // 4)
            proxy_b.freeze()  # B keeps running the held task, but nobody hears from it
            await cut_a()
            # B's lease runs out: the server redelivers the held task (and B's others) to A.
            await stored.until(lambda: stored.started_by(held.id, a.proc.pid))
            await cut_a()
            await enqueue()
            hold.touch()  # both runs of the held task finish now
            await stored.until(lambda: stored.finished([held.id]) == 1)
            proxy_b.thaw()  # what B did while frozen reaches the server late

            outcomes = await asyncio.gather(*(r.aget(timeout=60) for r in results), return_exceptions=True)
            for w in workers:
                w.signal(signal.SIGTERM)
            assert [await w.wait(30) for w in workers] == [0, 0]

        info = await nc.jetstream().stream_info(f"KV_{app.names.results_bucket}")
        await stored.until(lambda: stored.last_seq >= (info.state.last_seq or 0))
        kv = await broker.results()
        runs = set(log_lines(ledger))
        problems: dict[str, list[str]] = {"lost": [], "false success": [], "stale overwrite": []}
        for result, outcome in zip(results, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                problems["lost"].append(f"{result.id}: get() raised {outcome!r}")
                continue
            try:
                record = loads((await kv.get(result.id)).value or b"")
            except nats.js.errors.KeyNotFoundError:
                problems["lost"].append(f"{result.id}: no stored outcome")
                continue
            if record.get("state") != "SUCCESS" or record.get("result") != outcome:
                problems["false success"].append(f"{result.id}: caller saw {outcome}, stored {record}")
            if f"ran {result.id} {outcome['pid']}" not in runs:
                problems["false success"].append(f"{result.id}: no run in process {outcome['pid']}")
            states = [r["state"] for r in stored.records.get(result.id, [])]
            if sum(s in FINAL for s in states) != 1 or states[-1] not in FINAL:
                problems["stale overwrite"].append(f"{result.id}: stored {' -> '.join(states)}")
        assert problems == {"lost": [], "false success": [], "stale overwrite": []}
    finally:
        for w in workers:
            w.kill()
        await nc.close()
        await app.aclose()
