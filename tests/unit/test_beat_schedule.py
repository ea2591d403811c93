"""Periodic entries and fire-time arithmetic: pure, no server, fixed datetimes (no sleeps)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from natask import ConfigError, Natask
from natask.beat import (
    Beat,
    PeriodicEntry,
    describe,
    due_ticks,
    make_entry,
    next_fire,
    prev_fire,
    schedule_text,
    tick_id,
)
from natask.canvas import Signature

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
SPRING = datetime(2025, 3, 30, tzinfo=BERLIN)  # 02:00 CET -> 03:00 CEST
AUTUMN = datetime(2025, 10, 26, tzinfo=BERLIN)  # 03:00 CEST -> 02:00 CET: 02:00-02:59 happen twice
TRANSITIONS = {  # 2025 DST changes, UTC
    "Europe/Berlin": [datetime(2025, 3, 30, 1, tzinfo=UTC), datetime(2025, 10, 26, 1, tzinfo=UTC)],
    "America/New_York": [datetime(2025, 3, 9, 7, tzinfo=UTC), datetime(2025, 11, 2, 6, tzinfo=UTC)],
    "Australia/Lord_Howe": [datetime(2025, 4, 5, 15, tzinfo=UTC), datetime(2025, 10, 4, 15, 30, tzinfo=UTC)],
}


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("unit", servers=["nats://127.0.0.1:1"])  # never connects
    yield a
    a.close()


@pytest.fixture
def sig(app: Natask) -> Signature[Any]:
    return app.task(name="jobs.tick")(lambda: None).s()


def entry(sig: Signature[Any], schedule: str | timedelta, tz: str | None = None, name: str = "e") -> PeriodicEntry:
    return make_entry(schedule, sig, name=name, tz=tz)


def fires(e: PeriodicEntry, start: datetime, end: datetime) -> list[datetime]:
    out, t = [], next_fire(e, start)
    while t <= end:
        out.append(t)
        t = next_fire(e, t)
    return out


# -- definition errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "tz", "message"),
    [
        ("61 * * * *", None, "invalid cron"),
        ("*/0 * * * *", None, "invalid cron"),
        ("* * *", None, "has 3 fields"),
        ("* * * * * * *", None, "has 7 fields"),
        ("", None, "has 0 fields"),
        ("H * * * *", None, "hashed (H) or random (R)"),
        ("R * * * *", None, "hashed (H) or random (R)"),
        ("@reboot", None, "unsupported cron alias"),
        ("0 0 30 2 *", None, "never fires"),
        ("*/5 * * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("*/5 * * * *", "../etc/passwd", "unknown time zone"),
        (timedelta(0), None, "at least 1 second"),
        (timedelta(seconds=-5), None, "at least 1 second"),
        (timedelta(milliseconds=500), None, "at least 1 second"),
        (timedelta(seconds=1.5), None, "whole number of seconds"),
        (0, None, "at least 1 second"),
        (timedelta(seconds=30), "Europe/Berlin", "tz= applies to cron schedules only"),
        (None, None, "must be a cron string or a timedelta"),
        (True, None, "must be a cron string or a timedelta"),
    ],
)
def test_bad_schedules_fail_at_definition(sig: Signature[Any], schedule: Any, tz: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match="periodic entry 'e'") as info:
        make_entry(schedule, sig, name="e", tz=tz)
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["", "a b", "a.*", "a.>", "a..b", ".a", "a.", "a:b", "ä", 42])
def test_bad_entry_names(sig: Signature[Any], name: Any) -> None:
    with pytest.raises(ConfigError, match="invalid periodic entry name"):
        make_entry("* * * * *", sig, name=name, tz=None)


def test_signature_required(app: Natask) -> None:
    with pytest.raises(ConfigError, match=r"expected a signature such as task\.s"):
        make_entry("* * * * *", "jobs.tick", name="e", tz=None)  # type: ignore[arg-type]


def test_app_registration_validates(app: Natask, sig: Signature[Any]) -> None:
    with pytest.raises(ConfigError, match="invalid cron"):
        app.add_periodic_task("61 * * * *", sig, name="bad")
    with pytest.raises(ConfigError, match="unknown time zone"):
        app.periodic("0 3 * * *", name="jobs.broken", tz="Europe/Nowhere")(lambda: None)
    assert app.periodic_entries == {}

    @app.periodic("0 3 * * *", name="jobs.nightly", tz="Europe/Berlin")
    def nightly() -> None: ...

    e = app.periodic_entries["jobs.nightly"]
    assert (e.schedule, e.tz, e.signature.task) == ("0 3 * * *", "Europe/Berlin", "jobs.nightly")


def test_normalisation(sig: Signature[Any]) -> None:
    assert entry(sig, "  */5   *  * * * ").schedule == "*/5 * * * *"
    assert entry(sig, "@HOURLY").schedule == "@hourly"
    assert entry(sig, 90).schedule == timedelta(seconds=90)  # type: ignore[arg-type]
    assert entry(sig, "0 0 * * mon,thu").schedule == "0 0 * * mon,thu"  # day names are not H/R fields
    assert entry(sig, "0 0 1 mar,apr *").schedule == "0 0 1 mar,apr *"


def test_beat_options_validated(app: Natask) -> None:
    with pytest.raises(ConfigError, match="catch_up"):
        Beat(app, catch_up=-1)
    with pytest.raises(ConfigError, match="lease_ttl"):
        Beat(app, lease_ttl=0.1)


# -- intervals ------------------------------------------------------------------------------------


def test_interval_aligned_to_epoch(sig: Signature[Any]) -> None:
    e = entry(sig, timedelta(seconds=7))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for start in (datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, 0, 0, 3, 999999, tzinfo=UTC),
                  datetime(2025, 6, 30, 23, 59, 59, 123, tzinfo=BERLIN)):
        t = next_fire(e, start)
        assert t > start and t - start <= timedelta(seconds=7)
        assert (t - epoch) % timedelta(seconds=7) == timedelta(0)
        assert t.tzinfo is UTC
        assert prev_fire(e, t) == t - timedelta(seconds=7)
    exact = datetime(2025, 1, 1, 0, 0, 6, tzinfo=UTC)  # a multiple of 7 s since the epoch
    assert next_fire(e, exact) == exact + timedelta(seconds=7)  # strictly after
    assert prev_fire(e, exact) == exact - timedelta(seconds=7)  # strictly before


def test_interval_same_times_from_any_start(sig: Signature[Any]) -> None:
    e = entry(sig, timedelta(minutes=90))
    end = datetime(2025, 1, 3, tzinfo=UTC)
    a = fires(e, datetime(2025, 1, 1, 0, 17, tzinfo=UTC), end)
    b = fires(e, datetime(2025, 1, 1, 7, 44, 1, tzinfo=UTC), end)
    assert a[-len(b):] == b
    assert all(y - x == timedelta(minutes=90) for x, y in pairwise(a))


def test_naive_datetime_refused(sig: Signature[Any]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_fire(entry(sig, "* * * * *"), datetime(2025, 1, 1))


# -- cron -----------------------------------------------------------------------------------------


def test_cron_utc_and_seconds_field(sig: Signature[Any]) -> None:
    t0 = datetime(2025, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    assert next_fire(entry(sig, "*/5 * * * *"), t0) == datetime(2025, 1, 1, 0, 5, tzinfo=UTC)
    assert next_fire(entry(sig, "* * * * * *"), t0) == datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert next_fire(entry(sig, "*/20 * * * * 30"), t0) == datetime(2025, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert prev_fire(entry(sig, "* * * * * *"), t0) == datetime(2025, 1, 1, tzinfo=UTC)


def test_cron_in_time_zone(sig: Signature[Any]) -> None:
    e = entry(sig, "0 9 * * *", tz="Europe/Berlin")
    assert next_fire(e, datetime(2025, 1, 10, tzinfo=UTC)) == datetime(2025, 1, 10, 8, tzinfo=UTC)  # CET
    assert next_fire(e, datetime(2025, 7, 10, tzinfo=UTC)) == datetime(2025, 7, 10, 7, tzinfo=UTC)  # CEST


def test_spring_forward_skipped_wall_time_fires_once_after_the_gap(sig: Signature[Any]) -> None:
    e = entry(sig, "30 2 * * *", tz="Europe/Berlin")
    got = fires(e, SPRING - timedelta(days=1), SPRING + timedelta(days=2))
    assert [t.astimezone(BERLIN).strftime("%d %H:%M %Z") for t in got] == [
        "29 02:30 CET", "30 03:00 CEST", "31 02:30 CEST",
    ]


def test_spring_forward_every_hour_entries_lose_the_hour(sig: Signature[Any]) -> None:
    got = fires(entry(sig, "30 * * * *", tz="Europe/Berlin"), SPRING, SPRING + timedelta(hours=5))
    assert [t.astimezone(BERLIN).strftime("%H:%M") for t in got] == ["00:30", "01:30", "03:30", "04:30"]


def test_fall_back_pinned_hour_fires_once(sig: Signature[Any]) -> None:
    e = entry(sig, "30 2 * * *", tz="Europe/Berlin")
    got = fires(e, AUTUMN - timedelta(days=1), AUTUMN + timedelta(days=2))
    assert [t.astimezone(BERLIN).strftime("%d %H:%M %Z") for t in got] == [
        "25 02:30 CEST", "26 02:30 CEST", "27 02:30 CET",
    ]
    # A beat whose cursor sits in the repeated hour (after the first 02:30) does not fire it again.
    between = datetime(2025, 10, 26, 1, 15, tzinfo=UTC)  # 02:15 CET, the second pass
    assert next_fire(e, between) == datetime(2025, 10, 27, 1, 30, tzinfo=UTC)
    assert prev_fire(e, between) == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)


def test_fall_back_every_hour_entries_fire_in_both_passes(sig: Signature[Any]) -> None:
    got = fires(entry(sig, "*/20 * * * *", tz="Europe/Berlin"), datetime(2025, 10, 25, 23, 50, tzinfo=UTC),
                datetime(2025, 10, 26, 2, tzinfo=UTC))
    assert [t.astimezone(BERLIN).strftime("%H:%M%Z") for t in got] == [
        "02:00CEST", "02:20CEST", "02:40CEST", "02:00CET", "02:20CET", "02:40CET", "03:00CET",
    ]
    assert all(y - x == timedelta(minutes=20) for x, y in pairwise(got))


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize("expr", ["30 2 * * *", "*/20 * * * *", "0 1-3 * * *", "15 * * * *", "@daily"])
def test_prev_fire_mirrors_next_fire_across_dst(sig: Signature[Any], tz: str, expr: str) -> None:
    e = entry(sig, expr, tz=tz)
    for change in TRANSITIONS[tz]:
        forward = fires(e, change - timedelta(days=1), change + timedelta(days=2))
        assert forward == sorted(set(forward))
        backward, t = [], forward[-1]
        while True:
            t = prev_fire(e, t)
            if t < forward[0]:
                break
            backward.append(t)
        assert backward[::-1] == forward[:-1]


def _brute_force(expr: str, pinned: bool, zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The documented DST rules, minute by minute: an independent oracle for ``next_fire``."""
    minute, out = timedelta(minutes=1), []
    t = start
    while t <= end:
        local = t.astimezone(zone)
        offset, before = local.utcoffset(), (t - minute).astimezone(zone).utcoffset()
        assert offset is not None and before is not None
        if pinned and offset > before:  # the wall clock jumped forward at t: skipped wall times fire now
            skipped = (t + before).replace(tzinfo=None)
            walls = [skipped + k * minute for k in range((offset - before) // minute)]
            if any(croniter.match(expr, w) for w in walls):
                out.append(t)
                t += minute
                continue
        second_pass = local.fold == 1 and local.replace(fold=0).utcoffset() != offset
        if croniter.match(expr, local.replace(tzinfo=None)) and not (pinned and second_pass):
            out.append(t)
        t += minute
    return out


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize(("expr", "pinned"), [("30 2 * * *", True), ("15 2 * * *", True), ("0 1-3 * * *", True),
                                              ("45 1,2 * * *", True), ("*/20 * * * *", False),
                                              ("15 * * * *", False), ("0 0 * * *", True)])
def test_next_fire_matches_brute_force_across_dst(sig: Signature[Any], tz: str, expr: str, pinned: bool) -> None:
    e = entry(sig, expr, tz=tz)
    zone = ZoneInfo(tz)
    for change in TRANSITIONS[tz]:
        start, end = change - timedelta(hours=7), change + timedelta(hours=7)
        assert start.astimezone(zone).utcoffset() != end.astimezone(zone).utcoffset()
        assert fires(e, start - timedelta(minutes=1), end) == _brute_force(expr, pinned, zone, start, end)


def test_fall_back_night_with_a_controlled_clock(sig: Signature[Any]) -> None:
    """A beat ticking every 10 s through the fall-back night enqueues the 02:30 job exactly once."""
    e = entry(sig, "30 2 * * *", tz="Europe/Berlin")
    start = AUTUMN - timedelta(hours=1)
    cursor: datetime | None = None
    enqueued: list[datetime] = []
    now = start
    while now < AUTUMN + timedelta(hours=6):
        ticks = due_ticks(e, cursor, horizon=start, now=now, catch_up=1)
        enqueued += ticks
        cursor = now
        now += timedelta(seconds=10)
    assert enqueued == [datetime(2025, 10, 26, 0, 30, tzinfo=UTC)]


# -- planning: replay and catch-up ----------------------------------------------------------------


def test_due_ticks(sig: Signature[Any]) -> None:
    e = entry(sig, timedelta(seconds=10))
    t = datetime(2025, 1, 1, 12, tzinfo=UTC)

    def s(n: float) -> datetime:
        return t + timedelta(seconds=n)

    # never fired: nothing before the horizon, everything after it
    assert due_ticks(e, None, horizon=s(5), now=s(31), catch_up=1) == [s(10), s(20), s(30)]
    # steady state: only what fell due since the cursor
    assert due_ticks(e, s(20), horizon=s(0), now=s(29), catch_up=1) == []
    assert due_ticks(e, s(20), horizon=s(0), now=s(30), catch_up=1) == [s(30)]
    # a failover while beats were watching (cursor after the horizon): all late ticks, in order
    assert due_ticks(e, s(20), horizon=s(15), now=s(65), catch_up=0) == [s(30), s(40), s(50), s(60)]
    # ticks missed while no beat ran: only the latest catch_up of them, then the watched ones
    assert due_ticks(e, s(20), horizon=s(3600), now=s(3615), catch_up=1) == [s(3600), s(3610)]
    assert due_ticks(e, s(20), horizon=s(3605), now=s(3605), catch_up=3) == [s(3580), s(3590), s(3600)]
    assert due_ticks(e, s(20), horizon=s(3605), now=s(3605), catch_up=0) == []
    # fewer missed ticks than catch_up, and a cursor ahead of this beat's clock
    assert due_ticks(e, s(20), horizon=s(35), now=s(35), catch_up=5) == [s(30)]
    assert due_ticks(e, s(90), horizon=s(0), now=s(35), catch_up=5) == []


# -- ids and descriptions -------------------------------------------------------------------------


def test_tick_ids_are_deterministic_valid_task_ids(app: Natask, sig: Signature[Any]) -> None:
    fire = datetime(2025, 10, 26, 0, 30, tzinfo=UTC)
    assert tick_id("cleanup", fire) == "cleanup_20251026T003000Z"
    assert tick_id("jobs.nightly", fire.astimezone(BERLIN)) == "jobs/nightly_20251026T003000Z"
    ids = {tick_id(n, fire) for n in ("a.b", "a_b", "a-b", "ab", "a_b_20251026T003000Z")}
    assert len(ids) == 5
    call = app.client.prepare("jobs.tick", (), {}, queue="default", task_id=tick_id("jobs.nightly", fire))
    assert call.headers["Nats-Msg-Id"] == "jobs/nightly_20251026T003000Z"


def test_describe(app: Natask, sig: Signature[Any]) -> None:
    app.add_periodic_task(timedelta(minutes=90), sig, name="ping")
    app.add_periodic_task("*/5 * * * *", sig, name="cleanup", tz="Europe/Berlin")
    app.add_periodic_task("0 0 * * *", sig, name="daily")
    now = datetime(2025, 1, 1, 0, 1, tzinfo=UTC)
    assert describe(app, now) == [
        ("ping", "every 1h30m", datetime(2025, 1, 1, 1, 30, tzinfo=UTC)),
        ("cleanup", "*/5 * * * * (Europe/Berlin)", datetime(2025, 1, 1, 0, 5, tzinfo=UTC)),
        ("daily", "0 0 * * * (UTC)", datetime(2025, 1, 2, tzinfo=UTC)),
    ]
    assert all(when > datetime.now(UTC) for _, _, when in describe(app))
    assert schedule_text(entry(sig, timedelta(days=1, seconds=1))) == "every 1d1s"
