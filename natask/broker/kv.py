"""Buckets natask owns, as handles that heal, and watches of their entries that restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)
from nats.js.kv import KeyValue

from ..errors import BrokerError, PermissionDenied, StorageFull
from .connection import RETRY_PAUSE

if TYPE_CHECKING:
    from .provision import Provisioning as Broker

log = logging.getLogger("natask.broker")

WATCH_HEARTBEAT: Final = 1.0
"""Seconds between the server's idle heartbeats on a bucket watch."""
_WATCH_MISSED: Final = 3
"""Heartbeats a bucket watch may miss before it restarts its consumer (gone with its bucket?)."""
_WATCH_INACTIVE: Final = 10.0
"""Seconds the server keeps a watch's consumer once nobody listens (a closed watch, a client gone);
a watch whose client was away longer restarts on the missing heartbeats."""
_RESTART_PAUSE: Final = 1.0
"""Pause between attempts to restart a watch while the server cannot be reached."""


class _Bucket(KeyValue):
    """A KV handle whose calls heal: a bucket deleted on the server is recreated and the call made
    once more; a full store raises ``StorageFull`` at once."""

    def __init__(self, broker: Broker, kv: KeyValue) -> None:
        super().__init__(name=kv._name, stream=kv._stream, pre=kv._pre, js=kv._js, direct=kv._direct)
        self._broker = broker

    async def get(self, *args: Any, **kwargs: Any) -> KeyValue.Entry:
        call = super().get
        return await self._broker._healed(self._stream, lambda: call(*args, **kwargs), f"a read of {self._name}")

    async def put(self, *args: Any, **kwargs: Any) -> int:
        call = super().put
        return await self._broker._healed(self._stream, lambda: call(*args, **kwargs), f"a write to {self._name}")

    async def create(self, *args: Any, **kwargs: Any) -> int:
        call = super().create
        return await self._broker._healed(self._stream, lambda: call(*args, **kwargs), f"a write to {self._name}")

    async def update(self, *args: Any, **kwargs: Any) -> int:
        call = super().update
        return await self._broker._healed(self._stream, lambda: call(*args, **kwargs), f"a write to {self._name}")

    async def delete(self, *args: Any, **kwargs: Any) -> bool:
        call = super().delete
        return await self._broker._healed(self._stream, lambda: call(*args, **kwargs), f"a write to {self._name}")

    async def purge(self, *args: Any, **kwargs: Any) -> bool:
        call = super().purge
        return await self._broker._healed(self._stream, lambda: call(*args, **kwargs), f"a write to {self._name}")


class _Watch:
    """One bucket watch: an ephemeral push consumer (no acks, idle heartbeats), recreated after
    the last entry seen whenever it ends, skips entries or goes silent. No flow control: its
    replies would need publish rights on ``$JS.FC.>``; a slow reader that loses entries notices
    the gap in the consumer sequence and restarts instead."""

    def __init__(self, broker: Broker, bucket: str, keys: str | Sequence[str]) -> None:
        self.broker = broker
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        if not isinstance(keys, str) and len(keys) == 1:
            keys = keys[0]
        self.subject = f"$KV.{bucket}.{keys}" if isinstance(keys, str) else f"$KV.{bucket}.>"
        self.subjects = None if isinstance(keys, str) else [f"$KV.{bucket}.{key}" for key in keys]
        self.after = 0  # stream sequence of the last entry seen
        self.created = ""  # the stream's creation time: another one means the bucket was recreated
        self.cseq = 0  # consumer sequence of the last entry: a jump means entries were lost
        self.sub: Any = None
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def entries(self) -> AsyncGenerator[KeyValue.Entry | None, None]:
        await self.broker._bucket(self.bucket)  # created if missing, and known as natask's
        silence = WATCH_HEARTBEAT * _WATCH_MISSED
        why = ""
        try:
            while True:
                caught_up = await self._open(why)
                if caught_up:
                    yield None
                why = ""
                while not why:
                    try:
                        msg = await asyncio.wait_for(self.queue.get(), silence)
                    except asyncio.TimeoutError:
                        why = f"heard nothing for {silence:g}s (bucket deleted? server restarted?)"
                        break
                    headers = msg.headers or {}
                    if not msg.data and "Status" in headers:
                        why = self._status(headers)
                        if not why and not caught_up:  # an idle heartbeat: nothing pending
                            caught_up = True
                            yield None
                        continue
                    entry, why = self._entry(msg, headers)
                    if entry is not None:
                        yield entry
                        if not caught_up and entry.delta == 0:
                            caught_up = True
                            yield None
        finally:
            await self._close()

    async def _open(self, why: str) -> bool:
        """(Re)create the consumer; True if there is nothing to catch up on. The first start
        tries for up to ``publish_timeout`` (an election, a reconnect); a restart keeps trying
        (logged once) for as long as it takes."""
        broker = self.broker
        await self._close()
        if why:
            log.warning("watch of bucket %s %s: restarting it", self.bucket, why)
        deadline = time.monotonic() + broker.config.publish_timeout
        failing = False
        while True:
            try:
                return await self._start()
            except Exception as e:
                error = broker._translate(e, self.subject)
                final = isinstance(error, (PermissionDenied, StorageFull)) or time.monotonic() >= deadline
                if broker.closed or (not why and final):
                    raise error from e
                if why and not failing:
                    log.warning("watch of bucket %s cannot restart yet (%s): trying again", self.bucket, error)
                failing = True
            await asyncio.sleep(_RESTART_PAUSE if why else RETRY_PAUSE)

    async def _start(self) -> bool:
        broker = self.broker
        info = await broker._stream_info(self.stream)
        if info is None and await broker.heal(self.stream):
            info = await broker._stream_info(self.stream)
        if info is None:
            raise BrokerError(f"bucket {self.bucket} does not exist")
        created = str(info.get("created"))
        if created != self.created:
            if self.created:
                log.info("bucket %s was recreated: watching it from its start", self.bucket)
            self.after, self.created = 0, created
        inbox = broker.nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def put(msg: Msg) -> None:
            queue.put_nowait(msg)

        self.queue = queue
        self.sub = await broker.nc.subscribe(inbox, cb=put)
        config = ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=None if self.subjects else self.subject,
            filter_subjects=self.subjects,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.after else DeliverPolicy.LAST_PER_SUBJECT,
            opt_start_seq=self.after + 1 if self.after else None,
            idle_heartbeat=WATCH_HEARTBEAT,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=_WATCH_INACTIVE,
        )
        consumer = await broker.js.add_consumer(self.stream, config)
        self.cseq = 0
        return not consumer.num_pending

    def _status(self, headers: Mapping[str, str]) -> str:
        """Why the watch must restart, if a status message (heartbeat...) says it must."""
        if headers["Status"] != "100":
            return f"ended ({headers['Status']} {headers.get('Description', '')})"
        last = headers.get("Nats-Last-Consumer", "")
        if last.isdigit() and int(last) != self.cseq:
            return f"missed {int(last) - self.cseq} entries"
        return ""

    def _entry(self, msg: Msg, headers: Mapping[str, str]) -> tuple[KeyValue.Entry | None, str]:
        meta = msg.metadata
        if meta.sequence.consumer != self.cseq + 1:
            return None, f"missed {meta.sequence.consumer - self.cseq - 1} entries"
        self.cseq, self.after = meta.sequence.consumer, meta.sequence.stream
        # TTL markers (nats-server >= 2.11) remove a key like a purge.
        operation = headers.get("KV-Operation") or ("PURGE" if headers.get("Nats-Marker-Reason") else None)
        key = msg.subject[len(self.bucket) + 5:]
        return KeyValue.Entry(self.bucket, key, msg.data, self.after, meta.num_pending, None, operation), ""

    async def _close(self) -> None:
        # The server deletes the consumer once nobody listens (inactive threshold): no API call,
        # so no permission beyond creating it is needed.
        sub, self.sub = self.sub, None
        if sub is None:
            return
        try:
            await sub.unsubscribe()
        except nats.errors.Error as e:
            log.debug("closing the watch of bucket %s: %s", self.bucket, e)

