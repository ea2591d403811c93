"""``Beat``: any number run, one elected by a KV lease, each fire time enqueued once under a
deterministic task id (``tick_id``), so a split-brain pair is deduplicated by the stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from .. import signals
from ..broker import SequenceConflict
from ..broker.kv import Bucket
from ..config import Seconds, seconds
from ..errors import BrokerError, ConfigError
from .enqueue import Enqueuer, Message
from .live import LiveEntries
from .records import RECORD_PREFIX, Records, loads
from .schedule import UTC, PeriodicEntry, schedule_text
from .timetable import Tick, Timetable

if TYPE_CHECKING:
    from ..app import Natask

log = logging.getLogger("natask.beat")
LEASE_KEY: Final = "leader"
"""KV key of the leader lease: JSON ``{"holder": id, "expires": unix time}`` (``holder`` empty: released)."""
LEASE_SAFETY: Final = 0.8
"""A leader fires only within this fraction of ``lease_ttl`` after sending its last successful renewal."""
LATE_WINDOW_MIN: Final = 10.0
"""Ticks at most ``max(3 * lease_ttl, this)`` seconds late (a failover, a short outage) are all enqueued."""
TICK_BATCH: Final = 1000
"""Ticks published together (pipelined), then recorded together; the lease is checked between batches."""
_TRANSIENT: Final = (BrokerError, asyncio.TimeoutError, OSError)

__all__ = ["LATE_WINDOW_MIN", "LEASE_KEY", "LEASE_SAFETY", "RECORD_PREFIX", "TICK_BATCH", "Beat", "BeatState",
           "bucket_name", "read_state"]


# -- the beat ----------------------------------------------------------------------------------


def bucket_name(app: Natask) -> str:
    """The KV bucket holding the lease and the last fire times: ``natask_beat_<prefix>``."""
    return app.names.beat_bucket


@dataclass(frozen=True)
class BeatState:
    """What the beat bucket says, for ``natask status``: the lease holder (``None`` if released or
    never taken), when its lease runs out by the holder's clock, and the last fire time per entry."""

    leader: str | None
    lease_expires: datetime | None
    last_fired: dict[str, datetime]


async def read_state(app: Natask) -> BeatState:
    """Read the beat bucket (never creates it)."""
    broker = await app.client.broker()
    kv = await broker.existing_bucket(bucket_name(app))
    if kv is None:
        return BeatState(None, None, {})
    leader, expires = None, None
    lease = await kv.get(LEASE_KEY)
    if lease is not None:
        data = loads(lease.value)
        leader = str(data.get("holder") or "") or None
        if leader and isinstance(data.get("expires"), (int, float)):
            expires = datetime.fromtimestamp(data["expires"], UTC)
    recorded = await Records(kv).load(list(app.periodic_entries))
    return BeatState(leader, expires, {name: fire for name, fire in recorded.items() if fire is not None})


class Beat:
    """Enqueues an app's periodic entries; run any number of them (``natask beat``, ``worker -B``).

    One beat leads at a time, elected through a lease in the KV bucket ``natask_beat_<prefix>``; the
    others watch it and take over within about ``1.25 * lease_ttl`` of the leader's death. The lease
    is renewed by a task of its own, so a long pass never lets it lapse. The leader publishes the
    ticks of a pass pipelined and records each entry's last enqueued fire time in the same bucket once
    the server acknowledged it, so a new leader neither replays nor skips: fire times that fell due
    while some beat was watching are all enqueued (late, after a failover); fire times missed while
    no beat ran are dropped except the latest ``catch_up`` per entry.
    ``clock`` (unix seconds) decides fire times; lease timing uses the monotonic clock.
    Besides the app's own entries, each beat fires those stored in ``natask_schedules_<prefix>``
    (``app.beat``, ``natask beat add``): it watches that bucket and applies a change in the next pass.
    """

    def __init__(
        self,
        app: Natask,
        *,
        catch_up: int = 1,
        lease_ttl: Seconds = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(catch_up, bool) or not isinstance(catch_up, int) or catch_up < 0:
            raise ConfigError(f"catch_up must be an int >= 0, got {catch_up!r}")
        ttl = seconds(lease_ttl, "lease_ttl")
        if ttl < 0.5:
            raise ConfigError(f"lease_ttl must be >= 0.5 seconds, got {lease_ttl!r}")
        self.app = app
        self.catch_up = catch_up
        self.lease_ttl = ttl
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._late_window = max(3 * ttl, LATE_WINDOW_MIN)
        self._poll = ttl / 4
        self._live = LiveEntries(app, self._changed)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # the firing loop: leadership gained, or stop
        self._done = asyncio.Event()
        self._started = 0.0
        self._release_on_exit = True
        # lease (monotonic times)
        self._lease_rev: int | None = None
        self._leader_until = 0.0
        self._lease_due = 0.0
        self._seen: tuple[int, float] | None = None  # (lease revision, when we first saw it)
        self._term = 0  # bumped whenever this beat becomes leader after another may have led
        # while leading: cursors and next fire times, and the records' revisions for CAS
        self._timetable: Timetable | None = None
        self._timetable_term = 0
        self._records: Records | None = None
        self._enqueuer = Enqueuer(app)
        self.lease_checked: float | None = None
        """Monotonic time of the last lease renewal or read the server answered (``/health``)."""
        self.last_tick: tuple[str, datetime, float] | None = None
        """(entry, fire time, unix time sent) of the last tick this beat enqueued (``/health``)."""

    def __repr__(self) -> str:
        return f"<Beat {self.id} {'leader' if self.is_leader else 'follower'} entries={len(self.entries)}>"

    @property
    def entries(self) -> list[PeriodicEntry]:
        """The entries this beat fires now: the app's, and those stored (``app.beat``) and enabled."""
        return self._live.entries

    @property
    def running(self) -> bool:
        """Whether the electing and firing loop runs (started, not stopped, not crashed)."""
        return self._task is not None and not self._task.done()

    @property
    def is_leader(self) -> bool:
        """Whether this beat holds a valid lease right now (and so may enqueue ticks)."""
        return self._lease_rev is not None and time.monotonic() < self._leader_until

    async def start(self) -> None:
        """Connect, open (or create) the beat bucket and start electing and firing in the background."""
        if self._task is not None:
            raise RuntimeError("this beat is already running")
        kv = await self._open()
        self._live = LiveEntries(self.app, self._changed)
        await self._live.start(f"natask-beat-watch-{self.id}")  # known before this beat may lead
        if not self.entries:
            log.warning("app %r has no periodic entries yet: this beat enqueues those added later "
                        "(natask beat add, app.beat.add)", self.app.name)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._release_on_exit = True
        self._started = self._clock()
        self._lease_due = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run(kv), name=f"natask-beat-{self.id}")
        signals.beat_init.send(self)
        log.info("beat %s started with %d entries", self.id, len(self.entries))

    async def stop(self, *, release: bool = True) -> None:
        """Stop: finish the batch of ticks being enqueued, then hand the lease over at once
        (``release=False`` drops everything mid-flight and leaves the lease to expire, as a crash
        would: for tests)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._release_on_exit = release
        self._stopping.set()  # the loops exit on this even if a cancellation gets lost (see below)
        self._wake.set()
        if release and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.app.config.publish_timeout + self.lease_ttl)
            except asyncio.TimeoutError:
                log.warning("beat %s did not stop in time; cancelling it", self.id)
        # Before Python 3.12, asyncio.wait_for (inside nats-py requests) drops a cancellation that
        # arrives as its result does; the loops then stop at their next check of _stopping instead.
        task.cancel()
        await asyncio.wait({task})  # unlike `await task`, a cancellation of our caller still propagates
        if not task.cancelled() and task.exception() is not None:
            log.error("beat %s failed", self.id, exc_info=task.exception())
        self._lease_rev = None
        self._timetable = None
        await self._live.stop()
        self._done.set()

    def _changed(self) -> None:
        """The entries changed: a leader applies it in a pass now (a follower when it leads)."""
        self._wake.set()

    async def run(self) -> None:
        """Start, then wait until ``stop()`` (a cancelled ``run`` stops the beat and releases the lease)."""
        await self.start()
        task = self._task
        try:
            await self._done.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise
        if task is not None and task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error

    async def _open(self) -> Bucket:
        """The beat bucket, created if missing; its handle recreates it if it is deleted later."""
        broker = await self.app.client.broker()
        bucket = bucket_name(self.app)
        # Reads from the stream leader: no stale lease or cursor from a lagging replica.
        return await broker.bucket(bucket, ttl=None, direct=False,
                                   description="natask beat: leader lease and last fire times")

    async def _run(self, kv: Bucket) -> None:
        lease = asyncio.get_running_loop().create_task(self._keep_lease(kv), name=f"natask-beat-lease-{self.id}")
        try:
            await self._fire_loop(kv)
            await asyncio.wait({lease})  # it ends on _stopping, after a request in flight
            if self._release_on_exit:
                await self._release(kv)
        finally:
            lease.cancel()
            await asyncio.wait({lease})
            self._lease_rev = None
            self._timetable = None
            await self._live.stop()
            self._done.set()

    async def _pause(self, event: asyncio.Event, delay: float | None) -> None:
        """Wait ``delay`` seconds (``None``: without end) or until ``event`` is set."""
        if delay is not None and delay <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), delay)

    def _failed(self, error: Exception) -> float:
        """Log a failed step of a loop; returns how long to wait before trying again."""
        if isinstance(error, _TRANSIENT):
            log.warning("beat %s: %s; retrying", self.id, error or type(error).__name__)
        else:
            log.error("beat %s: unexpected error; retrying", self.id, exc_info=error)
        return min(1.0, self._poll)

    # -- the lease ------------------------------------------------------------------------------
    async def _keep_lease(self, kv: Bucket) -> None:
        """Renew the lease (or watch the holder's) on its own schedule, whatever a pass is doing."""
        while not self._stopping.is_set():
            if time.monotonic() >= self._lease_due:
                try:
                    await self._lease(kv)
                    self.lease_checked = time.monotonic()
                except Exception as e:
                    self._lease_due = time.monotonic() + self._failed(e)
            await self._pause(self._stopping, self._lease_due - time.monotonic())

    async def _lease(self, kv: Bucket) -> None:
        """Renew our lease, or watch the holder's and take it over once it went unrenewed for a whole
        ``lease_ttl`` by our own monotonic clock (no wall clocks compared across hosts)."""
        if self._stopping.is_set():
            return
        if self._lease_rev is not None:
            sent = time.monotonic()
            try:
                rev = await kv.update(LEASE_KEY, self._lease_value(), last=self._lease_rev)
            except SequenceConflict:
                self._lose("another beat took over the lease")
            else:
                self._won(rev, sent)
                return
        current = await kv.get(LEASE_KEY)
        seen = time.monotonic()  # after the read returned: the revision was written before this instant
        if current is None:
            try:
                rev = await kv.create(LEASE_KEY, self._lease_value())
            except SequenceConflict:
                self._lease_due = time.monotonic()  # someone else created it: look again
                return
            self._won(rev, seen)
            return
        rev = current.revision or 0
        holder = str(loads(current.value).get("holder", "?"))
        if self._seen is None or self._seen[0] != rev:
            self._seen = (rev, seen)
        if (holder in ("", self.id) or seen - self._seen[1] >= self.lease_ttl) and not self._stopping.is_set():
            sent = time.monotonic()
            try:
                new = await kv.update(LEASE_KEY, self._lease_value(), last=rev)
            except SequenceConflict:
                self._lease_due = time.monotonic()  # another beat was faster: look again
                return
            if holder not in ("", self.id):
                log.warning("beat %s took over the lease from %s (not renewed for %.1fs)",
                            self.id, holder, seen - self._seen[1])
            self._won(new, sent)
            return
        self._lease_due = min(seen + self._poll, self._seen[1] + self.lease_ttl)

    def _lease_value(self, released: bool = False) -> bytes:
        holder = "" if released else self.id
        return json.dumps({"holder": holder, "expires": time.time() + (0 if released else self.lease_ttl)}).encode()

    def _won(self, rev: int, sent: float) -> None:
        # Followers count our lease from when they first read it (>= when it was written >= sent),
        # so we stop firing before any of them can take over.
        was_leader = self.is_leader
        if self._lease_rev is None:
            log.info("beat %s is now the leader", self.id)
            self._term += 1  # another beat may have led meanwhile: records are read again
        self._lease_rev = rev
        self._leader_until = sent + self.lease_ttl * LEASE_SAFETY
        self._lease_due = sent + self.lease_ttl / 3
        self._seen = None
        if not was_leader:
            self._wake.set()

    def _lose(self, why: str) -> None:
        log.warning("beat %s is no longer the leader: %s", self.id, why)
        self._lease_rev = None

    async def _release(self, kv: Bucket) -> None:
        if self._lease_rev is None:
            return
        try:
            await kv.update(LEASE_KEY, self._lease_value(released=True), last=self._lease_rev)
            log.info("beat %s released the lease", self.id)
        except Exception as e:  # the lease expires on its own
            log.warning("beat %s could not release the lease: %s", self.id, e)

    def _leading(self, term: int) -> bool:
        return self.is_leader and self._term == term

    # -- ticks ----------------------------------------------------------------------------------
    async def _fire_loop(self, kv: Bucket) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before looking at the lease: a leadership won from here on wakes us
            try:
                delay = await self._fire(kv)
            except Exception as e:
                delay = self._failed(e)
            await self._pause(self._wake, delay)

    async def _fire(self, kv: Bucket) -> float | None:
        """One pass: every due tick, in batches, then their records; returns how long to wait for the
        next pass (``None``: until woken)."""
        term = self._term
        if not self._leading(term):
            await self._forget()
            return None
        table = self._timetable
        if table is None or self._timetable_term != term:
            await self._forget()
            table = await self._load(kv)
            self._timetable, self._timetable_term = table, term
        self._apply_changes(table)
        now_ts = self._clock()
        now = datetime.fromtimestamp(now_ts, UTC)
        horizon = datetime.fromtimestamp(max(self._started, now_ts - self._late_window), UTC)
        complete = await self._send_all(table, table.due(now, horizon), term)
        # Once per pass: a pass behind schedule (several fire times per entry) writes one record per entry.
        await self._record(table)
        if not complete:
            return 0.0
        table.finish(now)
        upcoming = table.next_at()
        return None if upcoming is None else upcoming.timestamp() - self._clock()

    async def _send_all(self, table: Timetable, ticks: Sequence[Tick], term: int) -> bool:
        """Publish the ticks batch by batch; False (the pass abandoned) if stopped or no longer leading."""
        try:
            for start in range(0, len(ticks), TICK_BATCH):
                if self._stopping.is_set() or not self._leading(term) \
                        or not await self._send(table, ticks[start:start + TICK_BATCH], term):
                    table.abandon()
                    return False
        except BaseException:
            table.abandon()  # what was acknowledged stays in table.unrecorded: recorded in a later pass
            raise
        return True

    async def _record(self, table: Timetable) -> None:
        """Write each entry's latest acknowledged (or skipped) tick not recorded yet, pipelined."""
        ticks = table.unrecorded()
        if ticks:
            assert self._records is not None
            entries = table.entries
            await self._records.write([(entries[t.slot].name, t.fire, table.tick_id(t)) for t in ticks])
            table.recorded(ticks)

    async def _load(self, kv: Bucket) -> Timetable:
        """On becoming leader: the last fire time each entry's previous leader recorded."""
        self._records = Records(kv)
        self._live.take()  # the timetable starts from the entries as they are now
        self._enqueuer = Enqueuer(self.app)  # plans of entries changed while following are stale
        entries = self.entries
        cursors = await self._records.load([entry.name for entry in entries])
        return Timetable(entries, cursors, self.catch_up)

    def _apply_changes(self, table: Timetable) -> None:
        """Entries added, changed, removed, enabled or disabled since the last pass (live schedules): a
        new or changed entry fires from now on (its missed fire times are not replayed)."""
        changes = self._live.take()
        if not changes:
            return
        now = datetime.fromtimestamp(self._clock(), UTC)
        for name, entry in changes.items():
            self._enqueuer.forget(name)
            if entry is None:
                if table.remove(name):
                    log.info("periodic entry %r removed or disabled: it fires no more", name)
            else:
                table.add(entry, now)
                log.info("periodic entry %r now fires %s (%s)", name, entry.signature, schedule_text(entry))

    async def _forget(self) -> None:
        """Drop the timetable (no longer leading, or leading again after another may have), writing
        the records it still owes first: they are facts, and the CAS keeps a later one."""
        table, self._timetable = self._timetable, None
        if table is None:
            return
        try:
            await self._record(table)
        except Exception as e:
            log.warning("beat %s: could not record the last ticks it sent: %s", self.id, e or type(e).__name__)

    async def _send(self, table: Timetable, ticks: Sequence[Tick], term: int) -> bool:
        """Publish a batch of ticks pipelined and mark them handled; False if the lease lapsed first
        (nothing of the batch is handled or recorded then: a new leader sends it again, deduplicated
        by the stream)."""
        broker = await self.app.client.broker()
        entries = table.entries
        hooks = self.app.hooks
        messages: list[Message] = []
        sent: list[tuple[Tick, str]] = []
        skipped: list[Tick] = []  # handled as enqueued, as when apply_async fails
        for tick in ticks:
            entry = entries[tick.slot]
            task_id = table.tick_id(tick)
            if hooks.before_tick:
                await hooks.call("before_tick", entry.name, entry.signature.task, tick.fire.timestamp())
            try:
                messages.append(self._enqueuer.message(broker, entry, task_id))
            except Exception:
                log.exception("periodic entry %r cannot be enqueued; skipping its tick %s", entry.name, task_id)
                skipped.append(tick)
                continue
            sent.append((tick, task_id))
        if messages and not await self._while_leading(self._enqueuer.publish(broker, messages), term):
            return False
        info = log.isEnabledFor(logging.INFO)
        for tick, task_id in sent:
            table.handled(tick)
            if info:
                entry = entries[tick.slot]
                log.info("tick of %s: %s at %s, task id %s", entry.name, entry.signature.task,
                         tick.fire.isoformat(), task_id)
        for tick in skipped:
            table.handled(tick)
        if sent:
            self.last_tick = (entries[sent[-1][0].slot].name, sent[-1][0].fire, time.time())
        return True

    async def _while_leading(self, publish: Awaitable[None], term: int) -> bool:
        """Await ``publish`` while our lease lasts; cancel it (False) once it lapses, so no tick is sent
        later than ``LEASE_SAFETY * lease_ttl`` after our last renewal, however slow the server is."""
        task = asyncio.ensure_future(publish)
        try:
            while not task.done():
                left = self._leader_until - time.monotonic()
                if left <= 0 or not self._leading(term):
                    task.cancel()
                    await asyncio.wait({task})
                    if not task.cancelled():
                        task.exception()  # retrieved: the batch is abandoned either way
                    log.warning("beat %s: its lease lapsed (or was taken) while ticks were being published; "
                                "the batch is left unrecorded", self.id)
                    return False
                await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            task.cancel()
            raise
        task.result()
        return True
