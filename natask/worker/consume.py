"""Worker: consume queues, run tasks with bounded concurrency, store results, ack, drain on stop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from nats.aio.msg import Msg

from .broker import Broker
from .broker.fetch import DEFAULT_PREFETCH_BYTES, Fetcher
from .config import check_queue_name
from .control import ControlResponder
from .dlq import index_dead_letter
from .errors import (
    BrokerError,
    DecodeError,
    EncodeError,
    Forged,
    PayloadTooLarge,
    StorageFull,
    TimeLimitExceeded,
    failure_record,
    type_name,
)
from .events import Batch, EventPublisher
from .message import Envelope, at_schedule, dumps, loads
from .naming import (
    DEFAULT_INBOX_PREFIX,
    HDR_CHECK_STORED,
    HDR_DLQ_ATTEMPTS,
    HDR_DLQ_ERROR,
    HDR_DLQ_ID,
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TIME,
    HDR_DLQ_TRUNCATED,
    HDR_MSG_ID,
    HDR_REPLAYS,
    HDR_REPLY,
    HDR_RETRIES,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    HDR_SCHEDULER,
    HDR_TASK,
    HDR_UNKNOWN_SINCE,
    TASK_ID_RE,
    is_queue_name,
    is_reply_for,
    is_reply_subject,
)
from .retry import Action, decide
from .runner import ThreadRunner
from .states import State
from .store import ResultStore, is_final
from .task import Request, Task, current_request

if TYPE_CHECKING:
    from .app import Natask

log = logging.getLogger("natask.worker")

DEFAULT_CONCURRENCY: Final = 32
HEARTBEAT_INTERVAL: Final = 5.0
"""Seconds between worker-heartbeat events."""
DEFAULT_GRACE: Final = 30.0
WATCH_RESTART_PAUSE: Final = 1.0
"""Seconds before the revoke watch is started again after it ended (no spin if the server refuses)."""
EVENTS_INTERVAL: Final = 0.05
"""Seconds a lifecycle event may wait to be sent with others."""
EVENTS_BATCH: Final = 1000
"""Events sent at once, without waiting out ``EVENTS_INTERVAL``."""
EVENT_TEXT: Final = 1000
"""Characters of an exception message an event carries (the result record has all of it)."""
UNKNOWN_GRACE: Final = 20.0
"""Seconds a message naming an unknown task keeps coming back (a rolling deploy: a worker with
newer code may know it) before it is dead-lettered; under SPEC's 30 s bound."""
UNKNOWN_STEP: Final = 5.0
"""Seconds between two looks at a message naming an unknown task."""
MAX_CLOCK_SKEW: Final = 60.0
"""A task delivered at most this long before its eta waits in the consumer (nak with a delay);
earlier ones go back to the server as a schedule."""
MAX_NAK_DELAY: Final = 300.0
"""Longest nak delay used when a message cannot be republished as a schedule."""
MAX_HEADER_INT: Final = 1_000_000
"""Largest value accepted in a counting header (``Natask-Retries``)."""
MAX_INTERNAL_ATTEMPTS: Final = 10
"""Deliveries of one message ending in an internal error before it is dead-lettered."""
INTERNAL_RETRY_DELAY: Final = 5.0
"""Seconds before a message that met an internal error is delivered again."""
RECORD_HEADROOM: Final = 1024
"""Bytes of ``max_payload`` kept free beside a result record (headers of its KV write)."""


class _Delivery:
    """One task message being worked on."""

    __slots__ = ("careful", "finished", "handler", "msg", "name", "result_seq", "revoked", "started", "started_at",
                 "superseded", "task_id", "touched", "writing")

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.started = self.touched = time.monotonic()
        self.started_at = time.time()
        self.task_id = ""
        self.name = ""
        self.revoked = False
        self.finished = False
        self.handler: asyncio.Task[None] | None = None
        self.result_seq: int | None = None
        """The task's results key revision as this delivery knows it (None: unknown, read first)."""
        self.careful = False
        """This delivery may repeat a finished run: store before replying."""
        self.superseded = False
        """Another run stored the final outcome first: this one's writes are dropped."""
        self.writing: asyncio.Task[None] | None = None
        """The last state write of this delivery (writes are chained, in order)."""


class Worker:
    """Runs an app's tasks from one or more queues in this process.

    ``await worker.start()`` then ``await worker.stop()`` (or ``async with``); ``run()`` blocks
    until ``stop()`` is called (the CLI wires SIGTERM/SIGINT to it). ``prefetch_bytes``: the bytes
    of task messages it holds and has asked for at most (README, "Workers": fetching).
    """

    def __init__(
        self,
        app: Natask,
        queues: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        grace: float = DEFAULT_GRACE,
        max_tasks: int | None = None,
        events: bool = True,
        unknown_grace: float = UNKNOWN_GRACE,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    ) -> None:
        self.app = app
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
        self._inflight: set[_Delivery] = set()
        self._waiting: collections.deque[_Delivery] = collections.deque()
        """Deliveries that arrived while RPC calls held every slot: they start as slots free up."""
        self._runner: ThreadRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._revoked: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rpc_subs: list[Any] = []
        self._slot_freed = asyncio.Event()
        self.listeners: list[Callable[[Batch], None]] = []
        """Callables given the lifecycle events in batches (event publisher, metrics)."""
        self._event_batch: Batch = {}
        self._event_count = 0
        self._event_timer: asyncio.TimerHandle | None = None
        # The two events of every task are noted as cheaply as possible and made rows on flush.
        self._started: list[tuple[float, str, str, int]] = []
        self._succeeded: list[tuple[float, str, str]] = []
        self._control: ControlResponder | None = None
        self._events: EventPublisher | None = None
        self.last_heartbeat = 0.0
        self._revoke_watch: asyncio.Task[None] | None = None
        self._store: ResultStore | None = None
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
        self._loop_thread = threading.get_ident()
        self.broker = broker = Broker(self.app.config, on_reconnect=self._on_reconnect, on_closed=self._on_closed)
        await broker.connect()
        await broker.ensure_stream()
        await broker.ensure_dlq()
        await broker.results()  # fire-and-forget state writes need the bucket to exist
        self._runner = ThreadRunner(self.concurrency)
        await self._watch_revokes()
        # Everything that observes tasks is in place before the first one can arrive.
        self.started_at = time.time()
        self._control = ControlResponder(self)
        await self._control.start()
        if self.send_events:
            self._events = EventPublisher(broker, self.ident)
            self.listeners.append(self._events)
        self.event("worker-online", **self._control.stats())
        for queue in self.queues:
            await broker.ensure_consumer(queue)
            await self._slots.add(broker, queue)
            # RPC: core request-reply beside the stream, same queue group name, same slots.
            self._rpc_subs.append(await broker.subscribe(
                f"natask.rpc.{broker.names.prefix}.{queue}.>", queue=queue, cb=self._on_rpc))
        self._slots.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._keep_leases())
        log.info("worker %s consuming %s (concurrency %d) on %s", self.ident, ", ".join(self.queues),
                 self.concurrency, self.app.config.safe_servers)

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
        grace = self.grace if grace is None else grace
        for sub in self._rpc_subs:
            await _quietly(sub.unsubscribe())
        await self._slots.stop()  # also ends the open pull requests: nothing comes back to us
        while self._waiting:  # never started: straight back to the queue
            waiting = self._waiting.popleft()
            self._slots.release(waiting.msg)
            await _quietly(waiting.msg.nak())
        if self._inflight:
            log.info("draining %d in-flight task(s) (grace %.0fs)", len(self._inflight), grace)
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                pending = [d.handler for d in self._inflight if d.handler is not None]
                log.warning("grace period over: returning %d unfinished task(s) to the queue", len(pending))
                for handler in pending:
                    handler.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for background in (self._heartbeat, self._revoke_watch):
            if background is not None:
                background.cancel()
        if self._control is not None:
            await self._control.stop()
            self.event("worker-offline", **self._control.stats())
            self._flush_events()
        if self._events is not None:
            await self._events.drain()
        await self._slots.close()
        if self._runner is not None:
            self._runner.shutdown()
        if self.broker is not None:
            await self.broker.close()
        self._stopped.set()
        log.info("worker %s stopped after %d task(s)", self.ident, self.processed)

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

    async def _watch_revokes(self) -> None:
        """Mirror the revoked-ids bucket into a local set: no KV read per task, and revokes
        recorded before this worker started still apply. The broker's watch outlives a deleted
        bucket or a restarted server; should it end anyway, it is started again."""
        broker = self.broker_
        loaded = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            while True:
                try:
                    async with contextlib.aclosing(broker.watch(broker.names.revoked_bucket)) as entries:
                        async for entry in entries:
                            if entry is None:
                                if not loaded.done():
                                    loaded.set_result(None)
                                continue
                            self._on_revoke(entry.key, entry.value, entry.operation)
                    why = "it ended"
                except Exception as e:
                    if not loaded.done():
                        loaded.set_exception(e)
                        return
                    why = f"it failed: {e}"
                if broker.closed:
                    return
                log.warning("revoke watch stopped (%s): starting it again", why)
                await asyncio.sleep(WATCH_RESTART_PAUSE)

        self._revoke_watch = asyncio.get_running_loop().create_task(follow())
        await asyncio.wait_for(loaded, 10)

    def _on_revoke(self, task_id: str, value: bytes | None, operation: str | None) -> None:
        if operation in ("DEL", "PURGE") or not value:
            self._revoked.discard(task_id)
            return
        self._revoked.add(task_id)
        try:
            terminate = bool(loads(value).get("terminate"))
        except Exception:
            terminate = False
        if terminate:
            self._terminate(task_id)

    def _terminate(self, task_id: str) -> None:
        for delivery in self._inflight:
            if delivery.task_id == task_id and delivery.handler is not None and not delivery.revoked:
                delivery.revoked = True
                delivery.handler.cancel()
                log.info("terminating revoked task %s", task_id)

    @property
    def consuming(self) -> bool:
        """True while the worker asks for and runs tasks (started, not stopping)."""
        return self._slots.started and not self._stopping

    def active(self) -> list[dict[str, Any]]:
        """The tasks running now: id, name, start time, seconds running."""
        now = time.time()
        return [{"id": d.task_id, "name": d.name, "started": d.started_at, "runtime": now - d.started_at}
                for d in self._inflight if d.task_id]

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
    def _on_message(self, msg: Msg) -> None:
        if self._stopping:
            # Still-open pull requests deliver after stop(): hand those straight back.
            self._background(_quietly(msg.nak()))
            self._slots.release(msg)
            return
        delivery = _Delivery(msg)
        self._idle.clear()
        if len(self._inflight) >= self.concurrency:
            # RPC calls (pushed, not pulled) took the slots this message was requested for.
            self._waiting.append(delivery)
            return
        self._start(delivery)

    def _start(self, delivery: _Delivery) -> None:
        self._inflight.add(delivery)
        delivery.handler = self._loop.create_task(self._handle(delivery))

    def _done(self, delivery: _Delivery) -> None:
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

    async def _on_rpc(self, msg: Msg) -> None:
        # Pushed by core NATS: wait for a slot so RPCs share the worker's concurrency limit.
        while len(self._inflight) >= self.concurrency or self._waiting:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._slots.hold(msg)
        delivery = _Delivery(msg)
        self._inflight.add(delivery)
        self._idle.clear()
        delivery.handler = self._loop.create_task(self._answer(delivery))

    async def _answer(self, delivery: _Delivery) -> None:
        """Run an RPC call and reply with its outcome record; nothing is stored or acked."""
        msg = delivery.msg
        try:
            if not is_reply_subject(msg.reply, self.inboxes):
                # The reply subject is the sender's choice: answering elsewhere would write with our rights.
                log.warning("RPC on %s without an inbox reply subject: not run", _cut(msg.subject))
                return
            try:
                record = await self._call(msg)
            except Exception as exc:
                record = failure_record(exc)
            await self.broker_.publish_core(msg.reply, self._encode(record, "the RPC call")[0])
        finally:
            self._done(delivery)

    async def _call(self, msg: Msg) -> dict[str, Any]:
        route = self.app.names.task_from_rpc_subject(msg.subject)
        if route is None:
            raise Forged(f"invalid RPC subject {_cut(msg.subject)}")
        env = Envelope.decode(msg.data, msg.headers)
        if env.task != route[1]:
            raise Forged(f"the message names task {env.task!r} but was sent to {route[1]!r}")
        task = self.app.get_task(env.task)
        args, kwargs = task.bind_call(env.args, env.kwargs)
        request = Request(id=env.id, task=env.task, args=args, kwargs=kwargs, queue=route[0],
                          headers=msg.headers or {})
        value = await self._run(task, args, kwargs, request)
        self.processed += 1
        return {"state": State.SUCCESS.value, "result": value}

    async def _handle(self, delivery: _Delivery) -> None:
        msg = delivery.msg
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            await _quietly(msg.nak())
        except Exception as e:
            # A bug in natask, or the broker unreachable for longer than publish_timeout: give the
            # message back rather than lose it, a bounded number of times.
            what = delivery.task_id or "a message"
            if delivered(msg) < MAX_INTERNAL_ATTEMPTS:
                log.exception("internal error handling %s; returning it to the queue", what)
                await _quietly(msg.nak(delay=INTERNAL_RETRY_DELAY))
                return
            log.exception("internal error handling %s, attempt %d: dead-lettering it", what, delivered(msg))
            try:
                await self._dead_letter(delivery, "internal error", f"{type(e).__name__}: {e}",
                                        task_id=delivery.task_id)
            except Exception as again:
                log.error("cannot dead-letter %s either (%s); returning it to the queue", what, again)
                await _quietly(msg.nak(delay=INTERNAL_RETRY_DELAY))
        finally:
            self._done(delivery)

    async def _process(self, delivery: _Delivery) -> None:
        """Gate a delivery (the subject decides which task it may run; every header and body field
        is validated), then run it and settle its outcome."""
        msg = delivery.msg
        headers = msg.headers or {}
        route = self.app.names.task_from_subject(msg.subject)
        if route is None:
            await self._dead_letter(delivery, "invalid subject",
                                    f"{_cut(msg.subject)} is not <prefix>.<queue>.<task name>")
            return
        delivery.name = route[1]
        try:
            env = Envelope.decode(msg.data, headers)
        except DecodeError as e:
            task_id = headers.get(HDR_MSG_ID, "").split(":")[0]
            await self._dead_letter(delivery, "undecodable", str(e),
                                    task_id=task_id if TASK_ID_RE.match(task_id) else "")
            return
        delivery.task_id = env.id
        if env.task != route[1]:
            await self._dead_letter(delivery, "forged", f"the message names task {_cut(env.task)} but was "
                                    f"published on {msg.subject}, the subject permissions are checked on", env=env)
            return
        scheduler = headers.get(HDR_SCHEDULER)
        if scheduler is not None and scheduler != self.app.names.schedule_subject(route[0], env.id):
            # NATS checks a schedule's own subject, not its target: a sender allowed to delay tasks of
            # one queue could otherwise enqueue, through a schedule, on any subject of the stream.
            await self._dead_letter(delivery, "forged", f"fired by the schedule {_cut(scheduler)}, not by this "
                                    f"queue's schedule for task {env.id}", env=env)
            return
        retried = _header_int(headers, HDR_RETRIES)
        if retried is None:
            await self._dead_letter(delivery, "malformed header", f"{HDR_RETRIES} must be an integer from 0 to "
                                    f"{MAX_HEADER_INT}, got {_cut(headers.get(HDR_RETRIES))}", env=env)
            return
        reply = headers.get(HDR_REPLY)
        if reply is not None and not is_reply_for(reply, env.id, self.inboxes):
            await self._dead_letter(delivery, "forged", f"{HDR_REPLY} {_cut(reply)} is not an inbox subject for "
                                    "this task: results go only to the caller's inbox", env=env)
            return
        task = self.app.tasks.get(env.task)
        if task is None:
            await self._unknown(delivery, env)
            return
        attempt = delivered(msg)
        retries = retried + attempt - 1
        now = time.time()
        if env.id in self._revoked:
            await self._finish(delivery, env, task, {"state": State.REVOKED.value, "info": {"reason": "revoked"}})
            return
        if env.expires is not None and now > env.expires:
            await self._finish(delivery, env, task, {"state": State.REVOKED.value, "info": {"reason": "expired"}})
            return
        if env.eta is not None and env.eta > now + 0.001:
            await self._early(delivery, env, now)
            return
        limit = task.options.max_retries
        if limit is not None and retries > limit:
            # Deliveries beyond the limit mean earlier attempts crashed their worker.
            await self._dead_letter(delivery, "max retries exceeded",
                                    f"{retries} attempt(s) ended without an outcome (worker crashed?)", env=env)
            return
        try:
            args, kwargs = task.bind_call(env.args, env.kwargs)
        except TypeError as e:
            await self._dead_letter(delivery, "arguments do not bind", str(e), env=env)
            return
        if task.options.ignore_result:
            pass  # nothing stored: nothing to check or fence
        elif attempt == 1 and not retried and HDR_CHECK_STORED not in headers and HDR_REPLAYS not in headers:
            delivery.result_seq = 0  # a first delivery of a fresh id: its key holds nothing yet
        else:
            delivery.careful = True
            if await self._done_before(delivery, env, reply):
                return
        request = Request(id=env.id, task=env.task, retries=retries, args=args, kwargs=kwargs,
                          queue=route[0], parent_id=env.parent_id, root_id=env.root_id,
                          eta=env.eta, expires=env.expires, headers=headers,
                          report=lambda state, meta: self._report(delivery, state, meta))
        current_request.set(request)  # log lines about this task, from here on, carry its id and name
        if self.listeners:
            self._started.append((delivery.started_at, env.id, env.task, retries))
            if self._event_timer is None:
                self._arm_events()
        if task.options.track_started and not task.options.ignore_result:
            self._write_state(delivery, dumps({"state": State.STARTED.value, "info": {"worker": self.ident}}))
        try:
            value = await self._run(task, args, kwargs, request)
        except asyncio.CancelledError:
            delivery.finished = True
            if not delivery.revoked:
                raise
            await self._finish(delivery, env, task, {"state": State.REVOKED.value, "info": {"reason": "terminated"}})
            return
        except Exception as exc:
            delivery.finished = True
            await self._failed(delivery, env, task, exc, retries)
            return
        delivery.finished = True
        self.processed += 1
        await self._finish(delivery, env, task, {"state": State.SUCCESS.value, "result": value}, retries)

    async def _done_before(self, delivery: _Delivery, env: Envelope, reply: str | None) -> bool:
        """For a delivery that may repeat a finished run (a redelivery, a retry, an id published
        again): True, after acking it, if a final outcome is stored already (JetStream's dedupe
        forgets acknowledged ids when the server restarts; this check does not)."""
        seq, record = await self.store.read(env.id)
        delivery.result_seq = seq
        if not is_final(record):
            return False
        assert record is not None
        log.info("task %s[%s] has a stored outcome (%s): not run again", env.task, env.id, record.get("state"))
        if reply:
            await self.broker_.publish_core(reply, dumps(record))
        await delivery.msg.ack()
        return True

    async def _unknown(self, delivery: _Delivery, env: Envelope) -> None:
        """A task name this worker does not know: during a rolling deploy a worker with newer code
        may know it, so the message goes back (held by the server, not by a slot) until
        ``unknown_grace`` has passed since a worker first met it; then it is dead-lettered."""
        msg, now = delivery.msg, time.time()
        raw = (msg.headers or {}).get(HDR_UNKNOWN_SINCE)
        since = now if raw is None else _header_time(raw, now)
        if since is None:
            await self._dead_letter(delivery, "malformed header", f"{HDR_UNKNOWN_SINCE} must be a Unix time no "
                                    f"later than now, got {_cut(raw)}", env=env)
            return
        if now - since >= self.unknown_grace:
            await self._dead_letter(delivery, "unknown task", f"no task named {env.task!r} in app {self.app.name!r} "
                                    f"(waited {now - since:.0f}s for a worker that knows it)", env=env)
            return
        log.warning("task %s[%s]: no task of that name here; giving workers with newer code %.0fs more to take it",
                    env.task, env.id, self.unknown_grace - (now - since))
        await self._schedule_again(delivery, env, now + UNKNOWN_STEP, "grace", {HDR_UNKNOWN_SINCE: f"{since:.6f}"})

    async def _early(self, delivery: _Delivery, env: Envelope, now: float) -> None:
        """Delivered before its eta. By a little: the server's clock is behind ours, wait it out.
        By more (published straight to the queue, or a badly skewed clock): hand it back to the
        server as a schedule, so no slot and no ack-pending place is held while it waits."""
        assert env.eta is not None
        if env.eta - now <= MAX_CLOCK_SKEW:
            await delivery.msg.nak(delay=env.eta - now)
            return
        await self._schedule_again(delivery, env, env.eta, "eta", {})

    async def _schedule_again(self, delivery: _Delivery, env: Envelope, when: float, kind: str,
                              extra: dict[str, str]) -> None:
        """Republish this message as a server-held schedule firing at ``when``, then ack it. The
        message id is derived from this message's stream sequence, so a crash between publish and
        ack cannot enqueue it twice."""
        msg = delivery.msg
        queue, _ = self.app.names.task_from_subject(msg.subject) or ("_", "")
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(extra)
        headers[HDR_MSG_ID] = f"{env.id}:{kind}{msg.metadata.sequence.stream}"
        headers[HDR_SCHEDULE] = at_schedule(when)
        headers[HDR_SCHEDULE_TARGET] = msg.subject
        try:
            await self.broker_.publish(self.app.names.schedule_subject(queue, env.id), msg.data, headers)
        except (PayloadTooLarge, StorageFull):  # no room for the schedule: wait in the consumer instead
            await msg.nak(delay=min(MAX_NAK_DELAY, max(0.0, when - time.time())))
            return
        await msg.ack()

    async def _run(self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any],
                   request: Request) -> Any:
        fn, limit = task.fn, task.options.time_limit
        if task.options.bind:
            args = (task, *args)
        if task.is_async:
            current_request.set(request)
            if limit is None:
                return await fn(*args, **kwargs)
            try:
                return await asyncio.wait_for(fn(*args, **kwargs), limit)
            except asyncio.TimeoutError:
                raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {limit:g}s") from None
        assert self._runner is not None
        future = self._runner.run(fn, args, kwargs, request)
        if limit is None:
            return await future
        try:
            # The thread cannot be stopped: it runs on, its outcome is ignored (see README).
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except asyncio.TimeoutError:
            raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {limit:g}s") from None

    # -- outcomes ---------------------------------------------------------------------------
    async def _failed(self, delivery: _Delivery, env: Envelope, task: Task[Any, Any], exc: Exception,
                      retries: int) -> None:
        decision = decide(exc, task.options, retries)
        cause = getattr(exc, "exc", None) or exc
        if decision.action is Action.RETRY:
            await self._retry(delivery, env, task, cause, retries, decision.countdown)
            return
        self.failed += 1
        record = failure_record(cause)
        if decision.action is Action.REJECT:
            await self._dead_letter(delivery, "rejected", decision.reason, env=env, record=record)
            return
        if decision.reason:  # retries exhausted
            await self._dead_letter(delivery, decision.reason, f"{record['exc_type']}: {record['message']}",
                                    env=env, record=record)
            return
        log.warning("task %s[%s] failed: %s: %s", env.task, env.id, record["exc_type"], record["message"])
        await self._finish(delivery, env, task, record, retries)

    async def _retry(self, delivery: _Delivery, env: Envelope, task: Task[Any, Any], exc: BaseException,
                     retries: int, countdown: float) -> None:
        """Publish the message again as a server-held schedule (also for a zero countdown: workers
        need no right to enqueue on task subjects) with the derived id ``<task id>:<n>``."""
        msg = delivery.msg
        n = retries + 1
        queue, _ = self.app.names.task_from_subject(msg.subject) or ("_", "")
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers[HDR_MSG_ID] = f"{env.id}:{n}"
        headers[HDR_RETRIES] = str(n)
        headers[HDR_SCHEDULE] = at_schedule(time.time() + countdown)
        headers[HDR_SCHEDULE_TARGET] = msg.subject
        try:
            await self.broker_.publish(self.app.names.schedule_subject(queue, env.id), msg.data, headers)
        except (PayloadTooLarge, StorageFull) as e:
            # No room for the retry headers next to this payload, or none in the store: let
            # JetStream redeliver it instead (the delivery count carries the attempt; the wait counts
            # against max_ack_pending).
            log.warning("task %s[%s]: retry %d waits in the queue (%s)", env.task, env.id, n, e)
            await msg.nak(delay=countdown)
            return
        if not task.options.ignore_result:
            info = {"retries": n, "countdown": countdown, "exc_type": type_name(type(exc)), "message": str(exc)}
            self._write_state(delivery, dumps({"state": State.RETRY.value, "info": info}))
            await self._writes_of(delivery)
        log.info("task %s[%s] retry %d in %.2fs: %r", env.task, env.id, n, countdown, exc)
        if self.listeners:
            self.event("task-retried", env.id, env.task, retries=n, countdown=countdown,
                       exc_type=type_name(type(exc)), message=str(exc)[:EVENT_TEXT])
        await msg.ack()

    def _report(self, delivery: _Delivery, state: str, meta: Any) -> None:
        """update_state from a task, on the loop or from a worker thread."""
        data = dumps({"state": state, "info": meta, "worker": self.ident})  # EncodeError goes to the task
        self.broker_.check_size(self.store.subject(delivery.task_id), data, {})  # PayloadTooLarge too

        def store() -> None:
            if not delivery.finished:  # the final outcome is being written: this state is stale
                self._write_state(delivery, data)

        if threading.get_ident() == self._loop_thread:
            store()
        else:
            self._loop.call_soon_threadsafe(store)

    def _write_state(self, delivery: _Delivery, data: bytes) -> None:
        """Store a non-final state (STARTED, RETRY, a custom one) in the background, after this
        delivery's earlier writes, never over a final outcome."""
        before = delivery.writing

        async def write() -> None:
            if before is not None:
                await asyncio.wait({before})
            if delivery.superseded:
                return
            try:
                seq, final = await self.store.write(delivery.task_id, data, delivery.result_seq)
            except Exception as e:
                delivery.result_seq = None  # we no longer know the key's revision: read it next time
                log.warning("task %s: cannot store its state: %s", delivery.task_id, e)
                return
            if final is None:
                delivery.result_seq = seq
            else:  # never compare-and-set against a final record's revision: read again next time
                delivery.result_seq = None
                self._superseded(delivery, final)

        delivery.writing = self._loop.create_task(write())

    async def _writes_of(self, delivery: _Delivery) -> None:
        if delivery.writing is not None:
            await asyncio.wait({delivery.writing})

    def _superseded(self, delivery: _Delivery, final: dict[str, Any]) -> None:
        if not delivery.superseded:
            delivery.superseded = True
            log.warning("task %s has a final outcome (%s) stored by another run (this worker lost its lease?): "
                        "this run's states and outcome are dropped", delivery.task_id, final.get("state"))

    def _background(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def event(self, kind: str, task_id: str | None = None, name: str | None = None, **fields: Any) -> None:
        """Record a lifecycle event; the listeners get the events of up to ``EVENTS_INTERVAL``
        seconds together (a batch costs about as much as one event)."""
        rows = self._event_batch.get(kind)
        if rows is None:
            rows = self._event_batch[kind] = []
        rows.append((time.time(), task_id, name, fields or None))
        self._event_count += 1
        if self._event_count >= EVENTS_BATCH:
            self._flush_events()
        elif self._event_timer is None:
            self._arm_events()

    def _arm_events(self) -> None:
        self._event_timer = self._loop.call_later(EVENTS_INTERVAL, self._flush_events)

    def _flush_events(self) -> None:
        if self._event_timer is not None:
            self._event_timer.cancel()
            self._event_timer = None
        batch: Batch = {}
        if self._started:  # first: a subscriber reading the messages in order sees starts first
            batch["task-started"] = [(ts, task_id, name, {"retries": retries} if retries else None)
                                     for ts, task_id, name, retries in self._started]
            self._started = []
        batch.update(self._event_batch)
        self._event_batch, self._event_count = {}, 0
        if self._succeeded:
            batch["task-succeeded"] = [(ts, task_id, name, None) for ts, task_id, name in self._succeeded]
            self._succeeded = []
        if not batch:
            return
        for listener in self.listeners:
            try:
                listener(batch)
            except Exception:
                log.exception("event listener %r failed", listener)

    def _encode(self, record: dict[str, Any], what: str) -> tuple[bytes, dict[str, Any]]:
        """A record and its bytes; a result that cannot be encoded, or too large for the server's
        ``max_payload``, becomes the FAILURE the caller gets instead (after one run: never a
        redelivery loop)."""
        try:
            data = dumps(record)
        except EncodeError as e:
            record = failure_record(EncodeError(f"the result of {what} cannot be encoded: {e}")) | _meta(record)
            return dumps(record), record
        limit = self.broker_.nc.max_payload - RECORD_HEADROOM
        if len(data) <= limit:
            return data, record
        error = PayloadTooLarge(f"the result of {what} is {len(data)} bytes encoded, over the {limit} bytes the "
                                "server's max_payload leaves for it: return a reference (a URL, an object key) "
                                "instead of the data", len(data), limit)
        record = failure_record(error) | _meta(record)
        return dumps(record), record

    async def _finish(self, delivery: _Delivery, env: Envelope, task: Task[Any, Any] | None,
                      record: dict[str, Any], retries: int = 0) -> None:
        """Run workflow follow-ups, send the outcome to the caller, store it (once: the first final
        outcome wins), then ack — in that order."""
        msg = delivery.msg
        ignore = task is not None and task.options.ignore_result
        if env.links or env.meta:
            from .canvas import on_outcome

            if record["state"] == State.SUCCESS:
                record = self._encode(record, env.task)[1]  # the workflow sees a result it cannot carry fail
            await on_outcome(self, env, record)
        if self.listeners:
            self._note_outcome(env, record)
        if not ignore:
            record.update(task=env.task, worker=self.ident, date_done=time.time(), retries=retries)
            if env.parent_id:
                record.update(parent_id=env.parent_id, root_id=env.root_id)
            data, record = self._encode(record, env.task)
            reply = (msg.headers or {}).get(HDR_REPLY)
            fast = not delivery.careful and delivery.writing is None
            if reply and fast:
                # A fresh id's first run: nobody else can have stored an outcome, so the caller need
                # not wait for the store's acknowledgement.
                await self.broker_.publish_core(reply, data)
            await self._writes_of(delivery)
            final = await self._store_final(delivery, env, data)
            if reply and not fast:
                await self.broker_.publish_core(reply, data if final is None else dumps(final))
        await msg.ack()

    async def _store_final(self, delivery: _Delivery, env: Envelope, data: bytes) -> dict[str, Any] | None:
        """Store the outcome unless one is stored already; that one, if so.

        With JetStream's storage full the outcome is not stored, and the task is acked anyway (the
        caller still gets the reply): running it again would not make room, and acking frees the
        task's own message. The condition shows in health, stats and metrics until a write succeeds.
        """
        try:
            seq, final = await self.store.write(env.id, data, delivery.result_seq)
        except StorageFull as e:
            self.results_not_stored += 1
            if self.storage_full_since is None:
                self.storage_full_since = time.time()
            log.error("task %s[%s]: outcome not stored (%s); acking it anyway, it will not run again",
                      env.task, env.id, e)
            return None
        self.storage_full_since = None
        delivery.result_seq = seq if final is None else None
        if final is not None:
            self._superseded(delivery, final)
        return final

    def _note_outcome(self, env: Envelope, record: dict[str, Any]) -> None:
        state = record["state"]
        if state == State.SUCCESS:
            self._succeeded.append((time.time(), env.id, env.task))
            if self._event_timer is None:
                self._arm_events()
        elif state == State.FAILURE:
            self.event("task-failed", env.id, env.task, exc_type=record.get("exc_type"),
                       message=str(record.get("message", ""))[:EVENT_TEXT])
        elif state == State.REVOKED:
            self.event("task-revoked", env.id, env.task, reason=(record.get("info") or {}).get("reason"))
        else:
            self.event("task-finished", env.id, env.task, state=state)

    async def _dead_letter(self, delivery: _Delivery, reason: str, error: str, *, env: Envelope | None = None,
                           task_id: str = "", record: dict[str, Any] | None = None) -> None:
        """Move a message to NATASK_DLQ with why, then ack it; the caller gets a FAILURE result.

        The entry's subject is built from the validated subject the message arrived on (never from
        its body or headers), and the entry is cut to fit ``max_payload``: a message crafted to make
        the dead-letter publish oversized or its subject too long cannot cost the connection.
        """
        msg, broker = delivery.msg, self.broker_
        route = self.app.names.task_from_subject(msg.subject)
        queue, name = route if route is not None else (_queue_token(msg.subject, broker.names.prefix), "_invalid")
        task_id = env.id if env is not None else task_id
        meta = msg.metadata
        retried = _header_int(msg.headers or {}, HDR_RETRIES) or 0
        ours = {
            HDR_TASK: name,  # the name its subject proves, not whatever a header claimed
            HDR_DLQ_REASON: reason,
            HDR_DLQ_ERROR: _one_line(error)[:1000],
            HDR_DLQ_ATTEMPTS: str(retried + meta.num_delivered),
            HDR_DLQ_TIME: f"{time.time():.6f}",
            HDR_DLQ_SUBJECT: msg.subject,
            HDR_DLQ_ID: task_id or f"seq-{meta.sequence.stream}",
        }
        subject = broker.names.dlq_subject(queue, name)
        # Nats-* headers (schedule, dedupe id) belong to the original publish, not to the DLQ entry.
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")} | ours
        data = msg.data
        try:
            broker.check_size(subject, data, headers)
        except PayloadTooLarge:
            headers = {k: v for k, v in headers.items() if k.startswith("Natask-")} | ours
            try:
                broker.check_size(subject, data, headers)
            except PayloadTooLarge:
                headers[HDR_DLQ_TRUNCATED] = str(len(data))  # the body cannot travel with its reasons
                data = b""
        try:
            published = await broker.publish(subject, data, headers)
        except StorageFull as e:
            # Nowhere to keep it: it stays in its queue and is looked at again later (not run).
            log.error("cannot dead-letter %s (%s): %s; it waits in the queue", task_id or "a message", reason, e)
            await msg.nak(delay=MAX_NAK_DELAY)
            return
        await index_dead_letter(broker, ours[HDR_DLQ_ID], published.seq)
        log.error("dead-lettered %s (%s): %s", task_id or f"message #{meta.sequence.stream}", reason,
                  ours[HDR_DLQ_ERROR])
        self.failed += 1
        if task_id and reason not in _UNTRUSTED:
            if record is None:
                record = {"state": State.FAILURE.value, "exc_type": _DLQ_EXC_TYPES.get(reason, "natask.DeadLettered"),
                          "message": error, "traceback": ""}
            task = self.app.tasks.get(name)
            await self._finish(delivery, env or Envelope(id=task_id, task=name), task, dict(record))
        else:
            await msg.ack()

    @property
    def broker_(self) -> Broker:
        assert self.broker is not None, "worker not started"
        return self.broker


_DLQ_EXC_TYPES: Final = {
    "unknown task": "natask.TaskNotFound",
    "arguments do not bind": "TypeError",
    "undecodable": "natask.DecodeError",
    "max retries exceeded": "natask.WorkerLost",
    "forged": "natask.Forged",
}
"""The exception type a caller sees for a message dead-lettered before it could run."""
_UNTRUSTED: Final = frozenset({"forged", "malformed header", "invalid subject"})
"""Dead-letter reasons that make the message's own claims (its id, its reply subject) untrusted:
no outcome is stored or sent for them, or the sender could write another task's result."""


def delivered(msg: Msg) -> int:
    """How many times the server has delivered ``msg``, read from its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``)
    without building nats-py's whole ``Metadata`` (a datetime among others) per task."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4])
    return msg.metadata.num_delivered  # the longer layouts (domains, account hashes)


def _header_int(headers: dict[str, str], name: str) -> int | None:
    """A non-negative integer header (absent: 0); None when malformed or beyond ``MAX_HEADER_INT``."""
    raw = headers.get(name)
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) > MAX_HEADER_INT:
        return None
    return int(raw)


def _header_time(raw: str, now: float) -> float | None:
    """A Unix time header no later than ``now`` (plus clock skew); None when malformed."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= now + MAX_CLOCK_SKEW else None


def _queue_token(subject: str, prefix: str) -> str:
    token = subject[len(prefix) + 1:].partition(".")[0] if subject.startswith(prefix + ".") else ""
    return token if is_queue_name(token) else "_invalid"


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k in _META_KEYS}


_META_KEYS: Final = frozenset({"task", "worker", "date_done", "retries", "parent_id", "root_id", "children"})


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cut(value: object, limit: int = 120) -> str:
    """A wire value for a log line or an error: repr'd (control characters escaped) and bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception as e:
        log.debug("ignored: %s", e)
