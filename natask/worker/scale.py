"""``--autoscale MAX,MIN``: the worker's concurrency follows its backlog.

The policy (README, "Autoscale", says the same for users), checked every ``AUTOSCALE_TICK``:

- **Grow** when every slot is busy and the queues have messages waiting (the pending count their
  latest delivery carried): by that backlog, up to MAX, at once.
- **Shrink** when the slots were never all busy for ``idle`` seconds (``AUTOSCALE_IDLE`` by
  default, Celery's keepalive): down to the most tasks seen running at once in that time, at
  least MIN. Running tasks are never stopped: a smaller concurrency only holds back new ones.

The worker starts at MIN. Both pools follow: threads are started as needed (idle ones cost
nothing), the process pool's children above the size exit after their task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, Protocol

log = logging.getLogger("natask.worker")

AUTOSCALE_TICK: Final = 1.0
"""Seconds between two looks at the slots and the backlog."""
AUTOSCALE_IDLE: Final = 30.0
"""Seconds the slots must stay not all busy before the concurrency shrinks."""


class Scaled(Protocol):
    """What the autoscaler reads and changes of a worker."""

    concurrency: int

    def running(self) -> int: ...

    def backlog(self) -> int: ...

    def resize(self, concurrency: int) -> None: ...


class Autoscaler:
    """Grows and shrinks a worker's concurrency between ``low`` and ``high`` (see module)."""

    def __init__(self, worker: Scaled, high: int, low: int, idle: float = AUTOSCALE_IDLE) -> None:
        self.worker = worker
        self.high = high
        self.low = low
        self.idle = idle
        self.since = time.monotonic()  # the slots were last all busy, or the size last changed
        self.peak = 0  # most tasks seen running at once since then
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(AUTOSCALE_TICK, self.idle))
            try:
                self.tick(time.monotonic())
            except Exception as e:  # never let the scaler die silently
                log.warning("autoscale: %s", e)

    def tick(self, now: float) -> None:
        """One look: grow, shrink or keep the concurrency."""
        w = self.worker
        size, running = w.concurrency, w.running()
        if running >= size:
            self.since, self.peak = now, 0
            backlog = w.backlog()
            if backlog > 0 and size < self.high:
                self._resize(min(self.high, size + backlog), now, f"{backlog} waiting")
            return
        self.peak = max(self.peak, running)
        if size > self.low and now - self.since >= self.idle:
            self._resize(max(self.low, self.peak), now, f"slots not all busy for {self.idle:g}s")

    def _resize(self, size: int, now: float, why: str) -> None:
        log.info("autoscale: concurrency %d -> %d (%s)", self.worker.concurrency, size, why)
        self.worker.resize(size)
        self.since, self.peak = now, 0
