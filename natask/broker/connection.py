"""One NATS connection bound to the event loop that made it: connect, subscribe, core publish and
request, the PubAck inbox, JetStream API calls retried through elections, close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ..config import Config, redact_url
from ..errors import BrokerError, ConfigError, PayloadTooLarge, PermissionDenied
from ..message import headers_size
from ..naming import Names
from .translate import TRANSIENT_API, NoResponders, describe, full_error, storage_full

log = logging.getLogger("natask.broker")

MIN_SERVER: Final = (2, 12, 0)
"""Server-held delays (message schedules) need nats-server 2.12."""
RETRY_PAUSE: Final = 0.25
"""Pause between attempts while the server is unreachable or electing a leader."""
CHECK_WAIT: Final = 2.0
"""Seconds the connect check waits for the JetStream API's answer before asking again."""
NOT_ENABLED: Final = frozenset({10039, 10076})
"""JetStream err_codes of "JetStream not enabled" (for the account; on the server)."""

_PERM_RE: Final = re.compile(r'permissions violation for (publish|subscription) to "?([^"\s]+)"?', re.I)

ResultCallback = Callable[[str, bytes], None]
T = TypeVar("T")


def api_prefix(domain: str) -> str:
    """The JetStream API's subject prefix: the server's own, or a domain's (``$JS.<domain>.API``)."""
    return f"$JS.{domain}.API" if domain else "$JS.API"


class DomainContext(JetStreamContext):
    """nats-py's JetStream context for a domain, with KV writes sent through the domain's API.

    Servers pass no ``$KV.>`` across a leaf connection between JetStream domains (a leaf node's
    publish of ``$KV.<bucket>.<key>`` finds no responders), so a key of another domain's bucket is
    written on ``$JS.<domain>.API.$KV.<bucket>.<key>``, which that domain's servers map back to
    ``$KV.…`` (as the Go client does). nats-py's ``KeyValue`` writes through this method; its reads
    (direct gets) and watches (consumers) already go through the domain's API."""

    async def publish(self, subject: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> Any:
        if subject.startswith("$KV."):
            subject = f"{self._prefix}.{subject}"
        return await super().publish(subject, payload, *args, **kwargs)


class Connection:
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
        domain = config.jetstream_domain
        self.api_prefix = api_prefix(domain)
        """Subject prefix of every JetStream API request (``$JS.API``, or the app's domain's)."""
        self.kv_prefix = f"{self.api_prefix}." if domain else ""
        """What goes before ``$KV.<bucket>.<key>`` to write a key (see ``DomainContext``)."""
        self.js: JetStreamContext = DomainContext(self.nc, domain=domain) if domain else self.nc.jetstream()
        self._checking: tuple[str, asyncio.Future[Msg]] | None = None  # the connect check's subject, answer
        self.reply_prefix = ""
        self._ack_prefix = ""
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_count = 0
        self.generation = 0  # bumped on every reconnect: replies in flight may be lost
        self._on_result = on_result
        self._on_reconnect = on_reconnect
        self._denied: dict[str, str] = {}
        self._last_error: BaseException | None = None
        self._auth_error: BaseException | None = None
        self._closed = False
        self._guard: asyncio.Task[None] | None = None
        self._on_closed = on_closed

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
                f"cannot connect to NATS at {self.config.safe_servers}: {describe(last)}. "
                "Is nats-server running? For development start one with `natask server`."
            )
        version = self.nc.connected_server_version
        if (version.major, version.minor, version.patch) < MIN_SERVER:
            await self.nc.close()
            raise ConfigError(
                f"nats-server {version.major}.{version.minor}.{version.patch} is too old: natask needs "
                f">= {'.'.join(map(str, MIN_SERVER))} (message schedules). Upgrade nats-server."
            )
        self._guard = self.loop.create_task(self._close_with_loop())
        self._ack_prefix = self.nc.new_inbox()
        await self.subscribe(f"{self._ack_prefix}.*", cb=self._ack_cb)
        # The check's round trip overlaps the reply inbox's subscribe: connecting costs no more.
        check = self.loop.create_task(self._check_jetstream(max(deadline, time.monotonic() + CHECK_WAIT)))
        try:
            if self._on_result is not None:
                self.reply_prefix = self.nc.new_inbox()
                await self.subscribe(f"{self.reply_prefix}.*", cb=self._reply_cb)
        except BaseException:
            check.cancel()
            raise
        try:
            await check
        except ConfigError:
            await self.close()
            raise

    async def _check_jetstream(self, deadline: float) -> None:
        """Ask the JetStream API (of the app's domain) for the account's info, once per connection:
        natask works wherever it answers, whatever the server connected to runs (a leaf node
        reaches its hub's JetStream through ``$JS.<domain>.API``). ``ConfigError`` when nothing
        answers or JetStream is off for the account; an error answer (a cluster electing its meta
        leader) or one too slow still means JetStream is there: later calls retry as usual."""
        subject = f"{self.api_prefix}.INFO"
        domain = self.config.jetstream_domain
        while True:
            try:
                msg = await self._ask(subject, max(0.05, min(CHECK_WAIT, deadline - time.monotonic())))
            except PermissionDenied:
                # Not a denial of the JetStream API as a whole (see _api_denied): forget it.
                self._denied.pop(subject.lower(), None)
                log.info("cannot check the JetStream API (NATS permissions deny %s): going on without", subject)
                return
            except nats.errors.NoRespondersError:
                # A leaf node's interest in its hub's API comes with its leaf connection: wait for it.
                if not domain or time.monotonic() >= deadline:
                    reachable = await self._queue_domain_answering()
                    if reachable is None:
                        raise ConfigError(self._no_jetstream(subject)) from None
                    # An edge-local queue's JetStream answers while its hub's is cut off: that queue works.
                    log.warning("nothing answers the JetStream API of domain %r (%s), but queue domain %r does: only "
                                "queues whose stream lives there work until it answers", domain, subject, reachable)
                    return
            except nats.errors.TimeoutError:
                if time.monotonic() >= deadline:
                    log.warning("the JetStream API (%s) did not answer within connect_timeout: going on", subject)
                    return
                continue
            else:
                try:
                    code = (json.loads(msg.data).get("error") or {}).get("err_code")
                except (ValueError, AttributeError):
                    code = None
                if code in NOT_ENABLED:
                    raise ConfigError(
                        f"JetStream is not enabled for this user's account on {self.config.safe_servers} "
                        f"({subject}): enable it in the account's server config (`jetstream: enabled` in the "
                        "account block, or limits for it) or connect as a user of an account that has it")
                return
            await asyncio.sleep(RETRY_PAUSE)

    async def _queue_domain_answering(self) -> str | None:
        """A JetStream domain of one of the app's queue streams (``queue_options``) whose API
        answers, if any."""
        for domain in self.config.queue_domains:
            if domain == self.config.jetstream_domain:
                continue
            try:
                await self._ask(f"{api_prefix(domain)}.INFO", CHECK_WAIT)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, PermissionDenied):
                continue
            return domain
        return None

    def _no_jetstream(self, subject: str) -> str:
        domain = self.config.jetstream_domain
        if domain:
            return (f"nothing answers the JetStream API of domain {domain!r} ({subject}) through "
                    f"{self.config.safe_servers} within connect_timeout: check jetstream_domain "
                    f"(NATASK_JS_DOMAIN) against the hub's `jetstream {{ domain: ... }}`, and that this leaf "
                    "node is connected to its hub (leafz on its monitoring port)")
        return (f"nothing answers the JetStream API ({subject}) on {self.config.safe_servers}: start nats-server "
                "with -js (or a `jetstream {}` block); on a leaf node without JetStream set jetstream_domain "
                "(NATASK_JS_DOMAIN) to the hub's JetStream domain; or the user's account has no JetStream "
                "(`jetstream: enabled` in its account block)")

    async def _ask(self, subject: str, timeout: float) -> Msg:
        """One request answered on the ack inbox; a NATS permissions denial of ``subject`` ends it at
        once (``PermissionDenied``) instead of after ``timeout``."""
        self._ack_count += 1
        token = str(self._ack_count)
        fut: asyncio.Future[Msg] = self.loop.create_future()
        self._acks[token] = fut
        self._checking = (subject.lower(), fut)
        timer = self.loop.call_later(timeout, _expire, fut)
        try:
            await self.nc.publish(subject, b"", f"{self._ack_prefix}.{token}")
            msg = await fut
        finally:
            timer.cancel()
            del self._acks[token]
            self._checking = None
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg

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
            except Exception:  # drain refuses while reconnecting; close may find the socket lost
                try:
                    await self.nc.close()
                except Exception:
                    self.abandon()

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
            checking = self._checking
            if checking is not None and checking[0] == match.group(2).lower() and not checking[1].done():
                checking[1].set_exception(PermissionDenied(text, checking[0]))
        # Before the first connect succeeds, errors are summed up in the BrokerError instead.
        log.log(logging.WARNING if self._guard is not None else logging.DEBUG, "%s", describe(e))

    async def _disconnected_cb(self) -> None:
        if not self._closed and not self.nc.is_closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _closed_cb(self) -> None:
        # nats-py gives up on a connection for good on most -ERRs from the server (e.g. a control
        # line over max_control_line) or when reconnect attempts run out: nothing comes back.
        if self._closed or self._guard is None:
            return  # asked for (close, drain), or the first connect failed (connect() reports it)
        error = BrokerError(
            f"the NATS connection was closed for good ({describe(self.nc.last_error or self._last_error)}); "
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
            except TRANSIENT_API as e:
                if storage_full(e):  # a 503 too, but no election ends it
                    raise full_error(e, "a JetStream request") from e
                if time.monotonic() >= deadline or self._api_denied():
                    raise
                await asyncio.sleep(RETRY_PAUSE)

    async def gather(self, subject: str, payload: bytes, seconds: float, expected: int | None = None) -> list[bytes]:
        """Publish a request and collect every reply that arrives within ``seconds`` (a scatter-
        gather: nobody knows how many will answer), or until ``expected`` replies came."""
        replies: list[bytes] = []
        enough = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            replies.append(msg.data)
            if expected is not None and len(replies) >= expected:
                enough.set()

        inbox = self.nc.new_inbox()
        sub = await self.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(subject, payload, reply=inbox)
            await asyncio.shield(self.nc.flush())  # never cancel a flush half-way (see subscribe)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(enough.wait(), seconds)
        finally:
            await sub.unsubscribe()
        return replies

    async def request(self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float) -> bytes:
        """A core request-reply: the reply's body. ``NoResponders`` at once when nobody listens,
        ``TimeoutError`` when no reply came within ``timeout``."""
        self.check_size(subject, payload, headers or {})
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"nobody listens to {subject}") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise TimeoutError(f"no reply on {subject} within {timeout:g}s") from None
        except nats.errors.Error as e:
            raise self._translate(e, subject) from e
        return msg.data

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

    async def heal(self, stream: str) -> bool:
        """Recreate a stream natask owns that the server lost (see ``Provisioning.heal``)."""
        return False

    def _owner(self, subject: str) -> str | None:
        """The stream natask owns that captures ``subject``, if any (see ``Provisioning``)."""
        return None

    def _api_denied(self) -> bool:
        """Whether NATS permissions denied this connection a JetStream API subject."""
        prefix = self.api_prefix.lower()
        return any(s.startswith(prefix) for s in self._denied)

    def _translate(self, e: BaseException, subject: str) -> BrokerError:
        if isinstance(e, BrokerError):
            return e
        if storage_full(e):
            return full_error(e, f"the request on {subject}")
        if subject.lower() in self._denied or self._api_denied():
            return PermissionDenied(f"NATS permissions deny {subject}: grant it to this user", subject)
        return BrokerError(f"NATS request on {subject} failed: {describe(e)}")



def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())
