"""Ticks as task messages: each entry's signature planned once (as ``apply_async`` would send it),
then one message per tick under the tick's id, published pipelined through the app's bulk path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..canvas.plan import expand
from ..canvas.signature import Freezer
from .schedule import PeriodicEntry

if TYPE_CHECKING:
    from ..app import Natask
    from ..broker import Broker


class _Plan(NamedTuple):
    """What ``launch`` passes to ``Natask._prepare`` for an entry's signature, but the task id."""

    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    links: list[Any] | None
    meta: dict[str, Any]
    options: dict[str, Any]
    subject: str
    """The task subject of the queue (a message with an ``eta`` is routed by the app instead)."""


class Message(NamedTuple):
    """One tick, encoded and routed."""

    subject: str
    payload: bytes
    headers: dict[str, str]


class Enqueuer:
    """Builds and publishes the messages of ticks for one app."""

    def __init__(self, app: Natask) -> None:
        self.app = app
        self._plans: dict[str, _Plan] = {}

    def message(self, broker: Broker, entry: PeriodicEntry, task_id: str) -> Message:
        """The message of one tick; raises what ``apply_async`` would (bad arguments, too large...)."""
        plan = self._plans.get(entry.name)
        if plan is None:
            plan = self._plans[entry.name] = self._plan(entry)
        call = self.app.client.prepare(plan.task, plan.args, plan.kwargs, task_id=task_id, links=plan.links,
                                 meta=plan.meta, **plan.options)
        # Nobody waits on a tick through this beat's connection: no reply route and no result handle
        # (the worker still stores the result unless the task ignores it).
        subject = plan.subject
        if call.eta is not None:  # a countdown or eta option: the app routes it to the schedule subject
            _, subject = self.app.client.route(broker, call._replace(ignore_result=True))
        broker.check_size(subject, call.payload, call.headers)
        return Message(subject, call.payload, call.headers)

    def forget(self, name: str) -> None:
        """Plan entry ``name`` again on its next tick (it changed or went away)."""
        self._plans.pop(name, None)

    def _plan(self, entry: PeriodicEntry) -> _Plan:
        node = Freezer(self.app).freeze(entry.signature)
        (step,) = expand(node)  # a signature is one message
        task = self.app.tasks.get(step.sig["task"])
        if task is not None:
            task.check_args(step.args, step.kwargs)
        options = step.sig["options"]
        return _Plan(step.sig["task"], step.args, step.kwargs, step.sig.get("link"), step.meta, options,
                     self.app.names.priority_subject(options["queue"], step.sig["task"], options["priority"])
                     if options.get("priority") else self.app.names.task_subject(options["queue"], step.sig["task"]))

    async def publish(self, broker: Broker, messages: Sequence[Message]) -> None:
        """Publish pipelined; returns once the server acknowledged every message (a message it did
        not acknowledge is published again under its id: ``Broker.publish_many``)."""
        if not messages:
            return
        names = self.app.names
        if broker.per_queue:
            for queue in {names.queue_of_subject(m.subject) for m in messages} - {None}:
                await broker.ensure_stream(queue)
        else:
            await broker.ensure_stream()
        for m in messages:
            level = names.priority_from_subject(m.subject)
            route = names.task_from_subject(m.subject) if level else None
            if route is not None:  # a tick with a priority: its level's consumer must exist
                await broker.ensure_level(route[0], level)
        await broker.publish_many([m.subject for m in messages], [m.payload for m in messages],
                                  [m.headers for m in messages])
