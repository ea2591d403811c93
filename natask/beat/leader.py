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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from ..config import Seconds, seconds
from ..errors import BrokerError, ConfigError
from .schedule import UTC, PeriodicEntry, due_ticks, next_fire, tick_id

if TYPE_CHECKING:
    from ..app import Natask

log = logging.getLogger("natask.beat")
LEASE_KEY: Final = "leader"
"""KV key of the leader lease: JSON ``{"holder": id, "expires": unix time}`` (``holder`` empty: released)."""
RECORD_PREFIX: Final = "last."
"""KV key prefix of the last fire time enqueued per entry: ``last.<entry>`` -> ``{"fire": unix, "id": tick}``."""
LEASE_SAFETY: Final = 0.8
"""A leader fires only within this fraction of ``lease_ttl`` after sending its last successful renewal."""
LATE_WINDOW_MIN: Final = 10.0
"""Ticks at most ``max(3 * lease_ttl, this)`` seconds late (a failover, a short outage) are all enqueued."""
_TRANSIENT: Final = (BrokerError, nats.errors.Error, asyncio.TimeoutError, OSError)




# -- the beat ----------------------------------------------------------------------------------


def bucket_name(app: Natask) -> str:
    """The KV bucket holding the lease and the last fire times: ``natask_beat_<prefix>``."""
    return f"natask_beat_{app.config.subject_prefix}"


@dataclass(frozen=True)
class BeatState:
    """What the beat bucket says, for ``natask status``: the lease holder (``None`` if released or
    never taken), when its lease runs out by the holder's clock, and the last fire time per entry."""

    leader: str | None
    lease_expires: datetime | None
    last_fired: dict[str, datetime]


async def read_state(app: Natask) -> BeatState:
    """Read the beat bucket (never creates it)."""
    broker = await app._broker()
    try:
        kv = await broker.js.key_value(bucket_name(app))
    except nats.js.errors.BucketNotFoundError:
        return BeatState(None, None, {})
    leader, expires = None, None
    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
        data = _loads((await kv.get(LEASE_KEY)).value)
        leader = str(data.get("holder") or "") or None
        if leader and isinstance(data.get("expires"), (int, float)):
            expires = datetime.fromtimestamp(data["expires"], UTC)
    last: dict[str, datetime] = {}
    for name in app.periodic_entries:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            fire = _record_time((await kv.get(RECORD_PREFIX + name)).value)
            if fire is not None:
                last[name] = fire
    return BeatState(leader, expires, last)


class Beat:
    """Enqueues an app's periodic entries; run any number of them (``natask beat``, ``worker -B``).

    One beat leads at a time, elected through a lease in the KV bucket ``natask_beat_<prefix>``; the
    others watch it and take over within about ``1.25 * lease_ttl`` of the leader's death. The leader
    records each enqueued fire time per entry in the same bucket, so a new leader neither replays nor
    skips: fire times that fell due while some beat was watching are all enqueued (late, after a
    failover); fire times missed while no beat ran are dropped except the latest ``catch_up`` per entry.
    ``clock`` (unix seconds) decides fire times; lease timing uses the monotonic clock.
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
        self._entries: list[PeriodicEntry] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._started = 0.0
        self._release_on_exit = True
        # lease (monotonic times)
        self._lease_rev: int | None = None
        self._leader_until = 0.0
        self._lease_due = 0.0
        self._seen: tuple[int, float] | None = None  # (lease revision, when we first saw it)
        # while leading: every fire time up to the cursor is handled; record revisions for CAS
        self._cursors: dict[str, datetime | None] | None = None
        self._records: dict[str, int] = {}
        self._upcoming: dict[str, datetime] = {}  # next fire time after each cursor (a cache)

    def __repr__(self) -> str:
        return f"<Beat {self.id} {'leader' if self.is_leader else 'follower'} entries={len(self._entries)}>"

    @property
    def is_leader(self) -> bool:
        """Whether this beat holds a valid lease right now (and so may enqueue ticks)."""
        return self._lease_rev is not None and time.monotonic() < self._leader_until

    async def start(self) -> None:
        """Connect, open (or create) the beat bucket and start electing and firing in the background."""
        if self._task is not None:
            raise RuntimeError("this beat is already running")
        kv = await self._open()
        self._entries = list(self.app.periodic_entries.values())
        if not self._entries:
            log.warning("app %r has no periodic entries: this beat has nothing to enqueue", self.app.name)
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._release_on_exit = True
        self._started = self._clock()
        self._lease_due = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run(kv), name=f"natask-beat-{self.id}")
        log.info("beat %s started with %d entries", self.id, len(self._entries))

    async def stop(self, *, release: bool = True) -> None:
        """Stop: finish a tick being enqueued, then hand the lease over at once (``release=False`` drops
        everything mid-flight and leaves the lease to expire, as a crash would: for tests)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._release_on_exit = release
        self._stopping.set()  # the loop exits on this even if a cancellation gets lost (see below)
        if release and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.app.config.publish_timeout + self.lease_ttl)
            except asyncio.TimeoutError:
                log.warning("beat %s did not stop in time; cancelling it", self.id)
        # Before Python 3.12, asyncio.wait_for (inside nats-py requests) drops a cancellation that
        # arrives as its result does; the loop then stops at its next check of _stopping instead.
        task.cancel()
        await asyncio.wait({task})  # unlike `await task`, a cancellation of our caller still propagates
        if not task.cancelled() and task.exception() is not None:
            log.error("beat %s failed", self.id, exc_info=task.exception())
        self._lease_rev = None
        self._cursors = None
        self._done.set()

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

    async def _open(self) -> KeyValue:
        """The beat bucket, created if missing; its handle recreates it if it is deleted later."""
        broker = await self.app._broker()
        bucket = bucket_name(self.app)
        config = KeyValueConfig(
            bucket=bucket,
            description="natask beat: leader lease and last fire times",
            history=1,
            storage=StorageType.FILE,
            replicas=self.app.config.stream_replicas,
            direct=False,  # reads from the stream leader: no stale lease or cursor from a replica
        )
        return await broker._bucket(bucket, config)

    async def _run(self, kv: KeyValue) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    delay = await self._step(kv)
                except _TRANSIENT as e:
                    log.warning("beat %s: %s; retrying", self.id, e or type(e).__name__)
                    delay = min(1.0, self._poll)
                except Exception:
                    log.exception("beat %s: unexpected error; retrying", self.id)
                    delay = min(1.0, self._poll)
                await self._sleep(delay)
            if self._release_on_exit:
                await self._release(kv)
        finally:
            self._lease_rev = None
            self._cursors = None
            self._done.set()

    async def _sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _step(self, kv: KeyValue) -> float:
        """One round: lease work if due, then the due ticks; returns how long to sleep."""
        if time.monotonic() >= self._lease_due:
            await self._lease(kv)
        if self._stopping.is_set():
            return 0.0
        wake = self._lease_due - time.monotonic()
        if not self.is_leader:
            self._cursors = None
            return max(wake, 0.0)
        if self._cursors is None:
            await self._load(kv)
        next_at = await self._fire(kv)
        if next_at is not None:
            wake = min(wake, next_at - self._clock())
        return max(wake, 0.0)

    # -- the lease ------------------------------------------------------------------------------
    async def _lease(self, kv: KeyValue) -> None:
        """Renew our lease, or watch the holder's and take it over once it went unrenewed for a whole
        ``lease_ttl`` by our own monotonic clock (no wall clocks compared across hosts)."""
        if self._stopping.is_set():
            return
        if self._lease_rev is not None:
            sent = time.monotonic()
            try:
                rev = await kv.update(LEASE_KEY, self._lease_value(), last=self._lease_rev)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lose("another beat took over the lease")
            else:
                self._won(rev, sent)
                return
        try:
            current = await kv.get(LEASE_KEY)
        except nats.js.errors.KeyNotFoundError:
            current = None
        seen = time.monotonic()  # after the read returned: the revision was written before this instant
        if current is None:
            try:
                rev = await kv.create(LEASE_KEY, self._lease_value())
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lease_due = time.monotonic()  # someone else created it: look again
                return
            self._won(rev, seen)
            return
        rev = current.revision or 0
        holder = str(_loads(current.value).get("holder", "?"))
        if self._seen is None or self._seen[0] != rev:
            self._seen = (rev, seen)
        if (holder in ("", self.id) or seen - self._seen[1] >= self.lease_ttl) and not self._stopping.is_set():
            sent = time.monotonic()
            try:
                new = await kv.update(LEASE_KEY, self._lease_value(), last=rev)
            except nats.js.errors.KeyWrongLastSequenceError:
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
        if self._lease_rev is None:
            log.info("beat %s is now the leader", self.id)
        self._lease_rev = rev
        self._leader_until = sent + self.lease_ttl * LEASE_SAFETY
        self._lease_due = sent + self.lease_ttl / 3
        self._seen = None

    def _lose(self, why: str) -> None:
        log.warning("beat %s is no longer the leader: %s", self.id, why)
        self._lease_rev = None
        self._cursors = None

    async def _release(self, kv: KeyValue) -> None:
        if self._lease_rev is None:
            return
        try:
            await kv.update(LEASE_KEY, self._lease_value(released=True), last=self._lease_rev)
            log.info("beat %s released the lease", self.id)
        except Exception as e:  # the lease expires on its own
            log.warning("beat %s could not release the lease: %s", self.id, e)

    # -- ticks ----------------------------------------------------------------------------------
    async def _load(self, kv: KeyValue) -> None:
        """On becoming leader: the last fire time each entry's previous leader recorded."""
        cursors: dict[str, datetime | None] = {}
        self._records = {}
        self._upcoming = {}
        for entry in self._entries:
            try:
                item = await kv.get(RECORD_PREFIX + entry.name)
            except nats.js.errors.KeyNotFoundError:
                cursors[entry.name] = None
                continue
            self._records[entry.name] = item.revision or 0
            cursors[entry.name] = _record_time(item.value)
        self._cursors = cursors

    async def _fire(self, kv: KeyValue) -> float | None:
        """Enqueue every due tick; returns the next fire time (unix seconds), ``None`` if interrupted."""
        cursors = self._cursors
        assert cursors is not None
        now_ts = self._clock()
        now = datetime.fromtimestamp(now_ts, UTC)
        horizon = datetime.fromtimestamp(max(self._started, now_ts - self._late_window), UTC)
        soonest: datetime | None = None
        for entry in self._entries:
            cursor = cursors.get(entry.name)
            upcoming = self._upcoming.get(entry.name)
            if upcoming is None or upcoming <= now or cursor is None or cursor < horizon:
                for fire in due_ticks(entry, cursor, horizon, now, self.catch_up):
                    if not self.is_leader or self._stopping.is_set():
                        self._upcoming.clear()
                        return None
                    await self._publish(entry, fire)
                    cursors[entry.name] = fire
                    await self._record(kv, entry, fire)
                cursor = cursors[entry.name] = now if cursor is None else max(cursor, now)
                upcoming = self._upcoming[entry.name] = next_fire(entry, cursor)
            soonest = upcoming if soonest is None else min(soonest, upcoming)
        return None if soonest is None else soonest.timestamp()

    async def _publish(self, entry: PeriodicEntry, fire: datetime) -> None:
        task_id = tick_id(entry.name, fire)
        try:
            await entry.signature.aapply_async(task_id=task_id)
        except BrokerError:
            raise  # retried on the next round, with the same id
        except Exception:
            log.exception("periodic entry %r cannot be enqueued; skipping its tick %s", entry.name, task_id)
            return
        log.debug("enqueued %s (%s)", task_id, entry.signature)

    async def _record(self, kv: KeyValue, entry: PeriodicEntry, fire: datetime) -> None:
        """Store the last enqueued fire time, never moving it backwards (compare-and-set)."""
        key = RECORD_PREFIX + entry.name
        value = json.dumps({"fire": int(fire.timestamp()), "id": tick_id(entry.name, fire)}).encode()
        rev = self._records.get(entry.name)
        try:
            if rev is None:
                self._records[entry.name] = await kv.create(key, value)
            else:
                self._records[entry.name] = await kv.update(key, value, last=rev)
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # Another beat wrote it meanwhile (it led while we thought we did): keep the later time.
        try:
            item = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # the bucket was deleted and recreated: start over
            self._records[entry.name] = await kv.create(key, value)
            return
        theirs = _record_time(item.value)
        if theirs is not None and theirs >= fire:
            self._records[entry.name] = item.revision or 0
        else:
            self._records[entry.name] = await kv.update(key, value, last=item.revision)


def _loads(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _record_time(data: bytes | None) -> datetime | None:
    fire = _loads(data).get("fire")
    if isinstance(fire, bool) or not isinstance(fire, int):
        return None
    return datetime.fromtimestamp(fire, UTC)

