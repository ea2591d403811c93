"""RPC serving: a task called over core NATS request-reply (pushed, not pulled from the stream),
run in one of the worker's slots and answered with its outcome record; nothing stored or acked."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..broker import Broker, Message
from ..errors import Forged, failure_record
from ..message import Envelope
from ..naming import is_reply_subject
from ..options import Request
from ..states import State
from .delivery import Delivery, Tally, cut

if TYPE_CHECKING:
    from ..app import Natask
    from ..task import Task

log = logging.getLogger("natask.worker")

Run = Callable[["Task[Any, Any]", Sequence[Any], dict[str, Any], Request], Awaitable[Any]]
"""Runs a task and returns its value (``Execution.run``)."""
Encode = Callable[[dict[str, Any], str, bool, str], tuple[bytes, dict[str, Any]]]
"""An outcome record's bytes, within ``max_payload`` (``Outcome.encode``: record, what, objects, hint)."""
_RPC_HINT: Final = " (an RPC reply travels over core NATS, so no claim check: call delay().get() for large results)"
"""Why an RPC call's large result fails where a stored one travels through the objects bucket."""


class Rpc:
    """Answers the RPC calls of one started worker; the worker gives each one a slot and a
    ``Delivery``, and ``done`` frees the slot."""

    def __init__(self, app: Natask, broker: Broker, inboxes: tuple[str, ...], run: Run, encode: Encode,
                 tally: Tally, done: Callable[[Delivery], None]) -> None:
        self.app = app
        self.broker = broker
        self.inboxes = inboxes
        self.run = run
        self.encode = encode
        self.tally = tally
        self.done = done
        self.broadcasts = app.names.broadcast_subject("", "")[:-1]
        """``natask.bcast.<prefix>.``: calls on these subjects are broadcasts (no reply, no result)."""

    async def answer(self, delivery: Delivery) -> None:
        """Run an RPC call and reply with its outcome record; nothing is stored or acked."""
        msg = delivery.msg
        try:
            if msg.subject.startswith(self.broadcasts):
                await self.broadcast(msg)
                return
            if not is_reply_subject(msg.reply, self.inboxes):
                # The reply subject is the sender's choice: answering elsewhere would write with our rights.
                log.warning("RPC on %s without an inbox reply subject: not run", cut(msg.subject))
                return
            try:
                record = await self.call(msg)
            except Exception as exc:
                record = failure_record(exc)
            await self.broker.publish_core(msg.reply, self.encode(record, "the RPC call", False, _RPC_HINT)[0])
        finally:
            self.done(delivery)

    async def broadcast(self, msg: Message) -> None:
        """Run a broadcast task (this worker's one run of it): nothing is stored or answered, a
        failure is logged."""
        try:
            record = await self.call(msg, self.app.names.task_from_broadcast_subject(msg.subject))
        except Exception:
            log.exception("broadcast %s failed", cut(msg.subject))
            self.tally.failed += 1
            return
        log.info("broadcast %s ran: %s", cut(msg.subject), record.get("state"))

    async def call(self, msg: Message, route: tuple[str, str] | None = None) -> dict[str, Any]:
        """The outcome record of the call ``msg`` carries (``Forged`` if its subject and body disagree)."""
        route = route or self.app.names.task_from_rpc_subject(msg.subject)
        if route is None:
            raise Forged(f"invalid RPC subject {cut(msg.subject)}")
        env = Envelope.decode(msg.data, msg.headers)
        if env.task != route[1]:
            raise Forged(f"the message names task {env.task!r} but was sent to {route[1]!r}")
        task = self.app.get_task(env.task)
        args, kwargs = task.bind_call(env.args, env.kwargs)
        request = Request(id=env.id, task=env.task, args=args, kwargs=kwargs, queue=route[0],
                          headers=msg.headers or {})
        value = await self.run(task, args, kwargs, request)
        self.tally.processed += 1
        return {"state": State.SUCCESS.value, "result": value}
