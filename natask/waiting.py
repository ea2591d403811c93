"""How waiters learn outcomes that no reply brings: read passes after a reconnect, and one watch of
the results bucket per connection, shared by every wait that has no reply route."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from .errors import BrokerError
from .message import loads

if TYPE_CHECKING:
    from .broker import Broker

log = logging.getLogger("natask.result")

RECHECK_AFTER: Final = (0.0, 2.0)
"""Seconds after a reconnect at which the outstanding results' keys are read (and once more when
``publish_timeout`` has passed). A reply sent while the connection was away, or before a cluster's
other servers knew of the resubscribed inbox, is lost; a worker sends its reply before it stores
the outcome, so a store may land after the first pass (a leader election delays it up to the
worker's ``publish_timeout``). Each pass reads only the keys still outstanding."""
READS_AT_ONCE: Final = 64
"""Key reads a read pass has in flight at most."""
_READ_TIMEOUT: Final = 2.0
"""Seconds a read of a pass may take: a bucket that does not answer ends the pass (the next one tries again)."""
SHARD_KEYS: Final = 128
"""Keys one watch consumer filters at most. The server compares a consumer's filters with one
another when it creates it: 128 keys took 9 ms, 1,000 keys 0.2 s, 4,000 keys 2.5 s."""
MAX_SHARDS: Final = 16
"""Watch consumers of one connection before new keys are merged into the least used one."""


Record = Mapping[str, Any]
"""A stored result: ``{"state", "result" | "exc_type"/"message"/"traceback" | "info", ...}``."""


class Waiter(Protocol):
    """A result handle, as the connections and watches that bring its outcome see it."""

    _route: Broker | None
    """The connection whose inbox receives the reply; None: wait through the results bucket."""
    _expiry: tuple[float, int, str] | None
    """(expires, stream sequence, queue) of a call the server removes at its expiry, else None."""

    @property
    def id(self) -> str: ...
    @property
    def _final(self) -> bool: ...
    def _deliver(self, record: Record) -> None: ...
    def _unroute(self) -> None: ...
    def _wake_all(self) -> None: ...
    def _add_waiter(self, fut: asyncio.Future[None], route: Broker | None = None) -> bool: ...
    def _drop_waiter(self, fut: asyncio.Future[None]) -> None: ...
    async def _fetch(self) -> Record | None: ...


class Routes(Protocol):
    """The outstanding results of a client, by the connection their replies come over."""

    @property
    def pending(self) -> Mapping[str, Waiter]: ...
    def routed(self, broker: Broker) -> Sequence[Waiter]: ...
    def routes_lost(self, broker: Broker) -> None: ...


def parse_record(data: bytes) -> dict[str, Any] | None:
    """A stored or replied result record, None if it is not one (logged)."""
    try:
        record = loads(data)
    except Exception:
        log.warning("ignoring an undecodable result record (%d bytes)", len(data))
        return None
    return record if isinstance(record, dict) and isinstance(record.get("state"), str) else None


async def read_record(broker: Broker, key: str) -> dict[str, Any] | None:
    """One read of a results key (no retries): its record, or None if there is none."""
    data = await (await broker.results()).value(key, _READ_TIMEOUT)
    return parse_record(data) if data else None


# -- after a reconnect ------------------------------------------------------------------------------
async def recheck(routes: Routes, broker: Broker) -> None:
    """Read the keys of the results still outstanding over ``broker`` (just reconnected) at each
    of ``RECHECK_AFTER`` and once ``publish_timeout`` has passed. nats-py calls the reconnect
    callback once the inbox subscription is back, so a reply sent after the first pass arrives.
    If the bucket cannot be read through the last pass, those results lose their route: their
    waiters watch the keys instead."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    complete = True
    for after in sorted({*RECHECK_AFTER, broker.config.publish_timeout + 1.0}):
        await asyncio.sleep(max(0.0, start + after - loop.time()))
        if broker.closed:
            return
        complete = await _read_pass(routes, broker)
    if not complete:
        log.warning("results bucket unreadable since the reconnect: waiters watch their keys instead")
        routes.routes_lost(broker)


async def _read_pass(routes: Routes, broker: Broker) -> bool:
    """One read of every outstanding key routed over ``broker``; False if the bucket did not answer."""
    outstanding = [result.id for result in routes.routed(broker)]
    keys = iter(outstanding)
    failed: list[BaseException] = []

    async def reader() -> None:
        for key in keys:
            result = routes.pending.get(key)
            if result is None or result._route is not broker or result._final:
                continue  # gone, settled or re-routed since the pass began
            try:
                record = await read_record(broker, key)
            except (BrokerError, asyncio.TimeoutError) as e:
                failed.append(e)
                return
            if record is not None:
                result._deliver(record)
            if failed:
                return

    await asyncio.gather(*(reader() for _ in range(min(READS_AT_ONCE, len(outstanding)))))
    if failed:
        log.info("a read pass after a reconnect stopped: %s", failed[0])
    return not failed


# -- waits without a reply route --------------------------------------------------------------------
class _Shard:
    """One watch consumer and the keys it filters."""

    __slots__ = ("keys", "live", "started", "task")

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.live = len(keys)  # keys still waited on through this shard
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class KeyWatch:
    """The result keys waited on without a reply route over one connection, watched by a few
    consumers (up to ``SHARD_KEYS`` keys each) that every such wait shares, not one per waiter.

    A key joins a consumer when its first waiter comes and leaves when its last waiter goes; a
    consumer whose keys are all gone is dropped. Keys arriving while a consumer starts go together
    into the next one; past ``MAX_SHARDS`` consumers, new keys are merged into the least used one.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.closed = False
        self._reading = 0
        self._waiting: dict[str, list[Waiter]] = {}
        self._queued: dict[str, None] = {}  # keys waiting for a consumer, in arrival order
        self._shard_of: dict[str, _Shard] = {}
        self._shards: set[_Shard] = set()
        self._failed: dict[str, BaseException] = {}
        self._builder: asyncio.Task[None] | None = None

    @property
    def consumers(self) -> int:
        """Watch consumers open now."""
        return len(self._shards)

    @property
    def keys(self) -> int:
        """Keys waited on now."""
        return len(self._waiting)

    async def read_first(self, result: Waiter) -> None:
        """Read ``result``'s key once if the watch is idle: a lone wait for a finished task costs
        one read, not a consumer. In a burst the key goes straight to the next consumer, whose
        start delivers the key's latest record anyway."""
        if self._queued or self._builder is not None or self._reading:
            return
        self._reading += 1
        try:
            with contextlib.suppress(BrokerError, asyncio.TimeoutError):
                await result._fetch()  # failing, it leaves the wait to the watch, which outlasts outages
        finally:
            self._reading -= 1

    async def wait(self, result: Waiter) -> None:
        """Wait until the watch brings ``result`` a record, or the watch ends (its connection
        closed: wait again on the app's next one). A watch that cannot start raises its error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self.closed or not result._add_waiter(fut):
            return
        self._join(result)
        try:
            await fut
        finally:
            result._drop_waiter(fut)
            error = self._failed.get(result.id)
            self._leave(result)
        if error is not None and not self.closed and not self.broker.closed:
            raise error

    def close(self) -> None:
        """Drop every consumer and wake the waiters (on the watch's loop)."""
        self.closed = True
        if self._builder is not None:
            self._builder.cancel()
        for shard in list(self._shards):
            self._stop(shard)
        for results in list(self._waiting.values()):
            for result in results:
                result._wake_all()

    def _join(self, result: Waiter) -> None:
        waiting = self._waiting.get(result.id)
        if waiting is not None:
            waiting.append(result)
            return
        self._waiting[result.id] = [result]
        self._queued[result.id] = None
        if self._builder is None:
            self._builder = asyncio.get_running_loop().create_task(self._build())

    def _leave(self, result: Waiter) -> None:
        key = result.id
        waiting = self._waiting.get(key)
        if waiting is None:
            return
        with contextlib.suppress(ValueError):
            waiting.remove(result)
        if waiting:
            return
        del self._waiting[key]
        self._queued.pop(key, None)
        self._failed.pop(key, None)
        shard = self._shard_of.pop(key, None)
        if shard is not None:
            shard.live -= 1
            if shard.live <= 0:
                self._stop(shard)

    async def _build(self) -> None:
        try:
            while self._queued and not self.closed:
                keys = list(itertools.islice(self._queued, SHARD_KEYS))
                for key in keys:
                    del self._queued[key]
                if len(self._shards) >= MAX_SHARDS:
                    least = min(self._shards, key=lambda s: s.live)
                    if least.live + len(keys) <= SHARD_KEYS:
                        # Its consumer restarts with the new keys: delivering each key's latest
                        # entry first, it misses nothing stored in between.
                        keys = [k for k in least.keys if self._shard_of.get(k) is least] + keys
                        self._stop(least)
                shard = _Shard(keys)
                for key in keys:
                    self._shard_of[key] = shard
                self._shards.add(shard)
                shard.task = asyncio.get_running_loop().create_task(self._follow(shard))
                await shard.started.wait()  # meanwhile arriving keys go together into the next one
        finally:
            self._builder = None

    async def _follow(self, shard: _Shard) -> None:
        broker = self.broker
        try:
            async with contextlib.aclosing(broker.watch(broker.names.results_bucket, shard.keys)) as entries:
                async for entry in entries:
                    shard.started.set()
                    if entry is not None and entry.value:
                        record = parse_record(entry.value)
                        if record is not None:
                            for result in list(self._waiting.get(entry.key, ())):
                                result._deliver(record)
                    if shard.live <= 0:
                        return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the watch could not start: PermissionDenied, StorageFull, closed
            self._fail(shard, e)
        finally:
            shard.started.set()
            self._shards.discard(shard)

    def _stop(self, shard: _Shard) -> None:
        self._shards.discard(shard)
        shard.live = 0
        if shard.task is not None and shard.task is not asyncio.current_task():
            shard.task.cancel()

    def _fail(self, shard: _Shard, error: BaseException) -> None:
        for key in shard.keys:
            if self._shard_of.get(key) is shard:
                del self._shard_of[key]
                self._failed[key] = error
                for result in self._waiting.get(key, ()):
                    result._wake_all()
