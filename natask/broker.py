"""JetStream plumbing for one event loop: connect, provision, publish with retries, results KV."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeGuard, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from .config import Config, redact_url
from .errors import BrokerError, ConfigError, PayloadTooLarge, PermissionDenied, StorageFull
from .message import headers_size
from .naming import DLQ_STREAM, HDR_CHECK_STORED, Names

log = logging.getLogger("natask.broker")

MIN_SERVER: Final = (2, 12, 0)
"""Server-held delays (message schedules) need nats-server 2.12."""

_PERM_RE: Final = re.compile(r'permissions violation for (publish|subscription) to "?([^"\s]+)"?', re.I)
_RETRY_PAUSE: Final = 0.25
PIPELINE: Final = 4096
"""Most publishes of one ``publish_many`` waiting for their PubAck at a time."""
_BATCH_ACK_WAIT: Final = 5.0
"""Seconds ``publish_many`` waits without any PubAck before publishing the rest one by one."""
"""Pause between publish attempts while the server is unreachable or electing a leader."""

ResultCallback = Callable[[str, bytes], None]
T = TypeVar("T")


class Published(NamedTuple):
    """What the server's PubAck said of a publish."""

    seq: int
    """The message's stream sequence (the original's, for a duplicate)."""
    duplicate: bool
    """The stream had this ``Nats-Msg-Id`` already within its duplicate window: stored once."""


_SEQ_RE: Final = re.compile(rb'"seq":(\d+)')

_WRONG_LAST_SEQUENCE: Final = 10071


class SequenceConflict(BrokerError):
    """A compare-and-set publish (``Nats-Expected-Last-Subject-Sequence``) found another last
    sequence on its subject: someone wrote the key in between."""

_STORAGE_FULL: Final = frozenset({10002, 10023, 10028, 10047})
"""JetStream err_codes of a full store: account limits exceeded (10002), insufficient resources
(10023: the server's max_file_store/max_memory_store), memory and storage reservations (10028, 10047)."""
_STORE_FAILED: Final = 10077
"""A stream refused a message: its description says which limit ("maximum bytes exceeded"...)."""
_STREAM_NOT_FOUND: Final = 10059
_CONSUMER_NOT_FOUND: Final = 10014
_CHECK_TIMEOUT: Final = 2.0
"""Seconds a check whether a stream or consumer exists may take (an election answers slowly or not)."""
_PRESENT_FOR: Final = 1.0
"""Seconds a stream seen to exist is not asked about again (no-responders during an election repeat)."""
WATCH_HEARTBEAT: Final = 1.0
"""Seconds between the server's idle heartbeats on a bucket watch."""
_WATCH_MISSED: Final = 3
"""Heartbeats a bucket watch may miss before it restarts its consumer (gone with its bucket?)."""
_WATCH_INACTIVE: Final = 10.0
"""Seconds the server keeps a watch's consumer once nobody listens (a closed watch, a client gone);
a watch whose client was away longer restarts on the missing heartbeats."""
_RESTART_PAUSE: Final = 1.0
"""Pause between attempts to restart a watch while the server cannot be reached."""

_TRANSIENT_API: Final = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
)
"""JetStream API failures that a leader election or a reconnect causes: worth asking again."""


class Broker:
    """One NATS connection bound to the event loop that created it.

    natask keeps one broker per event loop (the app's I/O thread has its own), because nats-py
    connections cannot cross loops.
    """

    def __init__(
        self,
        config: Config,
        on_result: ResultCallback | None = None,
        on_reconnect: Callable[[], None] | None = None,
        on_closed: Callable[[BrokerError], None] | None = None,
    ) -> None:
        self.config = config
        self.names = Names(config.subject_prefix)
        self._task_subjects = self.names.prefix + "."
        self.loop = asyncio.get_running_loop()
        self.nc = Client()
        self.js: JetStreamContext = self.nc.jetstream()
        self.reply_prefix = ""
        self._ack_prefix = ""
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_count = 0
        self.generation = 0  # bumped on every reconnect: replies in flight may be lost
        self._on_result = on_result
        self._on_reconnect = on_reconnect
        self._stream_ready = False
        self._dlq_ready = False
        self._kv: KeyValue | None = None
        self._revoked: KeyValue | None = None
        self._denied: dict[str, str] = {}
        self._last_error: BaseException | None = None
        self._auth_error: BaseException | None = None
        self._closed = False
        self._guard: asyncio.Task[None] | None = None
        self._on_closed = on_closed
        # What natask owns on the server, by stream name, and how to recreate it when it is gone.
        self._owned: dict[str, Callable[[], Awaitable[Any]]] = {
            self.names.stream: self.ensure_stream, DLQ_STREAM: self.ensure_dlq}
        self._healing: dict[str, asyncio.Task[bool]] = {}
        self._present: dict[str, float] = {}  # stream -> when it was last seen to exist (monotonic)

    # -- connection -------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect (retrying until ``connect_timeout``), check the server, open the reply inbox."""
        deadline = time.monotonic() + self.config.connect_timeout
        options: dict[str, Any] = {
            "name": self.config.name,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
            "error_cb": self._error_cb,
            "disconnected_cb": self._disconnected_cb,
            "reconnected_cb": self._reconnected_cb,
            "closed_cb": self._closed_cb,
        }
        options.update(self.config.connect_options)
        last: BaseException | None = None
        # nats-py retries the first connect itself (max_reconnect_attempts=-1): bound it here.
        try:
            await asyncio.wait_for(
                self.nc.connect(servers=list(self.config.servers), allow_reconnect=True, **options),
                max(0.1, deadline - time.monotonic()),
            )
        except Exception as e:  # nats raises several unrelated types here
            last = e
        if not self.nc.is_connected:
            await self._abandon_client()
            # A refused login explains the failure better than the reset that may follow it.
            last = self._auth_error or self._last_error or last
            raise BrokerError(
                f"cannot connect to NATS at {self.config.safe_servers}: {_describe(last)}. "
                "Is nats-server running? For development start one with `natask server`."
            )
        version = self.nc.connected_server_version
        if (version.major, version.minor, version.patch) < MIN_SERVER:
            await self.nc.close()
            raise ConfigError(
                f"nats-server {version.major}.{version.minor}.{version.patch} is too old: natask needs "
                f">= {'.'.join(map(str, MIN_SERVER))} (message schedules). Upgrade nats-server."
            )
        if not self.nc._server_info.get("jetstream"):
            await self.nc.close()
            raise ConfigError("JetStream is not enabled on this NATS server: start nats-server with -js")
        self._guard = self.loop.create_task(self._close_with_loop())
        self._ack_prefix = self.nc.new_inbox()
        await self.subscribe(f"{self._ack_prefix}.*", cb=self._ack_cb)
        if self._on_result is not None:
            self.reply_prefix = self.nc.new_inbox()
            await self.subscribe(f"{self.reply_prefix}.*", cb=self._reply_cb)

    async def subscribe(self, subject: str, **kwargs: Any) -> Any:
        """Subscribe and confirm with the server, so a permissions violation surfaces here as
        ``PermissionDenied`` instead of as a subscription that silently never receives."""
        sub = await self.nc.subscribe(subject, **kwargs)
        # nats-py writes a flush's PING straight to the socket but queues the SUB for its flusher
        # task, so the first PONG can overtake the server's -ERR. The second PING leaves after
        # the SUB: its PONG comes after any -ERR, which nats-py hands to error_cb as it reads it.
        # Shielded: a flush cancelled half-way leaves its cancelled future queued in nats-py, and the
        # PONG that arrives for it then kills nats-py's read loop (InvalidStateError).
        await asyncio.shield(self.nc.flush(timeout=5))
        await asyncio.shield(self.nc.flush(timeout=5))
        if subject.lower() in self._denied:
            await sub.unsubscribe()
            raise PermissionDenied(f"NATS permissions deny subscribing to {subject}: grant it to this user",
                                   subject)
        return sub

    @property
    def closed(self) -> bool:
        return self._closed or self.nc.is_closed or self.loop.is_closed()

    async def close(self) -> None:
        """Flush what is buffered and close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._guard is not None and self._guard is not asyncio.current_task():
            self._guard.cancel()
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except Exception:
                await self.nc.close()

    async def _close_with_loop(self) -> None:
        # asyncio.run() cancels every task when its main coroutine returns: that is our cue to
        # drop the socket, so an app used without `async with` leaves nothing open behind it.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self._closed:
                self.abandon()
            raise

    async def _abandon_client(self) -> None:
        self._closed = True
        try:
            await asyncio.wait_for(self.nc.close(), 2)
        except Exception:
            self.abandon()

    def abandon(self) -> None:
        """Drop the connection without awaiting anything (its event loop is shutting down)."""
        self._closed = True
        transport = getattr(self.nc, "_transport", None)
        if transport is not None:
            try:
                transport.close()
            except Exception:  # the loop may already be half torn down
                pass

    async def _ack_cb(self, msg: Msg) -> None:
        fut = self._acks.get(msg.subject[len(self._ack_prefix) + 1:])
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _reply_cb(self, msg: Msg) -> None:
        assert self._on_result is not None
        self._on_result(msg.subject.rsplit(".", 1)[-1], msg.data)

    async def _error_cb(self, e: Exception) -> None:
        self._last_error = e
        text = str(e)
        if isinstance(e, nats.errors.AuthorizationError) or "authorization" in text.lower():
            self._auth_error = e
        match = _PERM_RE.search(text)
        if match:
            self._denied[match.group(2).lower()] = text  # nats-py lowercases the server's -ERR line
        # Before the first connect succeeds, errors are summed up in the BrokerError instead.
        log.log(logging.WARNING if self._guard is not None else logging.DEBUG, "%s", _describe(e))

    async def _disconnected_cb(self) -> None:
        if not self._closed and not self.nc.is_closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _closed_cb(self) -> None:
        # nats-py gives up on a connection for good on most -ERRs from the server (e.g. a control
        # line over max_control_line) or when reconnect attempts run out: nothing comes back.
        if self._closed or self._guard is None:
            return  # asked for (close, drain), or the first connect failed (connect() reports it)
        error = BrokerError(
            f"the NATS connection was closed for good ({_describe(self.nc.last_error or self._last_error)}); "
            "nats-py does not reconnect after this"
        )
        log.error("%s", error)
        if self._on_closed is not None:
            self._on_closed(error)

    async def _reconnected_cb(self) -> None:
        self.generation += 1
        url = self.nc.connected_url
        log.info("reconnected to NATS at %s", redact_url(url.geturl()) if url else "?")
        if self._on_reconnect is not None:
            self._on_reconnect()

    async def api(self, call: Callable[[], Awaitable[T]]) -> T:
        """A JetStream API request, asked again while a leader election or reconnect makes it
        time out (up to ``publish_timeout``); a denied subject or a full store fails at once."""
        deadline = time.monotonic() + self.config.publish_timeout
        while True:
            try:
                return await call()
            except _TRANSIENT_API as e:
                if _storage_full(e):  # a 503 too, but no election ends it
                    raise _full(e, "a JetStream request") from e
                if time.monotonic() >= deadline or any(s.startswith("$js.api") for s in self._denied):
                    raise
                await asyncio.sleep(_RETRY_PAUSE)

    # -- provisioning -----------------------------------------------------------------------
    async def ensure_stream(self) -> None:
        """Create the task stream if missing (producers and workers both call this)."""
        if self._stream_ready:
            return
        names = self.names
        config = StreamConfig(
            name=names.stream,
            subjects=names.stream_subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.config.stream_replicas,
            allow_msg_schedules=True,
            allow_direct=True,
            duplicate_window=self.config.duplicate_window,
        )
        await self._ensure(config)
        self._stream_ready = True

    async def ensure_dlq(self) -> None:
        """Create the dead-letter stream if missing (workers and the dlq CLI call this)."""
        if self._dlq_ready:
            return
        config = StreamConfig(
            name=DLQ_STREAM,
            subjects=["natask.dlq.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self.config.stream_replicas,
            allow_direct=True,
        )
        await self._ensure(config)
        self._dlq_ready = True

    async def _ensure(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            info = await self.api(lambda: self.js.stream_info(config.name))  # type: ignore[arg-type]
        except nats.js.errors.NotFoundError:
            try:
                await self.api(lambda: self.js.add_stream(config))
                return
            except nats.js.errors.BadRequestError as e:
                if e.err_code != 10058:  # created concurrently by another process: fine
                    raise BrokerError(f"cannot create stream {config.name}: {e.description}") from e
                return
            except Exception as e:
                raise self._translate(e, f"$JS.API.STREAM.CREATE.{config.name}") from e
        except Exception as e:
            raise self._translate(e, f"$JS.API.STREAM.INFO.{config.name}") from e
        have = info.config
        if have.retention != config.retention or list(have.subjects or []) != list(config.subjects or []):
            raise ConfigError(
                f"stream {config.name} exists with retention={have.retention} subjects={have.subjects}, "
                f"natask needs retention={config.retention} subjects={config.subjects}: "
                "delete it or use another subject_prefix"
            )
        wanted, kept = config.duplicate_window, have.duplicate_window
        if wanted and kept and abs(kept - wanted) > 0.5:
            log.warning("stream %s keeps message ids for %gs, not the duplicate_window of %gs this app asks for: "
                        "natask does not change an existing stream (nats stream edit %s --dupe-window %gs)",
                        config.name, kept, wanted, config.name, wanted)

    async def ensure_consumer(self, queue: str) -> str:
        """Create or update the durable pull consumer of a queue (workers only)."""
        await self.ensure_stream()
        names = self.names
        durable = names.consumer(queue)
        config = ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subject=names.queue_filter(queue),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait,
            max_ack_pending=self.config.max_ack_pending,
            max_deliver=-1,  # retry limits are per task, enforced by the worker
            max_waiting=512,
            num_replicas=self.config.stream_replicas,
        )
        try:
            await self.api(lambda: self.js.add_consumer(names.stream, config))
        except nats.js.errors.BadRequestError as e:
            if e.err_code not in (10148, 10013):  # 10148: exists with another config
                raise BrokerError(f"cannot create consumer {durable}: {e.description}") from e
            await self.api(lambda: self._update_consumer(config))
        except Exception as e:
            raise self._translate(e, f"$JS.API.CONSUMER.CREATE.{names.stream}.{durable}") from e
        return durable

    async def _update_consumer(self, config: ConsumerConfig) -> None:
        import json

        req = {"stream_name": self.names.stream, "config": config.as_dict(), "action": "update"}
        subject = f"$JS.API.CONSUMER.CREATE.{self.names.stream}.{config.name}.{config.filter_subject}"
        msg = await self.nc.request(subject, json.dumps(req).encode(), timeout=5)
        resp = json.loads(msg.data)
        if "error" in resp:
            raise BrokerError(f"cannot update consumer {config.name}: {resp['error'].get('description')}")

    async def results(self) -> KeyValue:
        """The results KV bucket, created on first use."""
        if self._kv is None:
            self._kv = await self._bucket(self.names.results_bucket)
        return self._kv

    async def revoked(self) -> KeyValue:
        """The revoked task ids (kept as long as results), created on first use."""
        if self._revoked is None:
            self._revoked = await self._bucket(self.names.revoked_bucket)
        return self._revoked

    async def claims(self) -> KeyValue:
        """Idempotency claims (``Natask.claim``), kept as long as results."""
        return await self._bucket(self.names.claims_bucket)

    async def dlq_index(self) -> KeyValue:
        """Dead-letter id -> ``NATASK_DLQ`` sequence (``natask.dlq``): kept until purged, no TTL."""
        bucket = self.names.dlq_index_bucket
        return await self._bucket(bucket, KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE,
                                                         replicas=self.config.stream_replicas, direct=True))

    async def _bucket(self, bucket: str, config: KeyValueConfig | None = None) -> KeyValue:
        """A bucket natask owns, created if missing (``config``: by default one revision per key,
        kept ``result_ttl``). Its handle heals: a call that finds the bucket deleted on the server
        recreates it and is made again."""
        if config is None:
            config = KeyValueConfig(bucket=bucket, history=1, ttl=self.config.result_ttl, storage=StorageType.FILE,
                                    replicas=self.config.stream_replicas, direct=True)
        self._owned[f"KV_{bucket}"] = lambda: self._create_bucket(config)
        try:
            kv = await self.api(lambda: self.js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            kv = await self._create_bucket(config)
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e
        return _Bucket(self, kv)

    async def _create_bucket(self, config: KeyValueConfig) -> KeyValue:
        bucket = config.bucket
        try:
            return await self.api(lambda: self.js.create_key_value(config))
        except nats.js.errors.BadRequestError as e:
            if getattr(e, "err_code", None) != 10058:  # 10058: created meanwhile, with other settings
                raise self._translate(e, f"$KV.{bucket}") from e
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e
        try:
            return await self.api(lambda: self.js.key_value(bucket))
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e

    # -- healing what natask owns -----------------------------------------------------------
    async def heal(self, stream: str) -> bool:
        """Recreate ``stream`` (natask's task stream, DLQ or a bucket's stream) if the server lost
        it. True: recreated, make the failed call again. False: it exists (a leader election or a
        reconnect: retry as before), cannot be checked now, or is not natask's."""
        recreate, seen = self._owned.get(stream), self._present.get(stream)
        if recreate is None or self.closed or (seen is not None and time.monotonic() - seen < _PRESENT_FOR):
            return False
        healing = self._healing.get(stream)
        if healing is None:  # callers failing at once share one check (and one log line)
            healing = self._healing[stream] = self.loop.create_task(self._heal(stream, recreate))
            healing.add_done_callback(lambda _: self._healing.pop(stream, None))
        return await asyncio.shield(healing)

    async def _heal(self, stream: str, recreate: Callable[[], Awaitable[Any]]) -> bool:
        exists = await self._stream_exists(stream)
        if exists is not False:
            return False
        if stream == self.names.stream:
            self._stream_ready = False
        elif stream == DLQ_STREAM:
            self._dlq_ready = False
        elif stream == f"KV_{self.names.results_bucket}":
            self._kv = None
        elif stream == f"KV_{self.names.revoked_bucket}":
            self._revoked = None
        what = f"bucket {stream[3:]}" if stream.startswith("KV_") else f"stream {stream}"
        try:
            await recreate()
        except Exception as e:
            log.warning("%s was deleted on the server and cannot be recreated: %s", what, e)
            raise
        log.warning("%s was deleted on the server: recreated it", what)
        self._present[stream] = time.monotonic()
        return True

    async def _stream_info(self, stream: str) -> dict[str, Any] | None:
        """The stream's info (raw JSON), None if it does not exist; BrokerError if unknown now."""
        try:
            msg = await self.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=_CHECK_TIMEOUT)
            info = json.loads(msg.data)
        except (nats.errors.Error, asyncio.TimeoutError, ValueError) as e:
            raise BrokerError(f"cannot look up stream {stream}: {_describe(e)}") from e
        error = info.get("error") if isinstance(info, dict) else {"code": 0}
        if error is None:
            self._present[stream] = time.monotonic()
            return info  # type: ignore[no-any-return]
        if error.get("err_code") == _STREAM_NOT_FOUND:
            return None
        raise BrokerError(f"cannot look up stream {stream}: {error.get('description')}")

    async def _stream_exists(self, stream: str) -> bool | None:
        try:
            return await self._stream_info(stream) is not None
        except BrokerError:
            return None

    def _owner(self, subject: str) -> str | None:
        """The stream natask owns that stores ``subject``, if any."""
        if subject.startswith("$KV."):
            stream = "KV_" + subject[4:].split(".", 1)[0]
            return stream if stream in self._owned else None
        if subject.startswith("natask.dlq."):
            return DLQ_STREAM
        if subject.startswith(self.names.prefix) and subject[len(self.names.prefix):].startswith("."):
            return self.names.stream
        return None

    async def heal_consumer(self, queue: str) -> bool:
        """Recreate a queue's consumer (and the task stream) if the server lost it: True if it
        was recreated, False if it exists or cannot be checked now."""
        stream, durable = self.names.stream, self.names.consumer(queue)
        try:
            msg = await self.nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{durable}", b"", timeout=_CHECK_TIMEOUT)
            error = json.loads(msg.data).get("error")
        except (nats.errors.Error, asyncio.TimeoutError, ValueError, AttributeError):
            return False
        if error is None:
            return False
        if error.get("err_code") == _STREAM_NOT_FOUND:
            self._present.pop(stream, None)
            await self.heal(stream)
        elif error.get("err_code") != _CONSUMER_NOT_FOUND:
            return False
        await self.ensure_consumer(queue)
        log.warning("consumer %s of stream %s was deleted on the server: recreated it", durable, stream)
        return True

    async def _healed(self, stream: str, call: Callable[[], Awaitable[T]], what: str) -> T:
        """``call``, made once more if its stream was gone and is recreated; a full store is
        ``StorageFull`` at once."""
        for attempt in (1, 2):
            try:
                return await call()
            except nats.errors.Error as e:
                if _storage_full(e):
                    raise _full(e, what) from e
                if attempt == 2 or not _gone(e) or not await self.heal(stream):
                    raise
        raise AssertionError("unreachable")

    def watch(self, bucket: str, keys: str | Sequence[str] = ">") -> AsyncGenerator[KeyValue.Entry | None, None]:
        """The entries of a bucket natask owns, as they are stored: the latest of each key first,
        then every change; ``None`` each time the watch has caught up (after its start and after
        each restart). Creates the bucket if missing; when the server-side consumer ends or goes
        silent (bucket deleted, server restarted) it recreates what is gone and carries on from
        the last entry seen, logging why. Runs until the caller stops iterating. ``keys``: a key, a
        wildcard, or several keys (one consumer filtering them all)."""
        return _Watch(self, bucket, keys).entries()

    # -- publishing -------------------------------------------------------------------------
    def check_size(self, subject: str, payload: bytes, headers: Mapping[str, str]) -> None:
        """Refuse a message the server would drop the connection for (payload + headers)."""
        limit = self.nc.max_payload
        if len(payload) + 4 * (sum(map(len, headers)) + sum(map(len, headers.values()))) + 512 <= limit:
            return  # far below, whatever the characters' UTF-8 lengths
        size = len(payload) + headers_size(headers)
        if size > limit:
            raise PayloadTooLarge(
                f"message for {subject} is {size} bytes (payload {len(payload)} + headers), over the "
                f"server's max_payload of {limit}: pass a reference (URL, object key) instead of the data",
                size,
                limit,
            )

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> Published:
        """Publish to JetStream and await the PubAck, retrying with the same message id on
        reconnects and leader elections until ``publish_timeout``; never reports success without
        the server's ack. ``PayloadTooLarge`` (payload + headers over ``max_payload``) before sending:
        the server would otherwise drop the whole connection."""
        self.check_size(subject, payload, headers)
        deadline = time.monotonic() + self.config.publish_timeout
        attempt = 0
        while True:
            attempt += 1
            if attempt == 2 and subject.startswith(self._task_subjects):
                # The first attempt may be stored, and a server restart since makes JetStream forget
                # its id: the worker checks for a stored outcome before it runs this one.
                headers[HDR_CHECK_STORED] = "1"
                self.check_size(subject, payload, headers)
            remaining = deadline - time.monotonic()
            try:
                data = await self._request(subject, payload, headers, max(0.05, min(remaining, 2.0)))
                if b'"error"' in data:
                    raise nats.js.errors.APIError.from_error(json.loads(data)["error"])
                seq = _SEQ_RE.search(data)
                return Published(int(seq.group(1)) if seq else 0, b'"duplicate":true' in data)
            except nats.js.errors.APIError as e:
                if _storage_full(e):  # a 503 too, but no election ends it
                    raise _full(e, f"the publish to {subject}") from e
                if e.code == 503 or e.err_code == 10008:  # no leader / stream offline: election
                    error: BaseException = e
                elif e.err_code == _WRONG_LAST_SEQUENCE:
                    raise SequenceConflict(f"publish to {subject}: {e.description}") from e
                else:
                    raise BrokerError(f"publish to {subject} refused: {e.description}") from e
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as e:
                error = e  # no stream answers: its leader is moving, or it is gone (then recreate it)
                stream = self._owner(subject)
                if stream is not None and await self.heal(stream):
                    continue
            except (nats.errors.TimeoutError, asyncio.TimeoutError) as e:
                error = e
                if subject.lower() in self._denied:
                    raise PermissionDenied(
                        f"NATS permissions deny publishing to {subject}: grant it to this user", subject
                    ) from None
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                    nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError) as e:
                error = e
                if self.nc.is_closed:
                    raise BrokerError(f"publish to {subject} failed: the connection is closed") from e
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"publish to {subject} not acknowledged within {self.config.publish_timeout:g}s "
                    f"({_describe(error)}); is the stream {self.names.stream} available?"
                )
            if not isinstance(error, (nats.errors.TimeoutError, asyncio.TimeoutError)):
                await asyncio.sleep(_RETRY_PAUSE)

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> bytes:
        """Publish with a reply on this connection's ack inbox and return the reply's body.

        Leaner than ``js.publish`` (``nc.request``): the ack wakes the caller one loop turn
        sooner (no ``wait_for`` in between), its token is a counter (no random bytes), and only
        a refusal is parsed as JSON (no ``PubAck`` dataclass per message).
        """
        self._ack_count += 1
        token = str(self._ack_count)
        fut: asyncio.Future[Msg] = self.loop.create_future()
        self._acks[token] = fut
        timer = self.loop.call_later(timeout, _expire, fut)
        try:
            await self.nc.publish(subject, payload, f"{self._ack_prefix}.{token}", headers)
            msg = await fut
        finally:
            timer.cancel()
            del self._acks[token]
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg.data

    async def publish_many(self, subjects: Sequence[str], payloads: Sequence[bytes],
                           headers: Sequence[dict[str, str]]) -> None:
        """Pipelined publishes (the i-th subject, payload and headers each): up to ``PIPELINE``
        unacknowledged at a time; a message without a PubAck after all goes through ``publish``.

        Leaner than ``js.publish_async``: one inbox subscription for the batch and the message's
        index as reply token; an ack is checked for an error without being parsed, and no future
        is made per message. A republish keeps its ``Nats-Msg-Id``, so it never enqueues twice.
        """
        n = len(subjects)
        if n == 0:
            return
        inbox = self.nc.new_inbox()
        cut = len(inbox) + 1
        acked = bytearray(n)  # 1: acknowledged, 2: refused (published again below)
        state = {"acks": 0, "need": n}
        progress = asyncio.Event()

        async def on_ack(msg: Msg) -> None:
            i = int(msg.subject[cut:])
            if acked[i]:
                return
            # A PubAck is {"stream", "seq"...}; a refusal {"error"...}, or a 503 status with no body.
            acked[i] = 2 if not msg.data or b'"error"' in msg.data else 1
            state["acks"] += 1
            if state["acks"] >= state["need"]:
                progress.set()

        async def until(need: int) -> bool:
            state["need"] = need
            while state["acks"] < need:
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), _BATCH_ACK_WAIT)
                except asyncio.TimeoutError:
                    return False
            return True

        sub = await self.nc.subscribe(f"{inbox}.*", cb=on_ack)
        try:
            publish = self.nc.publish
            for i in range(n):
                if i - state["acks"] >= PIPELINE and not await until(i - PIPELINE // 2):
                    break  # no PubAck for a while: the rest goes one by one below
                try:
                    await publish(subjects[i], payloads[i], f"{inbox}.{i}", headers[i])
                except nats.errors.Error:
                    break  # reconnecting, closed...: likewise
            else:
                await until(n)
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        for i in range(n):
            if acked[i] != 1:
                if subjects[i].startswith(self._task_subjects):
                    headers[i][HDR_CHECK_STORED] = "1"  # as in publish: the first try may be stored
                await self.publish(subjects[i], payloads[i], headers[i])

    async def publish_core(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Fire-and-forget core publish (replies, events); ``PayloadTooLarge`` as ``publish``."""
        self.check_size(subject, payload, headers or {})
        await self.nc.publish(subject, payload, headers=headers)

    def _translate(self, e: BaseException, subject: str) -> BrokerError:
        if isinstance(e, BrokerError):
            return e
        if _storage_full(e):
            return _full(e, f"the request on {subject}")
        if subject.lower() in self._denied or any(s.startswith("$js.api") for s in self._denied):
            return PermissionDenied(f"NATS permissions deny {subject}: grant it to this user", subject)
        return BrokerError(f"NATS request on {subject} failed: {_describe(e)}")


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
            await asyncio.sleep(_RESTART_PAUSE if why else _RETRY_PAUSE)

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


def _gone(e: BaseException) -> bool:
    """Whether an error may mean that the stream is gone (no responders, stream not found)."""
    if isinstance(e, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)):
        return True
    code = getattr(e, "err_code", None)
    if isinstance(e, nats.js.errors.ServiceUnavailableError) and code is None:
        return True  # nats-py's JetStream manager reports no responders this way
    return isinstance(e, nats.js.errors.NotFoundError) and code == _STREAM_NOT_FOUND


def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())


def _storage_full(e: BaseException) -> TypeGuard[nats.js.errors.APIError]:
    """Whether JetStream refused for want of storage: no retry helps until an operator acts."""
    if not isinstance(e, nats.js.errors.APIError):
        return False
    # nats-py's KV errors (KeyNotFoundError...) are APIErrors that never set these attributes.
    code = getattr(e, "err_code", None)
    return code in _STORAGE_FULL or (code == _STORE_FAILED and "exceeded" in (getattr(e, "description", "") or ""))


def _full(e: nats.js.errors.APIError, what: str) -> StorageFull:
    return StorageFull(
        f"JetStream refused {what}: {e.description} (err_code {e.err_code}): the server, the account or the "
        "stream is out of storage. Free disk space, raise the server's jetstream max_file_store or the "
        "account's JetStream limits (or the stream's max_bytes/max_msgs), purge old messages, or start "
        "workers to drain the queues",
        e.err_code or 0,
    )


def _describe(e: BaseException | None) -> str:
    """An exception as text with any URL credentials removed."""
    if e is None:
        return "unknown error"
    text = str(e) or type(e).__name__
    return re.sub(r"(\w+://)[^@/\s]+@", r"\1***@", text)
