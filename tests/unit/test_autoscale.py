"""The autoscale policy (``natask.worker.scale``), tick by tick on a stand-in worker."""

from __future__ import annotations

from natask.worker.scale import Autoscaler


class Stub:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.busy = 0
        self.waiting = 0

    def running(self) -> int:
        return self.busy

    def backlog(self) -> int:
        return self.waiting

    def resize(self, concurrency: int) -> None:
        self.concurrency = concurrency


async def test_grows_by_the_backlog_up_to_max_and_shrinks_after_idle_seconds() -> None:
    w = Stub(2)
    scaler = Autoscaler(w, high=10, low=2, idle=30)
    scaler.stop()
    w.busy, w.waiting = 2, 3
    scaler.tick(100.0)
    assert w.concurrency == 5  # all busy, 3 waiting
    w.busy, w.waiting = 5, 50
    scaler.tick(101.0)
    assert w.concurrency == 10  # capped at max
    w.busy, w.waiting = 4, 0
    scaler.tick(110.0)
    assert w.concurrency == 10  # not idle for 30 s yet
    w.busy = 1
    scaler.tick(131.5)
    assert w.concurrency == 4  # the most seen running in that window
    w.busy = 0
    scaler.tick(170.0)
    assert w.concurrency == 2  # never below min


async def test_all_busy_without_backlog_keeps_the_size() -> None:
    w = Stub(3)
    scaler = Autoscaler(w, high=8, low=1, idle=5)
    scaler.stop()
    w.busy = 3
    scaler.tick(10.0)
    scaler.tick(20.0)
    assert w.concurrency == 3
