"""Fetching: one ``Fetcher`` per worker keeps pull requests open on its queues' consumers, within
the worker's free slots and byte budget, and decides which queue gets them.

The policy (the README's "Workers" section says the same for users):

- **Credit.** ``running + requested <= concurrency``, and the bytes of running tasks' messages plus
  the bytes open requests may still deliver (their ``max_bytes``) stay within ``prefetch_bytes``.
  The server ends a request whose next message does not fit its ``max_bytes`` with 409 "Message
  Size Exceeds MaxBytes" and keeps that message, so batches always carry room for one message of
  the server's ``max_payload`` (plus subject and ack subject). A look (below) at a queue of small
  messages carries ``LOOK_BYTES``; a larger message ends it with that 409, marks the queue busy
  with large messages, and a batch sized for ``max_payload`` fetches it: nothing waits on a look.
- **One queue:** every free slot is requested on it, topped up once a quarter of the capacity is
  free (one request per task would cost the drain).
- **Several queues:** a queue is *busy* when the pending count its last delivery carried (the
  last token of the ack subject) says more messages wait, *idle* otherwise. Idle queues without a
  request get *looks*, least recently looked first: a long poll for one message (more, up to a
  quarter of the capacity, after looks that found work at once). Looks may take half the slots
  while no queue is busy; while one is, all idle queues keep a look if they are at most a quarter
  of the capacity, else looks share an eighth of the slots. Looks never take the last half of the
  byte budget either, so a queue found busy gets batches at once. When every idle queue can hold a look
  at once, a look lasts ``PULL_EXPIRES`` (costing nothing while idle); otherwise looks are
  shortened so that each idle queue is looked at within ``ROTATION`` seconds (``n / LOOK_RATE``
  past ``LOOK_RATE * ROTATION`` idle queues), so no queue starves however many there are. Busy
  queues share the rest round robin, least recently served first: the first in line gets all it
  can use (its backlog, within the free slots and bytes: the server's cost is mostly per request),
  a batch of at least a quarter of the capacity unless nothing else is requested, lasting
  ``BUSY_EXPIRES`` (it fills at once; an unused rest must come back soon).
- **Priorities.** Each priority level 1..9 of a queue in use has its own consumer (priority 0 is the
  queue's own), fetched like a queue of its own, with one difference: busy levels of a queue take
  one turn of the round between them, and that turn goes to the highest busy level, so a backlog of
  a lower level never delays a higher one by more than the tasks already running, while the other
  queues keep their share. Starvation: every ``LOW_SHARE``-th turn of a queue goes to its lowest
  busy level instead, with a batch of at most ``capacity / LOW_SHARE``, so a flood of high
  priority slows lower levels down and never stops them.
- A finished task releases its slot and bytes and wakes the fetcher's one pump.
- Stopping unsubscribes the inboxes: the server skips requests nobody listens to, so messages are
  not handed to a worker that would only return them.

Deliveries arrive on a queue's inbox with their original subject, so credit is counted per queue:
each delivery uses one, and a request ending early (408 at expiry, 409) returns the undelivered
rest, which the server reports in ``Nats-Pending-Messages`` / ``Nats-Pending-Bytes``. A consumer
deleted on the server (409 "Consumer Deleted", or 503s that do not end) is recreated, with the
task stream if that is gone too, and consumption goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .delivery import Message

if TYPE_CHECKING:
    from . import Broker

log = logging.getLogger("natask.worker")

DEFAULT_PREFETCH_BYTES: Final = 16 * 1024 * 1024
"""Default byte budget of a worker's deliveries (held and requested): a quarter of nats-server's
default 64 MB ``max_pending``, past which the server cuts a client off as a slow consumer."""
PULL_EXPIRES: Final = 10.0
"""Lifetime of a request with nothing else to wait for (one queue; looks that need no rotation);
the server answers 408 when it ends unfilled."""
BUSY_EXPIRES: Final = 1.0
"""Lifetime of a batch on a busy queue of several: its unused rest comes back within this."""
ROTATION: Final = 2.0
"""Seconds within which every idle queue is looked at when they cannot all hold a look at once."""
LOOK_RATE: Final = 100.0
"""Looks per second at most while rotating (each costs a request and a 408 on an idle queue)."""
LOOK_MIN: Final = 0.05
"""Shortest look, in seconds."""
LOOK_SHARE: Final = 8
"""While a queue is busy and idle queues are more than a quarter of the slots, looks share
1/LOOK_SHARE of the slots."""
LOOK_BYTES: Final = 64 * 1024
"""``max_bytes`` of a look at a queue of small messages (larger ones: sized for ``max_payload``)."""
MSG_OVERHEAD: Final = 256
"""Bytes counted for a delivered message beside its payload (subject, ack subject, headers: the
server counts them against ``max_bytes`` too)."""
MAX_LINE: Final = 4096
"""Bytes added to ``max_payload`` for the smallest useful ``max_bytes``: a message's subject and
ack subject, bounded by the server's default ``max_control_line``."""
LOW_SHARE: Final = 10
"""One turn in this many of a queue with several busy priority levels goes to the lowest of them
(the starvation policy: lower levels keep about this share of the queue's pull requests)."""
_TICK: Final = 1.0
"""Seconds between two checks for requests the server never closed."""
_GRACE: Final = 3.0
"""Extra time before a request the server never closed is written off locally."""
_NO_LEADER_PAUSE: Final = 0.5
"""Pause before asking again after a 503 (no responders: the consumer is electing a leader)."""
_LOST_AFTER: Final = 3
"""503s in a row after which the consumer is looked up: an election ends, a deleted consumer does not."""
_HEAL_PAUSE: Final = 2.0
"""Pause before trying again to recreate a deleted consumer that could not be recreated."""
_DRAIN_TIMEOUT: Final = 5.0
"""Seconds stopping waits for the server to confirm an inbox's unsubscribe."""


def pending_of(reply: str | None) -> int:
    """The consumer's pending count a delivery carries: the last token of a v1 ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``), the one before the
    random token of a v2 one (with domain and account hash); -1 when unreadable."""
    tokens = (reply or "").split(".")
    raw = tokens[8] if len(tokens) == 9 else tokens[10] if len(tokens) >= 12 else ""
    return int(raw) if raw.isdigit() else -1


class _Levels:
    """The priority levels of one queue that have consumers: busy ones share one turn of the round."""

    __slots__ = ("members", "turns")

    def __init__(self, members: list[_Queue]) -> None:
        self.members = members  # highest priority first
        self.turns = 0  # pull requests made for the queue's busy levels


class _Queue:
    """One queue's consumer as the fetcher sees it: its inbox, its open credit, busy or idle."""

    __slots__ = ("backlog", "busy", "bytes", "credit", "deadline", "durable", "fetcher", "heal_failed", "healing",
                 "inbox", "last", "levels", "look", "lost", "name", "next_subject", "priority", "requests",
                 "retry_at", "size", "streak", "sub", "suspect", "where")

    def __init__(self, fetcher: Fetcher, name: str, durable: str, next_subject: str, inbox: str,
                 priority: int = 0) -> None:
        self.fetcher = fetcher
        self.name = name
        self.priority = priority
        self.levels: _Levels | None = None  # set once the queue has a priority level besides this one
        self.durable = durable
        self.next_subject = next_subject
        self.inbox = inbox
        self.sub: Subscription | None = None
        self.credit = 0  # messages requested and not yet delivered or returned
        self.bytes = 0  # max_bytes requested and not yet delivered (estimated) or returned
        self.requests: dict[str, tuple[int, int]] = {}  # token -> (batch, max_bytes), until it ends
        self.deadline = 0.0  # when the last open request expires on the server (monotonic)
        self.last: Msg | None = None  # the latest delivery, read when the credit runs out
        self.backlog = -1  # messages waiting, as the latest delivery said (-1: unknown)
        self.busy = False
        self.look = 0  # slots of the look open on this queue (0: none)
        self.streak = 0  # looks in a row that were filled
        self.size = MSG_OVERHEAD  # bytes of a recent message (sizes the next batch's max_bytes)
        self.where: deque[_Queue] | None = None  # the fetcher's deque this queue waits in
        self.retry_at = 0.0  # after a 503, no request before this (monotonic)
        self.lost = 0  # 503s with no other answer in between (a spurious lookup costs one request)
        self.suspect = False  # the consumer may be gone: look it up before the next request
        self.heal_failed = False
        self.healing: asyncio.Task[None] | None = None

    async def deliver(self, msg: Msg) -> None:
        """The inbox's callback: a task message, or a status that ends a request."""
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            self.fetcher.status(self, msg.subject[len(self.inbox) + 1:], headers)
            return
        fetcher = self.fetcher
        self.credit -= 1
        self.bytes -= len(msg.data) + MSG_OVERHEAD
        self.last = msg
        fetcher.requested -= 1
        fetcher.running += 1  # the message's bytes move from requested to held: `used` stays
        if self.credit <= 0:
            fetcher.settle(self)
        try:
            fetcher.on_message(msg)
        except Exception:
            log.exception("cannot dispatch a message of %s; returning it to the queue", self.durable)
            fetcher.release(msg)
            await msg.nak()


class Fetcher:
    """A worker's pull requests on all its queues: slots and bytes, and who gets them (see module)."""

    def __init__(self, capacity: int, on_message: Callable[[Message], None],
                 prefetch_bytes: int = DEFAULT_PREFETCH_BYTES) -> None:
        if capacity < 1:
            raise ValueError(f"concurrency must be >= 1, got {capacity}")
        if prefetch_bytes < 1:
            raise ValueError(f"prefetch_bytes must be >= 1, got {prefetch_bytes}")
        self.capacity = capacity
        self.prefetch_bytes = prefetch_bytes
        self.on_message = on_message
        self.running = 0
        self.requested = 0
        self.used = 0  # bytes held by running messages + bytes open requests may still deliver
        self.budget = prefetch_bytes
        self.unit = MAX_LINE  # the smallest max_bytes that fits any one message (set on start)
        self.min_batch = max(1, capacity // 4)
        self.queues: list[_Queue] = []
        self.single = True
        self.idle: deque[_Queue] = deque()  # idle queues without a request, least recently looked first
        self.ready: deque[_Queue] = deque()  # busy queues without a request, least recently served first
        self.busy_count = 0
        self.looking = 0  # slots held by open looks
        self.broker: Broker | None = None
        self._seq = 0
        self._wakeup = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.paused = True

    # -- lifecycle --------------------------------------------------------------------------
    async def add(self, broker: Broker, queue: str, priority: int = 0) -> None:
        """Subscribe the inbox of a queue (or of one of its priority levels); requests start with
        ``start()``, or at once for a level added later."""
        siblings = [o for o in self.queues if o.name == queue]
        if any(o.priority == priority for o in siblings):
            return
        self.broker = broker
        names = broker.names
        durable = names.priority_consumer(queue, priority)
        q = _Queue(self, queue, durable, broker.next_subject(queue, durable), broker.nc.new_inbox(), priority)
        q.sub = await broker.subscribe(f"{q.inbox}.*", cb=q.deliver, pending_msgs_limit=-1, pending_bytes_limit=-1)
        if self.single and self.queues:
            # Single-queue requests never learnt whether the first queue has a backlog: unknown
            # counts as busy (a batch finds out), and the new queue's looks come first.
            first = self.queues[0]
            if first.where is not None:
                first.where.remove(first)
                first.where = None
            first.busy = True
            self.busy_count += 1
            self._ready(first)
        self.queues.append(q)
        self.single = len(self.queues) == 1
        if siblings:
            levels = siblings[0].levels or _Levels(siblings)
            levels.members.append(q)
            levels.members.sort(key=lambda m: -m.priority)
            for member in levels.members:
                member.levels = levels
        self._ready(q)
        self.wake()

    async def remove(self, queue: str) -> None:
        """Stop fetching ``queue`` (every priority level of it): its inboxes are drained, so the
        server hands what it had not delivered to other workers; what it delivered before still
        reaches ``on_message``. The last queue cannot be removed."""
        gone = [q for q in self.queues if q.name == queue]
        if not gone:
            return
        if len(gone) == len(self.queues):
            raise ValueError(f"{queue!r} is the only queue fetched: add another before removing it")
        for q in gone:
            self.queues.remove(q)
            if q.where is not None:
                q.where.remove(q)
                q.where = None
            if q.healing is not None:
                q.healing.cancel()
            if q.busy:
                self.busy_count -= 1
                q.busy = False
            self.looking -= q.look
            q.look = 0
        self.single = len(self.queues) == 1
        await asyncio.gather(*(self._unsubscribe(q) for q in gone))
        for q in gone:  # after the drain: what it delivered meanwhile is counted as running already
            if q.credit < 0:
                self.requested -= q.credit
                q.credit = 0
            self._take(q, q.credit, q.bytes)
        self.wake()

    def start(self) -> None:
        """Start asking for messages on every added queue."""
        assert self.broker is not None, "no queue added"
        self.unit = self.broker.nc.max_payload + MAX_LINE
        self.budget = max(self.prefetch_bytes, self.unit)
        if self.budget > self.prefetch_bytes:
            log.warning("prefetch_bytes %d is below the server's max_payload of %d (plus %d): using %d, one "
                        "message at a time", self.prefetch_bytes, self.unit - MAX_LINE, MAX_LINE, self.budget)
        self.paused = False
        loop = asyncio.get_running_loop()
        self._pump_task = loop.create_task(self._pump())
        self._tick = loop.call_later(_TICK, self._on_tick)
        self.wake()

    @property
    def started(self) -> bool:
        return self._pump_task is not None

    async def stop(self) -> None:
        """Stop asking for messages and end the open requests: the inboxes are unsubscribed, so
        the server hands their messages to other workers. Messages it sent before still reach
        ``on_message``."""
        self.paused = True
        if self._tick is not None:
            self._tick.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        for q in self.queues:
            if q.healing is not None:
                q.healing.cancel()
        await asyncio.gather(*(self._unsubscribe(q) for q in self.queues))
        for q in self.queues:
            self._write_off(q)

    async def _unsubscribe(self, q: _Queue) -> None:
        sub, q.sub = q.sub, None
        if sub is None:
            return
        try:
            # drain: UNSUB, then a round trip, then the messages that came before it are handled.
            await asyncio.wait_for(sub.drain(), _DRAIN_TIMEOUT)  # type: ignore[no-untyped-call]
        except Exception as e:
            log.debug("inbox of %s not drained (%s): unsubscribing", q.durable, e)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        if not self.paused or any(q.sub is not None for q in self.queues):
            await self.stop()

    def reset(self) -> None:
        """After a reconnect the server forgot our requests: write them off and ask again."""
        if self.broker is not None:  # another server of the cluster may allow larger messages
            self.unit = self.broker.nc.max_payload + MAX_LINE
            self.budget = max(self.prefetch_bytes, self.unit)
        for q in self.queues:
            self._write_off(q)
        self.wake()

    # -- slots ------------------------------------------------------------------------------
    def hold(self, msg: Message) -> None:
        """A message this fetcher did not request (an RPC call) takes a slot and its bytes."""
        self.running += 1
        self.used += len(msg.data) + MSG_OVERHEAD

    def release(self, msg: Message) -> None:
        """A task finished: its slot and bytes are free again."""
        self.running -= 1
        self.used -= len(msg.data) + MSG_OVERHEAD
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    def resize(self, capacity: int) -> None:
        """Run up to ``capacity`` messages at once (autoscale); requests already open stay."""
        self.capacity = capacity
        self.min_batch = max(1, capacity // 4)
        self._wakeup.set()

    def backlog(self) -> int:
        """Messages waiting on the queues, as their latest deliveries said (unknown counts 0)."""
        return sum(max(0, q.backlog) for q in self.queues)

    # -- bookkeeping ------------------------------------------------------------------------
    def _take(self, q: _Queue, n: int, nbytes: int) -> None:
        n = max(0, min(n, q.credit))
        nbytes = max(0, min(nbytes, q.bytes))
        q.credit -= n
        q.bytes -= nbytes
        self.requested -= n
        self.used -= nbytes

    def _write_off(self, q: _Queue) -> None:
        self._take(q, q.credit, q.bytes)
        q.last = None
        self.settle(q)

    def settle(self, q: _Queue) -> None:
        """The queue's open requests all ended: what they did not deliver is free again, and the
        queue waits for its next request, busy or idle."""
        if q.credit < 0:  # a request written off delivered after all
            self.requested -= q.credit
            q.credit = 0
        self.used -= q.bytes
        q.bytes = 0
        q.requests.clear()
        last, q.last = q.last, None
        if last is not None:
            q.size = len(last.data) + MSG_OVERHEAD
            q.backlog = pending_of(last.reply)  # once a batch; autoscale reads it on one queue too
        if not self.single:
            if q.look:
                self.looking -= q.look
                q.look = 0
                q.streak = q.streak + 1 if last is not None else 0
            busy = q.backlog != 0  # unknown counts as busy: a batch finds out
            if busy != q.busy:
                q.busy = busy
                self.busy_count += 1 if busy else -1
            self._ready(q)
        self._wakeup.set()

    def _ready(self, q: _Queue) -> None:
        if q.where is None and not q.credit and q.healing is None:
            q.where = self.ready if q.busy else self.idle
            q.where.append(q)

    def _requeue(self, q: _Queue) -> None:
        self._ready(q)
        self.wake()

    def status(self, q: _Queue, token: str, headers: dict[str, str]) -> None:
        """A request ended (or an idle heartbeat): return its undelivered rest."""
        status = headers["Status"]
        if status == "100":  # idle heartbeat
            return
        request = q.requests.pop(token, None)
        description = headers.get("Description", "")
        if request is not None:  # else written off, or settled already (409 "Batch Completed" comes last)
            pending, pending_bytes = headers.get("Nats-Pending-Messages"), headers.get("Nats-Pending-Bytes")
            returned = int(pending) if pending and pending.isdigit() else request[0]
            self._take(q, returned, int(pending_bytes) if pending_bytes and pending_bytes.isdigit() else request[1])
            if returned == request[0] and "MaxBytes" in description:
                if request[1] < self.unit:  # a look too small for the message: a batch fetches it
                    q.size = max(q.size, self.unit - MAX_LINE)
                    q.backlog = max(q.backlog, 1)
                else:  # not one message fit a request sized for max_payload: asking again at once would spin
                    log.warning("a message of %s is larger than max_payload allows (%s): asking again shortly",
                                q.durable, description)
                    q.retry_at = time.monotonic() + _HEAL_PAUSE
        if status == "503":
            # No responders: the consumer's leader is moving (asking again at once would spin),
            # or the consumer is gone: look it up after a few in a row.
            q.retry_at = time.monotonic() + _NO_LEADER_PAUSE
            q.lost += 1
            q.suspect = q.suspect or q.lost >= _LOST_AFTER
            log.debug("consumer %s has no leader right now; asking again shortly", q.durable)
        else:
            q.lost = 0  # the consumer answered (reset here, not per delivery: no cost per task)
            if status == "408":
                q.backlog, q.last = 0, None  # it waited out its expiry: nothing is waiting
            elif status == "409" and "Deleted" in description:
                q.suspect = True
            elif status not in ("404", "409"):
                log.warning("pull request on %s ended with %s %s", q.durable, status, description)
        if request is not None and q.credit <= 0:
            self.settle(q)
        self.wake()

    def _on_tick(self) -> None:
        # Every open request ends by its expiry (filled, or a 408): credit left long after the
        # last one's expiry belongs to requests the server no longer has.
        now = time.monotonic()
        for q in self.queues:
            if q.credit and now > q.deadline + _GRACE:
                self._write_off(q)
        if not self.paused:
            self._tick = asyncio.get_running_loop().call_later(_TICK, self._on_tick)

    # -- the pump ---------------------------------------------------------------------------
    async def _pump(self) -> None:
        wakeup = self._wakeup
        while not self.paused:
            await wakeup.wait()
            wakeup.clear()
            if self.paused:
                return
            broker = self.broker
            assert broker is not None
            if not broker.nc.is_connected:
                continue  # reset() wakes us once reconnected
            try:
                if self.single:
                    await self._plan_one(self.queues[0])
                else:
                    await self._plan()
            except Exception as e:  # never let the pump die: the worker would starve silently
                log.warning("pull requests failed: %s", e)
                await asyncio.sleep(0.5)
                self.wake()

    def _available(self, q: _Queue, now: float) -> bool:
        """Whether the queue may be asked now; if not, it is queued again when it may."""
        if now < q.retry_at:
            asyncio.get_running_loop().call_later(q.retry_at - now, self._requeue, q)
            return False
        if q.suspect:
            if q.healing is None:
                q.healing = asyncio.get_running_loop().create_task(self._heal(q))
            return False
        return True

    async def _plan_one(self, q: _Queue) -> None:
        """One queue: request every free slot, topping up once a quarter of the capacity is free."""
        free = self.capacity - self.running - self.requested
        free_bytes = self.budget - self.used
        if free <= 0 or free_bytes < self.unit or (q.credit and free < self.min_batch):
            return
        if not self._available(q, time.monotonic()):
            return
        batch = min(free, max(1, free_bytes // q.size))
        await self._request(q, batch, max(self.unit, min(free_bytes, batch * q.size)), PULL_EXPIRES)

    async def _plan(self) -> None:
        """Several queues: looks at idle queues first (within their share), then batches for busy
        ones, round robin (see the module docstring)."""
        now = time.monotonic()
        unit = self.unit
        n_idle = len(self.queues) - self.busy_count
        capacity = self.capacity
        if not self.busy_count:  # half the slots stay for the first queue found busy
            look_cap = max(1, capacity // 2)
        else:  # a few idle queues are all watched; more share an eighth of the slots
            look_cap = n_idle if n_idle <= capacity // 4 else max(1, capacity // LOOK_SHARE)
        # Looks never take the last half of the byte budget: a queue found busy gets batches at once.
        half = self.budget // 2
        look_cap = min(look_cap, max(1, half // LOOK_BYTES))
        if n_idle <= look_cap:
            expires = PULL_EXPIRES
        else:
            period = max(ROTATION, n_idle / LOOK_RATE)
            expires = min(PULL_EXPIRES, max(LOOK_MIN, look_cap * period / n_idle))
        idle = self.idle
        while idle:
            free = self.capacity - self.running - self.requested
            room = min(free, look_cap - self.looking)
            if room <= 0:
                break
            q = idle[0]
            size = min(room, 1 << min(q.streak, 8), self.min_batch) if q.streak else 1
            # A look expects the queue's usual messages; one too large for it ends the look with
            # 409 "Message Size Exceeds MaxBytes" and is fetched by a batch sized for max_payload.
            max_bytes = LOOK_BYTES if size * q.size <= LOOK_BYTES else max(unit, size * q.size)
            if self.budget - self.used - max_bytes < half:
                break
            idle.popleft()
            q.where = None
            if q.busy or q.credit:
                self._ready(q)
                continue
            if not self._available(q, now):
                continue
            q.look = size
            self.looking += size
            await self._request(q, size, max_bytes, expires)
        await self._batches(now)

    async def _batches(self, now: float) -> None:
        """Batches for busy queues, round robin, least recently served first."""
        unit = self.unit
        ready = self.ready
        skipped = 0  # queues in a row whose turn waits for their highest level's open request
        while ready and skipped < len(ready):
            free = self.capacity - self.running - self.requested
            free_bytes = self.budget - self.used
            if free <= 0 or free_bytes < unit:
                break
            q = ready[0]
            levels, share = q.levels, False
            if levels is not None:  # the queue's turn goes to one of its busy levels
                chosen = self._level(levels)
                if chosen is None:
                    self._rotate(levels)
                    skipped += sum(1 for m in levels.members if m.where is ready)
                    continue
                q, share = chosen
            skipped = 0
            want = q.backlog if q.backlog > 0 else self.min_batch
            fit = max(1, free_bytes // q.size)  # large messages: bytes, not slots, bound the batch
            # The head of the round gets all it can use: the server's cost is mostly per request.
            size = min(free, want, fit)
            if size < min(self.min_batch, want, fit) and self.requested:
                break  # collect a sizeable batch first
            if levels is None:
                ready.popleft()
                q.where = None
            else:
                ready.remove(q)
                q.where = None
                self._rotate(levels)
                if share:
                    size = min(size, max(1, self.capacity // LOW_SHARE))
            if not q.busy or q.credit:
                self._ready(q)
                continue
            if not self._available(q, now):
                continue
            await self._request(q, size, max(unit, min(free_bytes, size * q.size)), BUSY_EXPIRES)

    def _level(self, levels: _Levels) -> tuple[_Queue, bool] | None:
        """The level of a queue a turn goes to: its highest busy one, or every ``LOW_SHARE``-th turn
        its lowest (True: the starvation share); None while the highest busy level has a request
        open (its messages come first: a lower level must not take the turn meanwhile)."""
        ready = self.ready
        waiting = [m for m in levels.members if m.where is ready]
        if len(waiting) > 1 and (levels.turns + 1) % LOW_SHARE == 0:
            return waiting[-1], True
        top = next((m for m in levels.members if m.busy), None)
        if top is not None and top.where is not ready and top.credit:
            return None
        return waiting[0], False

    def _rotate(self, levels: _Levels) -> None:
        """A queue had its turn: its other busy levels wait behind the other queues (fairness is
        per queue, not per level)."""
        levels.turns += 1
        ready = self.ready
        for member in levels.members:
            if member.where is ready:
                ready.remove(member)
                ready.append(member)

    async def _request(self, q: _Queue, batch: int, max_bytes: int, expires: float) -> None:
        broker = self.broker
        assert broker is not None
        self._seq += 1
        token = str(self._seq)
        body = json.dumps({"batch": batch, "max_bytes": max_bytes, "expires": int(expires * 1e9)}).encode()
        q.requests[token] = (batch, max_bytes)
        q.credit += batch
        q.bytes += max_bytes
        q.deadline = max(q.deadline, time.monotonic() + expires)
        self.requested += batch
        self.used += max_bytes
        try:
            await broker.nc.publish(q.next_subject, body, reply=f"{q.inbox}.{token}")
        except Exception as e:
            self._take(q, batch, max_bytes)
            q.requests.pop(token, None)
            if not q.credit:
                self.settle(q)
            log.warning("pull request on %s failed: %s", q.durable, e)
            q.retry_at = time.monotonic() + _NO_LEADER_PAUSE
        if len(q.requests) > 1000:  # fully served requests never report back: forget old ones
            for old in list(q.requests)[:500]:
                del q.requests[old]

    async def _heal(self, q: _Queue) -> None:
        """Recreate the consumer (and stream) if the server lost it; logged by the broker."""
        broker = self.broker
        assert broker is not None
        q.suspect, q.lost = False, 0
        try:
            healed = await broker.heal_consumer(q.name, q.priority)
        except Exception as e:
            if not q.heal_failed:
                log.warning("consumer %s is gone and cannot be recreated yet (%s): trying again", q.durable, e)
            q.heal_failed = q.suspect = True
            q.retry_at = time.monotonic() + _HEAL_PAUSE
            return
        finally:
            q.healing = None
            if not self.paused:
                self._requeue(q)
        q.heal_failed = False
        if healed:
            self._write_off(q)  # the old consumer's requests died with it
            q.retry_at = 0.0
            q.next_subject = broker.next_subject(q.name, q.durable)  # its stream may have another name now
