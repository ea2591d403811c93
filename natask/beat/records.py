"""The last fire time enqueued per entry, in the beat bucket: read in bulk, written pipelined with a
compare-and-set on each key's revision."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

from ..broker import SequenceConflict
from ..broker.kv import Bucket, Entry
from .schedule import UTC

log = logging.getLogger("natask.beat")

RECORD_PREFIX: Final = "last."
"""KV key prefix of the last fire time enqueued per entry: ``last.<entry>`` -> ``{"fire": unix, "id": tick}``."""
READ_CONCURRENCY: Final = 256
"""Record reads in flight at a time when a new leader loads them."""
WRITE_BATCH: Final = 4096
"""Record writes in flight at a time (as ``Broker.publish_many`` pipelines publishes)."""
WRITE_ACK_WAIT: Final = 5.0
"""Seconds a pipelined batch of record writes waits for its acks; the rest is written one by one."""

Record = tuple[str, datetime, str]
"""An entry's name, its last enqueued fire time and that tick's id."""


class Records:
    """The records of one leader: what it read or wrote, with each key's revision for the next CAS."""

    def __init__(self, kv: Bucket) -> None:
        self.kv = kv
        self._revisions: dict[str, int] = {}

    async def load(self, names: Sequence[str]) -> dict[str, datetime | None]:
        """The recorded last fire time of each entry (``None``: never recorded); reads in parallel."""
        self._revisions = {}
        out: dict[str, datetime | None] = {}
        for start in range(0, len(names), READ_CONCURRENCY):
            chunk = names[start:start + READ_CONCURRENCY]
            found = await asyncio.gather(*(self._get(name) for name in chunk), return_exceptions=True)
            for name, item in zip(chunk, found, strict=True):
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    out[name] = None
                    continue
                self._revisions[name] = item.revision or 0
                out[name] = record_time(item.value)
        return out

    async def _get(self, name: str) -> Entry | None:
        return await self.kv.get(RECORD_PREFIX + name)

    async def write(self, latest: Iterable[Record]) -> None:
        """Record each entry's last enqueued fire time and tick id, never moving it backwards:
        pipelined batches of compare-and-set writes; a conflict, a refusal or a missing ack is then
        written alone."""
        items = list(latest)
        for start in range(0, len(items), WRITE_BATCH):
            await self._write(items[start:start + WRITE_BATCH])

    async def _write(self, items: Sequence[Record]) -> None:
        revisions = self._revisions
        written = await self.kv.write_many([(RECORD_PREFIX + name, _value(fire, task_id), revisions.get(name, 0))
                                            for name, fire, task_id in items], WRITE_ACK_WAIT)
        for (name, fire, task_id), revision in zip(items, written, strict=True):
            if revision is not None:
                revisions[name] = revision
            else:  # refused, unacknowledged or not sent: alone, keeping a later time
                await self.write_one(name, fire, task_id)

    async def write_one(self, name: str, fire: datetime, task_id: str) -> None:
        """Record one fire time (compare-and-set), keeping a later time another beat recorded."""
        key, kv = RECORD_PREFIX + name, self.kv
        value = _value(fire, task_id)
        rev = self._revisions.get(name)
        try:
            if rev is None:
                self._revisions[name] = await kv.create(key, value)
            else:
                self._revisions[name] = await kv.update(key, value, last=rev)
            return
        except SequenceConflict:
            pass
        # Another beat wrote it meanwhile (it led while we thought we did): keep the later time.
        item = await kv.get(key)
        if item is None:  # the bucket was deleted and recreated: start over
            self._revisions[name] = await kv.create(key, value)
            return
        theirs = record_time(item.value)
        if theirs is not None and theirs >= fire:
            self._revisions[name] = item.revision or 0
        else:
            self._revisions[name] = await kv.update(key, value, last=item.revision)


def _value(fire: datetime, task_id: str) -> bytes:
    # json.dumps({"fire": ..., "id": ...}) byte for byte: a tick id has no character JSON escapes.
    return b'{"fire": %d, "id": "%s"}' % (int(fire.timestamp()), task_id.encode())


def loads(data: bytes | None) -> dict[str, Any]:
    """A JSON object stored in the beat bucket (``{}`` if it is not one)."""
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def record_time(data: bytes | None) -> datetime | None:
    """The fire time a record holds (``None`` if it holds none)."""
    fire = loads(data).get("fire")
    if isinstance(fire, bool) or not isinstance(fire, int):
        return None
    return datetime.fromtimestamp(fire, UTC)
