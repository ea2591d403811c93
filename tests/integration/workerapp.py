"""The app that subprocess workers of the integration tests run (``-A tests.integration.workerapp:app``)."""

from __future__ import annotations

import asyncio
import os
import time

from natask import Natask

app = Natask(
    "itest",
    subject_prefix=os.environ.get("NATASK_TEST_PREFIX", "tasks"),
    ack_wait=float(os.environ.get("NATASK_TEST_ACK_WAIT", "30")),
)
LOG = os.environ.get("NATASK_TEST_LOG", os.devnull)


def record(line: str) -> None:
    """Append one line to the shared log: what ran, in which process (O_APPEND keeps lines whole)."""
    with open(LOG, "a") as f:
        f.write(f"{line} {os.getpid()}\n")


@app.task(name="it.add")
def add(x: int, y: int) -> int:
    record(f"add {x} {y}")
    return x + y


@app.task(name="it.sleep", track_started=True)
def sleep(seconds: float, tag: str) -> str:
    record(f"start {tag}")
    time.sleep(seconds)
    record(f"done {tag}")
    return tag


@app.task(name="it.asleep", track_started=True)
async def asleep(seconds: float, tag: str) -> str:
    record(f"start {tag}")
    await asyncio.sleep(seconds)
    record(f"done {tag}")
    return tag


@app.task(name="it.crash", max_retries=1)
def crash(tag: str) -> None:
    record(f"crash {tag}")
    os._exit(3)  # the worker dies mid-task, every time


@app.task(name="it.charge", bind=True)
def charge(self, order: str) -> str:  # type: ignore[no-untyped-def]
    """A side effect guarded by an idempotency claim; the first run is killed after it."""
    if app.claim(f"charge-{order}"):
        record(f"charged {order}")
    self.update_state("CHARGED")
    if self.request.retries == 0:
        time.sleep(60)  # the test kills this worker here
    return "ok"


@app.task(name="it.stale", bind=True, track_started=True)
def stale(self, frozen_pid: int) -> str:  # type: ignore[no-untyped-def]
    """In the worker the test freezes (longer than ack_wait) the run resumes after another worker
    finished the task, then reports progress and fails: both must be dropped."""
    if os.getpid() == frozen_pid:
        time.sleep(1)  # frozen here (or just before)
        self.update_state("LATE", {"pid": os.getpid()})
        raise RuntimeError("late failure")
    return f"ran in {os.getpid()}"


@app.task(name="it.ledger", bind=True, track_started=True)
def ledger(self, seconds: float, hold: str = "") -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A ledgered run: takes ``seconds`` (or waits until the file ``hold`` exists), then appends
    ``ran <task id> <pid>`` and returns the id and pid, so a test can match outcomes to runs."""
    if hold:
        while not os.path.exists(hold):
            time.sleep(0.01)
    else:
        time.sleep(seconds)
    record(f"ran {self.request.id}")
    return {"id": self.request.id, "pid": os.getpid()}


@app.task(name="it.paced", global_rate_limit="30/s", max_retries=0)
async def paced(tag: int) -> float:
    """Records when it started (issue 17: 3 workers together stay within the global rate)."""
    return time.time()


@app.task(name="it.capped", max_concurrency=2, max_retries=0)
async def capped(seconds: float) -> tuple[float, float]:
    """Its run's start and end, read inside the task (issue 17: the cap holds across workers)."""
    start = time.time()
    await asyncio.sleep(seconds)
    return start, time.time()


@app.task(name="it.hello", broadcast=True)
async def hello(subject: str, token: str) -> None:
    """Says which worker process ran it, over the worker's own client connection (in order)."""
    broker = await app.client.broker()
    await broker.publish_core(subject, f"{token} {os.getpid()}".encode())
