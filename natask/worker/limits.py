"""Flow limits of a task, asked by the gate before it runs: ``rate_limit`` (a token bucket per worker),
``global_rate_limit`` (one per cluster, in KV) and ``max_concurrency`` (a KV semaphore with leases).

A task that must wait is handed back to the server as a schedule (``Outcome.schedule_again``): it
holds no slot and no ``max_ack_pending`` place while it waits, its retry count stays, and it is
never dead-lettered for waiting. Rate limits reserve the start (GCRA: the bucket keeps the next
free start, each reservation moves it one interval on), so a waiting task goes back once, to its
reserved time, carrying the reservation; a wait up to ``HOLD`` is spent in the slot instead."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ..broker import Broker, SequenceConflict
from ..message import Envelope, dumps, loads
from ..naming import HDR_CAP_WAITS, HDR_RATE_START, HDR_RETRIES, HDR_SCHEDULER
from ..options import parse_rate
from .delivery import Delivery, header_int
from .outcome import Outcome

if TYPE_CHECKING:
    from ..broker.kv import Bucket
    from ..task import Task

log = logging.getLogger("natask.worker")

HOLD: Final = 0.25
"""Longest wait for a reserved start spent in the slot (shorter than a schedule's round trip is
worth); longer waits go back to the server as a schedule."""
CAP_LEASE: Final = 10.0
"""Seconds a ``max_concurrency`` lease lasts unless renewed: a dead worker's runs free their places
within this."""
CAP_RENEW: Final = CAP_LEASE / 3
"""Seconds between renewals of a running task's lease."""
CAP_WAIT_MIN: Final = 0.1
"""First wait of a task whose cap is full; doubled each time it finds it full again."""
CAP_WAIT_MAX: Final = 2.0
"""Longest wait between two looks at a full cap."""
CAS_TRIES: Final = 50
"""Compare-and-set attempts on a limit's key before the delivery goes back to wait a little."""
_RETRY_SOON: Final = 0.2
"""Wait, in seconds, of a delivery whose limit key stayed contended for ``CAS_TRIES`` attempts."""

Run = Callable[[], Awaitable[None]]


class Limits:
    """The rate limits and caps of one started worker."""

    def __init__(self, broker: Broker, outcome: Outcome) -> None:
        self.broker = broker
        self.outcome = outcome
        self.local: dict[str, float] = {}
        """Per task: this worker's next free start (``rate_limit``)."""
        self.intervals: dict[tuple[str, str], float | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._queued: dict[str, list[asyncio.Future[float | None]]] = {}
        """Per task: this worker's global-rate reservations waiting for the next compare-and-set."""
        self._rates: Bucket | None = None
        self._caps: Bucket | None = None
        self._token = os.urandom(6).hex()
        self._seq = 0

    async def run(self, delivery: Delivery, env: Envelope, task: Task[Any, Any], run: Run) -> None:
        """``run`` the admitted task within its limits, or hand the delivery back to wait."""
        options = task.options
        if options.rate_limit or options.global_rate_limit:
            start = self.reserved(delivery)
            if start is None:
                start = await self.reserve(task)
                if start is None:
                    await self.wait(delivery, env, time.time() + _RETRY_SOON, "rate", {})
                    return
            wait = start - time.time()
            if wait > HOLD:
                retried = (delivery.msg.headers or {}).get(HDR_RETRIES, "0")
                await self.wait(delivery, env, start, "rate", {HDR_RATE_START: f"{start:.6f}/{retried}"})
                return
            if wait > 0:
                await asyncio.sleep(wait)  # the slot waits, not the CPU: shorter than a schedule's trip
        if options.max_concurrency:
            lease = await self.acquire(task.name, options.max_concurrency)
            if lease is None:
                waits = header_int(delivery.msg.headers or {}, HDR_CAP_WAITS) or 0
                pause = min(CAP_WAIT_MAX, CAP_WAIT_MIN * 2 ** min(waits, 10)) * random.uniform(0.5, 1.0)
                await self.wait(delivery, env, time.time() + pause, "cap", {HDR_CAP_WAITS: str(waits + 1)})
                return
            renew = asyncio.get_running_loop().create_task(self._renew(task.name, lease))
            try:
                await run()
            finally:
                renew.cancel()
                await self.release(task.name, lease)
            return
        await run()

    async def wait(self, delivery: Delivery, env: Envelope, when: float, kind: str, extra: dict[str, str]) -> None:
        """Hand the delivery back to the server until ``when`` (a schedule; the message is acked
        only once the schedule is stored)."""
        log.debug("task %s[%s] waits %.2fs for its %s limit", env.task, env.id, when - time.time(), kind)
        await self.outcome.schedule_again(delivery, env, when, kind, extra)

    # -- rate limits ------------------------------------------------------------------------
    def reserved(self, delivery: Delivery) -> float | None:
        """The start this message reserved before it waited, if it carries one it may use: fired
        by a schedule (the gate checked that schedule is this task's) and for the same retry."""
        headers = delivery.msg.headers or {}
        raw = headers.get(HDR_RATE_START)
        if raw is None or HDR_SCHEDULER not in headers:
            return None
        when, _, retried = raw.partition("/")
        if retried != headers.get(HDR_RETRIES, "0"):
            return None
        try:
            start = float(when)
        except ValueError:
            return None
        return start if math.isfinite(start) else None

    def interval(self, task: Task[Any, Any], what: str) -> float | None:
        """Seconds between two starts under the task's ``what`` limit (None: no limit)."""
        key = (task.name, what)
        if key not in self.intervals:
            rate = parse_rate(getattr(task.options, what), what)
            self.intervals[key] = None if rate is None else 1.0 / rate
        return self.intervals[key]

    async def reserve(self, task: Task[Any, Any]) -> float | None:
        """The start reserved for one run under the task's rate limits (the later of its local and
        global one); None if the global key stayed contended."""
        now = time.time()
        start = now
        local = self.interval(task, "rate_limit")
        if local is not None:
            start = max(self.local.get(task.name, 0.0), now)
            self.local[task.name] = start + local
        shared = self.interval(task, "global_rate_limit")
        if shared is not None:
            reserved = await self.reserve_global(task.name, shared)
            if reserved is None:
                return None
            start = max(start, reserved)
        return start

    async def reserve_global(self, name: str, interval: float) -> float | None:
        """Reserve the next free start of the cluster-wide bucket of ``name``. This worker's
        concurrent reservations of one task share one compare-and-set: whoever gets the lock
        reserves a start for everyone queued behind it."""
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._queued.setdefault(name, []).append(future)
        async with self._locks.setdefault(f"r:{name}", asyncio.Lock()):
            if future.done():
                return future.result()
            batch = self._queued.pop(name)
            starts: list[float] | None = None
            try:
                starts = await self._reserve_many(name, interval, len(batch))
            finally:
                for i, waiting in enumerate(batch):  # None (interrupted, contended): they wait a little
                    if not waiting.done():
                        waiting.set_result(None if starts is None else starts[i])
        return future.result()

    async def _reserve_many(self, name: str, interval: float, count: int) -> list[float] | None:
        kv = await self.rates()
        for _ in range(CAS_TRIES):
            rev, entry = await kv.last(name, leader=True)
            start = max(_float(entry.value) if entry is not None else 0.0, time.time())
            value = f"{start + count * interval:.6f}".encode()
            try:
                if rev:
                    await kv.update(name, value, rev)
                else:
                    await kv.create(name, value)
            except SequenceConflict:
                continue
            return [start + i * interval for i in range(count)]
        return None

    async def rates(self) -> Bucket:
        if self._rates is None:
            self._rates = await self.broker.bucket(self.broker.names.rates_bucket, ttl=None, direct=False,
                                                   description="natask global rate limits")
        return self._rates

    # -- concurrency caps -------------------------------------------------------------------
    async def caps(self) -> Bucket:
        if self._caps is None:
            self._caps = await self.broker.bucket(self.broker.names.caps_bucket, ttl=None, direct=False,
                                                  description="natask max_concurrency leases")
        return self._caps

    async def _change(self, name: str, change: Callable[[dict[str, float], float], bool]) -> bool:
        """Apply ``change`` to the live leases of ``name`` (expired ones dropped) and store them
        if it returns True; its answer."""
        kv = await self.caps()
        for _ in range(CAS_TRIES):
            rev, entry = await kv.last(name, leader=True)
            now = time.time()
            leases = {k: v for k, v in _leases(entry.value if entry is not None else b"").items() if v > now}
            if not change(leases, now):
                return False
            try:
                if rev:
                    await kv.update(name, dumps(leases), rev)
                else:
                    await kv.create(name, dumps(leases))
            except SequenceConflict:
                continue
            return True
        return False

    async def acquire(self, name: str, cap: int) -> str | None:
        """A lease on one of the ``cap`` places of ``name``; None if they are all taken."""
        self._seq += 1
        lease = f"{self._token}-{self._seq}"

        def take(leases: dict[str, float], now: float) -> bool:
            if len(leases) >= cap:
                return False
            leases[lease] = now + CAP_LEASE
            return True

        lock = self._locks.setdefault(f"c:{name}", asyncio.Lock())
        async with lock:
            return lease if await self._change(name, take) else None

    async def release(self, name: str, lease: str) -> None:
        """Give the place back (if this fails, the lease runs out within ``CAP_LEASE``)."""
        try:
            async with self._locks.setdefault(f"c:{name}", asyncio.Lock()):  # not racing our own takes
                await self._change(name, lambda leases, now: leases.pop(lease, None) is not None)
        except Exception as e:
            log.warning("cannot release a max_concurrency lease of %s (%s): it runs out within %gs", name, e,
                        CAP_LEASE)

    async def _renew(self, name: str, lease: str) -> None:
        def extend(leases: dict[str, float], now: float) -> bool:
            if lease not in leases:  # ran out (renewals failed): its place may be someone else's now
                return False
            leases[lease] = now + CAP_LEASE
            return True

        while True:
            await asyncio.sleep(CAP_RENEW)
            try:
                await self._change(name, extend)
            except Exception as e:
                log.warning("cannot renew a max_concurrency lease of %s: %s", name, e)


def _float(raw: bytes) -> float:
    """A stored next free start; 0 (free now) for anything that is not one."""
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def _leases(raw: bytes) -> dict[str, float]:
    """The leases a cap key holds (lease id -> expiry, Unix time); invalid entries are dropped."""
    if not raw:
        return {}
    try:
        data = loads(raw)
    except Exception:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
