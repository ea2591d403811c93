"""Periodic tasks: entries (croniter cron, epoch-aligned intervals), pure fire-time arithmetic, and ``Beat``:
any number of beats, one elected by a KV lease, enqueue each fire time once under a deterministic task id
(``tick_id``), so a split-brain pair is deduplicated by the stream (duplicate window, 120 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

import nats.errors
import nats.js.errors
from croniter import croniter
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .canvas import Signature
from .config import Seconds, seconds
from .errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from .app import Natask

log = logging.getLogger("natask.beat")

UTC: Final = timezone.utc
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
"""Interval schedules fire at whole multiples of the interval since this instant."""

TICK_SEP: Final = "_"
"""Joins entry and fire time in a tick's task id; ``:`` is reserved for retry ids (``<id>:<n>``)."""
TICK_TIME_FORMAT: Final = "%Y%m%dT%H%M%SZ"
"""Fire time in a tick's task id: ISO 8601 basic format, UTC, whole seconds."""

LEASE_KEY: Final = "leader"
"""KV key of the leader lease: JSON ``{"holder": id, "expires": unix time}`` (``holder`` empty: released)."""
RECORD_PREFIX: Final = "last."
"""KV key prefix of the last fire time enqueued per entry: ``last.<entry>`` -> ``{"fire": unix, "id": tick}``."""

LEASE_SAFETY: Final = 0.8
"""A leader fires only within this fraction of ``lease_ttl`` after sending its last successful renewal."""
LATE_WINDOW_MIN: Final = 10.0
"""Ticks at most ``max(3 * lease_ttl, this)`` seconds late (a failover, a short outage) are all enqueued."""

_MICRO: Final = timedelta(microseconds=1)
_REFERENCE: Final = datetime(2000, 1, 1, tzinfo=UTC)
_ENTRY_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_NONDETERMINISTIC_RE: Final = re.compile(r"(?<![A-Z])[HR](?![A-Z])")
_CRON_ALIASES: Final = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_MAX_SKIPS: Final = 64
_PROBE: Final = timedelta(hours=6)
"""Probe step when looking for a UTC offset change: shorter than any offset period in the tz database."""
_PREV_LIMIT: Final = timedelta(days=366 * 30)

_TRANSIENT: Final = (BrokerError, nats.errors.Error, asyncio.TimeoutError, OSError)


# -- entries and schedules ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodicEntry:
    """One periodic entry: fire ``signature`` on ``schedule`` (a normalised cron string in ``tz``, default
    UTC, or a whole-second ``timedelta`` aligned to the Unix epoch)."""

    name: str
    schedule: str | timedelta
    signature: Signature[Any]
    tz: str | None = None


def make_entry(
    schedule: str | timedelta | float, signature: Signature[Any], *, name: str, tz: str | None
) -> PeriodicEntry:
    """Validate and build an entry; every problem is a ``ConfigError`` raised at definition time.

    - ``name``: letters, digits, ``_``, ``-``, dot-separated (like task names): it is a KV key and, with
      ``.`` mapped to ``/``, part of each tick's task id.
    - cron: 5 fields, or 6 with seconds last (croniter), or ``@hourly``-style aliases; hashed (``H``)
      and random (``R``) fields are refused because every beat must compute the same fire times.
    - ``timedelta`` (or seconds as a number): a whole number of seconds, at least 1; ``tz`` does not apply.
    """
    if not isinstance(name, str) or not _ENTRY_NAME_RE.match(name):
        raise ConfigError(
            f"invalid periodic entry name {name!r}: use letters, digits, '_', '-' and '.' "
            "(no empty parts, spaces or wildcards), e.g. name='cleanup.nightly'"
        )
    if not isinstance(signature, Signature):
        raise ConfigError(f"periodic entry {name!r}: expected a signature such as task.s(...), got {signature!r}")
    if isinstance(schedule, str):
        entry = PeriodicEntry(name, _check_cron(schedule, name), signature, _check_tz(tz, name))
        try:
            next_fire(entry, _REFERENCE)
        except ConfigError:
            raise
        except Exception as e:  # croniter: e.g. "0 0 30 2 *" never matches
            raise ConfigError(f"periodic entry {name!r}: cron {schedule!r} never fires ({e})") from None
        return entry
    if isinstance(schedule, bool) or not isinstance(schedule, (timedelta, int, float)):
        raise ConfigError(
            f"periodic entry {name!r}: schedule must be a cron string or a timedelta, got {schedule!r}"
        )
    if tz is not None:
        raise ConfigError(
            f"periodic entry {name!r}: tz= applies to cron schedules only; intervals are aligned to the Unix epoch"
        )
    return PeriodicEntry(name, _check_interval(schedule, name), signature, None)


def _check_cron(expr: str, name: str) -> str:
    text = " ".join(expr.split())
    if text.startswith("@"):
        if text.lower() not in _CRON_ALIASES:
            raise ConfigError(
                f"periodic entry {name!r}: unsupported cron alias {expr!r} (use one of {sorted(_CRON_ALIASES)})"
            )
        text = text.lower()
    else:
        fields = text.split(" ") if text else []
        if len(fields) not in (5, 6):
            raise ConfigError(
                f"periodic entry {name!r}: cron {expr!r} has {len(fields)} fields; use 5 "
                "(minute hour day-of-month month day-of-week) or 6 (the same plus seconds last)"
            )
        if _NONDETERMINISTIC_RE.search(text.upper()):
            raise ConfigError(
                f"periodic entry {name!r}: cron {expr!r} uses a hashed (H) or random (R) field; every beat "
                "must compute the same fire times, so give explicit values"
            )
    try:
        croniter(text)
    except Exception as e:
        raise ConfigError(f"periodic entry {name!r}: invalid cron {expr!r}: {e}") from None
    return text


def _check_tz(tz: str | None, name: str) -> str | None:
    if tz is None:
        return None
    try:
        ZoneInfo(tz)
    except Exception:  # ZoneInfoNotFoundError, ValueError (malformed key), TypeError
        raise ConfigError(
            f"periodic entry {name!r}: unknown time zone {tz!r}: use an IANA name such as 'Europe/Berlin' "
            "(on systems without a tz database install the 'tzdata' package)"
        ) from None
    return tz


def _check_interval(schedule: timedelta | float, name: str) -> timedelta:
    if isinstance(schedule, timedelta):
        interval = schedule
    else:
        try:
            interval = timedelta(seconds=schedule)
        except (OverflowError, ValueError):
            raise ConfigError(f"periodic entry {name!r}: interval {schedule!r} is out of range") from None
    if interval < timedelta(seconds=1):
        raise ConfigError(f"periodic entry {name!r}: interval must be at least 1 second, got {schedule!r}")
    if interval % timedelta(seconds=1):
        raise ConfigError(
            f"periodic entry {name!r}: interval must be a whole number of seconds, got {schedule!r}"
        )
    return interval


def _zone(tz: str | None) -> tzinfo:
    return UTC if tz is None else ZoneInfo(tz)


def _as_utc(when: datetime) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got {when!r}")
    return when.astimezone(UTC)


@lru_cache(maxsize=256)
def _hour_pinned(expr: str) -> bool:
    """Whether a cron expression fires in selected hours only (not every hour)."""
    hours = croniter(expr).expanded[1]
    return hours != ["*"] and len(set(hours)) < 24


def _offset(zone: tzinfo, t: datetime) -> timedelta:
    offset = t.astimezone(zone).utcoffset()
    assert offset is not None
    return offset


def _second_pass(zone: tzinfo, fire: datetime) -> bool:
    """Whether ``fire`` is the second occurrence of its wall time (the repeated hour of a fall back)."""
    local = fire.astimezone(zone)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _next_transition(zone: tzinfo, since: datetime, offset: timedelta, until: datetime) -> datetime | None:
    """The first instant in ``(since, until]`` whose UTC offset is not ``offset`` (that of ``since``)."""
    if isinstance(zone, timezone):  # UTC or a fixed offset: never changes
        return None
    lo = since
    while lo < until:
        hi = min(lo + _PROBE, until)
        if _offset(zone, hi) != offset:
            while hi - lo > _MICRO:  # offsets are piecewise constant: bisect to the exact instant
                mid = lo + (hi - lo) // 2
                if _offset(zone, mid) == offset:
                    lo = mid
                else:
                    hi = mid
            return hi
        lo = hi
    return None


def _cron_next(entry: PeriodicEntry, after: datetime) -> datetime:
    # croniter runs in a fixed UTC offset, one offset segment of the zone at a time; zoneinfo decides
    # where segments end. (croniter's own DST handling mishandles e.g. Lord Howe's 30-minute shifts.)
    assert isinstance(entry.schedule, str)
    expr, zone = entry.schedule, _zone(entry.tz)
    pinned = _hour_pinned(expr)
    start = segment = after
    offset = _offset(zone, after)
    for _ in range(_MAX_SKIPS):
        fire: datetime = croniter(expr, start.astimezone(timezone(offset))).get_next(datetime).astimezone(UTC)
        change = _next_transition(zone, segment, offset, fire)
        if change is None:
            if not (pinned and _second_pass(zone, fire)):
                return fire
            start = segment = fire
            continue
        new_offset = _offset(zone, change)
        if pinned and new_offset > offset:  # spring forward: wall times [change+offset, change+new) never occur
            gap_start = (change + offset).replace(tzinfo=None)
            skipped: datetime = croniter(expr, gap_start - _MICRO).get_next(datetime)
            if skipped < (change + new_offset).replace(tzinfo=None):
                return change
        start, segment, offset = change - _MICRO, change, new_offset
    raise ConfigError(f"periodic entry {entry.name!r}: no fire time found after {after.isoformat()}")


def next_fire(entry: PeriodicEntry, after: datetime) -> datetime:
    """The first fire time of ``entry`` strictly after ``after`` (aware), as an aware UTC datetime.

    Cron entries follow the wall clock of their ``tz``; across DST changes (as Vixie cron does):
    - spring forward: entries pinned to certain hours whose wall time the clock skips fire once, at the
      first instant after the gap (a daily ``30 2 * * *`` in Europe/Berlin fires at 03:00 CEST that day);
      entries whose hour field matches every hour (``30 * * * *``, ``*/5 * * * *``) just lose the skipped
      wall times, as the hour has no real instant.
    - fall back: entries pinned to certain hours fire at the first occurrence of a repeated wall time
      only (``30 2 * * *`` fires once); entries matching every hour fire in both passes of the
      repeated hour, as they fire every real hour.
    """
    after = _as_utc(after)
    if isinstance(entry.schedule, timedelta):
        period = entry.schedule // _MICRO
        elapsed = (after - EPOCH) // _MICRO
        return EPOCH + timedelta(microseconds=(elapsed // period + 1) * period)
    return _cron_next(entry, after)


def prev_fire(entry: PeriodicEntry, before: datetime) -> datetime:
    """The last fire time of ``entry`` strictly before ``before``; defined through ``next_fire``, so the
    two always agree."""
    before = _as_utc(before)
    if isinstance(entry.schedule, timedelta):
        period = entry.schedule // _MICRO
        elapsed = (before - EPOCH) // _MICRO
        return EPOCH + timedelta(microseconds=(-(-elapsed // period) - 1) * period)
    ahead = next_fire(entry, before - _MICRO)
    span = max(next_fire(entry, ahead) - ahead, timedelta(seconds=1))  # about one period, to start with
    while True:  # widen a window ending at `before` until it holds a fire time
        fire = next_fire(entry, before - span - _MICRO)
        if fire < before:
            break
        span *= 2
        if span > _PREV_LIMIT:
            raise ConfigError(f"periodic entry {entry.name!r}: no fire time found before {before.isoformat()}")
    while (following := next_fire(entry, fire)) < before:
        fire = following
    return fire


def due_ticks(
    entry: PeriodicEntry, cursor: datetime | None, horizon: datetime, now: datetime, catch_up: int
) -> list[datetime]:
    """The fire times to enqueue at ``now``, oldest first.

    ``cursor``: every fire time up to it has been handled (``None``: the entry never fired). Fire times
    after ``horizon`` fell due while this beat was watching (a failover, a short outage) and all fire,
    late; older ones were missed while no beat ran and only the latest ``catch_up`` of them fire.
    """
    ticks: list[datetime] = []
    if cursor is not None and cursor < horizon and catch_up > 0:
        fire = prev_fire(entry, horizon + _MICRO)
        while fire > cursor and len(ticks) < catch_up:
            ticks.append(fire)
            fire = prev_fire(entry, fire)
        ticks.reverse()
    fire = next_fire(entry, horizon if cursor is None else max(cursor, horizon))
    while fire <= now:
        ticks.append(fire)
        fire = next_fire(entry, fire)
    return ticks


def tick_id(entry_name: str, fire: datetime) -> str:
    """The task id (and ``Nats-Msg-Id``) of one tick: ``cleanup.nightly`` at 2025-10-26 00:30:00 UTC is
    ``cleanup/nightly_20251026T003000Z`` (``.`` is not allowed in task ids, so it becomes ``/``)."""
    return f"{entry_name.replace('.', '/')}{TICK_SEP}{_as_utc(fire).strftime(TICK_TIME_FORMAT)}"


def schedule_text(entry: PeriodicEntry) -> str:
    """A schedule as people read it: ``*/5 * * * * (Europe/Berlin)`` or ``every 1m30s``."""
    if isinstance(entry.schedule, str):
        return f"{entry.schedule} ({entry.tz or 'UTC'})"
    left = int(entry.schedule.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "every " + "".join(parts)


def describe(app: Natask, now: datetime | None = None) -> list[tuple[str, str, datetime]]:
    """``(entry name, schedule text, next fire time in UTC)`` for each periodic entry of ``app``; no I/O."""
    at = datetime.now(UTC) if now is None else _as_utc(now)
    return [(e.name, schedule_text(e), next_fire(e, at)) for e in app.periodic_entries.values()]


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
        broker = await self.app._broker()
        bucket = bucket_name(self.app)
        try:
            try:
                return await broker.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            config = KeyValueConfig(
                bucket=bucket,
                description="natask beat: leader lease and last fire times",
                history=1,
                storage=StorageType.FILE,
                replicas=self.app.config.stream_replicas,
                direct=False,  # reads from the stream leader: no stale lease or cursor from a replica
            )
            try:
                return await broker.js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # created concurrently with other settings
                return await broker.js.key_value(bucket)
        except BrokerError:
            raise
        except Exception as e:
            raise BrokerError(f"cannot open the beat bucket {bucket}: {e}") from e

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
        item = await kv.get(key)
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


__all__ = [
    "Beat",
    "BeatState",
    "PeriodicEntry",
    "bucket_name",
    "describe",
    "due_ticks",
    "make_entry",
    "next_fire",
    "prev_fire",
    "read_state",
    "schedule_text",
    "tick_id",
]
