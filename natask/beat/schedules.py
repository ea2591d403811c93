"""``app.beat``: periodic entries added, removed, enabled and disabled while beats run, stored in the
schedules bucket (every running beat watches it and applies a change within a second)."""

from __future__ import annotations

import asyncio
import difflib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from ..broker import SequenceConflict
from ..canvas import Signature
from ..config import check_queue_name
from ..errors import ConfigError, EncodeError, TaskNotFound
from .schedule import UTC, PeriodicEntry, make_entry, next_fire, schedule_text
from .stored import ENTRY, MAX_EVERY, OVERRIDE, StoredEntry, decode

if TYPE_CHECKING:
    from ..broker.kv import Bucket
    from ..task import Task
    from .schedule import Scheduled

DESCRIPTION: Final = "natask: periodic entries stored at run time (app.beat, natask beat add)"
"""Description of the schedules bucket on the server."""
CODE: Final = "code"
"""``ScheduleInfo.source`` of an entry defined in the app's code (``@app.periodic``, ``add_periodic_task``)."""
STORED: Final = "stored"
"""``ScheduleInfo.source`` of an entry stored in the schedules bucket."""
_CAS_TRIES: Final = 20


async def open_bucket(app: Scheduled) -> Bucket:
    """The schedules bucket, created if missing: values kept without end, reads from the stream leader."""
    broker = await app.client.broker()
    return await broker.bucket(app.names.schedules_bucket, ttl=None, direct=False, description=DESCRIPTION)


@dataclass(frozen=True)
class ScheduleInfo:
    """One periodic entry as ``app.beat.list()`` shows it. ``source``: ``"code"`` or ``"stored"``;
    ``next_fire``: None while disabled; ``error``: why a stored value is skipped by beats (then
    ``enabled`` is False)."""

    name: str
    source: str
    task: str
    schedule: str
    enabled: bool
    next_fire: datetime | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    error: str | None = None


class Schedules:
    """Live periodic entries of an app (``app.beat``). Entries defined in code stay: they cannot be
    removed here, and ``disable``/``enable`` of one stores an override under its name that every beat
    applies. Sync methods run through the app's portal; each has an async twin (``aadd``...)."""

    def __init__(self, app: Scheduled) -> None:
        self.app = app

    def add(self, name: str, task: str | Signature[Any] | Task[..., Any], *, every: float | timedelta | None = None,
            cron: str | None = None, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
            queue: str | None = None, tz: str | None = None) -> PeriodicEntry:
        """Store entry ``name`` (replacing a stored one of that name); running beats fire it within a second.

        ``task``: a task name, a task, or a signature (``add.s(1, 2)``); ``every``: seconds or a
        ``timedelta`` (whole seconds, aligned to the Unix epoch), or ``cron`` in ``tz`` (default UTC)."""
        return self.app.client.portal.run(self.aadd(name, task, every=every, cron=cron, args=args, kwargs=kwargs,
                                              queue=queue, tz=tz))

    async def aadd(self, name: str, task: str | Signature[Any] | Task[..., Any], *,
                   every: float | timedelta | None = None, cron: str | None = None, args: Sequence[Any] = (),
                   kwargs: Mapping[str, Any] | None = None, queue: str | None = None,
                   tz: str | None = None) -> PeriodicEntry:
        """Async ``add``."""
        stored = self._stored(name, task, every, cron, args, kwargs, queue, tz)
        kv = await open_bucket(self.app)
        now = time.time()
        for _ in range(_CAS_TRIES):  # keep the first creation time of a replaced entry
            current = await kv.get(name)
            if current is None:
                try:
                    await kv.create(name, replace(stored, created=now, updated=now).encode())
                except SequenceConflict:
                    continue
            else:
                created = _created(name, current.value, self.app) or now
                try:
                    await kv.update(name, replace(stored, created=created, updated=now).encode(), current.revision)
                except SequenceConflict:
                    continue
            return stored.to_entry(self.app)
        raise ConfigError(f"periodic entry {name!r} keeps changing under us: try again")

    def remove(self, name: str) -> None:
        """Delete stored entry ``name``: beats fire it no more."""
        self.app.client.portal.run(self.aremove(name))

    async def aremove(self, name: str) -> None:
        """Async ``remove``."""
        if name in self.app.periodic_entries:
            raise ConfigError(f"periodic entry {name!r} is defined in the app's code and cannot be removed "
                              f"while beats run it: disable it (natask beat disable {name}) or delete it from the code")
        kv = await open_bucket(self.app)
        if await kv.get(name) is None:
            raise ConfigError(f"no stored periodic entry named {name!r}{await self._known(kv, name)}")
        await kv.delete(name)

    def enable(self, name: str) -> None:
        """Let beats fire entry ``name`` again (from the next fire time on: missed ones are not replayed)."""
        self.app.client.portal.run(self.aenable(name))

    async def aenable(self, name: str) -> None:
        """Async ``enable``."""
        await self._set_enabled(name, True)

    def disable(self, name: str) -> None:
        """Stop beats firing entry ``name`` (stored or defined in code) until ``enable``."""
        self.app.client.portal.run(self.adisable(name))

    async def adisable(self, name: str) -> None:
        """Async ``disable``."""
        await self._set_enabled(name, False)

    async def _set_enabled(self, name: str, enabled: bool) -> None:
        kv = await open_bucket(self.app)
        code = name in self.app.periodic_entries
        for _ in range(_CAS_TRIES):
            current = await kv.get(name)
            now = time.time()
            if current is None:
                if not code:
                    raise ConfigError(f"no periodic entry named {name!r}{await self._known(kv, name)}")
                if enabled:
                    return  # a code-defined entry without override is enabled
                value = StoredEntry(name, enabled=False, created=now, updated=now, kind=OVERRIDE).encode()
                try:
                    await kv.create(name, value)
                except SequenceConflict:
                    continue
                return
            try:
                stored, _ = decode(name, current.value, self.app)
            except Exception as e:
                raise ConfigError(f"stored periodic entry {name!r} is not valid ({e}): add it again or remove it") \
                    from None
            if code and stored.kind == OVERRIDE and enabled:
                await kv.delete(name)  # back to the code's definition: no override left
                return
            try:
                await kv.update(name, replace(stored, enabled=enabled, updated=now).encode(), current.revision)
            except SequenceConflict:
                continue
            return
        raise ConfigError(f"periodic entry {name!r} keeps changing under us: try again")

    async def _known(self, kv: Bucket, name: str) -> str:
        names = sorted(set(await kv.keys()) | set(self.app.periodic_entries))
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
        return f" (known: {', '.join(names)})" if names else " (there are none: add one with natask beat add)"

    def _stored(self, name: str, task: str | Signature[Any] | Task[..., Any], every: float | timedelta | None,  # noqa: C901 - one check per field of a hostile value
                cron: str | None, args: Sequence[Any], kwargs: Mapping[str, Any] | None, queue: str | None,
                tz: str | None) -> StoredEntry:
        """Validate an entry to store (as strictly as a beat validates what it reads)."""
        app = self.app
        if name in app.periodic_entries:
            raise ConfigError(f"periodic entry {name!r} is defined in the app's code: choose another name")
        if isinstance(task, Signature):
            if args or kwargs:
                raise ConfigError(f"periodic entry {name!r}: give the arguments in the signature or in "
                                  "args=/kwargs=, not both")
            extra = sorted(set(task.options) - {"queue"})
            if extra:
                raise ConfigError(f"periodic entry {name!r}: a stored entry keeps the queue option only, "
                                  f"not {', '.join(extra)}")
            args, kwargs, queue = task.args, task.kwargs, queue or task.options.get("queue")
            task = task.task
        elif not isinstance(task, str):
            task = getattr(task, "name", task)  # a Task
        if not isinstance(task, str):
            raise ConfigError(f"periodic entry {name!r}: task must be a task name, a task or a signature, "
                              f"got {task!r}")
        if (every is None) == (cron is None):
            raise ConfigError(f"periodic entry {name!r}: give exactly one of every= (seconds) and cron=")
        if queue is not None:
            check_queue_name(queue)
        known = app.tasks.get(task)
        if known is None and app.tasks:  # a producer without tasks may name any; an app with tasks knows them
            close = difflib.get_close_matches(task, list(app.tasks), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"registered: {', '.join(sorted(app.tasks))}"
            raise TaskNotFound(f"periodic entry {name!r}: no task named {task!r} in app {app.name!r} ({hint})")
        args, kwargs = tuple(args), dict(kwargs or {})
        if known is not None:
            try:
                known.check_args(args, kwargs)
            except TypeError as e:
                raise ConfigError(f"periodic entry {name!r}: arguments do not fit {task}: {e}") from None
        seconds_: int | None = None
        if every is not None:
            span = every if isinstance(every, timedelta) else None
            if span is None:
                if isinstance(every, bool) or not isinstance(every, (int, float)):
                    raise ConfigError(f"periodic entry {name!r}: every= must be seconds or a timedelta, got {every!r}")
                if not 1 <= every <= MAX_EVERY:
                    raise ConfigError(f"periodic entry {name!r}: every= must be from 1 to {MAX_EVERY} seconds, "
                                      f"got {every!r}")
                span = timedelta(seconds=every)
            entry = make_entry(span, Signature(app, task, args, kwargs), name=name, tz=tz)  # whole seconds, >= 1
            assert isinstance(entry.schedule, timedelta)
            seconds_ = int(entry.schedule.total_seconds())
            if seconds_ > MAX_EVERY:
                raise ConfigError(f"periodic entry {name!r}: every= must be at most {MAX_EVERY} seconds")
        else:
            entry = make_entry(str(cron), Signature(app, task, args, kwargs), name=name, tz=tz)
        stored = StoredEntry(name, task, args, kwargs, queue, seconds_,
                             entry.schedule if isinstance(entry.schedule, str) else None, entry.tz)
        try:
            stored.encode()
        except EncodeError as e:
            raise ConfigError(f"periodic entry {name!r}: arguments cannot be stored: {e}") from None
        return stored

    async def alist(self) -> list[ScheduleInfo]:
        """Async ``list``."""
        app = self.app
        broker = await app.client.broker()
        kv = await broker.existing_bucket(app.names.schedules_bucket)
        values: dict[str, bytes] = {}
        if kv is not None:
            keys = await kv.keys()
            found = await asyncio.gather(*(kv.get(key) for key in keys))
            values = {key: item.value for key, item in zip(keys, found, strict=True) if item is not None}
        now = datetime.now(UTC)
        out: list[ScheduleInfo] = []
        for name, entry in app.periodic_entries.items():
            enabled = True
            if name in values:
                try:
                    stored, _ = decode(name, values[name], app)
                    enabled = stored.enabled or stored.kind == ENTRY  # a whole entry cannot replace code
                except Exception:
                    pass
            out.append(_info(entry, CODE, enabled, now))
        for name, value in sorted(values.items()):
            if name in app.periodic_entries:
                continue
            try:
                stored, fires = decode(name, value, app)
            except Exception as e:
                out.append(ScheduleInfo(name, STORED, "?", "?", False, None, error=str(e)))
                continue
            if fires is not None:
                out.append(_info(fires, STORED, stored.enabled, now))
        return out


    # Last: from here on, ``list`` in an annotation would name this method.
    def list(self) -> list[ScheduleInfo]:
        """Every entry: code-defined and stored, with its source, enabled state and next fire time."""
        return self.app.client.portal.run(self.alist())


def _info(entry: PeriodicEntry, source: str, enabled: bool, now: datetime) -> ScheduleInfo:
    sig = entry.signature
    return ScheduleInfo(entry.name, source, sig.task, schedule_text(entry), enabled,
                        next_fire(entry, now) if enabled else None, sig.args, dict(sig.kwargs),
                        sig.options.get("queue"))


def _created(name: str, data: bytes, app: Scheduled) -> float | None:
    try:
        stored, _ = decode(name, data, app)
    except Exception:
        return None
    return stored.created or None
