"""Settling a delivery: workflow follow-ups, the reply, the stored outcome (the first final one
wins), retries republished as schedules, dead letters, and the ack that ends it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from ..broker import Broker, attempt, stream_sequence
from ..canvas.eager import Replaced
from ..dlq import index_dead_letter
from ..errors import EncodeError, Ignore, PayloadTooLarge, StorageFull, failure_record, type_name
from ..message import Envelope, at_schedule, dumps
from ..naming import (
    HDR_DLQ_ATTEMPTS,
    HDR_DLQ_ERROR,
    HDR_DLQ_ID,
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TIME,
    HDR_DLQ_TRUNCATED,
    HDR_IGNORE_RESULT,
    HDR_MSG_ID,
    HDR_OBJECT,
    HDR_REPLY,
    HDR_RETRIES,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    HDR_SHADOW,
    HDR_TASK,
    RESULT_OBJECT,
)
from ..options import Request
from ..retry import Action, decide
from ..states import State
from .delivery import Delivery, Tally, header_int, one_line, queue_token
from .events import EVENT_TEXT, EventLog
from .flow import on_outcome, replace
from .store import ResultStore

if TYPE_CHECKING:
    from ..app import Natask
    from ..task import Task

log = logging.getLogger("natask.worker")

MAX_NAK_DELAY: Final = 300.0
"""Longest nak delay used when a message cannot be republished as a schedule."""
_CHORD_HINT: Final = " (a chord member's result is kept in the chords bucket, which takes no claim checks)"
"""Why a chord member's large result fails where a chain step's travels through the objects bucket."""
RECORD_HEADROOM: Final = 1024
"""Bytes of ``max_payload`` kept free beside a result record (headers of its KV write)."""
DLQ_EXC_TYPES: Final = {
    "unknown task": "natask.TaskNotFound",
    "arguments do not bind": "TypeError",
    "undecodable": "natask.DecodeError",
    "max retries exceeded": "natask.WorkerLost",
    "forged": "natask.Forged",
}
"""The exception type a caller sees for a message dead-lettered before it could run."""
UNTRUSTED: Final = frozenset({"forged", "malformed header", "invalid subject"})
"""Dead-letter reasons that make the message's own claims (its id, its reply subject) untrusted:
no outcome is stored or sent for them, or the sender could write another task's result."""
_BULKY: Final = frozenset({"result", "args", "kwargs"})
"""Record keys left out of the small record that points at a large result's object."""
_META_KEYS: Final = frozenset({"task", "worker", "date_done", "retries", "parent_id", "root_id", "children", "args",
                               "kwargs", "queue"})


class Outcome:
    """How the deliveries of one started worker end: ``finish`` (a run's outcome record),
    ``failed`` (a task raised), ``retry``, ``schedule_again``, ``dead_letter``; and the states a
    running task stores (``write_state``, ``report``)."""

    def __init__(self, app: Natask, broker: Broker, store: ResultStore, ident: str, inboxes: tuple[str, ...],
                 events: EventLog, tally: Tally) -> None:
        self.app = app
        self.hooks = app.hooks
        self.broker = broker
        self.store = store
        self.ident = ident
        self.inboxes = inboxes
        self.events = events
        self.tally = tally
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.extended = app.config.result_extended
        """Store args, kwargs and queue in result records (``result_extended``)."""

    # -- the outcome of a run ---------------------------------------------------------------
    async def finish(self, delivery: Delivery, env: Envelope, task: Task[Any, Any] | None,
                     record: dict[str, Any], retries: int = 0, *, keep_object: bool = False) -> None:
        """Run workflow follow-ups, send the outcome to the caller, store it (once: the first final
        outcome wins), delete a claim-checked call's object (unless ``keep_object``: a dead letter's
        replay needs it), then ack — in that order."""
        msg = delivery.msg
        ignore = task is not None and task.options.ignore_result and not (
            task.options.store_errors_even_if_ignored and record["state"] != State.SUCCESS)
        if msg.headers and HDR_IGNORE_RESULT in msg.headers:  # the call's ignore_result=True
            ignore = not (task is not None and task.options.store_errors_even_if_ignored
                          and record["state"] != State.SUCCESS)
        if env.links or env.meta:
            if record["state"] == State.SUCCESS:
                # The workflow sees a result it cannot carry fail: a chain step takes a claim check
                # (the follow-up's call goes through the objects bucket), a chord member's result not.
                chord = bool(env.meta.get("chord"))
                record = self.encode(record, env.task, objects=not chord, hint=_CHORD_HINT if chord else "")[1]
            await on_outcome(self, env, record)
        if self.events.listeners:
            self.events.outcome(env, record)
        if not ignore:
            record.update(task=env.task, worker=self.ident, date_done=time.time(), retries=retries)
            if env.parent_id:
                record.update(parent_id=env.parent_id, root_id=env.root_id)
            if self.extended:
                route = self.app.names.task_from_subject(msg.subject)
                record.update(args=env.args, kwargs=env.kwargs, queue=route[0] if route else None)
            data, record = self.encode(record, env.task, objects=True)
            if len(data) > self.broker.nc.max_payload - RECORD_HEADROOM:  # only a SUCCESS gets here (encode)
                data = await self.result_object(env, data, record)
            reply = (msg.headers or {}).get(HDR_REPLY)
            fast = not delivery.careful and delivery.writing is None
            if reply and fast:
                # A fresh id's first run: nobody else can have stored an outcome, so the caller need
                # not wait for the store's acknowledgement.
                await self.broker.publish_core(reply, data)
            await self.writes_of(delivery)
            final = await self.store_final(delivery, env, data)
            if reply and not fast:
                await self.broker.publish_core(reply, data if final is None else dumps(final))
        if not msg.data and not keep_object and msg.headers and HDR_OBJECT in msg.headers:
            try:  # the gate checked the name; the bucket's TTL removes it if this fails
                await self.broker.delete_object(msg.headers[HDR_OBJECT])
            except Exception as e:
                log.warning("task %s[%s]: cannot delete its call's object (it expires after result_ttl): %s",
                            env.task, env.id, e)
        await msg.ack()

    async def result_object(self, env: Envelope, data: bytes, record: dict[str, Any]) -> bytes:
        """A SUCCESS record over ``max_payload``, put whole in the objects bucket: the small record
        stored and replied instead, naming the object (``AsyncResult.get`` fetches it). A failed
        put becomes the FAILURE the caller gets."""
        name = f"{env.id}.result"
        try:
            await self.broker.put_object(name, data)
        except Exception as e:
            log.error("task %s[%s]: cannot store its large result: %s", env.task, env.id, e)
            return dumps(failure_record(e) | _meta(record))
        return dumps({k: v for k, v in record.items() if k not in _BULKY} | {RESULT_OBJECT: name})

    async def failed(self, delivery: Delivery, env: Envelope, task: Task[Any, Any], exc: Exception,
                     retries: int, request: Request) -> str:
        """A run raised ``exc``: retry, dead-letter or store the failure, as the task's options decide;
        the state it ended in (``RETRY`` or ``FAILURE``)."""
        if isinstance(exc, Replaced):  # Task.replace: the replacement stores this task's result later
            await replace(self, env, exc, request)
            await delivery.msg.ack()
            return State.IGNORED.value
        if isinstance(exc, Ignore):
            # Celery's Ignore: acked, nothing stored, no retry, no dead letter.
            log.info("task %s[%s] ignored", env.task, env.id)
            await delivery.msg.ack()
            return State.IGNORED.value
        decision = decide(exc, task.options, retries)
        cause = getattr(exc, "exc", None) or exc
        if decision.action is Action.RETRY:
            if self.hooks.on_retry:
                await self.hooks.call("on_retry", request, cause, decision.countdown)
            await self.retry(delivery, env, task, cause, retries, decision.countdown)
            return State.RETRY.value
        self.tally.failed += 1
        record = failure_record(cause)
        if decision.action is Action.REJECT:
            await self.dead_letter(delivery, "rejected", decision.reason, env=env, record=record)
        elif decision.reason:  # retries exhausted
            await self.dead_letter(delivery, decision.reason, f"{record['exc_type']}: {record['message']}",
                                   env=env, record=record)
        elif task.options.throws and isinstance(cause, task.options.throws):  # expected: no traceback
            log.info("task %s[%s] raised expected %s: %s", shown(task, env, request), env.id,
                     record["exc_type"], record["message"])
            await self.finish(delivery, env, task, record, retries)
        else:
            log.error("task %s[%s] failed: %s: %s", shown(task, env, request), env.id, record["exc_type"],
                      record["message"], exc_info=cause)
            await self.finish(delivery, env, task, record, retries)
        return State.FAILURE.value

    def encode(self, record: dict[str, Any], what: str, objects: bool = False,
               hint: str = "") -> tuple[bytes, dict[str, Any]]:
        """A record and its bytes; a result that cannot be encoded, or too large for the server's
        ``max_payload``, becomes the FAILURE the caller gets instead (after one run: never a
        redelivery loop). ``objects``: a SUCCESS up to ``large_payload_limit`` is returned whole, for
        ``finish`` to store in the objects bucket; else ``hint`` says why it cannot go there."""
        try:
            data = dumps(record)
        except EncodeError as e:
            record = failure_record(EncodeError(f"the result of {what} cannot be encoded: {e}")) | _meta(record)
            return dumps(record), record
        limit = self.broker.nc.max_payload - RECORD_HEADROOM
        if len(data) <= limit:
            return data, record
        large = self.app.config.large_payload_limit
        if objects and len(data) <= large and record.get("state") == State.SUCCESS:
            return data, record  # finish() stores it in the objects bucket
        beyond = (f" and over large_payload_limit={large} (the Object Store's share): raise that, or" if objects
                  else f"{hint}:")
        error = PayloadTooLarge(f"the result of {what} is {len(data)} bytes encoded, over the {limit} bytes the "
                                f"server's max_payload leaves for it{beyond} return a reference (a URL, an object "
                                "key) instead of the data", len(data), limit)
        record = failure_record(error) | _meta(record)
        return dumps(record), record

    # -- the results bucket -----------------------------------------------------------------
    async def store_final(self, delivery: Delivery, env: Envelope, data: bytes) -> dict[str, Any] | None:
        """Store the outcome unless one is stored already; that one, if so.

        With JetStream's storage full the outcome is not stored, and the task is acked anyway (the
        caller still gets the reply): running it again would not make room, and acking frees the
        task's own message. The condition shows in health, stats and metrics until a write succeeds.
        """
        tally = self.tally
        try:
            seq, final = await self.store.write(env.id, data, delivery.result_seq)
        except StorageFull as e:
            tally.results_not_stored += 1
            if tally.storage_full_since is None:
                tally.storage_full_since = time.time()
            log.error("task %s[%s]: outcome not stored (%s); acking it anyway, it will not run again",
                      env.task, env.id, e)
            return None
        tally.storage_full_since = None
        delivery.result_seq = seq if final is None else None
        if final is not None:
            self.superseded(delivery, final)
        return final

    def report(self, delivery: Delivery, state: str, meta: Any) -> None:
        """update_state from a task, on the loop or from a worker thread."""
        data = dumps({"state": state, "info": meta, "worker": self.ident})  # EncodeError goes to the task
        self.broker.check_size(self.store.subject(delivery.task_id), data, {})  # PayloadTooLarge too

        def store() -> None:
            if not delivery.finished:  # the final outcome is being written: this state is stale
                self.write_state(delivery, data)

        if threading.get_ident() == self.loop_thread:
            store()
        else:
            self.loop.call_soon_threadsafe(store)

    def write_state(self, delivery: Delivery, data: bytes) -> None:
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
                self.superseded(delivery, final)

        delivery.writing = self.loop.create_task(write())

    async def writes_of(self, delivery: Delivery) -> None:
        """Wait for this delivery's state writes."""
        if delivery.writing is not None:
            await asyncio.wait({delivery.writing})

    def superseded(self, delivery: Delivery, final: dict[str, Any]) -> None:
        """Another run stored ``final`` first: drop this delivery's writes from now on."""
        if not delivery.superseded:
            delivery.superseded = True
            log.warning("task %s has a final outcome (%s) stored by another run (this worker lost its lease?): "
                        "this run's states and outcome are dropped", delivery.task_id, final.get("state"))

    # -- back to the server -----------------------------------------------------------------
    async def retry(self, delivery: Delivery, env: Envelope, task: Task[Any, Any], exc: BaseException,
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
            await self.broker.publish(self.app.names.schedule_subject(queue, env.id), msg.data, headers)
        except (PayloadTooLarge, StorageFull) as e:
            # No room for the retry headers next to this payload, or none in the store: let
            # JetStream redeliver it instead (the delivery count carries the attempt; the wait counts
            # against max_ack_pending).
            log.warning("task %s[%s]: retry %d waits in the queue (%s)", env.task, env.id, n, e)
            await msg.nak(delay=countdown)
            return
        if not task.options.ignore_result:
            info = {"retries": n, "countdown": countdown, "exc_type": type_name(type(exc)), "message": str(exc)}
            self.write_state(delivery, dumps({"state": State.RETRY.value, "info": info}))
            await self.writes_of(delivery)
        log.warning("task %s[%s] retry %d in %.2fs: %r", env.task, env.id, n, countdown, exc)
        if self.events.listeners:
            self.events.event("task-retried", env.id, env.task, retries=n, countdown=countdown,
                              exc_type=type_name(type(exc)), message=str(exc)[:EVENT_TEXT])
        await msg.ack()

    async def schedule_again(self, delivery: Delivery, env: Envelope, when: float, kind: str,
                             extra: dict[str, str]) -> None:
        """Republish this message as a server-held schedule firing at ``when``, then ack it. The
        message id is derived from this message's stream sequence, so a crash between publish and
        ack cannot enqueue it twice."""
        msg = delivery.msg
        queue, _ = self.app.names.task_from_subject(msg.subject) or ("_", "")
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(extra)
        headers[HDR_MSG_ID] = f"{env.id}:{kind}{stream_sequence(msg)}"
        headers[HDR_SCHEDULE] = at_schedule(when)
        headers[HDR_SCHEDULE_TARGET] = msg.subject
        try:
            await self.broker.publish(self.app.names.schedule_subject(queue, env.id), msg.data, headers)
        except (PayloadTooLarge, StorageFull):  # no room for the schedule: wait in the consumer instead
            await msg.nak(delay=min(MAX_NAK_DELAY, max(0.0, when - time.time())))
            return
        await msg.ack()

    async def dead_letter(self, delivery: Delivery, reason: str, error: str, *, env: Envelope | None = None,
                          task_id: str = "", record: dict[str, Any] | None = None) -> None:
        """Move a message to NATASK_DLQ with why, then ack it; the caller gets a FAILURE result.

        The entry's subject is built from the validated subject the message arrived on (never from
        its body or headers), and the entry is cut to fit ``max_payload``: a message crafted to make
        the dead-letter publish oversized or its subject too long cannot cost the connection.
        """
        msg, broker = delivery.msg, self.broker
        route = self.app.names.task_from_subject(msg.subject)
        queue, name = route if route is not None else (queue_token(msg.subject, broker.names.prefix), "_invalid")
        task_id = env.id if env is not None else task_id
        if self.hooks.on_dead_letter:
            request = None if env is None else Request(id=env.id, task=env.task, args=env.args, kwargs=env.kwargs,
                                                       queue=queue, parent_id=env.parent_id, root_id=env.root_id,
                                                       headers=msg.headers or {})
            await self.hooks.call("on_dead_letter", request, reason, msg.subject)
        retried = header_int(msg.headers or {}, HDR_RETRIES) or 0
        ours = {
            HDR_TASK: name,  # the name its subject proves, not whatever a header claimed
            HDR_DLQ_REASON: reason,
            HDR_DLQ_ERROR: one_line(error)[:1000],
            HDR_DLQ_ATTEMPTS: str(retried + attempt(msg)),
            HDR_DLQ_TIME: f"{time.time():.6f}",
            HDR_DLQ_SUBJECT: msg.subject,
            HDR_DLQ_ID: task_id or f"seq-{stream_sequence(msg)}",
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
        log.error("dead-lettered %s (%s): %s", task_id or f"message #{stream_sequence(msg)}", reason,
                  ours[HDR_DLQ_ERROR])
        self.tally.failed += 1
        if task_id and reason not in UNTRUSTED:
            if record is None:
                record = {"state": State.FAILURE.value, "exc_type": DLQ_EXC_TYPES.get(reason, "natask.DeadLettered"),
                          "message": error, "traceback": ""}
            task = self.app.tasks.get(name)
            await self.finish(delivery, env or Envelope(id=task_id, task=name), task, dict(record), keep_object=True)
        else:
            await msg.ack()


def shown(task: Task[Any, Any], env: Envelope, request: Request | None = None) -> str:
    """The name the logs show: the call's ``shadow``, else the task's, else its own name."""
    if request is not None and request.headers:
        shadow = request.headers.get(HDR_SHADOW)
        if shadow:
            return shadow
    return task.options.shadow or env.task


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k in _META_KEYS}
