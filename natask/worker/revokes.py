"""The revoke watch: the revoked-ids bucket mirrored into a local set (no KV read per task, and
revokes recorded before the worker started still apply); a revoke with ``terminate`` cancels the
running task.

A revoke by task name or glob (``natask control revoke --name 'shop.*'``) is a record under
``name.<digest>`` holding the pattern and the task stream's last sequence when it was made: every
task of a matching name stored up to that sequence is revoked (queued ones skipped, running ones
cancelled with ``terminate``); tasks sent later run. The sequence, not a time, decides: no clocks
to agree on. With ``stream_per_queue`` the record holds each queue stream's last sequence (``seqs``)."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Mapping, Set
from typing import Final

from ..broker import Broker
from ..message import loads
from ..naming import REVOKED_NAME_PREFIX
from .delivery import Delivery

log = logging.getLogger("natask.worker")

WATCH_RESTART_PAUSE: Final = 1.0
"""Seconds before the revoke watch is started again after it ended (no spin if the server refuses)."""
WATCH_LOAD_TIMEOUT: Final = 10.0
"""Seconds the worker waits at start for the revoked ids already recorded."""


class Revokes:
    """The revoked task ids of one app, kept current by a watch of its revoked bucket."""

    def __init__(self, broker: Broker, inflight: Set[Delivery]) -> None:
        self.broker = broker
        self.inflight = inflight
        self.revoked: set[str] = set()
        """Revoked task ids (the gate reads this set: it is updated in place, never replaced)."""
        self.names: dict[str, tuple[str, int, Mapping[str, int] | None]] = {}
        """Revokes by name: key -> (task name or glob, last task-stream sequence it covers, or per queue
        the last sequence of its stream with ``stream_per_queue``)."""
        self._matches: dict[str, list[tuple[int, Mapping[str, int] | None]]] = {}
        """Per task name: the sequences of the name revokes it matches (cache, cleared on change)."""
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the watch and return once the ids recorded so far are loaded. The broker's watch
        outlives a deleted bucket or a restarted server; should it end anyway, it is started again."""
        broker = self.broker
        loaded = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            while True:
                try:
                    async with contextlib.aclosing(broker.watch(broker.names.revoked_bucket)) as entries:
                        async for entry in entries:
                            if entry is None:
                                if not loaded.done():
                                    loaded.set_result(None)
                                continue
                            self.on_revoke(entry.key, entry.value, entry.operation)
                    why = "it ended"
                except Exception as e:
                    if not loaded.done():
                        loaded.set_exception(e)
                        return
                    why = f"it failed: {e}"
                if broker.closed:
                    return
                log.warning("revoke watch stopped (%s): starting it again", why)
                await asyncio.sleep(WATCH_RESTART_PAUSE)

        self._watch = asyncio.get_running_loop().create_task(follow())
        await asyncio.wait_for(loaded, WATCH_LOAD_TIMEOUT)

    def stop(self) -> None:
        """End the watch."""
        if self._watch is not None:
            self._watch.cancel()

    def on_revoke(self, task_id: str, value: bytes | None, operation: str | None) -> None:
        """A change of the revoked bucket: a task id revoked (or the revoke deleted)."""
        if task_id.startswith(REVOKED_NAME_PREFIX):
            self.on_name_revoke(task_id, value, operation)
            return
        if operation in ("DEL", "PURGE") or not value:
            self.revoked.discard(task_id)
            return
        self.revoked.add(task_id)
        try:
            terminate = bool(loads(value).get("terminate"))
        except Exception:
            terminate = False
        if terminate:
            self.terminate(task_id)

    def on_name_revoke(self, key: str, value: bytes | None, operation: str | None) -> None:
        """A revoke by task name or glob recorded (or deleted); a malformed record is ignored."""
        self._matches.clear()
        if operation in ("DEL", "PURGE") or not value:
            self.names.pop(key, None)
            return
        try:
            record = loads(value)
            pattern, seq, terminate = record["name"], record["seq"], bool(record.get("terminate"))
            seqs = record.get("seqs")
        except Exception:
            log.warning("ignoring a malformed revoke-by-name record %s", key)
            return
        if not isinstance(pattern, str) or type(seq) is not int or (seqs is not None and not (
                isinstance(seqs, dict) and all(isinstance(q, str) and type(s) is int for q, s in seqs.items()))):
            log.warning("ignoring a malformed revoke-by-name record %s", key)
            return
        self.names[key] = (pattern, seq, seqs)
        if terminate:
            for delivery in self.inflight:
                if delivery.name and delivery.task_id and fnmatch.fnmatchcase(delivery.name, pattern):
                    self.terminate(delivery.task_id)

    def covers(self, name: str, seq: int, queue: str) -> bool:
        """Whether a revoke by name covers the task ``name`` stored at stream sequence ``seq`` (of
        ``queue``'s stream)."""
        matches = self._matches.get(name)
        if matches is None:
            matches = self._matches[name] = [(s, q) for p, s, q in self.names.values() if fnmatch.fnmatchcase(name, p)]
        return any(seq <= (s if seqs is None else seqs.get(queue, 0)) for s, seqs in matches)

    def terminate(self, task_id: str) -> None:
        """Cancel the running task ``task_id`` (its outcome is stored as REVOKED, "terminated")."""
        for delivery in self.inflight:
            if delivery.task_id == task_id and delivery.handler is not None and not delivery.revoked:
                delivery.revoked = True
                delivery.handler.cancel()
                log.info("terminating revoked task %s", task_id)
