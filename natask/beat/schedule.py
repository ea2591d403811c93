"""Periodic entries and their pure fire-time arithmetic: croniter cron strings in a time zone
(DST-correct), epoch-aligned intervals, tick ids. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Protocol
from zoneinfo import ZoneInfo

from croniter import croniter

from ..canvas import Signature
from ..client import App
from ..errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

UTC: Final = timezone.utc
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
"""Interval schedules fire at whole multiples of the interval since this instant."""
TICK_SEP: Final = "_"
"""Joins entry and fire time in a tick's task id; ``:`` is reserved for retry ids (``<id>:<n>``)."""
TICK_TIME_FORMAT: Final = "%Y%m%dT%H%M%SZ"
"""Fire time in a tick's task id: ISO 8601 basic format, UTC, whole seconds."""
_MICRO: Final = timedelta(microseconds=1)
_REFERENCE: Final = datetime(2000, 1, 1, tzinfo=UTC)
_ENTRY_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_NONDETERMINISTIC_RE: Final = re.compile(r"(?<![A-Z])[HR](?![A-Z])")
_CRON_ALIASES: Final = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_MAX_SKIPS: Final = 64
_PROBE: Final = timedelta(hours=6)
"""Probe step when looking for a UTC offset change: shorter than any offset period in the tz database."""
_PREV_LIMIT: Final = timedelta(days=366 * 30)
_CRON_CACHE: Final = 4096
"""Cron fire times remembered, by (schedule, time zone, after): more than the distinct schedules due at once."""


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


@lru_cache(maxsize=_CRON_CACHE)
def _cron_next(expr: str, tz: str | None, after: datetime) -> datetime | None:
    """The next fire time of a cron schedule (``None``: none found); entries sharing a schedule share
    the work (a croniter step costs ~0.2 ms: thousands of entries on one schedule compute it once)."""
    # croniter runs in a fixed UTC offset, one offset segment of the zone at a time; zoneinfo decides
    # where segments end. (croniter's own DST handling mishandles e.g. Lord Howe's 30-minute shifts.)
    zone = _zone(tz)
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
    return None


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
    fire = _cron_next(entry.schedule, entry.tz, after)
    if fire is None:
        raise ConfigError(f"periodic entry {entry.name!r}: no fire time found after {after.isoformat()}")
    return fire


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


class Scheduled(App, Protocol):
    """An app with periodic entries (``Natask`` is one)."""

    @property
    def periodic_entries(self) -> Mapping[str, PeriodicEntry]: ...


def describe(app: Scheduled, now: datetime | None = None) -> list[tuple[str, str, datetime]]:
    """``(entry name, schedule text, next fire time in UTC)`` for each periodic entry of ``app``; no I/O."""
    at = datetime.now(UTC) if now is None else _as_utc(now)
    return [(e.name, schedule_text(e), next_fire(e, at)) for e in app.periodic_entries.values()]
