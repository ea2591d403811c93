"""The last fire time enqueued per entry, in the beat bucket: read in bulk, written pipelined with a
compare-and-set on each key's revision."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from ..broker import Broker
from ..naming import HDR_EXPECTED_LAST_SUBJECT_SEQ
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
_SEQ_RE: Final = re.compile(rb'"seq":(\d+)')

Record = tuple[str, datetime, str]
"""An entry's name, its last enqueued fire time and that tick's id."""


class Records:
    """The records of one leader: what it read or wrote, with each key's revision for the next CAS."""

    def __init__(self, broker: Broker, kv: KeyValue) -> None:
        self.broker = broker
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

    async def _get(self, name: str) -> KeyValue.Entry | None:
        try:
            return await self.kv.get(RECORD_PREFIX + name)
        except nats.js.errors.KeyNotFoundError:
            return None

    async def write(self, latest: Iterable[Record]) -> None:
        """Record each entry's last enqueued fire time and tick id, never moving it backwards:
        pipelined batches of compare-and-set writes; a conflict, a refusal or a missing ack is then
        written alone."""
        items = list(latest)
        for start in range(0, len(items), WRITE_BATCH):
            await self._write(items[start:start + WRITE_BATCH])

    async def _write(self, items: Sequence[Record]) -> None:
        nc = self.broker.nc
        inbox = nc.new_inbox()
        cut = len(inbox) + 1
        replies: list[bytes | None] = [None] * len(items)
        state = {"left": len(items)}
        done = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            i = int(msg.subject[cut:])
            if replies[i] is None:
                replies[i] = msg.data  # empty: a 503 status (no stream: the bucket is gone)
                state["left"] -= 1
                if not state["left"]:
                    done.set()

        pre, revisions = self.kv._pre, self._revisions
        sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
        try:
            for i, (name, fire, task_id) in enumerate(items):
                # A KV key is a subject: the expected last sequence is the key's revision (0: absent).
                headers = {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(revisions.get(name, 0))}
                await nc.publish(pre + RECORD_PREFIX + name, _value(fire, task_id), f"{inbox}.{i}", headers)
            try:
                await asyncio.wait_for(done.wait(), WRITE_ACK_WAIT)
            except asyncio.TimeoutError:
                pass
        except nats.errors.Error as e:  # reconnecting, closed...: what was not acknowledged goes alone
            log.debug("pipelined record writes interrupted: %s", e)
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        for (name, fire, task_id), data in zip(items, replies, strict=True):
            seq = _SEQ_RE.search(data) if data and b'"error"' not in data else None
            if seq is not None:
                revisions[name] = int(seq.group(1))
            else:
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
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # Another beat wrote it meanwhile (it led while we thought we did): keep the later time.
        try:
            item = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # the bucket was deleted and recreated: start over
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
