"""The dashboard's NATS side: core subscriptions to every task publish, result record and dead
letter; lifecycle events (from the history stream, then live); periodic readings of queues, dead
letters and workers. It only listens and reads: workers do no extra work for a dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack

from ..broker import Message
from ..control import inspect
from ..control import queues as read_queues
from ..dlq import DeadLetter, DeadLetters, parse_count
from ..errors import NataskError
from ..events import EventStream, decode_batch, events_subject
from ..message import Envelope, loads
from ..naming import DLQ_STREAM, HDR_MSG_ID, HDR_REPLAYS, HDR_RETRIES, HDR_SCHEDULE_TARGET, TASK_ID_RE
from ..worker import HEARTBEAT_INTERVAL
from .model import Model
from .previews import preview

if TYPE_CHECKING:
    from ..app import Natask

log = logging.getLogger("natask.dashboard")

REFRESH: Final = 1.0
"""Seconds between queue and dead-letter readings."""
WORKER_POLL: Final = 3.0
"""Seconds between ``inspect stats`` rounds (events update workers in between)."""
RATE_WINDOW: Final = 10.0
"""Seconds of queue readings a rate is computed over."""
MAX_DECODE: Final = 1024 * 1024
"""Larger task messages and result records are not decoded (their id and name come from headers)."""
MAX_DEAD_LETTERS: Final = 100
"""Newest dead letters shown."""
MAX_QUEUES: Final = 1000
"""Queues seen in publishes tracked at most."""
STOP_TIMEOUT: Final = 5.0
"""Seconds ``stop()`` waits for each background job and unsubscribe before going on without it."""
HISTORY_MAX_AGE: Final = 7 * 24 * 3600.0
"""Seconds the history stream keeps an event (``--history-max-age``)."""
HISTORY_MAX_BYTES: Final = 1024**3
"""Bytes the history stream holds at most, oldest events dropped first (``--history-max-bytes``)."""
SENT_BATCH: Final = 0.25
"""Seconds publishes are collected before the dashboard records them in the history as one message."""
READ_BATCH: Final = 256
"""Stored events read per request when the history is rebuilt."""
_QUEUE_RE: Final = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]{0,199}$")


@dataclass
class History:
    """Keep lifecycle events in a limits stream, so a restarted dashboard rebuilds its model."""

    max_age: float = HISTORY_MAX_AGE
    max_bytes: int = HISTORY_MAX_BYTES
    enabled: bool = True


@dataclass
class _Reading:
    at: float
    done: int
    sent: int


class Feed:
    """Feeds a ``Model`` from NATS and tells listeners (the event streams of pages) when it changed."""

    def __init__(self, app: Natask, model: Model, refresh: float = REFRESH, history: History | None = None) -> None:
        self.app = app
        self.model = model
        self.refresh = refresh
        self.history = history or History()
        self.prefix = app.config.subject_prefix
        self.ident = f"dashboard:{socket.gethostname()}:{os.getpid()}"
        """The worker field of the ``task-sent`` events this dashboard records."""
        self.closing = False
        self.started = False
        self.listeners: set[asyncio.Event] = set()
        self._events = EventStream(app)
        self._sent_by_queue: dict[str, int] = {}
        self._readings: dict[str, deque[_Reading]] = {}
        self._start_time = time.monotonic()
        self._dlq_dirty = True
        self._dlq_checked = 0.0
        self._workers_polled = 0.0
        self._wake = asyncio.Event()
        self._subs: list[Any] = []
        self._jobs: list[asyncio.Task[None]] = []
        self._sent: list[list[Any]] = []
        self._lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            if self.started:
                return
            self.started = True
            try:
                broker = await self.app.client.broker()
                for subject, cb in ((f"{self.prefix}.>", self._on_publish),
                                    (f"$KV.{self.app.names.results_bucket}.>", self._on_result),
                                    (f"natask.dlq.{self.prefix}.>", self._on_dead_letter)):
                    self._subs.append(await broker.subscribe(subject, cb=cb))
                # Subscribed before the history is read: an event stored meanwhile comes twice,
                # which the model recognises; none falls between the two.
                await self._events.__aenter__()
                if self.history.enabled:
                    await self._rebuild()
                self._jobs = [asyncio.create_task(self._follow_events()), asyncio.create_task(self._poll())]
                if self.history.enabled:
                    self._jobs.append(asyncio.create_task(self._record_sent()))
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        self.closing = True  # the jobs' loops end on this even if a cancellation gets lost
        pending, deadline = set(self._jobs), time.monotonic() + STOP_TIMEOUT
        while pending and time.monotonic() < deadline:
            # Before Python 3.12, asyncio.wait_for (inside nats-py's flush) can drop a cancellation
            # that arrives as its result does: cancel again until the job is gone.
            for job in pending:
                job.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), STOP_TIMEOUT)
        if self._events._sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._events.__aexit__(), STOP_TIMEOUT)
        self.notify()  # event streams end

    def notify(self) -> None:
        for listener in self.listeners:
            listener.set()

    def _changed(self) -> None:
        self.notify()

    # -- history -------------------------------------------------------------------------------
    async def _rebuild(self) -> None:
        """Apply every stored event (oldest first) to the model; rows beyond the limit fall out."""
        broker = await self.app.client.broker()
        names = self.app.names
        await broker.ensure_events_stream(self.history.max_age, self.history.max_bytes)
        state = await broker.stream_state(names.events_stream)
        if state is None or state.messages == 0:
            self.model.history_from = time.time()
            return
        low, high, first = state.first_seq, state.last_seq + 1, True
        while low < high and not self.closing:
            stored = await broker.read_forward(names.events_stream, names.events_filter, low, high,
                                               batch=READ_BATCH, max_bytes=4 * 1024 * 1024)
            if not stored:
                break
            for message in stored:
                events, dropped = decode_batch(message.data)
                self.model.dropped += dropped
                for event in events:
                    if first:
                        self.model.history_from, first = float(event["ts"]), False
                    self._apply(event, live=False)
            low = stored[-1].seq + 1
            await asyncio.sleep(0)  # pages may be served while a long history is read
        log.info("dashboard: history rebuilt from %d stored event message(s), %d task(s) indexed",
                 state.messages, len(self.model.rows))

    async def _record_sent(self) -> None:
        """Publishes seen, as ``task-sent`` events in the history (arguments, queue, parent): a
        restarted dashboard can search them. Batched like a worker's events."""
        broker = await self.app.client.broker()
        subject = events_subject(self.prefix, "task-sent")
        while not self.closing:
            await asyncio.sleep(SENT_BATCH)
            rows, self._sent = self._sent, []
            for start in range(0, len(rows), 500):
                data = msgpack.packb({"worker": self.ident, "type": "task-sent", "events": rows[start:start + 500]},
                                     use_bin_type=True)
                try:
                    await broker.publish_core(subject, data)
                except Exception as e:  # history is best effort, the live view goes on
                    log.debug("dashboard: %d sent event(s) not recorded: %s", len(rows), e)

    # -- feeds ---------------------------------------------------------------------------------
    async def _on_publish(self, msg: Message) -> None:
        """Every task publish (the audit pattern): a new call, a retry, a replay or a schedule."""
        headers = msg.headers or {}
        rest = msg.subject[len(self.prefix) + 1:]
        scheduled = rest.startswith("_sched.")
        queue = ([*rest.split(".", 2), ""][1]) if scheduled else rest.split(".", 1)[0]
        if not _QUEUE_RE.match(queue):
            return  # not a task subject natask would publish
        msg_id = headers.get(HDR_MSG_ID, "")
        target = headers.get(HDR_SCHEDULE_TARGET, "") if scheduled else msg.subject
        route = self.app.names.task_from_subject(target) if isinstance(target, str) else None
        task_id, name, args, parent, root = msg_id.split(":", 1)[0], route[1] if route else "", "", "", ""
        if len(msg.data) <= MAX_DECODE:
            try:
                env = Envelope.decode(msg.data, headers)
                task_id, name, args = env.id, env.task, preview(env.args, env.kwargs)
                parent, root = env.parent_id or "", env.root_id or ""
            except NataskError:
                args = f"<undecodable, {len(msg.data)} bytes>"
        else:
            args = f"<{len(msg.data)} bytes>"
        if not TASK_ID_RE.match(task_id):
            return
        if queue in self._sent_by_queue or len(self._sent_by_queue) < MAX_QUEUES:
            self._sent_by_queue[queue] = self._sent_by_queue.get(queue, 0) + (not scheduled)
        retries, replayed, now = parse_count(headers.get(HDR_RETRIES)), HDR_REPLAYS in headers, time.time()
        before = self.model.version
        self.model.publish(task_id, name, queue, args, msg_id=msg_id, retries=retries, scheduled=scheduled,
                           replayed=replayed, parent_id=parent, root_id=root, ts=now)
        if self.model.version == before:
            return  # a duplicate
        if self.history.enabled and len(self._sent) < 50_000:
            fields: dict[str, Any] = {"queue": queue, "args": args}
            for key, value in (("parent_id", parent), ("root_id", root), ("retries", retries),
                               ("scheduled", scheduled), ("replayed", replayed)):
                if value:
                    fields[key] = value
            self._sent.append([now, task_id, name or None, fields])
        self._changed()

    def _apply(self, event: dict[str, Any], live: bool = True) -> None:
        if live and event.get("type") == "task-sent" and event.get("worker") == self.ident:
            return  # our own record of a publish we saw
        try:
            self.model.on_event(event)
        except Exception:  # one odd event must not end the subscription
            self.model.dropped += 1
            log.debug("dashboard: event %r not applied", event, exc_info=True)

    async def _follow_events(self) -> None:
        while not self.closing:
            try:
                async for event in self._events:
                    self._apply(event)
                    self.model.dropped += self._events.dropped
                    self._events.dropped = 0
                    self._changed()
                log.warning("events: the subscription ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("events: %s; resubscribing", e)
            await asyncio.sleep(self.refresh)
            with contextlib.suppress(Exception):
                await self._events.__aenter__()

    async def _on_result(self, msg: Message) -> None:
        if not msg.data or len(msg.data) > MAX_DECODE or (msg.headers or {}).get("KV-Operation"):
            return
        try:
            record = loads(msg.data)
        except NataskError:
            self.model.dropped += 1
            return
        self.model.on_result(msg.subject.rsplit(".", 1)[-1], record)
        self._changed()

    async def _on_dead_letter(self, msg: Message) -> None:
        self._dlq_dirty = True
        self._wake.set()

    # -- readings ------------------------------------------------------------------------------
    async def _poll(self) -> None:
        while not self.closing:
            try:
                await self.read()
                self.model.error = ""
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the server may be away: show it, keep trying
                log.warning("dashboard refresh failed: %s", e)
                self.model.error = str(e) or type(e).__name__
            self.model.touch()
            self._changed()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh)

    async def read(self) -> None:
        """Queues with rates, dead letters (when changed), workers (every few seconds)."""
        now = time.monotonic()
        jobs = [self._read_queues()]
        if self._dlq_dirty or now - self._dlq_checked > 10 * self.refresh:
            jobs.append(self._read_dead_letters())
        if now - self._workers_polled > WORKER_POLL:
            self._workers_polled = now
            jobs.append(self._read_workers())
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _read_queues(self) -> None:
        now = time.monotonic()
        queues = []
        for q in await read_queues(self.app):  # the numbers of `natask status`, priority levels counted in
            queues.append({"name": q.name, "pending": q.pending, "in_flight": q.in_flight,
                           "redelivered": q.redelivered, "waiting_pulls": q.waiting_pulls, "stranded": q.stranded,
                           "consumer": q.consumed, **self._rates(q.name, now, q.delivered - q.in_flight)})
        known = {q["name"] for q in queues}
        for name in sorted(set(self._sent_by_queue) - known):  # sent to, nothing waits, no worker has consumed
            queues.append({"name": name, "pending": 0, "in_flight": 0, "redelivered": 0, "waiting_pulls": 0,
                           "stranded": 0, "consumer": False, **self._rates(name, now, 0)})
        self.model.queues = sorted(queues, key=lambda q: str(q["name"]))

    def _rates(self, queue: str, now: float, done: int) -> dict[str, float]:
        readings = self._readings.setdefault(queue, deque([_Reading(self._start_time, done, 0)]))
        readings.append(_Reading(now, done, self._sent_by_queue.get(queue, 0)))
        while len(readings) > 2 and now - readings[0].at > RATE_WINDOW:
            readings.popleft()
        first, span = readings[0], now - readings[0].at
        if span <= 0:
            return {"in_rate": 0.0, "out_rate": 0.0}
        return {"in_rate": round(max(0, readings[-1].sent - first.sent) / span, 2),
                "out_rate": round(max(0, done - first.done) / span, 2)}

    async def _read_dead_letters(self) -> None:
        self._dlq_dirty, self._dlq_checked = False, time.monotonic()
        dlq = DeadLetters(self.app)
        (entries, _), total = await asyncio.gather(dlq.page(MAX_DEAD_LETTERS), dlq.count())
        dead = []
        for e in entries:  # newest first
            info = e.as_dict()
            try:
                env = Envelope.decode(e.data)
                info["args"] = preview(env.args, env.kwargs)
            except NataskError:
                info["args"] = f"<undecodable, {len(e.data)} bytes>"
            dead.append(info)
        self.model.dead_letters, self.model.dead_total = dead, total

    async def _read_workers(self) -> None:
        self.model.worker_stats(await inspect(self.app, "stats", timeout=0.5), HEARTBEAT_INTERVAL)

    # -- actions and reads for the pages -------------------------------------------------------
    async def replay(self, entry_id: str) -> DeadLetter:
        entry = await DeadLetters(self.app).replay(entry_id)
        self._dlq_dirty = True
        self._wake.set()
        return entry

    async def revoke(self, task_id: str, terminate: bool) -> None:
        """What ``natask revoke [--terminate]`` does: recorded durably, every worker skips or cancels."""
        await self.app.client.revoke(task_id, terminate)

    async def result_record(self, task_id: str) -> dict[str, Any] | None:
        broker = await self.app.client.broker()
        entry = await (await broker.results()).get(task_id)
        if entry is None or not entry.value or len(entry.value) > MAX_DECODE:
            return None
        try:
            record = loads(entry.value)
        except NataskError:
            return None
        return record if isinstance(record, dict) else None

    async def active(self) -> list[dict[str, Any]]:
        return await inspect(self.app, "active", timeout=0.5)

    async def registered(self) -> list[dict[str, Any]]:
        """Each live worker's registered task names (``natask inspect registered``)."""
        return await inspect(self.app, "registered", timeout=0.5)

    async def broker_info(self) -> dict[str, Any]:
        """Streams, their consumers and the buckets natask owns for this app: sizes and limits."""
        broker = await self.app.client.broker()
        names = self.app.names
        # The task stream, or each queue's own (stream_per_queue, perhaps in another JetStream domain).
        tasks = await broker.task_streams()
        streams = (*((stream, "tasks", domain) for stream, domain in tasks),
                   (DLQ_STREAM, "dead letters (every app's)", None), (names.events_stream, "dashboard history", None),
                   (f"OBJ_{names.objects_bucket}", "large payloads", None))
        buckets = ((names.results_bucket, "results"), (names.revoked_bucket, "revoked tasks"),
                   (names.beat_bucket, "beat lease and last ticks"), (names.schedules_bucket, "stored schedules"),
                   (names.groups_bucket, "saved groups"), (names.chords_bucket, "chord progress"),
                   (names.claims_bucket, "claims"), (names.dlq_index_bucket, "dead-letter index"),
                   (names.rates_bucket, "global rate limits"), (names.caps_bucket, "concurrency caps"))
        sizes = await asyncio.gather(*(broker.stream_sizes(s, d) for s, _, d in streams),
                                     *(broker.stream_sizes(f"KV_{b}") for b, _ in buckets))
        found = [(role, size, domain) for (_, role, domain), size in zip(streams, sizes[:len(streams)], strict=True)
                 if size is not None]
        consumers = await asyncio.gather(*(broker.consumer_states(size.name, domain) for _, size, domain in found))
        kv = [(name, role, size) for (name, role), size in zip(buckets, sizes[len(streams):], strict=True)
              if size is not None]
        return {
            "streams": [{**size._asdict(), "role": role} for role, size, _ in found],
            "consumers": [{"stream": size.name, "name": c.name, "pending": c.pending, "ack_pending": c.in_flight,
                           "redelivered": c.redelivered, "waiting": c.waiting_pulls, "delivered": c.delivered}
                          for (_, size, _), states in zip(found, consumers, strict=True) for c in states],
            "buckets": [{"name": name, "role": role, "values": size.messages, "bytes": size.bytes,
                         "history": size.max_msgs_per_subject, "ttl": size.max_age, "max_bytes": size.max_bytes,
                         "replicas": size.replicas, "storage": size.storage} for name, role, size in kv],
            "history": {"stream": names.events_stream, "max_age": self.history.max_age,
                        "max_bytes": self.history.max_bytes, "enabled": self.history.enabled}}
