"""The client: what every producer does under the app — a connection per event loop, calls prepared
(validated and encoded in the caller's thread), routed, published and waited for, RPC, revokes and
claims. Result handles, tasks and canvas sit on top of it; the app is configuration, the task
registry and one client."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

from .broker import Broker, NoResponders, SequenceConflict
from .config import Config, check_queue_name, seconds
from .errors import BrokerError, ConfigError, EncodeError, NoWorkers, PayloadTooLarge, ResultTimeout, TaskFailed
from .hooks import Hooks
from .message import Call, Envelope, PublishRetry, at_schedule, compress, dumps, find_unencodable, loads
from .naming import (
    HDR_CHECK_STORED,
    HDR_MSG_ID,
    HDR_OBJECT,
    HDR_REPLY,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    HDR_SOFT_TIME_LIMIT,
    HDR_TTL,
    MAX_PRIORITY,
    TASK_ID_RE,
    Names,
    check_kv_key,
    check_task_id,
    check_task_name,
    invalid_task_id,
)
from .portal import Portal
from .states import State
from .waiting import KeyWatch, Waiter, recheck

if TYPE_CHECKING:
    from .options import TaskOptions

H = TypeVar("H", bound=Waiter)

_NO_LINKS: Final[list[Any]] = []  # shared defaults: the envelope is encoded and dropped, never mutated
_NO_META: Final[dict[str, Any]] = {}
_RESERVED_HEADERS: Final = ("natask-", "nats-")
FAILURE_MEMORY: Final = 2.0
"""Seconds a failed connect is remembered, so a burst of calls fails fast instead of each waiting."""


class Registered(Protocol):
    """A registered task, as the layers under the app see it."""

    @property
    def name(self) -> str: ...
    @property
    def options(self) -> TaskOptions: ...
    @property
    def queue(self) -> str: ...
    def check_args(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> object: ...


class App(Protocol):
    """What result handles, tasks and canvas need of their app (``Natask`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> Config: ...
    @property
    def names(self) -> Names: ...
    @property
    def tasks(self) -> Mapping[str, Registered]: ...
    @property
    def client(self) -> Client[Any]: ...
    always_eager: bool
    eager_propagates: bool
    @property
    def builtins(self) -> Mapping[str, Registered]: ...


class Client(Generic[H]):
    """Connections, publishing and calling for one app; ``H`` is its result handle type, made by
    ``result_type(owner, task_id, task_name, ignore_result=..., route=broker)`` for each call."""

    def __init__(self, config: Config, names: Names, result_type: Callable[..., H], owner: object,
                 hooks: Hooks | None = None) -> None:
        self.config = config
        self.names = names
        self.hooks = hooks if hooks is not None else Hooks()
        """The middleware whose ``before_publish``/``after_publish`` run around each publish."""
        self.portal = Portal(config.name, self._close_loop_brokers)
        """Where the sync API runs its coroutines (``portal.run(coro)``)."""
        self._result_type = result_type
        self._owner = owner
        self._lock = threading.Lock()
        self._brokers: dict[asyncio.AbstractEventLoop, asyncio.Task[Broker]] = {}
        self._ready: dict[asyncio.AbstractEventLoop, Broker] = {}  # the brokers of _brokers that are connected
        self._failure: tuple[float, BrokerError] | None = None
        self._checked: set[str] = set()
        self._checked_queues: set[str] = set()
        self.pending: weakref.WeakValueDictionary[str, H] = weakref.WeakValueDictionary()
        """Handles of the calls whose reply may still come over a connection, by task id."""
        self._watches: dict[asyncio.AbstractEventLoop, KeyWatch] = {}  # per loop, of its broker
        self._rechecks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        self._closes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
        self.router: Callable[..., str | None] | None = None
        """``task_routes`` compiled (``natask.routes.Router``): the queue of calls that name none."""
        _CLIENTS.add(self)

    def default_queue(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                      options: Mapping[str, Any] | None = None) -> str:
        """The queue of a call when neither it nor its task names one: the first route of
        ``task_routes`` that matches, else the app's default queue (Celery's order)."""
        router = self.router
        if router is not None:
            queue = router(name, args, kwargs, options or {})
            if queue:
                return queue
        return self.config.default_queue

    # -- calls ------------------------------------------------------------------------------
    def prepare(  # noqa: PLR0913, C901 - every call option, keyword-only
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        queue: str,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        ignore_result: bool = False,
        parent_id: str | None = None,
        root_id: str | None = None,
        links: list[Any] | None = None,
        meta: dict[str, Any] | None = None,
        soft_time_limit: float | None = None,
        priority: int = 0,
        serializer: str = "msgpack",
        compression: str | None = None,
        extra: Mapping[str, str] | None = None,
        retry: PublishRetry | None = None,
    ) -> Call:
        """Validate and encode a call in the caller's thread, so errors surface at ``.delay()``."""
        if name not in self._checked:  # names repeat: validate each once
            check_task_name(name)
            self._checked.add(name)
        if queue not in self._checked_queues:
            check_queue_name(queue)
            self._checked_queues.add(queue)
        if type(args) is not tuple and type(args) is not list and (
                isinstance(args, (str, bytes)) or not isinstance(args, Sequence)):
            raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
        if kwargs and (not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs)):
            raise TypeError("kwargs must be a dict with string keys")
        if priority and not (type(priority) is int and 0 < priority <= MAX_PRIORITY):
            raise ConfigError(f"priority must be an int from 0 to {MAX_PRIORITY} (higher runs first), got {priority!r}")
        now = time.time()
        when = None if countdown is None and eta is None else _eta(now, countdown, eta)
        explicit_id = task_id is not None
        if task_id is None:
            task_id = os.urandom(16).hex()  # as unique as uuid4().hex, at a third of the cost
        elif not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
            raise invalid_task_id(task_id, "task_id")
        envelope = Envelope(
            id=task_id,
            task=name,
            args=list(args),
            kwargs=dict(kwargs),
            eta=when,
            expires=None if expires is None else _expires(now, expires),  # from the call, as Celery
            parent_id=parent_id,
            root_id=root_id,
            links=links or _NO_LINKS,
            meta=meta or _NO_META,
        )
        if serializer == "msgpack" and compression is None:
            try:
                payload = envelope.encode()
            except EncodeError:
                raise EncodeError(
                    f"cannot send {name}: {find_unencodable(args, kwargs)}. natask carries msgpack types plus "
                    "datetime, date, time, timedelta, UUID, Decimal, bytes, set, tuple and dataclasses"
                ) from None
        else:
            payload = _encode_other(envelope, serializer, compression)
        hdrs = {HDR_MSG_ID: task_id}  # the task's name is in the subject (a header would cost ~40 B a task)
        if explicit_id:
            hdrs[HDR_CHECK_STORED] = "1"  # this id may have run before: the worker looks first
        if soft_time_limit is not None:
            hdrs[HDR_SOFT_TIME_LIMIT] = _soft_limit(soft_time_limit)
        if extra:
            hdrs.update(extra)
        if headers:
            for key, value in headers.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError("headers must map str to str")
                if key.lower().startswith(_RESERVED_HEADERS):
                    raise ConfigError(f"header {key!r} is reserved: natask and NATS own the 'Natask-' and "
                                      "'Nats-' headers (use task_id= for the message id)")
                hdrs[key] = value
        return Call(task_id, name, queue, payload, hdrs, when, ignore_result, priority, envelope.expires, retry)

    def subject(self, call: Call) -> str:
        """The subject to publish ``call`` on: its queue's (or priority level's) task subject, or,
        for a call due later, its schedule subject (the schedule headers set)."""
        names = self.names
        subject = (names.task_subject(call.queue, call.task) if not call.priority
                   else names.priority_subject(call.queue, call.task, call.priority))
        if call.eta is not None and call.eta > time.time():
            call.headers[HDR_SCHEDULE] = at_schedule(call.eta)
            call.headers[HDR_SCHEDULE_TARGET] = subject
            subject = names.schedule_subject(call.queue, call.task_id)
        return subject

    def route(self, broker: Broker, call: Call) -> tuple[H, str]:
        """The result handle and the subject of a call; registers the reply fast path."""
        subject = self.subject(call)
        existing = self.pending.get(call.task_id)
        if existing is not None and existing._route is broker:
            call.headers[HDR_REPLY] = f"{broker.reply_prefix}.{call.task_id}"
            return existing, subject  # the same id again: one handle, one reply
        result = self._result_type(self._owner, call.task_id, call.task, ignore_result=call.ignore_result,
                                   route=broker)
        if not call.ignore_result:
            call.headers[HDR_REPLY] = f"{broker.reply_prefix}.{call.task_id}"
            self.pending[call.task_id] = result
        return result, subject

    async def publish(self, call: Call) -> H:
        """Publish one prepared call; its handle once the server has it."""
        hooks = self.hooks
        if hooks.before_publish:
            await hooks.call("before_publish", call)
        broker = await self.broker()
        result, subject = self.route(broker, call)
        await broker.ensure_stream(call.queue)
        ttl = (call.priority or call.expires is not None) and await self._before_wire(broker, call)
        try:
            published = await broker.publish(subject, call.payload, call.headers, call.retry)
        except PayloadTooLarge as e:  # a try costs nothing until it raises: small calls pay no more
            published = await broker.publish(subject, await self.claim_check(broker, call, e), call.headers,
                                             call.retry)
        if ttl and call.expires is not None:
            result._expiry = (call.expires, published.seq, call.queue)
        if published.duplicate and self.pending.get(call.task_id) is not result:
            # The stored message carries another caller's reply inbox, not ours: read the KV bucket.
            result._route = None
        if hooks.after_publish:
            await hooks.call("after_publish", call)
        return result

    async def publish_many(self, calls: Sequence[Call]) -> list[H]:
        """Publish prepared calls pipelined; their handles in order."""
        hooks = self.hooks
        if hooks.before_publish:
            for call in calls:
                await hooks.call("before_publish", call)
        broker = await self.broker()
        results, subjects, payloads = [], [], []
        for call in calls:
            result, subject = self.route(broker, call)
            try:
                broker.check_size(subject, call.payload, call.headers)
                payloads.append(call.payload)
            except PayloadTooLarge as e:
                payloads.append(await self.claim_check(broker, call, e))
            results.append(result)
            subjects.append(subject)
        if broker.per_queue:
            for queue in {call.queue for call in calls}:
                await broker.ensure_stream(queue)
        else:
            await broker.ensure_stream()
        ttl = [i for i, call in enumerate(calls) if (call.priority or call.expires is not None)
               and await self._before_wire(broker, call)]
        seqs = [0] * len(calls) if ttl else None
        await broker.publish_many(subjects, payloads, [c.headers for c in calls], seqs)
        if seqs is not None:
            for i in ttl:
                expires = calls[i].expires
                if expires is not None:
                    results[i]._expiry = (expires, seqs[i], calls[i].queue)
        if hooks.after_publish:
            for call in calls:
                await hooks.call("after_publish", call)
        return results

    async def broadcast(self, call: Call) -> H:
        """Send a broadcast task over core NATS to every worker of its queue listening now (each
        runs it once; at-most-once: nothing is stored, a worker away misses it). Its handle stores
        no result (``ignore_result``)."""
        if call.eta is not None:
            raise ConfigError(f"{call.task} is a broadcast task: it runs when sent (no countdown or eta)")
        hooks = self.hooks
        if hooks.before_publish:
            await hooks.call("before_publish", call)
        broker = await self.broker()
        await broker.publish_core(self.names.broadcast_subject(call.queue, call.task), call.payload, call.headers)
        if hooks.after_publish:
            await hooks.call("after_publish", call)
        return self._result_type(self._owner, call.task_id, call.task, ignore_result=True, route=None)

    async def claim_check(self, broker: Broker, call: Call, error: PayloadTooLarge) -> bytes:
        """A call over ``max_payload``: put its body in the objects bucket (up to
        ``large_payload_limit``) and mark its headers; the body to publish instead (empty).
        ``PayloadTooLarge`` naming the option beyond that limit."""
        limit = self.config.large_payload_limit
        if len(call.payload) > limit:
            raise PayloadTooLarge(
                f"{error} (the Object Store carries calls up to large_payload_limit="
                f"{limit} bytes{', off' if not limit else ''}: raise it, or pass a reference instead)",
                len(call.payload), limit or error.limit) from None
        name = f"{call.task_id}.args"
        await broker.put_object(name, call.payload)
        call.headers[HDR_OBJECT] = name
        return b""

    @staticmethod
    async def _before_wire(broker: Broker, call: Call) -> bool:
        """What a call with a priority or an expiry needs before its publish: its level's consumer
        (created once per connection), and ``Nats-TTL`` where the stream removes expired messages
        (True: set; a delayed call has none, its schedule message would expire instead)."""
        if call.priority:
            await broker.ensure_level(call.queue, call.priority)
        if call.expires is not None and HDR_SCHEDULE not in call.headers and broker.ttl_for(call.queue):
            call.headers[HDR_TTL] = expiry_ttl(call.expires, time.time())
            return not call.ignore_result
        return False

    async def call(self, call: Call, timeout: float) -> Any:
        """Core NATS request-reply to the queue group: at-most-once, nothing stored."""
        broker = await self.broker()
        subject = self.names.rpc_subject(call.queue, call.task)
        try:
            data = await broker.request(subject, call.payload, call.headers, timeout)
        except NoResponders:
            raise NoWorkers(
                f"no worker listens to queue {call.queue!r} for {call.task}: start one with "
                f"`natask worker -A <module>:app -Q {call.queue}`"
            ) from None
        except TimeoutError:
            raise ResultTimeout(f"no reply from {call.task} within {timeout:g}s") from None
        record = loads(data)
        if record.get("state") == State.SUCCESS:
            return record.get("result")
        raise TaskFailed(str(record.get("exc_type", "Exception")), str(record.get("message", "")),
                         str(record.get("traceback", "")), call.task_id)

    async def claim(self, key: str) -> bool:
        """Record ``key`` once, cluster-wide: True for the first caller."""
        check_kv_key(key, "claim key")
        broker = await self.broker()
        kv = await broker.claims()
        try:
            await kv.create(key, dumps({"at": time.time()}))
        except SequenceConflict:  # the key exists
            return False
        return True

    async def revoke(self, task_id: str, terminate: bool) -> None:
        """Record a revoke durably; every worker keeps the set and skips (or cancels) the task."""
        check_task_id(task_id)
        broker = await self.broker()
        kv = await broker.revoked()
        await kv.put(task_id, dumps({"terminate": terminate, "at": time.time()}))

    # -- connections ------------------------------------------------------------------------
    async def broker(self) -> Broker:
        """The connected broker of the running event loop, created on first use."""
        loop = asyncio.get_running_loop()
        broker = self._ready.get(loop)
        if broker is not None and not broker.closed:
            return broker  # the hot path: connected already
        entry = self._brokers.get(loop)
        if entry is not None and entry.done() and not entry.cancelled() and entry.exception() is None:
            broker = entry.result()
            if not broker.closed:
                self._ready[loop] = broker
                return broker
        failed = self._failure
        if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY:
            raise failed[1]  # the server was unreachable a moment ago: do not wait again
        with self._lock:
            for other in [lp for lp in self._brokers if lp.is_closed()]:
                del self._brokers[other]
                self._ready.pop(other, None)
                self._watches.pop(other, None)
                self._rechecks.pop(other, None)
            entry = self._brokers.get(loop)
            if entry is None or (entry.done() and (entry.cancelled() or entry.exception() is not None
                                                   or entry.result().closed)):
                entry = loop.create_task(self._connect())
                self._brokers[loop] = entry
        broker = await asyncio.shield(entry)
        self._ready[loop] = broker
        return broker

    def connected(self, loop: asyncio.AbstractEventLoop) -> Broker | None:
        """The connected broker of ``loop``, if it has one (no I/O)."""
        return self._ready.get(loop)

    async def _connect(self) -> Broker:
        broker = Broker(self.config, on_result=self._on_result, on_reconnect=lambda: self._on_reconnect(broker),
                        on_closed=lambda _: self.routes_lost(broker))
        try:
            await broker.connect()
        except BrokerError as e:
            self._failure = (time.monotonic(), e)
            raise
        self._failure = None
        return broker

    def _on_result(self, task_id: str, data: bytes) -> None:
        result = self.pending.get(task_id)
        if result is None:
            return
        try:
            record = loads(data)
        except Exception:
            return
        if isinstance(record, dict) and isinstance(record.get("state"), str):
            result._deliver(record)

    def _on_reconnect(self, broker: Broker) -> None:
        # Replies published while we were away are lost: read the outstanding keys (a few shared
        # passes), not a timer or a watch per waiter. The first connect has no such window: the
        # inbox is subscribed (and flushed) before any call goes out, so its interest leaves our
        # server, towards the cluster's other servers, ahead of anything that could answer.
        loop = broker.loop
        running = self._rechecks.get(loop)
        if running is not None:
            running.cancel()
        task = self._rechecks[loop] = loop.create_task(recheck(self, broker))
        task.add_done_callback(lambda t: self._rechecks.pop(loop) if self._rechecks.get(loop) is t else None)

    def routed(self, broker: Broker) -> list[H]:
        """The results still outstanding whose replies come over ``broker``."""
        # valuerefs() copies in one step: another thread's loop may be adding results meanwhile.
        results = (ref() for ref in self.pending.valuerefs())
        return [r for r in results if r is not None and r._route is broker and not r._final]

    def routes_lost(self, broker: Broker) -> None:
        """``broker`` closed: the waiters of its results wait through the KV bucket instead."""
        for result in self.routed(broker):
            result._unroute()

    def key_watch(self, broker: Broker) -> KeyWatch:
        """The shared watch of the keys waited on without a reply route, on ``broker``'s loop."""
        watch = self._watches.get(broker.loop)
        if watch is None or watch.broker is not broker or watch.closed:
            if watch is not None:
                watch.close()
            watch = self._watches[broker.loop] = KeyWatch(broker)
        return watch

    def _stop_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the read passes and the key watch of ``loop`` (on that loop)."""
        running = self._rechecks.pop(loop, None)
        if running is not None:
            running.cancel()
        watch = self._watches.pop(loop, None)
        if watch is not None:
            watch.close()

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and stop the I/O thread; safe from any thread."""
        self.portal.stop()
        self._abandon_others()

    async def aclose(self) -> None:
        """Close the connection of the running loop, then everything else."""
        await self._close_loop_brokers()
        await asyncio.to_thread(self.portal.stop)
        self._abandon_others()

    def closes_on(self, loop: asyncio.AbstractEventLoop) -> int:
        """How many times the app was closed on ``loop``: a wait running there when it changes
        stops instead of connecting anew."""
        return self._closes.get(loop, 0)

    async def _close_loop_brokers(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._brokers.pop(loop, None)
            self._ready.pop(loop, None)
            self._closes[loop] = self._closes.get(loop, 0) + 1
        self._stop_waiting(loop)
        if entry is not None and entry.done() and not entry.cancelled() and entry.exception() is None:
            await entry.result().close()
            self.routes_lost(entry.result())
        elif entry is not None:
            entry.cancel()

    def _abandon_others(self) -> None:
        with self._lock:
            entries, self._brokers = list(self._brokers.items()), {}
            self._ready = {}
        for loop, entry in entries:
            if loop.is_closed() or not entry.done() or entry.cancelled() or entry.exception() is not None:
                continue
            broker = entry.result()
            if loop.is_running():
                loop.call_soon_threadsafe(self._stop_waiting, loop)
                asyncio.run_coroutine_threadsafe(broker.close(), loop)
            else:
                broker.abandon()
            self.routes_lost(broker)

    def _after_fork(self) -> None:
        # A forked child shares the parent's sockets: it must open connections of its own.
        self._lock = threading.Lock()
        self._brokers, self._ready = {}, {}
        self._watches, self._rechecks = {}, {}


_CLIENTS: weakref.WeakSet[Client[Any]] = weakref.WeakSet()


def _after_fork() -> None:
    for client in _CLIENTS:
        client._after_fork()


os.register_at_fork(after_in_child=_after_fork)


def _eta(now: float, countdown: float | timedelta | None, eta: datetime | None) -> float | None:
    if countdown is not None and eta is not None:
        raise ConfigError("give countdown= or eta=, not both")
    if countdown is not None:
        return now + seconds(countdown, "countdown")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"eta must be a datetime, got {type(eta).__name__}")
        if eta.tzinfo is None:
            raise ConfigError("eta must be timezone-aware (e.g. datetime.now(timezone.utc) + ...)")
        return eta.timestamp()
    return None


def _encode_other(envelope: Envelope, serializer: str, compression: str | None) -> bytes:
    """A call's body with a ``serializer`` other than msgpack and/or a ``compression``."""
    if serializer not in ("msgpack", "json"):
        raise ConfigError(f"serializer must be 'msgpack' or 'json', got {serializer!r:.40}")
    try:
        payload = envelope.encode() if serializer == "msgpack" else envelope.encode_json()
    except EncodeError as e:
        detail = find_unencodable(envelope.args, envelope.kwargs) if serializer == "msgpack" else e
        raise EncodeError(f"cannot send {envelope.task} as {serializer}: {detail}") from None
    return payload if compression is None else compress(payload, compression)


def _soft_limit(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"soft_time_limit must be a number of seconds > 0, got {value!r}")
    return repr(float(value))
def expiry_ttl(expires: float, now: float) -> str:
    """``Nats-TTL`` for a task expiring at ``expires``: whole seconds (the server takes no less than
    1), rounded up so that the server never removes a task before its expiry (SPEC §2)."""
    return str(max(1, math.ceil(expires - now)))


def _expires(start: float, expires: float | timedelta | datetime | None) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise ConfigError("expires must be timezone-aware when given as a datetime")
        return expires.timestamp()
    return start + seconds(expires, "expires")
