"""Buckets natask owns, as handles that heal, and watches of their entries that restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypeVar

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
from ..naming import HDR_EXPECTED_LAST_SUBJECT_SEQ, HDR_KV_OPERATION
from .connection import RETRY_PAUSE
from .translate import WRONG_LAST_SEQUENCE, SequenceConflict

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

    from ..config import Config

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
T = TypeVar("T")
_SEQ_RE: Final = re.compile(rb'"seq":(\d+)')


class Host(Protocol):
    """The connection a bucket and its watches run on (``Provisioning`` is one)."""

    config: Config
    nc: Client
    js: JetStreamContext
    api_prefix: str

    @property
    def closed(self) -> bool: ...
    async def api(self, call: Callable[[], Awaitable[T]]) -> T: ...
    async def _healed(self, stream: str, call: Callable[[], Awaitable[T]], what: str) -> T: ...
    def _translate(self, e: BaseException, subject: str) -> BrokerError: ...
    async def _request(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> bytes: ...
    async def _bucket(self, bucket: str) -> Bucket: ...
    async def _stream_info(self, stream: str) -> dict[str, Any] | None: ...
    async def heal(self, stream: str) -> bool: ...


class Entry(NamedTuple):
    """One stored revision of a key: ``value`` is empty and ``operation`` ``DEL``/``PURGE`` for a
    delete marker (or an expiry marker)."""

    key: str
    value: bytes
    revision: int
    operation: str | None = None


class Bucket:
    """A KV bucket natask owns. Its calls heal (a bucket deleted on the server is recreated and the
    call made once more) and speak natask: a missing key is ``None``, a compare-and-set that lost
    is ``SequenceConflict``, a full store ``StorageFull``, anything else ``BrokerError``."""

    def __init__(self, broker: Host, kv: KeyValue) -> None:
        self._broker = broker
        self._kv = kv
        self.name: str = kv._name
        self.stream: str = kv._stream
        self._pre: str = kv._pre

    def subject(self, key: str) -> str:
        """The subject a key is stored under (``$KV.<bucket>.<key>``)."""
        return self._pre + key

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._broker._healed(self.stream, call, f"{what} {self.name}")
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise SequenceConflict(f"{what} {self.name}: the key changed meanwhile") from e
        except nats.js.errors.BadRequestError as e:
            if e.err_code == WRONG_LAST_SEQUENCE:
                raise SequenceConflict(f"{what} {self.name}: {e.description}") from e
            raise self._broker._translate(e, self.subject("")) from e
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            raise self._broker._translate(e, self.subject("")) from e

    async def get(self, key: str) -> Entry | None:
        """The key's latest value; None if it was never stored, deleted, purged or expired. Asked
        again through a leader election or a reconnect (up to ``publish_timeout``)."""
        try:
            entry = await self._call("a read of", lambda: self._broker.api(lambda: self._kv.get(key)))
        except BrokerError as e:
            if isinstance(e.__cause__, (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)):
                return None
            raise
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None
        return Entry(key, entry.value, entry.revision or 0, entry.operation)

    async def value(self, key: str, timeout: float = 2.0) -> bytes | None:
        """One quick read of the key's value (no retries): None if it holds none. A direct get
        goes through the connection's PubAck inbox: a third of nats-py's ``kv.get`` in CPU (no inbox
        token, task or exception per read); not found, deleted or expired is an empty body."""
        if self._kv._direct:
            subject = f"{self._broker.api_prefix}.DIRECT.GET.{self.stream}.{self.subject(key)}"
            try:
                data = await self._broker._request(subject, b"", {}, timeout)
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                raise self._broker._translate(e, subject) from e
            return data or None
        entry = await self.get(key)
        return entry.value if entry is not None and entry.value else None

    async def last(self, key: str, *, leader: bool = False) -> tuple[int, Entry | None]:
        """The key's last revision (0: never written) and its entry, markers included (their value
        is empty). ``leader=True`` reads from the stream leader rather than any replica (a replica
        may lag behind a write just lost a race to)."""
        js = self._broker.js
        try:
            msg = await self._broker.api(lambda: js.get_msg(self.stream, subject=self.subject(key), direct=not leader))
        except nats.js.errors.NotFoundError:
            return 0, None
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            raise self._broker._translate(e, self.subject(key)) from e
        seq = msg.seq or 0
        operation = (msg.headers or {}).get(HDR_KV_OPERATION)
        return seq, Entry(key, msg.data or b"", seq, operation)

    async def keys(self) -> list[str]:
        """Every key holding a value (reads the whole bucket: for tools and tests, not hot paths)."""
        try:
            return list(await self._call("a listing of", lambda: self._kv.keys()))
        except BrokerError as e:
            if isinstance(e.__cause__, nats.js.errors.NoKeysError):
                return []
            raise

    async def put(self, key: str, value: bytes) -> int:
        """Store a value; its revision."""
        return await self._call("a write to", lambda: self._kv.put(key, value))

    async def create(self, key: str, value: bytes) -> int:
        """Store a value only if the key holds none; ``SequenceConflict`` if it does."""
        return await self._call("a write to", lambda: self._kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Store a value only if the key's revision is still ``last``; ``SequenceConflict`` if not."""
        return await self._call("a write to", lambda: self._kv.update(key, value, last=last))

    async def delete(self, key: str) -> None:
        await self._call("a write to", lambda: self._kv.delete(key))

    async def purge(self, key: str) -> None:
        """Remove a key and its history."""
        await self._call("a write to", lambda: self._kv.purge(key))

    async def write_many(self, items: Sequence[tuple[str, bytes, int]], ack_wait: float = 5.0) -> list[int | None]:
        """Pipelined compare-and-set writes ``(key, value, expected revision; 0: absent)``: each
        one's new revision, or None where it was refused (another revision), not acknowledged
        within ``ack_wait`` or not sent (the connection went away): write those one by one."""
        nc = self._broker.nc
        inbox = nc.new_inbox()
        cut = len(inbox) + 1
        replies: list[bytes | None] = [None] * len(items)
        left = len(items)
        done = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            nonlocal left
            i = int(msg.subject[cut:])
            if replies[i] is None:
                replies[i] = msg.data  # empty: a 503 status (no stream: the bucket is gone)
                left -= 1
                if not left:
                    done.set()

        if not items:
            return []
        sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
        try:
            for i, (key, value, expected) in enumerate(items):
                # A KV key is a subject: the expected last sequence is the key's revision (0: absent).
                await nc.publish(self._pre + key, value, f"{inbox}.{i}",
                                 {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(expected)})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), ack_wait)
        except nats.errors.Error as e:  # reconnecting, closed...: what was not acknowledged goes alone
            log.debug("pipelined writes to %s interrupted: %s", self.name, e)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        out: list[int | None] = []
        for data in replies:
            seq = _SEQ_RE.search(data) if data and b'"error"' not in data else None
            out.append(int(seq.group(1)) if seq else None)
        return out

    async def count(self, keys: str) -> int:
        """How many keys matching ``keys`` (a wildcard) hold a value: an ephemeral consumer's pending
        count, O(1) data however many there are."""
        broker = self._broker
        config = ConsumerConfig(filter_subject=self.subject(keys), deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                ack_policy=AckPolicy.NONE, mem_storage=True, num_replicas=1,
                                inactive_threshold=10.0)
        info = await self._call("a count of", lambda: broker.js.add_consumer(self.stream, config))
        try:
            return int(info.num_pending or 0)
        finally:
            try:
                await broker.js.delete_consumer(self.stream, info.name)
            except Exception as e:  # the inactive threshold removes it anyway
                log.debug("deleting a counting consumer: %s", e)


class _Watch:
    """One bucket watch: an ephemeral push consumer (no acks, idle heartbeats), recreated after
    the last entry seen whenever it ends, skips entries or goes silent. No flow control: its
    replies would need publish rights on ``$JS.FC.>``; a slow reader that loses entries notices
    the gap in the consumer sequence and restarts instead."""

    def __init__(self, broker: Host, bucket: str, keys: str | Sequence[str]) -> None:
        self.broker = broker
        self.pending = -1  # entries still to come, as the latest one said
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

    async def entries(self) -> AsyncGenerator[Entry | None, None]:
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
                        if not caught_up and self.pending == 0:
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

    def _entry(self, msg: Msg, headers: Mapping[str, str]) -> tuple[Entry | None, str]:
        meta = msg.metadata
        if meta.sequence.consumer != self.cseq + 1:
            return None, f"missed {meta.sequence.consumer - self.cseq - 1} entries"
        self.cseq, self.after, self.pending = meta.sequence.consumer, meta.sequence.stream, meta.num_pending
        # TTL markers (nats-server >= 2.11) remove a key like a purge.
        operation = headers.get(HDR_KV_OPERATION) or ("PURGE" if headers.get("Nats-Marker-Reason") else None)
        key = msg.subject[len(self.bucket) + 5:]
        return Entry(key, msg.data, self.after, operation), ""

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

