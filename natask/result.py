"""AsyncResult: a task's outcome, from the caller's reply inbox or the results KV bucket.

Waiting costs nothing while nothing happens: a waiter is one future. Replies come over the app's
one inbox subscription per connection; after a reconnect, shared read passes find the replies it
lost (``waiting.recheck``); a wait without a reply route reads the key once, then joins the
connection's shared watch of such keys (``waiting.KeyWatch``)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final, Generic, TypeGuard, TypeVar

from .broker import SequenceConflict
from .errors import BrokerError, ResultError, ResultTimeout, TaskFailed, TaskRevoked
from .message import dumps
from .naming import RESULT_OBJECT, TASK_ID_RE, check_task_id
from .portal import Portal, blocking
from .states import FINAL_STATES, State
from .waiting import Record, parse_record

if TYPE_CHECKING:
    from .broker import Broker
    from .client import App

R = TypeVar("R")
log = logging.getLogger("natask.result")


EXPIRY_MARGIN: Final = 1.5
"""Seconds after a task's expiry its handle looks whether the server removed it: ``Nats-TTL`` is
rounded up to whole seconds, and the server's expiry runs on a timer."""

_LOCK = threading.Lock()
"""Guards every handle's record and waiters (held for a few bytecodes: one lock, not one per handle)."""


class AsyncResult(Generic[R]):
    """The handle of one task call; ``app.AsyncResult(id)`` rebuilds it in any process.

    The id is checked against ``TASK_ID_RE`` (``ConfigError`` otherwise): it becomes a KV key, and a
    wildcard key would read or delete every stored result.
    """

    # A producer may hold 100,000 handles waiting: no __dict__, no lock of their own.
    __slots__ = ("__weakref__", "_expiry", "_ignore_result", "_record", "_route", "_waiters", "app", "id",
                 "task_name")

    def __init__(
        self,
        app: App,
        task_id: str,
        task_name: str | None = None,
        *,
        ignore_result: bool = False,
        route: Broker | None = None,
    ) -> None:
        if route is None:  # with a route, a call just published: its id was checked when prepared
            check_task_id(task_id)
        self.app = app
        self.id = task_id
        self.task_name = task_name
        self._ignore_result = ignore_result
        self._record: Record | None = None
        self._route = route
        # A tuple, not a list: most handles are never waited on, and an empty tuple is shared.
        self._waiters: tuple[asyncio.Future[None], ...] = ()
        self._expiry: tuple[float, int, str] | None = None
        """(expires, stream sequence, queue) of a call the server removes at its expiry (``Nats-TTL``)."""

    @property
    def _portal(self) -> Portal:
        return self.app.client.portal

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} {self._record['state'] if self._record else '?'}>"

    # -- known outcome, no I/O --------------------------------------------------------------
    def _deliver(self, record: Record) -> None:
        """Take a new record (any thread) and wake every waiter."""
        with _LOCK:
            if self._record is not None and self._record.get("state") in FINAL_STATES:
                return
            self._record = record
            waiters, self._waiters = self._waiters, ()
        _wake_waiters(waiters)

    def _wake_all(self) -> None:
        with _LOCK:
            waiters, self._waiters = self._waiters, ()
        _wake_waiters(waiters)

    def _add_waiter(self, fut: asyncio.Future[None], route: Broker | None = None) -> bool:
        """Register a waiter (any thread); False if the outcome is known or the route (when given)
        was lost meanwhile."""
        with _LOCK:
            if self._final or (route is not None and self._route is not route):
                return False
            self._waiters = (*self._waiters, fut)
            return True

    def _drop_waiter(self, fut: asyncio.Future[None]) -> None:
        with _LOCK:
            self._waiters = tuple(w for w in self._waiters if w is not fut)

    def _unroute(self) -> None:
        """The reply route is gone (connection closed) or may have lost the reply: wait through
        the KV bucket from now on."""
        self._route = None
        self._wake_all()

    @property
    def _final(self) -> bool:
        record = self._record
        return record is not None and record.get("state") in FINAL_STATES

    def _unwrap(self, propagate: bool) -> Any:
        record = self._record
        assert record is not None
        state = record["state"]
        if state == State.SUCCESS:
            return record.get("result")
        error = self._error(record)
        if propagate:
            raise error
        return error

    def _error(self, record: Record) -> ResultError:
        if record["state"] == State.REVOKED:
            info = record.get("info") or {}
            reason = info.get("reason", "revoked") if isinstance(info, dict) else "revoked"
            return TaskRevoked(f"task {self.id} was revoked ({reason})")
        return TaskFailed(
            str(record.get("exc_type", "Exception")),
            str(record.get("message", "")),
            str(record.get("traceback", "")),
            self.id,
        )

    # -- state ------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED or a custom state."""
        record = self._current()
        return str(record["state"]) if record else State.PENDING.value

    @property
    def info(self) -> Any:
        """The result on SUCCESS, a ``TaskFailed`` on FAILURE, otherwise the state's meta."""
        return self._info(self._current())

    def _info(self, record: Record | None) -> Any:
        if record is None:
            return None
        if record["state"] == State.SUCCESS:
            return record.get("result")
        if record["state"] == State.FAILURE:
            return self._error(record)
        return record.get("info")

    @property
    def result(self) -> Any:
        """Alias of ``info`` (Celery compatibility)."""
        return self.info

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failed task (text), else None."""
        record = self._current()
        return record.get("traceback") or None if record and record["state"] == State.FAILURE else None

    @property
    def date_done(self) -> datetime | None:
        """When the outcome was stored (an aware UTC datetime), None before."""
        record = self._current()
        done = record.get("date_done") if record else None
        return datetime.fromtimestamp(done, timezone.utc) if isinstance(done, (int, float)) else None

    @property
    def name(self) -> str | None:
        """The task's name: known to the handle of a call, else read from the stored outcome."""
        if self.task_name is not None:
            return self.task_name
        record = self._current()
        return record.get("task") if record else None

    @property
    def retries(self) -> int | None:
        """Retries the task took before its stored outcome (None before one is stored)."""
        record = self._current()
        return record.get("retries") if record else None

    @property
    def args(self) -> list[Any] | None:
        """The call's positional arguments; stored only with the app's ``result_extended=True``."""
        record = self._current()
        return record.get("args") if record else None

    @property
    def kwargs(self) -> dict[str, Any] | None:
        """The call's keyword arguments; stored only with ``result_extended=True``."""
        record = self._current()
        return record.get("kwargs") if record else None

    @property
    def queue(self) -> str | None:
        """The queue the task ran from; stored only with ``result_extended=True``."""
        record = self._current()
        return record.get("queue") if record else None

    def maybe_throw(self, propagate: bool = True) -> None:
        """Raise ``TaskFailed``/``TaskRevoked`` if the task ended so (no waiting); else nothing."""
        record = self._current()
        if propagate and record is not None and record["state"] in (State.FAILURE, State.REVOKED):
            raise self._error(record)

    @property
    def worker(self) -> str | None:
        """The worker (``host:pid``) that produced the latest state, if known."""
        record = self._current()
        return None if record is None else record.get("worker")

    @property
    def parent(self) -> AsyncResult[Any] | None:
        """The task whose success sent this one (a chain's previous step), once this one ran."""
        record = self._current()
        parent_id = record.get("parent_id") if record else None
        return AsyncResult(self.app, parent_id) if _is_task_id(parent_id) else None

    @property
    def children(self) -> list[AsyncResult[Any]]:
        """The tasks this one's success sent (next chain step, chord callback, links)."""
        record = self._current()
        children = record.get("children") if record else None
        # A stored record is data from the wire: ids that are not task ids are left out.
        return [AsyncResult(self.app, c) for c in children if _is_task_id(c)] if isinstance(children, list) else []

    async def astate(self) -> str:
        """Async ``state``: reads the KV bucket on the running loop instead of the I/O thread."""
        if not self._final:
            await self._fetch()
        return str(self._record["state"]) if self._record else State.PENDING.value

    async def ainfo(self) -> Any:
        """Async ``info``."""
        await self.astate()
        return self._info(self._record)

    def ready(self) -> bool:
        """True once the task succeeded, failed or was revoked."""
        return self.state in FINAL_STATES

    def successful(self) -> bool:
        return bool(self.state == State.SUCCESS)

    def failed(self) -> bool:
        return bool(self.state == State.FAILURE)

    def _current(self) -> Record | None:
        if self._final:
            return self._record
        try:
            record = self._portal.run(self._fetch())
        except BrokerError as e:
            # Celery's PENDING means "unknown": that is what an unreachable store tells us.
            log.warning("cannot read the state of task %s: %s", self.id, e)
            return self._record
        return record if record is not None else self._record

    async def _fetch(self) -> Record | None:
        broker = await self.app.client.broker()
        entry = await (await broker.results()).get(self.id)
        if entry is None:
            return await self._expired() if self._expiry is not None and time.time() > self._expiry[0] else None
        record = parse_record(entry.value)
        if record is not None:
            self._deliver(record)
        return record

    async def _expired(self) -> Record | None:
        """After the expiry of a call published with ``Nats-TTL``, with no state stored: if its message
        is gone from the stream, the server removed it unrun (a task that started stores STARTED),
        so record REVOKED/expired for every reader (once: a state a worker stored first wins)."""
        assert self._expiry is not None
        broker = await self.app.client.broker()
        queue = self._expiry[2]
        if await broker.read_at(broker.stream_of(queue), self._expiry[1], broker.domain_of(queue)) is not None:
            return None  # still queued, or running
        record: Record = {"state": State.REVOKED.value, "info": {"reason": "expired"}}
        kv = await broker.results()
        try:
            await kv.create(self.id, dumps(record))
        except SequenceConflict:  # a worker stored a state meanwhile: that one counts
            return await self._fetch()
        self._deliver(record)
        return record

    async def _expire_later(self) -> None:
        """While waiting on a call the server removes at its expiry: look once it is due."""
        assert self._expiry is not None
        delay = self._expiry[0] - time.time() + EXPIRY_MARGIN
        while not self._final:
            await asyncio.sleep(max(0.0, delay))  # a timer until the expiry, not a wait for an event
            delay = EXPIRY_MARGIN
            try:
                if await self._fetch() is not None:
                    return  # a state is stored (it started, or expired): the usual wait goes on
            except BrokerError as e:
                log.debug("cannot check the expiry of task %s yet: %s", self.id, e)

    # -- waiting ----------------------------------------------------------------------------
    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Block until the task is done; return its result or raise ``TaskFailed``/``TaskRevoked``.

        ``timeout`` (seconds) expiring raises ``ResultTimeout``.
        """
        if not self._final:
            self._check_waitable()
            self._portal.run(self._wait(timeout))
        if RESULT_OBJECT in self._record:  # type: ignore[operator]
            self._portal.run(self._claim())
        return self._unwrap(propagate)  # type: ignore[no-any-return]

    def wait(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Alias of ``get`` (Celery's name)."""
        return self.get(timeout, propagate)

    def collect(self, timeout: float | None = None) -> Iterator[tuple[AsyncResult[Any], Any]]:
        """``(handle, result)`` of this task, then of its children and theirs, depth first (Celery's
        ``collect``: waits for each in turn)."""
        yield self, self.get(timeout)
        for child in self.children:
            yield from child.collect(timeout)

    def then(self, callback: Callable[[AsyncResult[R]], object],
             on_error: Callable[[BaseException], object] | None = None) -> Future[None]:
        """Call ``callback(self)`` on the app's I/O thread once the task ended (any final state);
        ``on_error(exc)`` if waiting failed. Returns a ``concurrent.futures.Future`` of the call."""
        async def wait_then() -> None:
            try:
                if not self._final:
                    self._check_waitable()
                    await self._wait_final()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(e)
                return
            callback(self)

        portal = self._portal
        return asyncio.run_coroutine_threadsafe(wait_then(), portal.loop or portal._start())

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Async ``get``."""
        if not self._final:
            self._check_waitable()
            await (self._wait_final() if timeout is None else self._wait(timeout))  # one frame less
        if RESULT_OBJECT in self._record:  # type: ignore[operator]
            await self._claim()
        return self._unwrap(propagate)  # type: ignore[no-any-return]

    async def _claim(self) -> None:
        """Replace a SUCCESS record that points at an object (a result over ``max_payload``) by
        the whole record stored there."""
        broker = await self.app.client.broker()
        data = await broker.get_object(f"{self.id}.result")  # our own id: never a name from the wire
        record = parse_record(data) if data else None
        if record is None or record.get("state") != State.SUCCESS:
            raise ResultError(f"the result of task {self.id} was stored in the Object Store (bucket "
                              f"{self.app.names.objects_bucket}) and is gone: it is kept result_ttl")
        self._record = record

    def _check_waitable(self) -> None:
        if self._ignore_result:
            raise ResultError(
                f"task {self.task_name or self.id} has ignore_result=True: no result is sent or stored. "
                "Drop ignore_result to wait for it."
            )

    async def _wait(self, timeout: float | None) -> None:
        try:
            if timeout is None:
                await self._wait_final()
            elif sys.version_info >= (3, 11):
                async with asyncio.timeout(timeout):  # no task per waiter, unlike wait_for
                    await self._wait_final()
            else:
                await asyncio.wait_for(self._wait_final(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            if self._final:
                return
            raise ResultTimeout(f"no result for task {self.id} within {timeout:g}s") from None

    async def _wait_final(self) -> None:
        if self._expiry is None:
            await self._wait_outcome()
            return
        expiry = asyncio.get_running_loop().create_task(self._expire_later())
        try:
            await self._wait_outcome()
        finally:
            expiry.cancel()

    async def _wait_outcome(self) -> None:
        loop = asyncio.get_running_loop()
        closes = self.app.client.closes_on(loop)
        read = False
        while not self._final:
            route = self._route
            # A reply is read by its connection's loop: this one, or the I/O thread's (which runs
            # until the app closes, and then unroutes its results). Other loops may stop at any time.
            if route is not None and not route.closed and (route.loop is loop or route.loop is self._portal.loop):
                fut: asyncio.Future[None] = loop.create_future()
                if self._add_waiter(fut, route):
                    try:
                        await fut
                    finally:
                        self._drop_waiter(fut)
                continue
            # No reply route (another process, a duplicate call, a lost connection, a loop that
            # runs only during another thread's sync calls): read the key, then watch it.
            if self.app.client.closes_on(loop) != closes:
                raise ResultError(f"the app was closed while waiting for task {self.id}: its outcome is not "
                                  "known here (read it later with AsyncResult(id))")
            broker = await self.app.client.broker()
            watch = self.app.client.key_watch(broker)
            if read:
                await watch.wait(self)
            else:
                read = True
                await watch.read_first(self)

    # -- management -------------------------------------------------------------------------
    async def aforget(self) -> None:
        broker = await self.app.client.broker()
        kv = await broker.results()
        await kv.purge(self.id)
        with _LOCK:
            self._record = None

    forget = blocking(aforget, "Delete the stored result (and forget the local copy).")

    async def arevoke(self, terminate: bool = False) -> None:
        await self.app.client.revoke(self.id, terminate)

    revoke = blocking(arevoke, "Revoke the task: if it has not started it never runs; ``terminate`` cancels a "
                               "running\nasync task.")


def _is_task_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and TASK_ID_RE.match(value) is not None


def _wake_waiters(waiters: tuple[asyncio.Future[None], ...]) -> None:
    here = asyncio._get_running_loop()
    for fut in waiters:
        loop = fut.get_loop()
        if loop is here:
            _wake(fut)  # the reply came in on the waiter's own loop: no self-pipe round
        elif not loop.is_closed():
            loop.call_soon_threadsafe(_wake, fut)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
