"""Pull consumption with credit: never more messages requested than a worker has free slots."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .broker import Broker

log = logging.getLogger("natask.worker")

PULL_EXPIRES: Final = 10.0
"""Lifetime of one pull request on the server; the server answers 408 when it ends unfilled."""
_GRACE: Final = 3.0
"""Extra time before a request the server never closed is written off locally."""
_NO_LEADER_PAUSE: Final = 0.5
"""Pause before asking again after a 503 (no responders: the consumer is electing a leader)."""
_LOST_AFTER: Final = 3
"""503s in a row after which the consumer is looked up: an election ends, a deleted consumer does not."""
_HEAL_PAUSE: Final = 2.0
"""Pause before trying again to recreate a deleted consumer that could not be recreated."""


class Slots:
    """A worker's concurrency, shared by its consumers: running + requested <= capacity."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"concurrency must be >= 1, got {capacity}")
        self.capacity = capacity
        self.running = 0
        self.requested = 0
        self.consumers: list[PullConsumer] = []

    @property
    def free(self) -> int:
        return self.capacity - self.running - self.requested

    def release(self) -> None:
        """A task finished: let the consumers ask for more."""
        self.running -= 1
        for consumer in self.consumers:
            consumer.wake()


class PullConsumer:
    """Keeps pull requests outstanding on one durable consumer, sized to free slots.

    Deliveries arrive on an inbox with their original subject, so credit is counted in total:
    each delivery uses one, and a request ending early (408 at expiry, 409) returns the
    undelivered rest, which the server reports in ``Nats-Pending-Messages``. A consumer deleted
    on the server (409 "Consumer Deleted", or 503s that do not end) is recreated, with the task
    stream if that is gone too, and consumption goes on.
    """

    def __init__(
        self,
        broker: Broker,
        queue: str,
        slots: Slots,
        on_message: Callable[[Msg], None],
    ) -> None:
        self.broker = broker
        self.queue = queue
        durable = self.durable = broker.names.consumer(queue)
        self.slots = slots
        self.on_message = on_message
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{broker.names.stream}.{durable}"
        self._inbox = broker.nc.new_inbox()
        self._batches: dict[str, int] = {}  # request token -> batch asked, until it ends or expires
        self.credit = 0  # messages requested and not yet delivered or returned
        self._seq = 0
        self._wakeup = asyncio.Event()
        self._sub: Subscription | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self.paused = False
        self.last_activity = time.monotonic()
        self._retry_at = 0.0  # after a 503, no pull request before this (monotonic)
        self._lost = 0  # 503s with no other answer in between (a spurious lookup costs one request)
        self._suspect = False  # the consumer may be gone: look it up before the next request
        self._heal_failed = False

    async def start(self) -> None:
        self._sub = await self.broker.subscribe(f"{self._inbox}.*", cb=self._deliver,
                                                pending_msgs_limit=-1, pending_bytes_limit=-1)
        self.slots.consumers.append(self)
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        """Stop asking for messages; already-delivered ones still reach ``on_message``."""
        self.paused = True
        if self in self.slots.consumers:
            self.slots.consumers.remove(self)
        self.wake()
        if self._pump_task is not None:
            self._pump_task.cancel()
            try:
                await self._pump_task
            except asyncio.CancelledError:
                pass

    async def close(self) -> None:
        await self.stop()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
        self._write_off()

    def wake(self) -> None:
        self._wakeup.set()

    def reset(self) -> None:
        """After a reconnect the server forgot our requests: write them off and ask again."""
        self._write_off()
        self.wake()

    def _write_off(self) -> None:
        self._take(self.credit)
        self._batches.clear()

    def _take(self, n: int) -> None:
        n = max(0, min(n, self.credit))
        self.credit -= n
        self.slots.requested -= n

    async def _pump(self) -> None:
        # Loop on the flag, not on cancellation alone: wait_for on Python < 3.12 can swallow a
        # cancel that lands as the wait completes.
        while not self.paused:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            if self.paused:
                return
            if self.credit and time.monotonic() - self.last_activity > PULL_EXPIRES + _GRACE:
                # Every unfinished request ends with a 408 by PULL_EXPIRES: silence means they are gone.
                self._write_off()
            if not self.broker.nc.is_connected or time.monotonic() < self._retry_at:
                continue
            if self._suspect:
                await self._heal()
                continue
            await self._request()

    async def _heal(self) -> None:
        """Recreate the consumer (and stream) if the server lost them; logged by the broker."""
        self._suspect, self._lost = False, 0
        try:
            healed = await self.broker.heal_consumer(self.queue)
        except Exception as e:
            if not self._heal_failed:
                log.warning("consumer %s is gone and cannot be recreated yet (%s): trying again", self.durable, e)
            self._heal_failed = self._suspect = True
            self._retry_at = time.monotonic() + _HEAL_PAUSE
            return
        self._heal_failed = False
        if healed:
            self._write_off()  # the old consumer's requests died with it
            self._retry_at = 0.0
        self.wake()

    async def _request(self) -> None:
        free = self.slots.free
        if free <= 0:
            return
        n = len(self.slots.consumers) or 1
        share = free if n == 1 else max(1, free // n)
        # Small top-ups cost a request each; wait for a quarter of capacity unless idle.
        if self.credit and share < max(1, self.slots.capacity // 4):
            return
        self._seq += 1
        token = str(self._seq)
        body = json.dumps({"batch": share, "expires": int(PULL_EXPIRES * 1e9)}).encode()
        if not self.credit:
            self.last_activity = time.monotonic()
        self._batches[token] = share
        self.credit += share
        self.slots.requested += share
        try:
            await self.broker.nc.publish(self._next_subject, body, reply=f"{self._inbox}.{token}")
        except Exception as e:
            self._take(self._batches.pop(token, 0))
            log.warning("pull request on %s failed: %s", self.durable, e)
            await asyncio.sleep(0.5)
        if len(self._batches) > 1000:  # fully served requests never report back: forget old ones
            for old in list(self._batches)[:500]:
                del self._batches[old]

    async def _deliver(self, msg: Msg) -> None:
        self.last_activity = time.monotonic()
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            self._status(msg.subject[len(self._inbox) + 1:], headers)
            return
        self._take(1)
        self.slots.running += 1
        try:
            self.on_message(msg)
        except Exception:
            log.exception("cannot dispatch a message of %s; returning it to the queue", self.durable)
            self.slots.release()
            await msg.nak()

    def _status(self, token: str, headers: dict[str, str]) -> None:
        status = headers["Status"]
        if status == "100":  # idle heartbeat
            return
        batch = self._batches.pop(token, 0)
        pending = headers.get("Nats-Pending-Messages")
        self._take(int(pending) if pending and pending.isdigit() else batch)
        description = headers.get("Description", "")
        if status == "503":
            # No responders: the consumer's leader is moving (asking again at once would spin),
            # or the consumer is gone: look it up after a few in a row.
            self._retry_at = time.monotonic() + _NO_LEADER_PAUSE
            self._lost += 1
            self._suspect = self._suspect or self._lost >= _LOST_AFTER
            log.debug("consumer %s has no leader right now; asking again shortly", self.durable)
        else:
            self._lost = 0  # the consumer answered (reset here, not per delivery: no cost per task)
            if status == "409" and "Deleted" in description:
                self._suspect = True
            elif status not in ("404", "408", "409"):
                log.warning("pull request on %s ended with %s %s", self.durable, status, description)
        self.wake()
