"""JetStream plumbing for one event loop: connect, provision, publish with retries, results KV."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeVar

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
from .errors import BrokerError, ConfigError, PayloadTooLarge, PermissionDenied
from .message import headers_size
from .naming import DLQ_STREAM, Names

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

HDR_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
"""Compare-and-set: the server stores the message only if the subject's last sequence is this
(``0``: the subject holds no message). A KV key is a subject, so this is the KV revision check."""
_WRONG_LAST_SEQUENCE: Final = 10071


class SequenceConflict(BrokerError):
    """A compare-and-set publish (``Nats-Expected-Last-Subject-Sequence``) found another last
    sequence on its subject: someone wrote the key in between."""

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
    ) -> None:
        self.config = config
        self.names = Names(config.subject_prefix)
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
        if not self._closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _reconnected_cb(self) -> None:
        self.generation += 1
        url = self.nc.connected_url
        log.info("reconnected to NATS at %s", redact_url(url.geturl()) if url else "?")
        if self._on_reconnect is not None:
            self._on_reconnect()

    async def api(self, call: Callable[[], Awaitable[T]]) -> T:
        """A JetStream API request, asked again while a leader election or reconnect makes it
        time out (up to ``publish_timeout``); a denied subject fails at once."""
        deadline = time.monotonic() + self.config.publish_timeout
        while True:
            try:
                return await call()
            except _TRANSIENT_API:
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

    async def _bucket(self, bucket: str) -> KeyValue:
        try:
            return await self.api(lambda: self.js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            pass
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e
        try:
            return await self.api(lambda: self.js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    ttl=self.config.result_ttl,
                    storage=StorageType.FILE,
                    replicas=self.config.stream_replicas,
                    direct=True,
                )
            ))
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e

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
        the server's ack."""
        deadline = time.monotonic() + self.config.publish_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                data = await self._request(subject, payload, headers, max(0.05, min(remaining, 2.0)))
                if b'"error"' in data:
                    raise nats.js.errors.APIError.from_error(json.loads(data)["error"])
                seq = _SEQ_RE.search(data)
                return Published(int(seq.group(1)) if seq else 0, b'"duplicate":true' in data)
            except nats.js.errors.APIError as e:
                if e.code == 503 or e.err_code == 10008:  # no leader / stream offline: election
                    error: BaseException = e
                elif e.err_code == _WRONG_LAST_SEQUENCE:
                    raise SequenceConflict(f"publish to {subject}: {e.description}") from e
                else:
                    raise BrokerError(f"publish to {subject} refused: {e.description}") from e
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as e:
                error = e  # no stream answers: its leader is moving (or it is gone); keep trying
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
                await self.publish(subjects[i], payloads[i], headers[i])

    async def publish_core(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Fire-and-forget core publish (replies, events)."""
        await self.nc.publish(subject, payload, headers=headers)

    def _translate(self, e: BaseException, subject: str) -> BrokerError:
        if isinstance(e, BrokerError):
            return e
        if subject.lower() in self._denied or any(s.startswith("$js.api") for s in self._denied):
            return PermissionDenied(f"NATS permissions deny {subject}: grant it to this user", subject)
        return BrokerError(f"NATS request on {subject} failed: {_describe(e)}")


def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())


def _describe(e: BaseException | None) -> str:
    """An exception as text with any URL credentials removed."""
    if e is None:
        return "unknown error"
    text = str(e) or type(e).__name__
    return re.sub(r"(\w+://)[^@/\s]+@", r"\1***@", text)
