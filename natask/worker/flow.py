"""The worker side of workflows: advance a workflow when one of its tasks finished — next chain step, chord
completion (KV bucket ``natask_chords_<prefix>``), links and errbacks — from what its message carries."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..broker import Broker, SequenceConflict
from ..canvas.eager import Replaced, new_style_errback, replacement
from ..canvas.eager import call as eager_call
from ..canvas.plan import Node, Step, derived_id, expand, seeded_ids, walk
from ..canvas.signature import Freezer, from_dict
from ..errors import ConfigError, EncodeError, PayloadTooLarge, PermissionDenied, TaskFailed, failure_record
from ..message import dumps, loads
from ..naming import HDR_MSG_ID, HDR_REPLY, TASK_ID_RE, is_reply_for
from ..options import Request, current_request
from ..states import State

if TYPE_CHECKING:
    from ..app import Natask
    from ..broker.kv import Bucket
    from ..message import Envelope

log = logging.getLogger("natask.canvas")

_COLLECT_TIMEOUT: Final = 30.0
"""Upper bound for reading a finished chord's member results from KV."""
_COLLECT_BATCH: Final = 256
"""Member results read concurrently when a chord completes."""
MAX_CHORD_SIZE: Final = 1_000_000
"""Largest chord header a worker accepts from workflow data."""


class Site(Protocol):
    """Where a workflow advances: the worker's app, its broker, and who it is."""

    @property
    def app(self) -> Natask: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def ident(self) -> str:
        """The worker's ``host:pid``, stored with the outcomes it writes."""

    @property
    def inboxes(self) -> tuple[str, ...]:
        """Inbox prefixes the worker answers on."""


async def on_outcome(site: Site, envelope: Envelope, record: dict[str, Any]) -> None:
    """Workflow follow-ups of a finished task: chain steps, chord completion, links, errbacks.

    Called by the worker before it replies, stores the outcome and acks; may add ``children`` to
    ``record``. Raising (a broker error) makes the worker return the message for another attempt,
    which is safe: every publish here uses an id fixed by the message, and chord state is keyed
    per member.
    """
    try:
        await _Flow(site, envelope).run(record)
    except (KeyError, TypeError, ValueError, IndexError, ConfigError, PayloadTooLarge):
        # Malformed workflow data (or a callback too large to send) cannot get better on redelivery.
        log.exception("task %s[%s]: malformed workflow data; follow-ups skipped", envelope.task, envelope.id)


async def replace(site: Site, envelope: Envelope, replaced: Replaced, request: Request) -> None:
    """Send what replaces a task (``Task.replace``): its last task takes the replaced task's id (and
    its caller's reply route), then the rest of the replaced task's chain, chord and callbacks follow.
    Ids and message ids derive from the replaced message's: a redelivery re-sends the same ones."""
    env, app, headers = envelope, site.app, request.headers
    mid = headers.get(HDR_MSG_ID) or env.id
    data = replacement(replaced.sig, "natask.accumulate", request.queue or None)
    inherited = {"task_id": env.id, "link": list(env.links), "link_error": list(env.meta.get("errbacks") or [])}
    node = Freezer(app, seeded_ids(f"{mid}/replace"), check=False).freeze(from_dict(app, data), inherited, entry=False)
    for leaf in walk(node):
        if leaf["id"] == env.id:
            # Not the task id as message id: the replaced message used it within the dedupe window.
            leaf["mid"] = derived_id(f"{mid}/replaced")
            reply = headers.get(HDR_REPLY)
            if reply:
                leaf["reply"] = reply
    flow = _Flow(site, env)
    await flow.publish(expand(node, (), {}, list(env.meta.get("chain") or []), env.meta.get("chord")))


class _Flow:
    """The follow-ups of one finished task."""

    def __init__(self, site: Site, env: Envelope) -> None:
        self.app = site.app
        self.broker = site.broker
        self.ident = site.ident
        self.inboxes = site.inboxes
        self.env = env
        self._kv: Bucket | None = None

    async def run(self, record: dict[str, Any]) -> None:
        env, meta = self.env, self.env.meta
        rest: list[Node] = list(meta.get("chain") or [])
        member: dict[str, Any] | None = meta.get("chord")
        state = record.get("state")
        if state == State.SUCCESS:
            value = record.get("result")
            try:
                children = await self.advance(value, rest, member)
                for k, link in enumerate(env.links):
                    children += await self.call(link, value, f"{env.id}/link/{k}")
            except (EncodeError, PayloadTooLarge, PermissionDenied) as e:
                # None of these gets better on a redelivery: fail what will now never run.
                log.error("task %s[%s]: cannot send the next step: %s", env.task, env.id, e)
                await self.fail(failure_record(e, traceback_text=False), rest, member)
                return
            if children:
                record["children"] = children
        elif state in (State.FAILURE, State.REVOKED):
            if state == State.FAILURE:
                for k, errback in enumerate(meta.get("errbacks") or []):
                    await self.errback(errback, record, f"{env.id}/errback/{k}")
            await self.fail(record, rest, member)

    # -- success ----------------------------------------------------------------------------
    async def advance(self, value: Any, rest: list[Node], member: dict[str, Any] | None) -> list[str]:
        """Publish what runs after a success; returns the ids published."""
        if rest:
            return await self.publish(expand(rest[0], (value,), {}, rest[1:], member))
        if member is None:
            return []
        results = await self.complete(member, value)
        if results is None:
            return []
        body = member.get("body")
        if body is not None:
            children = await self.publish(expand(body, (results,), {}, member.get("rest") or [], member.get("up")))
        else:
            children = await self.advance(results, member.get("rest") or [], member.get("up"))
        kv = await self.chords()
        await self.broker.publish(kv.subject(f"{member['id']}.sent"), self.env.id.encode(), {})
        return children

    async def complete(self, member: dict[str, Any], value: Any) -> list[Any] | None:
        """Record this chord member's result; the chord's result list if this call completes it
        (and nobody else did), else None."""
        chord_id, index, size = _chord_member(member)
        kv = await self.chords()
        # One key per member, not a counter: a member finishing twice overwrites its own key.
        await self.broker.publish(kv.subject(f"{chord_id}.m.{index}"), dumps(value), {})
        if await kv.count(f"{chord_id}.m.*") < size:
            return None
        # Only the first completer fires (a redelivery of that same member may fire again:
        # the callback's fixed id makes JetStream drop the second publish).
        if not await self._claim(kv, f"{chord_id}.fired"):
            return None
        if await kv.get(f"{chord_id}.failed") is not None or await kv.get(f"{chord_id}.sent") is not None:
            return None
        results = await asyncio.wait_for(self._collect(kv, chord_id, size), _COLLECT_TIMEOUT)
        missing = [i for i in range(size) if i not in results]
        if missing:
            error = {"state": State.FAILURE.value, "exc_type": "natask.ChordError", "traceback": "",
                     "message": f"chord {chord_id} lost the results of member(s) {missing[:10]} "
                                "(expired: is result_ttl shorter than the chord takes?)"}
            await self.fail(error, [], member)
            return None
        return [results[i] for i in range(size)]

    async def _collect(self, kv: Bucket, chord_id: str, size: int) -> dict[int, Any]:
        """Read every member's result by key (direct gets, a bounded number in flight; nats-py's
        ``kv.watch`` may signal "no more values" before values it already received)."""
        results: dict[int, Any] = {}
        for start in range(0, size, _COLLECT_BATCH):
            keys = range(start, min(size, start + _COLLECT_BATCH))
            entries = await asyncio.gather(*(kv.get(f"{chord_id}.m.{i}") for i in keys))
            for i, entry in zip(keys, entries, strict=True):
                if entry is not None:
                    results[i] = loads(entry.value)
        return results

    # -- failure ----------------------------------------------------------------------------
    async def fail(self, record: Mapping[str, Any], rest: Sequence[Node], member: dict[str, Any] | None) -> None:
        """Mark everything that will now never run with the failure, and fail the enclosing chord."""
        for node in rest:
            for sig in walk(node):
                await self.store(sig, record)
        if member is None:
            return
        chord_id = _chord_member(member)[0]
        kv = await self.chords()
        if not await self._claim(kv, f"{chord_id}.failed"):
            return  # another member failed it first (errbacks ran then)
        body = member.get("body")
        if body is not None:
            if record.get("state") == State.FAILURE:
                seen: list[Any] = []
                for sig in (step.sig for step in expand(body)):
                    for errback in sig.get("link_error") or []:
                        if errback not in seen:
                            seen.append(errback)
                for k, errback in enumerate(seen):
                    await self.errback(errback, record, f"{self.env.id}/chord/{chord_id}/{k}")
            for sig in walk(body):
                await self.store(sig, record)
        await self.fail(record, member.get("rest") or [], member.get("up"))

    async def store(self, sig: Node, record: Mapping[str, Any]) -> None:
        """Store (and reply) the upstream failure as the outcome of a task that will never run."""
        if sig["options"].get("ignore_result"):
            return
        outcome = {k: record[k] for k in ("state", "exc_type", "message", "traceback", "info") if k in record}
        outcome.update(task=sig["task"], worker=self.ident, date_done=time.time(), cause=self.env.id)
        data = dumps(outcome)
        await self.broker.results()
        await self.broker.publish(f"$KV.{self.broker.names.results_bucket}.{sig['id']}", data, {})
        reply = sig.get("reply")
        if isinstance(reply, str) and is_reply_for(reply, sig["id"], self.inboxes):
            await self.broker.publish_core(reply, data)

    # -- publishing -------------------------------------------------------------------------
    async def call(self, data: Mapping[str, Any], value: Any, seed: str) -> list[str]:
        """Send a link/errback with ``value`` as its first argument, under ids derived from ``seed``."""
        node = Freezer(self.app, seeded_ids(seed), check=False).freeze(from_dict(self.app, data), entry=False)
        return await self.publish(expand(node, (value,)))

    async def errback(self, data: Mapping[str, Any], record: Mapping[str, Any], seed: str) -> list[str]:
        """Run an errback of the failed task: Celery's new style ``(request, exc, traceback)`` here, in
        this worker, when its task is registered here and takes more than one positional argument;
        else sent as a task with the failed task's id."""
        if not new_style_errback(self.app, data):
            return await self.call(data, self.env.id, seed)
        env = self.env
        task = self.app.tasks[data["task"]]
        request = Request(env.id, env.task, 0, env.args, env.kwargs, parent_id=env.parent_id, root_id=env.root_id)
        text = str(record.get("traceback") or "")
        exc = TaskFailed(str(record.get("exc_type", "Exception")), str(record.get("message", "")), text, env.id)
        args = (request, exc, text, *data.get("args", ()))
        own = Request(derived_id(seed), task.name, 0, args, dict(data.get("kwargs") or {}))
        try:
            if task.is_async:
                token = current_request.set(own)
                try:
                    await task.fn(*((task, *args) if task.options.bind else args), **own.kwargs)
                finally:
                    current_request.reset(token)
            else:
                await asyncio.to_thread(contextvars.copy_context().run, eager_call, task, args, own.kwargs, own)
        except Exception:
            log.exception("errback %s of task %s[%s] raised", task.name, env.task, env.id)
        return []

    async def publish(self, steps: Sequence[Step]) -> list[str]:
        env, broker, hooks = self.env, self.broker, self.app.hooks
        items, calls = [], []
        for step in steps:
            sig = step.sig
            opts = dict(sig["options"])
            call = self.app.client.prepare(sig["task"], step.args, step.kwargs, task_id=sig["id"],
                                           headers=opts.pop("headers", None), parent_id=env.id,
                                           root_id=env.root_id or env.id, links=sig.get("link"), meta=step.meta,
                                           **opts)
            if sig.get("reply"):
                call.headers[HDR_REPLY] = sig["reply"]
            if sig.get("mid"):
                call.headers[HDR_MSG_ID] = sig["mid"]
            if hooks.before_publish:
                await hooks.call("before_publish", call)  # in the finished task's context
            calls.append(call)
            if broker.per_queue:
                await broker.ensure_stream(call.queue)  # a step routed to a queue nobody published to yet
            if call.priority:
                await broker.ensure_level(call.queue, call.priority)
            subject = self.app.client.subject(call)
            payload = call.payload
            try:
                broker.check_size(subject, payload, call.headers)
            except PayloadTooLarge as e:  # a large parent result as the next step's argument
                payload = await self.app.client.claim_check(broker, call, e)
            items.append((subject, payload, call.headers))
        if len(items) == 1:
            await broker.publish(*items[0])
        elif items:
            subjects, payloads, headers_list = zip(*items, strict=True)
            await broker.publish_many(subjects, payloads, headers_list)
        if hooks.after_publish:
            for call in calls:
                await hooks.call("after_publish", call)
        return [step.sig["id"] for step in steps]

    # -- chord state ------------------------------------------------------------------------
    async def chords(self) -> Bucket:
        if self._kv is None:
            self._kv = await self.broker._bucket(self.broker.names.chords_bucket)
        return self._kv

    async def _claim(self, kv: Bucket, key: str) -> bool:
        """Create ``key`` naming this task; True if we created it or an earlier delivery of this
        same task did."""
        me = self.env.id.encode()
        try:
            await kv.create(key, me)
            return True
        except SequenceConflict:
            entry = await kv.get(key)
            return entry is not None and entry.value == me


def _chord_member(member: Mapping[str, Any]) -> tuple[str, int, int]:
    """(chord id, member index, chord size) from workflow data, validated: the id becomes a KV key."""
    chord_id, index, size = member["id"], member["i"], member["n"]
    if not (isinstance(chord_id, str) and TASK_ID_RE.match(chord_id)):
        raise ValueError(f"invalid chord id {chord_id!r:.100}")
    if not (isinstance(index, int) and isinstance(size, int) and 0 <= index < size <= MAX_CHORD_SIZE):
        raise ValueError(f"invalid chord member {index!r:.20} of {size!r:.20}")
    return chord_id, index, size
