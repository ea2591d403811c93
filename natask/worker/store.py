"""The results bucket as workers write it: a final outcome is stored once (the first one wins).

Every write to a task's key is a compare-and-set on the key's last revision
(``Nats-Expected-Last-Subject-Sequence``), and no write lands on a final record (SUCCESS, FAILURE,
REVOKED). So a worker that lost its lease (frozen, partitioned past ``ack_wait``) and resumes after
another worker finished the task cannot replace that outcome, nor can its late ``update_state``.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from ..broker import Broker, SequenceConflict
from ..errors import BrokerError
from ..message import loads
from ..naming import HDR_EXPECTED_LAST_SUBJECT_SEQ
from ..states import FINAL_STATES

log = logging.getLogger("natask.worker")

_ATTEMPTS: Final = 5
"""Compare-and-set rounds before giving up on a key that keeps changing under us."""

Record = dict[str, Any]


def is_final(record: Record | None) -> bool:
    """Whether a stored record is a final outcome (it never changes afterwards)."""
    return record is not None and record.get("state") in FINAL_STATES


class ResultStore:
    """Reads and conditional writes of one app's results bucket, on one broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def subject(self, task_id: str) -> str:
        return self.broker.names.result_subject(task_id)

    async def read(self, task_id: str, *, leader: bool = False) -> tuple[int, Record | None]:
        """The key's last revision (0: never written) and its record (None for a delete marker or
        an undecodable value). ``leader=True`` reads from the stream leader rather than any replica
        (a replica may lag behind a write we just lost a race to)."""
        seq, entry = await (await self.broker.results()).last(task_id, leader=leader)
        if entry is None or not entry.value or entry.operation:
            return seq, None
        try:
            record = loads(entry.value)
        except Exception:
            return seq, None
        return seq, record if isinstance(record, dict) else None

    async def write(self, task_id: str, data: bytes, expected: int | None) -> tuple[int, Record | None]:
        """Store ``data`` unless a final outcome is stored already.

        ``expected`` is the key's revision as the caller knows it (0: no record; None: unknown, read
        it first). Returns ``(revision, None)`` once stored, or ``(revision, final record)`` when a
        final outcome was there first (``data`` is dropped).
        """
        subject = self.subject(task_id)
        for attempt in range(_ATTEMPTS):
            if expected is None:
                expected, record = await self.read(task_id, leader=attempt > 0)
                if is_final(record):
                    return expected, record
            try:
                published = await self.broker.publish(subject, data, {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(expected)})
            except SequenceConflict:
                expected = None  # written in between: look again
                continue
            return published.seq, None
        raise BrokerError(f"the result of task {task_id} kept changing under {_ATTEMPTS} compare-and-set attempts")
