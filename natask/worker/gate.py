"""Decode and gate a task message before anything runs: the subject decides which task it may run,
every header and body field is validated (forged, malformed), and revoked, expired, early (eta),
unknown, over-retried and unbindable messages are settled without running."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..broker import Broker, attempt, stream_sequence
from ..errors import DecodeError
from ..message import Envelope, dumps
from ..naming import (
    HDR_CHECK_STORED,
    HDR_MSG_ID,
    HDR_OBJECT,
    HDR_REPLAYS,
    HDR_REPLY,
    HDR_RETRIES,
    HDR_SCHEDULER,
    HDR_UNKNOWN_SINCE,
    OBJECT_NAME_RE,
    TASK_ID_RE,
    is_reply_for,
)
from ..options import Request, current_request
from ..states import State
from .delivery import MAX_CLOCK_SKEW, MAX_HEADER_INT, Delivery, cut, header_int, header_time
from .limits import Limits
from .outcome import Outcome
from .store import ResultStore, is_final

if TYPE_CHECKING:
    from ..app import Natask
    from ..task import Task
    from .revokes import Revokes

log = logging.getLogger("natask.worker")

UNKNOWN_STEP: Final = 5.0
"""Seconds between two looks at a message naming an unknown task."""

Execute = Callable[[Delivery, Envelope, "Task[Any, Any]", Sequence[Any], dict[str, Any], Request, int], Awaitable[None]]
"""Runs an admitted task and settles it (``Execution.task``)."""


class Gate:
    """Admits the task messages of one started worker, or settles them without running."""

    def __init__(self, app: Natask, broker: Broker, store: ResultStore, outcome: Outcome, execute: Execute,
                 revokes: Revokes, inboxes: tuple[str, ...], unknown_grace: float) -> None:
        self.app = app
        self.names = app.names
        self.tasks = app.tasks
        self.hooks = app.hooks
        self.broker = broker
        self.store = store
        self.outcome = outcome
        self.execute = execute
        self.revoked = revokes.revoked
        """Revoked task ids (mirrored from the revoked bucket by ``Revokes``, shared, never replaced)."""
        self.by_name = revokes
        """Revokes by task name or glob (``Revokes.covers``), asked only while one is recorded."""
        self.inboxes = inboxes
        self.unknown_grace = unknown_grace
        self.limits = Limits(broker, outcome)
        """Rate limits and concurrency caps (used only by tasks that set one)."""
        self.foreign: set[str] = set()
        """First name parts of unknown tasks warned about as another app's (``warn_foreign``)."""

    async def process(self, delivery: Delivery) -> None:  # noqa: C901 - one check per gate rule, read top to bottom
        """Gate a delivery (the subject decides which task it may run; every header and body field
        is validated), then hand it to execution."""
        msg = delivery.msg
        headers = msg.headers or {}
        outcome = self.outcome
        route = self.names.task_from_subject(msg.subject)
        if route is None:
            await outcome.dead_letter(delivery, "invalid subject",
                                      f"{cut(msg.subject)} is not <prefix>.<queue>.<task name>")
            return
        delivery.name = route[1]
        data = msg.data
        if not data and HDR_OBJECT in headers:  # a claim check (an envelope is never empty)
            claimed = await self.claimed(delivery, headers[HDR_OBJECT])
            if claimed is None:
                return
            data = claimed
        try:
            env = Envelope.decode(data, headers)
        except DecodeError as e:
            task_id = headers.get(HDR_MSG_ID, "").split(":")[0]
            await outcome.dead_letter(delivery, "undecodable", str(e),
                                      task_id=task_id if TASK_ID_RE.match(task_id) else "")
            return
        delivery.task_id = env.id
        if data is not msg.data and headers[HDR_OBJECT] != f"{env.id}.args":
            await outcome.dead_letter(delivery, "forged", f"{HDR_OBJECT} {cut(headers[HDR_OBJECT])} is not the "
                                      f"object of task {env.id}", env=env)
            return
        if env.task != route[1]:
            await outcome.dead_letter(delivery, "forged", f"the message names task {cut(env.task)} but was "
                                      f"published on {msg.subject}, the subject permissions are checked on", env=env)
            return
        scheduler = headers.get(HDR_SCHEDULER)
        if scheduler is not None and scheduler != self.names.schedule_subject(route[0], env.id):
            # NATS checks a schedule's own subject, not its target: a sender allowed to delay tasks of
            # one queue could otherwise enqueue, through a schedule, on any subject of the stream.
            await outcome.dead_letter(delivery, "forged", f"fired by the schedule {cut(scheduler)}, not by this "
                                      f"queue's schedule for task {env.id}", env=env)
            return
        retried = header_int(headers, HDR_RETRIES)
        if retried is None:
            await outcome.dead_letter(delivery, "malformed header", f"{HDR_RETRIES} must be an integer from 0 to "
                                      f"{MAX_HEADER_INT}, got {cut(headers.get(HDR_RETRIES))}", env=env)
            return
        reply = headers.get(HDR_REPLY)
        if reply is not None and not is_reply_for(reply, env.id, self.inboxes):
            await outcome.dead_letter(delivery, "forged", f"{HDR_REPLY} {cut(reply)} is not an inbox subject for "
                                      "this task: results go only to the caller's inbox", env=env)
            return
        task = self.tasks.get(env.task) or self.app.builtins.get(env.task)
        if task is None:
            await self.unknown(delivery, env)
            return
        delivered = attempt(msg)
        retries = retried + delivered - 1
        now = time.time()
        by_name = self.by_name
        revoked = env.id in self.revoked or (
            bool(by_name.names) and by_name.covers(env.task, stream_sequence(msg), route[0]))
        expired = not revoked and env.expires is not None and now > env.expires
        if revoked or expired:
            if self.hooks.on_revoked:
                request = Request(id=env.id, task=env.task, retries=retries, args=env.args, kwargs=env.kwargs,
                                  queue=route[0], parent_id=env.parent_id, root_id=env.root_id, headers=headers)
                await self.hooks.call("on_revoked", request, False, expired)
            reason = "expired" if expired else "revoked"
            await outcome.finish(delivery, env, task, {"state": State.REVOKED.value, "info": {"reason": reason}})
            return
        if env.eta is not None and env.eta > now + 0.001:
            await self.early(delivery, env, now)
            return
        limit = task.options.max_retries
        if limit is not None and retries > limit:
            # Deliveries beyond the limit mean earlier attempts crashed their worker.
            await outcome.dead_letter(delivery, "max retries exceeded",
                                      f"{retries} attempt(s) ended without an outcome (worker crashed?)", env=env)
            return
        try:
            args, kwargs = task.bind_call(env.args, env.kwargs)
        except TypeError as e:
            await outcome.dead_letter(delivery, "arguments do not bind", str(e), env=env)
            return
        if task.options.ignore_result:
            pass  # nothing stored: nothing to check or fence
        elif delivered == 1 and not retried and HDR_CHECK_STORED not in headers and HDR_REPLAYS not in headers:
            delivery.result_seq = 0  # a first delivery of a fresh id: its key holds nothing yet
        else:
            delivery.careful = True
            if await self.done_before(delivery, env, reply):
                return
        request = Request(id=env.id, task=env.task, retries=retries, args=args, kwargs=kwargs,
                          queue=route[0], parent_id=env.parent_id, root_id=env.root_id,
                          eta=env.eta, expires=env.expires, headers=headers,
                          priority=self.names.priority_from_subject(msg.subject),
                          report=lambda state, meta: outcome.report(delivery, state, meta))
        current_request.set(request)  # log lines about this task, from here on, carry its id and name
        if task.options.limited:
            await self.limits.run(delivery, env, task,
                                  lambda: self.execute(delivery, env, task, args, kwargs, request, retries))
            return
        await self.execute(delivery, env, task, args, kwargs, request, retries)

    async def claimed(self, delivery: Delivery, name: str) -> bytes | None:
        """The body of a claim-checked call, fetched from the objects bucket; None once the message
        is settled instead: a malformed name, or an object gone (dead-lettered once, never a loop;
        a redelivery of a task that finished and deleted its object is acked as done)."""
        match = OBJECT_NAME_RE.match(name)
        if match is None or match.group(2) != "args":
            await self.outcome.dead_letter(delivery, "malformed header", f"{HDR_OBJECT} must name an object "
                                           f"<task id>.args, got {cut(name)}")
            return None
        data = await self.broker.get_object(name)
        if data:
            return data
        task_id = match.group(1)
        if is_final((await self.store.read(task_id))[1]):
            await delivery.msg.ack()  # ran and deleted its object: this is a late redelivery
            return None
        await self.outcome.dead_letter(delivery, "object missing", f"the call's body, object {name} of bucket "
                                       f"{self.names.objects_bucket}, is gone (expired after result_ttl, or "
                                       "deleted)", task_id=task_id)
        return None

    async def done_before(self, delivery: Delivery, env: Envelope, reply: str | None) -> bool:
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
            await self.broker.publish_core(reply, dumps(record))
        await delivery.msg.ack()
        return True

    async def unknown(self, delivery: Delivery, env: Envelope) -> None:
        """A task name this worker does not know: during a rolling deploy a worker with newer code
        may know it, so the message goes back (held by the server, not by a slot) until
        ``unknown_grace`` has passed since a worker first met it; then it is dead-lettered."""
        msg, now = delivery.msg, time.time()
        self.warn_foreign(env.task)
        raw = (msg.headers or {}).get(HDR_UNKNOWN_SINCE)
        since = now if raw is None else header_time(raw, now)
        if since is None:
            await self.outcome.dead_letter(delivery, "malformed header", f"{HDR_UNKNOWN_SINCE} must be a Unix time "
                                           f"no later than now, got {cut(raw)}", env=env)
            return
        if now - since >= self.unknown_grace:
            await self.outcome.dead_letter(delivery, "unknown task", f"no task named {env.task!r} in app "
                                           f"{self.app.name!r} (waited {now - since:.0f}s for a worker that knows "
                                           "it)", env=env)
            return
        log.warning("task %s[%s]: no task of that name here; giving workers with newer code %.0fs more to take it",
                    env.task, env.id, self.unknown_grace - (now - since))
        await self.outcome.schedule_again(delivery, env, now + UNKNOWN_STEP, "grace",
                                          {HDR_UNKNOWN_SINCE: f"{since:.6f}"})

    def warn_foreign(self, name: str) -> None:
        """Warn once per module when an unknown task's name shares its first part with no task of this
        app: likely another app's task, sent to the same queues because both use the same subject prefix."""
        module = name.partition(".")[0]
        if module in self.foreign or len(self.foreign) >= 100 or any(
                known.partition(".")[0] == module for known in self.tasks):
            return
        self.foreign.add(module)
        log.warning("task %s is not one of app %r's tasks, and none of them starts with %r: is another app sending "
                    "to queues of subject prefix %r on this server? Apps sharing a server need their own "
                    "subject_prefix (Natask(..., subject_prefix=...) or $NATASK_SUBJECT_PREFIX)", name, self.app.name,
                    module + ".", self.app.config.subject_prefix)

    async def early(self, delivery: Delivery, env: Envelope, now: float) -> None:
        """Delivered before its eta. By a little: the server's clock is behind ours, wait it out.
        By more (published straight to the queue, or a badly skewed clock): hand it back to the
        server as a schedule, so no slot and no ack-pending place is held while it waits."""
        assert env.eta is not None
        if env.eta - now <= MAX_CLOCK_SKEW:
            await delivery.msg.nak(delay=env.eta - now)
            return
        await self.outcome.schedule_again(delivery, env, env.eta, "eta", {})
