"""The ``Worker``: lifecycle (start, run, stop, the connection's callbacks), dispatch of fetched
messages and RPC calls over a fixed number of slots, and leases kept with heartbeats. What happens
to a message in a slot is up to the roles it wires together at start: gate, execute, outcome."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final

from .. import signals
from ..broker import Broker, Message, attempt
from ..broker.fetch import DEFAULT_PREFETCH_BYTES, Fetcher
from ..config import check_queue_name
from ..errors import BrokerError
from ..events import Batch, EventPublisher
from ..naming import DEFAULT_INBOX_PREFIX
from .control import ControlResponder
from .delivery import Delivery, quietly
from .events import EventLog
from .execute import Execution
from .gate import Gate
from .levels import Levels
from .outcome import Outcome
from .processes import ProcessPool, find_app_spec
from .revokes import Revokes
from .rpc import Rpc
from .scale import AUTOSCALE_IDLE, Autoscaler
from .store import ResultStore
from .threads import ThreadRunner

if TYPE_CHECKING:
    from ..app import Natask

log = logging.getLogger("natask.worker")

DEFAULT_CONCURRENCY: Final = 32
HEARTBEAT_INTERVAL: Final = 5.0
"""Seconds between worker-heartbeat events."""
DEFAULT_GRACE: Final = 30.0
POOLS: Final = ("threads", "processes")
"""Where ``def`` tasks run: the worker's threads, or child processes (killable at ``time_limit``)."""
UNKNOWN_GRACE: Final = 20.0
"""Seconds a message naming an unknown task keeps coming back (a rolling deploy: a worker with
newer code may know it) before it is dead-lettered; under SPEC's 30 s bound."""
MAX_INTERNAL_ATTEMPTS: Final = 10
"""Deliveries of one message ending in an internal error before it is dead-lettered."""
INTERNAL_RETRY_DELAY: Final = 5.0
"""Seconds before a message that met an internal error is delivered again."""


class Worker:
    """Runs an app's tasks from one or more queues in this process.

    ``await worker.start()`` then ``await worker.stop()`` (or ``async with``); ``run()`` blocks
    until ``stop()`` is called (the CLI wires SIGTERM/SIGINT to it). ``prefetch_bytes``: the bytes
    of task messages it holds and has asked for at most (README, "Workers": fetching).
    """

    def __init__(  # noqa: PLR0913 - the worker's options, as the CLI gives them
        self,
        app: Natask,
        queues: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        grace: float = DEFAULT_GRACE,
        max_tasks: int | None = None,
        events: bool = True,
        unknown_grace: float = UNKNOWN_GRACE,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        pool: str = "threads",
        app_spec: str | None = None,
        max_memory_per_child: int | None = None,
        autoscale: tuple[int, int] | None = None,
        autoscale_idle: float = AUTOSCALE_IDLE,
    ) -> None:
        self.app = app
        app.finalize()  # import include/autodiscover_tasks modules and @shared_task tasks before serving
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.pool = pool
        self.app_spec = app_spec
        """``module:attr`` the process pool's children import (None: found among the imported modules)."""
        if max_memory_per_child is not None and (max_memory_per_child < 1 or pool != "processes"):
            raise ValueError("max_memory_per_child must be >= 1 KB and needs pool='processes', got "
                             f"{max_memory_per_child} with pool={pool!r}")
        self.max_memory_per_child = max_memory_per_child
        if autoscale is not None:
            high, low = autoscale
            if not 1 <= low <= high:
                raise ValueError(f"autoscale is (max, min) with 1 <= min <= max, got {autoscale}")
            concurrency = low
        self.autoscale = autoscale
        self.autoscale_idle = autoscale_idle
        self.unknown_grace = unknown_grace
        self.max_tasks = max_tasks
        self.send_events = events
        self.queues = [check_queue_name(q) for q in (queues or [app.config.default_queue])]
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.grace = grace
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
        self.processed = 0
        self.failed = 0
        self.started_at = 0.0
        self.broker: Broker | None = None
        self._slots = Fetcher(concurrency, self._on_message, prefetch_bytes)
        self._inflight: set[Delivery] = set()
        self._waiting: collections.deque[Delivery] = collections.deque()
        """Deliveries that arrived while RPC calls held every slot: they start as slots free up."""
        self._runner: ThreadRunner | None = None
        self._pool: ProcessPool | None = None
        self._scaler: Autoscaler | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rpc_subs: list[Any] = []
        self._queue_subs: dict[str, list[Any]] = {}
        self.gate: Gate | None = None
        self._levels: Levels | None = None
        self._slot_freed = asyncio.Event()
        self._events = EventLog()
        self.listeners: list[Callable[[Batch], None]] = self._events.listeners
        """Callables given the lifecycle events in batches (event publisher, metrics)."""
        self._control: ControlResponder | None = None
        self._publisher: EventPublisher | None = None
        self.last_heartbeat = 0.0
        self._store: ResultStore | None = None
        self._revokes: Revokes | None = None
        self._outcome: Outcome | None = None
        self._rpc: Rpc | None = None
        self._process: Callable[[Delivery], Coroutine[Any, Any, None]]
        """Gate a delivery, then run and settle it (``Gate.process``, bound by ``start``)."""
        self.results_not_stored = 0
        """Outcomes this worker could not store because JetStream's storage was full (see README)."""
        self.storage_full_since: float | None = None
        """When result writes started failing for lack of storage (None: they succeed)."""
        self._failure: BrokerError | None = None  # why the worker stopped on its own
        self._stopping = False
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, create the queues' consumers and start consuming."""
        self._loop = asyncio.get_running_loop()
        self.broker = broker = Broker(self.app.config, on_reconnect=self._on_reconnect, on_closed=self._on_closed)
        await broker.connect()
        await broker.ensure_stream()
        await broker.ensure_dlq()
        await broker.results()  # fire-and-forget state writes need the bucket to exist
        self._runner = ThreadRunner(self.concurrency)
        if self.pool == "processes":
            spec = self.app_spec or find_app_spec(self.app)
            if spec is None:
                raise ValueError("pool='processes' needs the app's module:attr for its children to import: pass "
                                 "app_spec (the CLI passes -A)")
            self._pool = ProcessPool(spec, self.concurrency, self.max_memory_per_child)
            await self._pool.start()
        self._revokes = Revokes(broker, self._inflight)
        await self._revokes.start()
        self._outcome = outcome = Outcome(self.app, broker, self.store, self.ident, self.inboxes, self._events, self)
        execution = Execution(self._runner, outcome, self._events, self, self.ident, self.app.hooks, self._pool)
        self.gate = gate = Gate(self.app, broker, self.store, outcome, execution.task, self._revokes, self.inboxes,
                                self.unknown_grace)
        self._process = gate.process
        self._rpc = Rpc(self.app, broker, self.inboxes, execution.run, outcome.encode, self, self._done)
        # Everything that observes tasks is in place before the first one can arrive.
        self.started_at = time.time()
        self._control = ControlResponder(self)
        await self._control.start()
        if self.send_events:
            self._publisher = EventPublisher(broker, self.ident)
            self.listeners.append(self._publisher)
        self.event("worker-online", **self._control.stats())
        for queue in self.queues:
            await self._consume(queue)
        self._levels = Levels(broker, self._slots, self.queues)
        await self._levels.start()
        self._slots.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._keep_leases())
        if self.autoscale is not None:
            self._scaler = Autoscaler(self, *self.autoscale, idle=self.autoscale_idle)
        await self.app.hooks.call("on_worker_start", self)
        log.info("worker %s consuming %s (concurrency %d, %s pool) on %s", self.ident, ", ".join(self.queues),
                 self.concurrency, self.pool, self.app.config.safe_servers)

    async def run(self) -> None:
        """Start (unless started) and block until ``stop()`` completes; ``BrokerError`` if the
        worker stopped because its connection was closed for good (restart it)."""
        if self.broker is None:
            await self.start()
        await self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let in-flight tasks finish within ``grace`` seconds, nak the rest, close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        signals.worker_shutting_down.send(self.ident, sig=None, how="warm", exitcode=0)
        grace = self.grace if grace is None else grace
        for sub in self._rpc_subs:
            await quietly(sub.unsubscribe())
        if self._levels is not None:
            await self._levels.stop()
        await self._slots.stop()  # also ends the open pull requests: nothing comes back to us
        await self._drain(grace)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._scaler is not None:
            self._scaler.stop()
        if self._revokes is not None:
            self._revokes.stop()
        if self._control is not None:
            await self._control.stop()
            self.event("worker-offline", **self._control.stats())
            self._flush_events()
        if self._publisher is not None:
            await self._publisher.drain()
        await self._slots.close()
        if self._runner is not None:
            self._runner.shutdown()
        if self._pool is not None:
            self._pool.shutdown()
        await self.app.hooks.call("on_worker_stop", self)
        if self.broker is not None:
            await self.broker.close()
        self._stopped.set()
        log.info("worker %s stopped after %d task(s)", self.ident, self.processed)

    async def _drain(self, grace: float) -> None:
        """Hand back what never started; let what runs finish within ``grace`` seconds, then
        cancel it (its message goes back to the queue)."""
        while self._waiting:  # never started: straight back to the queue
            waiting = self._waiting.popleft()
            self._slots.release(waiting.msg)
            await quietly(waiting.msg.nak())
        if not self._inflight:
            return
        log.info("draining %d in-flight task(s) (grace %.0fs)", len(self._inflight), grace)
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            pending = [d.handler for d in self._inflight if d.handler is not None]
            log.warning("grace period over: returning %d unfinished task(s) to the queue", len(pending))
            for handler in pending:
                handler.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_reconnect(self) -> None:
        self._slots.reset()

    def _on_closed(self, error: BrokerError) -> None:
        # A connection nats-py closed for good never comes back, and nothing can be acked on it:
        # stop (the server redelivers the unacked tasks) so run() raises and a supervisor restarts us.
        if self._stopping:
            return
        self._failure = BrokerError(f"worker {self.ident} stopped: {error}")
        log.error("worker %s lost its NATS connection for good: stopping (in-flight tasks go back to the "
                  "queue after ack_wait); restart the worker", self.ident)
        self._background(self.stop(grace=0))

    async def _consume(self, queue: str) -> None:
        broker = self.broker_
        await broker.ensure_consumer(queue)
        await self._slots.add(broker, queue)
        # RPC: core request-reply beside the stream, same queue group name, same slots.
        subs = self._queue_subs[queue] = [
            await broker.subscribe(broker.names.rpc_filter(queue), queue=queue, cb=self._on_rpc)]
        if any(task.options.broadcast for task in self.app.tasks.values()):
            # Broadcasts: the same slots, but no queue group, so every worker of the queue gets each
            # one. Only an app with broadcast tasks listens (and needs the grant for it).
            subs.append(await broker.subscribe(broker.names.broadcast_filter(queue), cb=self._on_rpc))
        self._rpc_subs.extend(subs)

    async def add_queue(self, queue: str) -> bool:
        """Consume ``queue`` too, from now on (``natask control add_consumer``); False if it does already."""
        check_queue_name(queue)
        if queue in self.queues:
            return False
        await self._consume(queue)
        self.queues.append(queue)
        if self._levels is not None:
            await self._levels.watch(queue)
        log.info("worker %s consumes %s too", self.ident, queue)
        return True

    async def cancel_queue(self, queue: str) -> bool:
        """Stop consuming ``queue`` (``natask control cancel_consumer``): running tasks finish, what
        was not delivered goes to other workers; False if it is not consumed. ``ValueError`` for
        the last queue."""
        if queue not in self.queues:
            return False
        if len(self.queues) == 1:
            raise ValueError(f"{queue!r} is the only queue of worker {self.ident}: add another first (add_consumer)")
        self.queues.remove(queue)
        if self._levels is not None:
            self._levels.forget(queue)
        await self._slots.remove(queue)
        for sub in self._queue_subs.pop(queue, []):
            self._rpc_subs.remove(sub)
            await quietly(sub.unsubscribe())
        log.info("worker %s no longer consumes %s", self.ident, queue)
        return True

    def resize(self, concurrency: int) -> None:
        """Run up to ``concurrency`` tasks at once from now on (``--autoscale``): more slots are
        requested at once; fewer take effect as running tasks end."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self._slots.resize(concurrency)
        if self._runner is not None:
            self._runner.size = max(self._runner.size, concurrency)  # idle threads cost nothing
        if self._pool is not None:
            self._pool.resize(concurrency)

    def reserved(self) -> list[dict[str, Any]]:
        """Deliveries received and waiting for a slot (RPC calls held every slot when they came)."""
        return [{"id": d.task_id, "subject": d.msg.subject} for d in self._waiting]

    @property
    def revokes(self) -> Revokes | None:
        """The revoked ids and names this worker mirrors (None before start)."""
        return self._revokes

    def running(self) -> int:
        """Tasks and RPC calls holding a slot now."""
        return len(self._inflight)

    def backlog(self) -> int:
        """Messages waiting in this worker's queues, as their latest deliveries said (0: none known)."""
        return self._slots.backlog()

    # -- what others read -------------------------------------------------------------------
    @property
    def consuming(self) -> bool:
        """True while the worker asks for and runs tasks (started, not stopping)."""
        return self._slots.started and not self._stopping

    def active(self) -> list[dict[str, Any]]:
        """The tasks running now: id, name, start time, seconds running."""
        now = time.time()
        return [{"id": d.task_id, "name": d.name, "started": d.started_at, "runtime": now - d.started_at}
                for d in self._inflight if d.task_id]

    @property
    def store(self) -> ResultStore:
        """Compare-and-set access to the results bucket (a final outcome is stored once)."""
        if self._store is None or self._store.broker is not self.broker:
            self._store = ResultStore(self.broker_)
        return self._store

    @functools.cached_property
    def inboxes(self) -> tuple[str, ...]:
        """Inbox prefixes this worker answers on: nats-py's default and the app's own ``inbox_prefix``."""
        custom = self.app.config.connect_options.get("inbox_prefix")
        if isinstance(custom, bytes):
            custom = custom.decode(errors="replace")
        return (DEFAULT_INBOX_PREFIX, custom) if isinstance(custom, str) and custom else (DEFAULT_INBOX_PREFIX,)

    def event(self, kind: str, task_id: str | None = None, name: str | None = None, **fields: Any) -> None:
        """Record a lifecycle event; the listeners get the events of up to ``EVENTS_INTERVAL``
        seconds together (a batch costs about as much as one event)."""
        self._events.event(kind, task_id, name, **fields)

    def _flush_events(self) -> None:
        self._events.flush()

    @property
    def broker_(self) -> Broker:
        assert self.broker is not None, "worker not started"
        return self.broker

    # -- leases -----------------------------------------------------------------------------
    async def _keep_leases(self) -> None:
        # in_progress resets the server's ack timer, so ack_wait can stay short for long tasks.
        interval = max(0.2, min(HEARTBEAT_INTERVAL, self.app.config.ack_wait / 3))
        while True:
            await asyncio.sleep(interval)
            if self._control is not None and time.time() - self.last_heartbeat >= HEARTBEAT_INTERVAL:
                self.last_heartbeat = time.time()
                self.event("worker-heartbeat", **self._control.stats())
            now = time.monotonic()
            for delivery in [*self._inflight, *self._waiting]:
                if now - delivery.touched >= interval:
                    delivery.touched = now
                    try:
                        await delivery.msg.in_progress()
                    except Exception as e:
                        log.debug("in_progress failed: %s", e)

    # -- dispatch ---------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        if self._stopping:
            # Still-open pull requests deliver after stop(): hand those straight back.
            self._background(quietly(msg.nak()))
            self._slots.release(msg)
            return
        delivery = Delivery(msg)
        self._idle.clear()
        if len(self._inflight) >= self.concurrency:
            # RPC calls (pushed, not pulled) took the slots this message was requested for.
            self._waiting.append(delivery)
            return
        self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        self._inflight.add(delivery)
        delivery.handler = self._loop.create_task(self._handle(delivery))

    def _done(self, delivery: Delivery) -> None:
        self._inflight.discard(delivery)
        self._slots.release(delivery.msg)
        self._slot_freed.set()
        if self._waiting and not self._stopping:
            self._start(self._waiting.popleft())
        if self.max_tasks and self.processed + self.failed >= self.max_tasks and not self._stopping:
            log.info("processed %d task(s), the --max-tasks-per-child limit: exiting", self.max_tasks)
            self._background(self.stop())
        if not self._inflight and not self._waiting:
            self._idle.set()

    async def _on_rpc(self, msg: Message) -> None:
        # Pushed by core NATS: wait for a slot so RPCs share the worker's concurrency limit.
        while len(self._inflight) >= self.concurrency or self._waiting:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._slots.hold(msg)
        delivery = Delivery(msg)
        self._inflight.add(delivery)
        self._idle.clear()
        assert self._rpc is not None
        delivery.handler = self._loop.create_task(self._rpc.answer(delivery))

    async def _handle(self, delivery: Delivery) -> None:
        msg = delivery.msg
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            await quietly(msg.nak())
        except Exception as e:
            # A bug in natask, or the broker unreachable for longer than publish_timeout: give the
            # message back rather than lose it, a bounded number of times.
            await self._internal_error(delivery, e)
        finally:
            self._done(delivery)

    async def _internal_error(self, delivery: Delivery, e: Exception) -> None:
        msg, what = delivery.msg, delivery.task_id or "a message"
        if attempt(msg) < MAX_INTERNAL_ATTEMPTS:
            log.exception("internal error handling %s; returning it to the queue", what)
            await quietly(msg.nak(delay=INTERNAL_RETRY_DELAY))
            return
        log.exception("internal error handling %s, attempt %d: dead-lettering it", what, attempt(msg))
        try:
            assert self._outcome is not None
            await self._outcome.dead_letter(delivery, "internal error", f"{type(e).__name__}: {e}",
                                                 task_id=delivery.task_id)
        except Exception as again:
            log.error("cannot dead-letter %s either (%s); returning it to the queue", what, again)
            await quietly(msg.nak(delay=INTERNAL_RETRY_DELAY))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
