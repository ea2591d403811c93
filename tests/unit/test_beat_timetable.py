"""The leader's timetable: the same ticks as ``due_ticks`` for every entry every pass, at the cost of
what falls due; pure, no server, fixed datetimes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from natask import Natask
from natask.beat import PeriodicEntry, due_ticks, make_entry, next_fire, tick_id
from natask.beat.timetable import Tick, Timetable
from natask.canvas import Signature

UTC = timezone.utc
START = datetime(2025, 10, 26, 0, 30, tzinfo=UTC)  # Berlin falls back at 01:00 UTC: DST inside the run
LATE_WINDOW = timedelta(seconds=10)


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("unit", servers=["nats://127.0.0.1:1"])  # never connects
    yield a
    a.close()


@pytest.fixture
def sig(app: Natask) -> Signature[Any]:
    return app.task(name="jobs.tick")(lambda: None).s()


def entries(sig: Signature[Any], zoned: bool) -> list[PeriodicEntry]:
    specs: list[tuple[str | timedelta, str | None]] = [
        (timedelta(seconds=1), None), (timedelta(seconds=2), None), (timedelta(seconds=7), None),
        (timedelta(hours=1), None), ("*/3 * * * * *", None), ("* * * * * *", None),
    ]
    if zoned:  # slow to compute (croniter per UTC offset segment): a few runs only
        specs += [("*/20 * * * * *", "Europe/Berlin"), ("30 2 * * *", "Europe/Berlin"),
                  ("15,45 * * * * *", "Asia/Kolkata")]
    return [make_entry(schedule, sig, name=f"e{i}.x", tz=tz) for i, (schedule, tz) in enumerate(specs)]


class Reference:
    """What the beat did before the timetable: ``due_ticks`` for every entry in every pass."""

    def __init__(self, items: list[PeriodicEntry], cursors: dict[str, datetime | None], catch_up: int) -> None:
        self.items, self.cursors, self.catch_up = items, dict(cursors), catch_up

    def due(self, now: datetime, horizon: datetime) -> list[Tick]:
        ticks = [Tick(fire, i) for i, e in enumerate(self.items)
                 for fire in due_ticks(e, self.cursors[e.name], horizon, now, self.catch_up)]
        return sorted(ticks)

    def handled(self, tick: Tick) -> None:
        name = self.items[tick.slot].name
        cursor = self.cursors[name]
        self.cursors[name] = tick.fire if cursor is None else max(cursor, tick.fire)

    def finish(self, now: datetime) -> None:
        for name, cursor in self.cursors.items():
            self.cursors[name] = now if cursor is None else max(cursor, now)


@pytest.mark.parametrize(("seed", "catch_up", "zoned"),
                         [(seed, catch_up, False) for seed in range(4) for catch_up in (0, 1, 3)]
                         + [(10, 0, True), (11, 1, True), (12, 3, True)])
def test_timetable_matches_due_ticks_of_every_entry_in_every_pass(sig: Signature[Any], seed: int, catch_up: int,
                                                                  zoned: bool) -> None:
    rng = random.Random(seed)
    items = entries(sig, zoned)
    # Cursors as a new leader reads them: never fired, fired long ago, fired a moment ago.
    choices = [None, START - timedelta(hours=5), START - timedelta(seconds=3), START]
    cursors = {e.name: rng.choice(choices) for e in items}
    table, ref = Timetable(items, cursors, catch_up), Reference(items, cursors, catch_up)
    started = START + timedelta(seconds=rng.uniform(0, 2))
    now = started
    for _ in range(80):
        # Passes every fraction of a second to a few seconds, and now and then a stall or an outage.
        step = rng.choice([rng.uniform(0.05, 1.5)] * 6 + [rng.uniform(1, 4)] * 3 + [30, 3000])
        now += timedelta(seconds=step)
        horizon = max(started, now - LATE_WINDOW)
        ticks = table.due(now, horizon)
        assert ticks == ref.due(now, horizon), now
        if ticks and rng.random() < 0.2:  # interrupted part-way: the rest is sent in the next pass
            for tick in ticks[:rng.randrange(len(ticks))]:
                table.handled(tick)
                ref.handled(tick)
            table.abandon()
            continue
        for tick in ticks:
            table.handled(tick)
            ref.handled(tick)
        table.finish(now)
        ref.finish(now)
        upcoming = table.next_at()
        assert upcoming == min(next_fire(e, now) for e in items)
        for i, e in enumerate(items):  # an entry not looked at keeps an older cursor: no fire time between
            cursor, theirs = table.cursor(i), ref.cursors[e.name]
            assert cursor == theirs or (cursor is not None and theirs is not None and next_fire(e, cursor) > theirs)


def test_a_pass_looks_only_at_the_entries_that_fall_due(sig: Signature[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    every_second = [make_entry(timedelta(seconds=1), sig, name=f"s{i}", tz=None) for i in range(50)]
    hourly = [make_entry("0 * * * *", sig, name=f"h{i}", tz="Europe/Berlin") for i in range(50)]
    table = Timetable(every_second + hourly, {}, 1)
    table.due(START, START)
    table.finish(START)
    looked_at: list[str] = []

    def counting(entry: PeriodicEntry, after: datetime) -> datetime:
        looked_at.append(entry.name)
        return next_fire(entry, after)

    monkeypatch.setattr("natask.beat.timetable.next_fire", counting)
    monkeypatch.setattr("natask.beat.timetable.due_ticks", None)  # the steady state never needs it
    for second in range(1, 20):
        now = START + timedelta(seconds=second)
        ticks = table.due(now, now - LATE_WINDOW)
        assert [t.slot for t in ticks] == list(range(50))
        table.finish(now)
    assert looked_at == []  # interval entries step by their interval; the hourly ones were not due


def test_tick_ids_match_tick_id(sig: Signature[Any]) -> None:
    items = [make_entry(timedelta(seconds=1), sig, name=name, tz=None) for name in ("a", "cleanup.nightly", "x-y_z")]
    table = Timetable(items, {}, 1)
    now = START + timedelta(seconds=3)
    ticks = table.due(now, START)
    assert ticks
    for tick in ticks:
        assert table.tick_id(tick) == tick_id(items[tick.slot].name, tick.fire)


def test_a_pass_must_end_before_the_next(sig: Signature[Any]) -> None:
    table = Timetable([make_entry(timedelta(seconds=1), sig, name="a", tz=None)], {}, 1)
    table.due(START, START)
    with pytest.raises(RuntimeError, match="neither finished nor abandoned"):
        table.due(START, START)


def test_handled_ticks_wait_to_be_recorded_latest_per_entry(sig: Signature[Any]) -> None:
    items = [make_entry(timedelta(seconds=1), sig, name=name, tz=None) for name in ("a", "b")]
    table = Timetable(items, {"a": START, "b": START}, 1)
    now = START + timedelta(seconds=3)
    ticks = table.due(now, START)
    assert [t.fire - START for t in ticks if t.slot == 0] == [timedelta(seconds=s) for s in (1, 2, 3)]
    for tick in ticks[:4]:  # a's and b's first two: the pass stops there
        table.handled(tick)
    table.abandon()
    pending = table.unrecorded()
    assert sorted(pending) == [Tick(START + timedelta(seconds=2), 0), Tick(START + timedelta(seconds=2), 1)]
    table.recorded(pending[:1])
    assert table.unrecorded() == pending[1:]
    assert [t.fire - START for t in table.due(now, START)] == [timedelta(seconds=3)] * 2  # the rest, then


def run_pass(table: Timetable, now: datetime) -> list[tuple[str, datetime]]:
    ticks = table.due(now, now - LATE_WINDOW)
    for tick in ticks:
        table.handled(tick)
    table.finish(now)
    return [(table.entries[t.slot].name, t.fire) for t in ticks]


def test_entries_added_changed_and_removed_between_passes(sig: Signature[Any]) -> None:
    every = make_entry(timedelta(seconds=1), sig, name="a", tz=None)
    table = Timetable([every], {"a": START}, catch_up=1)
    now = START
    assert run_pass(table, now) == []
    now += timedelta(seconds=1)
    assert run_pass(table, now) == [("a", now)]

    table.add(make_entry(timedelta(seconds=1), sig, name="b", tz=None), now)  # fires after its cursor
    assert len(table) == 2 and "b" in table
    now += timedelta(seconds=1)
    assert run_pass(table, now) == [("a", now), ("b", now)]

    changed = now
    table.add(make_entry(timedelta(seconds=2), sig, name="a", tz=None), now)  # a new schedule, same name
    fired: list[tuple[str, datetime]] = []
    for _ in range(4):
        now += timedelta(seconds=1)
        fired += run_pass(table, now)
    seconds = [changed + timedelta(seconds=s) for s in (1, 2, 3, 4)]
    assert [f for n, f in fired if n == "a"] == [t for t in seconds if t.timestamp() % 2 == 0]
    assert [f for n, f in fired if n == "b"] == seconds

    assert table.remove("b") and not table.remove("b") and "b" not in table
    now += timedelta(seconds=10)
    assert {n for n, _ in run_pass(table, now)} == {"a"}  # a removed entry fires no more


def test_a_changed_entry_never_moves_its_cursor_back(sig: Signature[Any]) -> None:
    table = Timetable([make_entry(timedelta(seconds=1), sig, name="a", tz=None)], {"a": START}, catch_up=1)
    now = START + timedelta(seconds=3)
    assert [f for _, f in run_pass(table, now)] == [START + timedelta(seconds=s) for s in (1, 2, 3)]
    table.add(make_entry(timedelta(seconds=1), sig, name="a", tz=None), START)  # an older cursor is ignored
    now += timedelta(seconds=1)
    assert [f for _, f in run_pass(table, now)] == [now]  # nothing fired twice


def test_removed_entries_are_compacted_and_their_last_tick_still_recorded(sig: Signature[Any]) -> None:
    names = [f"e{i}" for i in range(200)]
    table = Timetable([make_entry(timedelta(seconds=1), sig, name=n, tz=None) for n in names], {}, catch_up=1)
    run_pass(table, START)
    ticks = table.due(START + timedelta(seconds=1), START)
    for tick in ticks:
        table.handled(tick)
    table.finish(START + timedelta(seconds=1))
    for name in names[:150]:
        table.remove(name)
    assert len(table) == 50
    recorded = {table.entries[t.slot].name for t in table.unrecorded()}
    assert recorded == set(names)  # removed entries' ticks are facts: still written
    table.recorded(table.unrecorded())
    table.remove(names[150])  # compacts now that nothing is owed
    assert len(table.entries) < 200 and len(table) == 49
    now = START + timedelta(seconds=2)
    assert sorted(n for n, _ in run_pass(table, now)) == sorted(names[151:])
    table.due(now + timedelta(seconds=1), now)  # a pass is open
    with pytest.raises(RuntimeError, match="between passes"):
        table.add(make_entry(timedelta(seconds=1), sig, name="late", tz=None), now)
    with pytest.raises(RuntimeError, match="between passes"):
        table.remove("e151")
