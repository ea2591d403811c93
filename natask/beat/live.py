"""The entries a beat fires: the app's code-defined ones and those stored in the schedules bucket,
kept current by a watch of the bucket that is rebuilt from the whole bucket whenever it restarts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Final

from .schedule import PeriodicEntry
from .schedules import open_bucket
from .stored import ENTRY, StoredEntry, decode

if TYPE_CHECKING:
    from ..app import Natask
    from ..broker.kv import Entry

log = logging.getLogger("natask.beat")

RETRY_PAUSE: Final = 1.0
"""Seconds before the schedules watch is opened again after it failed."""

_Value = tuple[StoredEntry, "PeriodicEntry | None"]


class LiveEntries:
    """What a beat fires now, and what changed since the beat last looked (``take``)."""

    def __init__(self, app: Natask, on_change: Callable[[], None]) -> None:
        self.app = app
        self._code = dict(app.periodic_entries)
        self._on_change = on_change
        self._values: dict[str, _Value] = {}  # key -> its valid stored value
        self._entries: dict[str, PeriodicEntry] = dict(self._code)  # what fires now, by name
        self._changed: dict[str, PeriodicEntry | None] = {}  # since the last take; None: fires no more
        self._bad: dict[str, int] = {}  # key -> revision of the skipped value (logged once)
        self._clashes: set[str] = set()  # stored entries named like a code-defined one (logged once)
        self.ready = asyncio.Event()
        """Set once the whole bucket was read after the start."""
        self._task: asyncio.Task[None] | None = None

    @property
    def entries(self) -> list[PeriodicEntry]:
        """Every entry that fires now."""
        return list(self._entries.values())

    def take(self) -> dict[str, PeriodicEntry | None]:
        """The entries changed since the last call, by name: the new entry, or None if it fires no more."""
        changed, self._changed = self._changed, {}
        return changed

    async def start(self, name: str) -> None:
        """Start following the bucket; returns once it was read whole (raises why it could not be)."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name=name)
        ready = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            task, self._task = self._task, None
            task.result()  # the watch could not start: its error

    async def stop(self) -> None:
        """Stop following the bucket."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def run(self) -> None:
        """Follow the bucket until cancelled; a failure to start the first watch is raised."""
        bucket = self.app.names.schedules_bucket
        while True:
            try:
                broker = await self.app.client.broker()
                await open_bucket(self.app)  # with its settings, before the watch would create it with others
                await self._follow(broker.watch(bucket))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not self.ready.is_set():
                    raise
                log.warning("watch of the periodic entries in %s failed (%s); opening it again", bucket, e)
                await asyncio.sleep(RETRY_PAUSE)

    async def _follow(self, watch: AsyncGenerator[Entry | None, None]) -> None:
        snapshot: dict[str, Entry] | None = {}
        async with aclosing(watch) as entries:
            async for entry in entries:
                if entry is None:
                    if snapshot is None:
                        # The watch restarted (server restart, bucket deleted and recreated...): what it
                        # missed may include deletes it cannot replay, so read the whole bucket again.
                        return
                    self._rebuild(snapshot)
                    snapshot = None
                    self.ready.set()
                elif snapshot is not None:
                    snapshot[entry.key] = entry
                else:
                    self._apply(entry)
                    self._resolve(entry.key)
                if self._changed:
                    self._on_change()

    def _rebuild(self, snapshot: dict[str, Entry]) -> None:
        names = set(self._values) | set(self._entries)
        self._values = {}
        for entry in snapshot.values():
            self._apply(entry)
        self._bad = {key: rev for key, rev in self._bad.items() if key in snapshot}
        for name in names | set(self._values) | set(self._code):
            self._resolve(name)

    def _apply(self, entry: Entry) -> None:
        key = entry.key
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._values.pop(key, None)
            self._bad.pop(key, None)
            return
        try:
            self._values[key] = decode(key, entry.value, self.app)
        except Exception as e:  # hostile or broken: skipped, never stops the beat
            self._values.pop(key, None)
            if self._bad.get(key) != entry.revision:
                self._bad[key] = entry.revision
                log.warning("periodic entry %r in bucket %s (revision %d) is skipped: %s", key,
                            self.app.names.schedules_bucket, entry.revision, e)
            return
        self._bad.pop(key, None)

    def _resolve(self, name: str) -> None:
        """Work out what entry ``name`` fires now, noting a change."""
        value = self._values.get(name)
        code = self._code.get(name)
        new: PeriodicEntry | None
        if code is not None:
            if value is not None and value[0].kind == ENTRY and name not in self._clashes:
                self._clashes.add(name)
                log.warning("periodic entry %r is defined in the app's code; the stored entry of that name is "
                            "ignored (remove it)", name)
            new = code if value is None or value[0].enabled else None
        else:
            new = value[1] if value is not None and value[0].enabled else None
        old = self._entries.get(name)
        if new == old:
            return
        if new is None:
            del self._entries[name]
        else:
            self._entries[name] = new
        self._changed[name] = new
