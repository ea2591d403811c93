"""Worker: consume queues, run tasks with bounded concurrency, store results, ack, drain on stop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from nats.aio.msg import Msg

import natask

from .broker import Broker
from .config import check_queue_name
from .consumer import PullConsumer, Slots
from .control import ControlResponder
from .dlq import (
    HDR_DLQ_ATTEMPTS,
    HDR_DLQ_ERROR,
    HDR_DLQ_ID,
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TIME,
    index_dead_letter,
)
from .errors import DecodeError, EncodeError, TimeLimitExceeded
from .events import Batch, EventPublisher
from .message import (
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    HDR_TASK,
    TASK_ID_RE,
    Envelope,
    at_schedule,
    dumps,
    loads,
)
from .result import FAILURE, RETRY, REVOKED, STARTED, SUCCESS
from .retry import decide
from .runner import ThreadRunner
from .task import Request, Task, current_request

if TYPE_CHECKING:
    from .app import Natask

log = logging.getLogger("natask.worker")

HDR_RETRIES: Final = "Natask-Retries"
"""How many times the task was retried before this message (republishes carry it)."""

DEFAULT_CONCURRENCY: Final = 32
HEARTBEAT_INTERVAL: Final = 5.0
"""Seconds between worker-heartbeat events."""
DEFAULT_GRACE: Final = 30.0
EVENTS_INTERVAL: Final = 0.05
"""Seconds a lifecycle event may wait to be sent with others."""
EVENTS_BATCH: Final = 1000
"""Events sent at once, without waiting out ``EVENTS_INTERVAL``."""
EVENT_TEXT: Final = 1000
"""Characters of an exception message an event carries (the result record has all of it)."""


class _Delivery:
    """One task message being worked on."""

    __slots__ = ("finished", "handler", "msg", "name", "revoked", "started", "started_at", "task_id", "touched")

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.started = self.touched = time.monotonic()
        self.started_at = time.time()
        self.task_id = ""
        self.name = ""
        self.revoked = False
        self.finished = False
        self.handler: asyncio.Task[None] | None = None


class Worker:
    """Runs an app's tasks from one or more queues in this process.

    ``await worker.start()`` then ``await worker.stop()`` (or ``async with``); ``run()`` blocks
    until ``stop()`` is called (the CLI wires SIGTERM/SIGINT to it).
    """

    def __init__(
        self,
        app: Natask,
        queues: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        grace: float = DEFAULT_GRACE,
        max_tasks: int | None = None,
        events: bool = True,
    ) -> None:
        self.app = app
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
        self._slots = Slots(concurrency)
        self._consumers: list[PullConsumer] = []
        self._inflight: set[_Delivery] = set()
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
        self._stopping = False
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, create the queues' consumers and start consuming."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.broker = broker = Broker(self.app.config, on_reconnect=self._on_reconnect)
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
            durable = await broker.ensure_consumer(queue)
            consumer = PullConsumer(broker, durable, self._slots, self._on_message)
            await consumer.start()
            self._consumers.append(consumer)
            # RPC: core request-reply beside the stream, same queue group name, same slots.
            self._rpc_subs.append(await broker.subscribe(
                f"natask.rpc.{broker.names.prefix}.{queue}.>", queue=queue, cb=self._on_rpc))
        for consumer in self._consumers:
            consumer.wake()
        self._heartbeat = asyncio.get_running_loop().create_task(self._keep_leases())
        log.info("worker %s consuming %s (concurrency %d) on %s", self.ident, ", ".join(self.queues),
                 self.concurrency, self.app.config.safe_servers)

    async def run(self) -> None:
        """Start (unless started) and block until ``stop()`` completes."""
        if self.broker is None:
            await self.start()
        await self._stopped.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let in-flight tasks finish within ``grace`` seconds, nak the rest, close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.grace if grace is None else grace
        for sub in self._rpc_subs:
            await _quietly(sub.unsubscribe())
        for consumer in self._consumers:
            await consumer.stop()
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
        for consumer in self._consumers:
            await consumer.close()
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
        for consumer in self._consumers:
            consumer.reset()

    async def _watch_revokes(self) -> None:
        """Mirror the revoked-ids bucket into a local set: no KV read per task, and revokes
        recorded before this worker started still apply."""
        kv = await self.broker_.revoked()
        watcher = await self.broker_.api(kv.watchall)  # through an election, too
        loaded = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            try:
                async for entry in watcher:
                    if entry is None:
                        if not loaded.done():
                            loaded.set_result(None)
                        continue
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        self._revoked.discard(entry.key)
                        continue
                    self._revoked.add(entry.key)
                    try:
                        terminate = bool(loads(entry.value).get("terminate"))
                    except Exception:
                        terminate = False
                    if terminate:
                        self._terminate(entry.key)
            finally:
                await _quietly(watcher.stop())  # type: ignore[no-untyped-call]

        self._revoke_watch = asyncio.get_running_loop().create_task(follow())
        await asyncio.wait_for(loaded, 10)

    def _terminate(self, task_id: str) -> None:
        for delivery in self._inflight:
            if delivery.task_id == task_id and delivery.handler is not None and not delivery.revoked:
                delivery.revoked = True
                delivery.handler.cancel()
                log.info("terminating revoked task %s", task_id)

    @property
    def consuming(self) -> bool:
        """True while the worker asks for and runs tasks (started, not stopping)."""
        return bool(self._consumers) and not self._stopping

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
            for delivery in list(self._inflight):
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
            self._slots.release()
            return
        delivery = _Delivery(msg)
        self._inflight.add(delivery)
        self._idle.clear()
        delivery.handler = asyncio.get_running_loop().create_task(self._handle(delivery))

    def _done(self, delivery: _Delivery) -> None:
        self._inflight.discard(delivery)
        self._slots.release()
        self._slot_freed.set()
        if self.max_tasks and self.processed + self.failed >= self.max_tasks and not self._stopping:
            log.info("processed %d task(s), the --max-tasks-per-child limit: exiting", self.max_tasks)
            self._background(self.stop())
        if not self._inflight:
            self._idle.set()

    async def _on_rpc(self, msg: Msg) -> None:
        # Pushed by core NATS: wait for a slot so RPCs share the worker's concurrency limit.
        while self._slots.running >= self._slots.capacity:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._slots.running += 1
        delivery = _Delivery(msg)
        self._inflight.add(delivery)
        self._idle.clear()
        delivery.handler = self._loop.create_task(self._answer(delivery))

    async def _answer(self, delivery: _Delivery) -> None:
        """Run an RPC call and reply with its outcome record; nothing is stored or acked."""
        msg = delivery.msg
        try:
            record: dict[str, Any]
            try:
                env = Envelope.decode(msg.data, msg.headers)
                task = self.app.get_task(env.task)
                args, kwargs = task.bind_call(env.args, env.kwargs)
                request = Request(id=env.id, task=env.task, args=args, kwargs=kwargs, headers=msg.headers or {})
                record = {"state": SUCCESS, "result": await self._run(task, args, kwargs, request)}
                self.processed += 1
            except Exception as exc:
                record = _failure(exc)
            try:
                data = dumps(record)
            except EncodeError as e:
                data = dumps(_failure(EncodeError(f"the result cannot be encoded: {e}")))
            if msg.reply:
                await self.broker_.publish_core(msg.reply, data)
        finally:
            self._done(delivery)

    async def _handle(self, delivery: _Delivery) -> None:
        msg = delivery.msg
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            await _quietly(msg.nak())
        except Exception:
            # A bug in natask itself: give the message back rather than lose it.
            log.exception("internal error handling %s; returning it to the queue", delivery.task_id or "a message")
            await _quietly(msg.nak(delay=5))
        finally:
            self._done(delivery)

    async def _process(self, delivery: _Delivery) -> None:
        msg = delivery.msg
        headers = msg.headers or {}
        try:
            env = Envelope.decode(msg.data, headers)
        except DecodeError as e:
            task_id = headers.get(HDR_MSG_ID, "").split(":")[0]
            await self._dead_letter(msg, "undecodable", str(e), task_id=task_id if TASK_ID_RE.match(task_id) else "")
            return
        delivery.task_id, delivery.name = env.id, env.task
        task = self.app.tasks.get(env.task)
        if task is None:
            await self._dead_letter(msg, "unknown task", f"no task named {env.task!r} in app {self.app.name!r}",
                                    env=env)
            return
        retries = int(headers.get(HDR_RETRIES, "0") or 0) + delivered(msg) - 1
        now = time.time()
        if env.id in self._revoked:
            await self._finish(msg, env, task, {"state": REVOKED, "info": {"reason": "revoked"}})
            return
        if env.expires is not None and now > env.expires:
            await self._finish(msg, env, task, {"state": REVOKED, "info": {"reason": "expired"}})
            return
        if env.eta is not None and env.eta > now + 0.001:
            await msg.nak(delay=env.eta - now)  # clock skew between server and worker: never early
            return
        limit = task.options.max_retries
        if limit is not None and retries > limit:
            # Deliveries beyond the limit mean earlier attempts crashed their worker.
            await self._dead_letter(msg, "max retries exceeded",
                                    f"{retries} attempt(s) ended without an outcome (worker crashed?)", env=env)
            return
        try:
            args, kwargs = task.bind_call(env.args, env.kwargs)
        except TypeError as e:
            await self._dead_letter(msg, "arguments do not bind", str(e), env=env)
            return
        request = Request(id=env.id, task=env.task, retries=retries, args=args, kwargs=kwargs,
                          queue=msg.subject.split(".", 2)[1], parent_id=env.parent_id, root_id=env.root_id,
                          eta=env.eta, expires=env.expires, headers=headers,
                          report=lambda state, meta: self._report(delivery, state, meta))
        current_request.set(request)  # log lines about this task, from here on, carry its id and name
        if self.listeners:
            self._started.append((delivery.started_at, env.id, env.task, retries))
            if self._event_timer is None:
                self._arm_events()
        if task.options.track_started and not task.options.ignore_result:
            await self._store(env.id, {"state": STARTED, "info": {"worker": self.ident}}, wait=False)
        try:
            value = await self._run(task, args, kwargs, request)
        except asyncio.CancelledError:
            delivery.finished = True
            if not delivery.revoked:
                raise
            await self._finish(msg, env, task, {"state": REVOKED, "info": {"reason": "terminated"}})
            return
        except Exception as exc:
            delivery.finished = True
            await self._failed(msg, env, task, exc, retries)
            return
        delivery.finished = True
        self.processed += 1
        await self._finish(msg, env, task, {"state": SUCCESS, "result": value}, retries)

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
    async def _failed(self, msg: Msg, env: Envelope, task: Task[Any, Any], exc: Exception, retries: int) -> None:
        decision = decide(exc, task.options, retries)
        cause = getattr(exc, "exc", None) or exc
        if decision.action == "retry":
            await self._retry(msg, env, task, cause, retries, decision.countdown)
            return
        self.failed += 1
        record = _failure(cause)
        if decision.action == "reject":
            await self._dead_letter(msg, "rejected", decision.reason, env=env, record=record)
            return
        if decision.reason:  # retries exhausted
            await self._dead_letter(msg, decision.reason, f"{record['exc_type']}: {record['message']}",
                                    env=env, record=record)
            return
        log.warning("task %s[%s] failed: %s: %s", env.task, env.id, record["exc_type"], record["message"])
        await self._finish(msg, env, task, record, retries)

    async def _retry(self, msg: Msg, env: Envelope, task: Task[Any, Any], exc: BaseException, retries: int,
                     countdown: float) -> None:
        assert self.broker is not None
        n = retries + 1
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers[HDR_MSG_ID] = f"{env.id}:{n}"
        headers[HDR_RETRIES] = str(n)
        subject = msg.subject
        if countdown > 0:
            queue = subject.split(".", 2)[1]
            headers[HDR_SCHEDULE] = at_schedule(time.time() + countdown)
            headers[HDR_SCHEDULE_TARGET] = subject
            subject = self.app.names.schedule_subject(queue, env.id)
        await self.broker.publish(subject, msg.data, headers)
        if not task.options.ignore_result:
            info = {"retries": n, "countdown": countdown, "exc_type": _qualname(type(exc)), "message": str(exc)}
            await self._store(env.id, {"state": RETRY, "info": info})
        log.info("task %s[%s] retry %d in %.2fs: %r", env.task, env.id, n, countdown, exc)
        if self.listeners:
            self.event("task-retried", env.id, env.task, retries=n, countdown=countdown,
                       exc_type=_qualname(type(exc)), message=str(exc)[:EVENT_TEXT])
        await msg.ack()

    def _report(self, delivery: _Delivery, state: str, meta: Any) -> None:
        """update_state from a task, on the loop or from a worker thread."""
        data = dumps({"state": state, "info": meta, "worker": self.ident})  # EncodeError goes to the task

        def store() -> None:
            if not delivery.finished:  # never overwrite the final outcome
                self._background(self._store(delivery.task_id, data, wait=False))

        if threading.get_ident() == self._loop_thread:
            store()
        else:
            self._loop.call_soon_threadsafe(store)

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

    async def _finish(self, msg: Msg, env: Envelope, task: Task[Any, Any] | None, record: dict[str, Any],
                      retries: int = 0) -> None:
        """Run workflow follow-ups, send the outcome to the caller, store it, then ack (in that order)."""
        if env.links or env.meta:
            from .canvas import on_outcome

            await on_outcome(self, env, record)
        if self.listeners:
            state = record["state"]
            if state == SUCCESS:
                self._succeeded.append((time.time(), env.id, env.task))
                if self._event_timer is None:
                    self._arm_events()
            elif state == FAILURE:
                self.event("task-failed", env.id, env.task, exc_type=record.get("exc_type"),
                           message=str(record.get("message", ""))[:EVENT_TEXT])
            elif state == REVOKED:
                self.event("task-revoked", env.id, env.task, reason=(record.get("info") or {}).get("reason"))
            else:
                self.event("task-finished", env.id, env.task, state=state)
        ignore = task is not None and task.options.ignore_result
        if not ignore:
            record.update(task=env.task, worker=self.ident, date_done=time.time(), retries=retries)
            if env.parent_id:
                record.update(parent_id=env.parent_id, root_id=env.root_id)
            try:
                data = dumps(record)
            except EncodeError as e:
                record = _failure(EncodeError(f"the result of {env.task} cannot be encoded: {e}"))
                record.update(task=env.task, worker=self.ident, date_done=time.time(), retries=retries)
                data = dumps(record)
            reply = (msg.headers or {}).get(HDR_REPLY)
            if reply:
                await self.broker_.publish_core(reply, data)
            await self._store(env.id, data)
        await msg.ack()

    async def _store(self, task_id: str, record: dict[str, Any] | bytes, wait: bool = True) -> None:
        broker = self.broker_
        data = record if isinstance(record, bytes) else dumps(record)
        subject = f"$KV.{broker.names.results_bucket}.{task_id}"
        if not wait:
            await broker.publish_core(subject, data)
            return
        await broker.results()
        await broker.publish(subject, data, {})

    async def _dead_letter(self, msg: Msg, reason: str, error: str, *, env: Envelope | None = None,
                           task_id: str = "", record: dict[str, Any] | None = None) -> None:
        """Move a message to NATASK_DLQ with why, then ack it; the caller gets a FAILURE result."""
        broker = self.broker_
        # Nats-* headers (schedule, dedupe id) belong to the original publish, not to the DLQ entry.
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        queue, name = ([*msg.subject.split(".", 2), "", ""])[1:3]
        name = env.task if env is not None else headers.get(HDR_TASK, "") or name
        task_id = env.id if env is not None else task_id
        meta = msg.metadata
        headers.update({
            HDR_DLQ_REASON: reason,
            HDR_DLQ_ERROR: _one_line(error)[:1000],
            HDR_DLQ_ATTEMPTS: str(int(headers.get(HDR_RETRIES, "0") or 0) + meta.num_delivered),
            HDR_DLQ_TIME: f"{time.time():.6f}",
            HDR_DLQ_SUBJECT: msg.subject,
            HDR_DLQ_ID: task_id or f"seq-{meta.sequence.stream}",
        })
        subject = broker.names.dlq_subject(queue or "_", _subject_token(name))
        published = await broker.publish(subject, msg.data, headers)
        await index_dead_letter(broker, headers[HDR_DLQ_ID], published.seq)
        log.error("dead-lettered %s (%s): %s", task_id or f"message #{meta.sequence.stream}", reason, error)
        self.failed += 1
        if task_id:
            if record is None:
                record = {"state": FAILURE, "exc_type": _DLQ_EXC_TYPES.get(reason, "natask.DeadLettered"),
                          "message": error, "traceback": ""}
            task = self.app.tasks.get(name)
            await self._finish(msg, env or Envelope(id=task_id, task=name), task, dict(record))
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
}
"""The exception type a caller sees for a message dead-lettered before it could run."""


def delivered(msg: Msg) -> int:
    """How many times the server has delivered ``msg``, read from its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``)
    without building nats-py's whole ``Metadata`` (a datetime among others) per task."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4])
    return msg.metadata.num_delivered  # the longer layouts (domains, account hashes)


def _failure(exc: BaseException) -> dict[str, Any]:
    return {
        "state": FAILURE,
        "exc_type": _qualname(type(exc)),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _qualname(cls: type) -> str:
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith("natask.") and getattr(natask, cls.__name__, None) is cls:
        return f"natask.{cls.__name__}"  # the public name, not the defining module
    return f"{module}.{cls.__qualname__}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _subject_token(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip(".")
    return cleaned.replace("..", ".") or "_unknown"


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception as e:
        log.debug("ignored: %s", e)
