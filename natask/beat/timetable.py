"""Which entries are due when, for the leading beat: a heap of next fire times, so a pass costs
what falls due in it rather than one schedule computation per entry. No I/O."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final, NamedTuple

from .schedule import TICK_SEP, TICK_TIME_FORMAT, UTC, PeriodicEntry, due_ticks, next_fire

_UNKNOWN: Final = datetime.min.replace(tzinfo=UTC)
"""Heap key of an entry whose next fire time is not known: looked at in the next pass."""


class Tick(NamedTuple):
    """One fire time of one entry (``slot``: its index in the timetable's entries)."""

    fire: datetime
    slot: int


class _Slot:
    __slots__ = ("cursor", "entry", "id_prefix", "interval", "removed", "upcoming")

    def __init__(self, entry: PeriodicEntry, cursor: datetime | None) -> None:
        self.entry = entry
        self.cursor = cursor  # every fire time up to it is handled (None: the entry never fired)
        self.upcoming: datetime | None = None  # the first fire time after the cursor, once known
        self.interval = entry.schedule if isinstance(entry.schedule, timedelta) else None
        self.id_prefix = entry.name.replace(".", "/") + TICK_SEP
        self.removed = False  # removed (or disabled) while leading: its heap items are dropped when popped


class Timetable:
    """The entries' cursors and next fire times while one beat leads.

    ``due(now, horizon)`` returns the ticks to enqueue (the same as ``due_ticks`` per entry); the
    caller then reports each acknowledged tick with ``handled`` and ends the pass with ``finish``
    (every tick handled) or ``abandon`` (interrupted: the entries of the pass are looked at again,
    from their cursors, in the next pass). Handled ticks wait in ``unrecorded`` (the latest per entry)
    until ``recorded`` says they were written to the bucket. Between passes, ``add`` and ``remove``
    change the entries (live schedules).
    """

    def __init__(self, entries: Sequence[PeriodicEntry], cursors: Mapping[str, datetime | None],
                 catch_up: int) -> None:
        self.entries = list(entries)
        self.catch_up = catch_up
        self._slots = [_Slot(e, cursors.get(e.name)) for e in self.entries]
        self._heap: list[tuple[datetime, int]] = [(_UNKNOWN, i) for i in range(len(self._slots))]  # a heap already
        self._pass: list[tuple[int, datetime]] = []  # (slot, its next fire time after the pass)
        self._unrecorded: dict[int, datetime] = {}  # slot -> its latest handled fire time not yet recorded
        self._stamps: dict[datetime, str] = {}
        self._index = {e.name: i for i, e in enumerate(self.entries)}
        self._removed = 0

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def add(self, entry: PeriodicEntry, cursor: datetime | None) -> None:
        """Fire ``entry`` from now on, after ``cursor``; looked at in the next pass. An entry of the
        same name is replaced (its next fire time recomputed from ``cursor``)."""
        if self._pass:
            raise RuntimeError("entries change between passes only")
        old = self._index.get(entry.name)
        if old is not None:
            previous = self._slots[old].cursor  # never back: a fire time handled stays handled
            if cursor is None or (previous is not None and previous > cursor):
                cursor = previous
            self.remove(entry.name)
        i = len(self._slots)
        self.entries.append(entry)
        self._slots.append(_Slot(entry, cursor))
        self._index[entry.name] = i
        heapq.heappush(self._heap, (_UNKNOWN, i))

    def remove(self, name: str) -> bool:
        """Fire ``name`` no more (False: not in the timetable). Its last handled tick is still recorded."""
        if self._pass:
            raise RuntimeError("entries change between passes only")
        i = self._index.pop(name, None)
        if i is None:
            return False
        self._slots[i].removed = True
        self._removed += 1
        if self._removed > len(self._index) + 64:
            self._compact()
        return True

    def _compact(self) -> None:
        """Drop removed slots whose records are written (slot numbers change: between passes only)."""
        slots = self._slots
        keep = [i for i, slot in enumerate(slots) if not slot.removed or i in self._unrecorded]
        moved = {old: new for new, old in enumerate(keep)}
        self._heap = [(at, moved[i]) for at, i in self._heap if not slots[i].removed]
        heapq.heapify(self._heap)
        self._slots = [slots[i] for i in keep]
        self.entries = [self.entries[i] for i in keep]
        self._index = {name: moved[i] for name, i in self._index.items()}
        self._unrecorded = {moved[i]: fire for i, fire in self._unrecorded.items()}
        self._removed = sum(slot.removed for slot in self._slots)

    def next_at(self) -> datetime | None:
        """The earliest fire time not yet handled (``_UNKNOWN`` if an entry must be looked at now)."""
        return self._heap[0][0] if self._heap else None

    def cursor(self, slot: int) -> datetime | None:
        return self._slots[slot].cursor

    def due(self, now: datetime, horizon: datetime) -> list[Tick]:
        """The ticks to enqueue at ``now``, by fire time (then entry order); see ``due_ticks`` for
        ``horizon``. Only entries whose next fire time has come are looked at."""
        if self._pass:
            raise RuntimeError("the previous pass was neither finished nor abandoned")
        ticks: list[Tick] = []
        heap, slots = self._heap, self._slots
        while heap and heap[0][0] <= now:
            _, i = heapq.heappop(heap)
            slot = slots[i]
            if slot.removed:
                continue
            fire = slot.upcoming
            if fire is not None and fire > horizon:
                # Nothing between the cursor and `fire` (its next fire time) and nothing to catch up on.
                interval = slot.interval
                while fire <= now:
                    ticks.append(Tick(fire, i))
                    fire = fire + interval if interval is not None else next_fire(slot.entry, fire)
            else:
                ticks.extend(Tick(f, i) for f in due_ticks(slot.entry, slot.cursor, horizon, now, self.catch_up))
                fire = next_fire(slot.entry, now if slot.cursor is None else max(slot.cursor, now))
            self._pass.append((i, fire))
        ticks.sort()
        return ticks

    def handled(self, tick: Tick) -> None:
        """``tick`` was enqueued (acknowledged) or skipped for good: its entry's cursor moves to it."""
        slot = self._slots[tick.slot]
        if slot.cursor is None or slot.cursor < tick.fire:
            slot.cursor = tick.fire
        last = self._unrecorded.get(tick.slot)
        if last is None or last < tick.fire:
            self._unrecorded[tick.slot] = tick.fire

    def unrecorded(self) -> list[Tick]:
        """Each entry's latest handled tick whose record was not written yet."""
        return [Tick(fire, i) for i, fire in self._unrecorded.items()]

    def recorded(self, ticks: Sequence[Tick]) -> None:
        """``ticks`` (from ``unrecorded``) are in the bucket now."""
        for tick in ticks:
            if self._unrecorded.get(tick.slot) == tick.fire:
                del self._unrecorded[tick.slot]

    def finish(self, now: datetime) -> None:
        """Every tick of the pass was handled: each entry's cursor moves to ``now``."""
        for i, upcoming in self._pass:
            slot = self._slots[i]
            if slot.removed:
                continue
            if slot.cursor is None or slot.cursor < now:
                slot.cursor = now
            slot.upcoming = upcoming
            heapq.heappush(self._heap, (upcoming, i))
        self._pass = []
        if len(self._stamps) > 4 * len(self._index) + 64:
            self._stamps.clear()

    def abandon(self) -> None:
        """The pass stopped part-way: its entries continue from their cursors in the next pass."""
        for i, _ in self._pass:
            if self._slots[i].removed:
                continue
            self._slots[i].upcoming = None
            heapq.heappush(self._heap, (_UNKNOWN, i))
        self._pass = []

    def tick_id(self, tick: Tick) -> str:
        """``tick_id(entry.name, tick.fire)``, with the time formatted once per fire time."""
        stamp = self._stamps.get(tick.fire)
        if stamp is None:
            stamp = self._stamps[tick.fire] = tick.fire.astimezone(UTC).strftime(TICK_TIME_FORMAT)
        return self._slots[tick.slot].id_prefix + stamp
