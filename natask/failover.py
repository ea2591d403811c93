"""Disaster recovery for a queue with a stream of its own (``stream_per_queue``): a mirror of its
stream in another cluster, and the mirror's promotion once the primary cluster is lost.

The fail-over, step by step (``tests/integration/test_qstreams_topology.py`` performs exactly these):

1. Beforehand, ``await add_mirror(app, "eu", placement={"cluster": "east"})`` (or ``natask failover
   mirror eu --cluster east``) creates ``NATASK_<PREFIX>_mirror_eu`` in the other cluster. It makes
   sure the queue's consumer exists first: a mirror of a WorkQueue stream consumes it, and would
   take (remove) tasks no consumer of the queue holds.
2. The primary cluster is lost.
3. From a client of the surviving cluster, ``await promote(app, "eu")`` (``natask failover promote
   eu``): the lost primary stream is deleted (the JetStream meta leader does it while its servers are
   down, so the surviving side needs a majority of the meta group's servers), the mirror becomes a
   normal stream holding the queue's subjects, copies of tasks whose final outcome the results
   bucket holds are removed (they ran before the loss), older copies of a task the mirror also
   holds a later copy of are removed, and the queue's consumers are created on it.
4. Workers (old or new) serve the queue from the promoted stream; producers publish to it.

What the mirror cannot give back: calls waiting on a server-held delay in the primary (countdown,
eta, retries in backoff, rate-limit waits), which reach the mirror only once they fire; tasks acked
by the primary after the mirror's last copy of them whose outcome was not stored (``ignore_result``
tasks: nothing records that they ran) run again; tasks published to the primary that the mirror had
not copied yet (it lags by up to a second or so) are lost with it. The results bucket must survive
the loss (create it from the surviving side, or keep it in a third cluster).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .broker import Broker, Stored
from .client import App
from .config import check_placement, check_queue_name
from .errors import ConfigError, NataskError
from .message import Envelope
from .naming import HDR_OBJECT, MAX_PRIORITY, OBJECT_NAME_RE
from .states import FINAL_STATES
from .waiting import read_record

WINDOW: Final = 1000
"""Stream sequences read at a time when a promoted stream is settled."""
_READ_BYTES: Final = 8 * 1024 * 1024
"""Bytes one batched read of the promoted stream may return."""


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did."""

    stream: str
    """The queue's stream from now on (the promoted mirror)."""
    waiting: int
    """Tasks left in it to run."""
    finished: int
    """Copies of tasks whose final outcome was stored before the loss: removed (they do not run again)."""
    superseded: int
    """Older copies of a task of which the mirror holds a later copy (an attempt retried or replayed): removed."""


async def _broker(app: App, queue: str) -> Broker:
    check_queue_name(queue)
    if not app.config.stream_per_queue:
        raise ConfigError("mirrors are per queue: they need stream_per_queue=True (NATASK_STREAM_PER_QUEUE=1), where "
                          "each queue has a stream of its own")
    return await app.client.broker()


async def add_mirror(app: App, queue: str, *, placement: Mapping[str, Any] | None = None,
                     replicas: int | None = None, name: str | None = None) -> str:
    """Create a mirror of ``queue``'s stream (``NATASK_<PREFIX>_mirror_<queue>`` unless ``name``),
    placed by ``placement`` (``{"cluster": ..., "tags": [...]}``; e.g. another cluster of a
    super-cluster), with ``replicas`` (default: the queue's); its name. Nothing is created if it
    exists. The queue's consumer is made first (a mirror of a WorkQueue stream would take tasks no
    consumer holds); the mirror copies the task subjects, not the schedules (delayed calls reach it
    when they fire)."""
    broker = await _broker(app, queue)
    place = None if placement is None else check_placement(placement)
    if replicas is not None and not (type(replicas) is int and 1 <= replicas <= 5):
        raise ConfigError(f"replicas must be an int from 1 to 5, got {replicas!r}")
    await broker.ensure_consumer(queue, update=False)  # before the mirror: it would take what no consumer holds
    return await broker.add_mirror(queue, name or app.names.queue_mirror(queue), place, replicas)


async def promote(app: App, queue: str, *, name: str | None = None, force: bool = False) -> Promotion:
    """Make the mirror of ``queue`` (``name``, default ``NATASK_<PREFIX>_mirror_<queue>``) its
    stream once the primary is lost: the lost primary stream is deleted, the mirror becomes a normal
    stream holding the queue's subjects, copies of tasks whose final outcome the results bucket holds
    (they ran) and older copies of tasks it also holds a later copy of are removed, and the queue's
    consumers are created on it. Refused while the primary still answers, unless ``force`` (then it
    is deleted, and what the mirror had not copied is lost). Safe to run again."""
    broker = await _broker(app, queue)
    stream = await broker.promote_mirror(queue, name or app.names.queue_mirror(queue), force)
    finished, superseded, waiting = await _settle(broker, stream, broker.domain_of(queue))
    await broker.ensure_consumer(queue, update=False)
    state = await broker.stream_state(stream, f"{app.names.prefix}.>", broker.domain_of(queue))
    held = set(state.subjects) if state is not None else set()
    for level in range(1, MAX_PRIORITY + 1):
        if any(app.names.priority_from_subject(s) == level for s in held):
            await broker.ensure_level(queue, level)
    return Promotion(stream, waiting, finished, superseded)


async def _settle(broker: Broker, stream: str, domain: str | None) -> tuple[int, int, int]:
    """Remove from a promoted stream what must not run again: (finished, superseded, left)."""
    state = await broker.stream_state(stream, domain=domain)
    if state is None or not state.messages:
        return 0, 0, 0
    copies: dict[str, list[int]] = {}
    left = 0
    low = state.first_seq
    while low <= state.last_seq:
        high = min(low + WINDOW, state.last_seq + 1)
        for stored in await broker.read_forward(stream, ">", low, high, batch=WINDOW, max_bytes=_READ_BYTES,
                                                domain=domain):
            task_id = _task_id(stored)
            if task_id is None:
                left += 1  # undecodable: the worker dead-letters it
            else:
                copies.setdefault(task_id, []).append(stored.seq)
        low = high
    finished = superseded = 0
    for task_id, seqs in copies.items():
        record = await read_record(broker, task_id)
        done = record is not None and record.get("state") in FINAL_STATES
        drop = seqs if done else sorted(seqs)[:-1]  # the latest copy is the attempt still due
        for seq in drop:
            await broker.delete_message(stream, seq, domain)
        finished += len(drop) if done else 0
        superseded += 0 if done else len(drop)
        left += 0 if done else 1
    return finished, superseded, left


def _task_id(stored: Stored) -> str | None:
    """The task id of a stored call (from its claim check's object name when its body is elsewhere)."""
    claim = stored.headers.get(HDR_OBJECT)
    if claim is not None and not stored.data:
        match = OBJECT_NAME_RE.match(claim)
        return match.group(1) if match else None
    try:
        return Envelope.decode(stored.data, stored.headers).id
    except NataskError:
        return None
