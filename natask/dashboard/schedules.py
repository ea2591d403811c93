"""The dashboard's schedules page: every periodic entry with the beat's records, and the edits of
stored entries (add, enable, disable, remove), all through ``app.beat`` as ``natask beat`` does.
Request bodies are read as hostile input; ``app.beat`` validates every field."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ..beat.leader import LEASE_KEY
from ..beat.records import RECORD_PREFIX
from ..beat.records import loads as record_of
from ..beat.schedules import STORED
from ..errors import ConfigError
from ..naming import TASK_ID_RE
from .previews import preview

if TYPE_CHECKING:
    from ..app import Natask
    from ..beat.schedule import PeriodicEntry

FIELDS: Final = ("name", "task", "every", "cron", "args", "kwargs", "queue", "tz")
"""The fields of an entry to add (those of ``natask beat add``)."""
MAX_BODY: Final = 256 * 1024
"""Largest request body read; a stored entry holds at most 64 KiB anyway."""
MAX_TEXT: Final = 1000
"""Longest text field other than ``args``/``kwargs`` (names, cron, queue and zone are far shorter)."""
READ_CONCURRENCY: Final = 64
"""Beat records read at once when the page is drawn."""


async def read(app: Natask) -> dict[str, Any]:
    """Every entry (code-defined and stored: ``app.beat.list()``) with its last tick, the beat
    leader, and the task names an entry may fire. Never creates a bucket."""
    infos = await app.beat.alist()
    broker = await app.client.broker()
    kv = await broker.existing_bucket(app.names.beat_bucket)

    async def record(key: str) -> dict[str, Any]:
        entry = await kv.get(key) if kv is not None else None
        return record_of(entry.value) if entry is not None else {}

    records: list[dict[str, Any]] = []
    keys = [LEASE_KEY] + [RECORD_PREFIX + info.name for info in infos]
    for start in range(0, len(keys), READ_CONCURRENCY):
        records += await asyncio.gather(*(record(k) for k in keys[start:start + READ_CONCURRENCY]))
    lease, last = records[0], records[1:]
    entries = []
    for info, done in zip(infos, last, strict=True):
        fire, tick = done.get("fire"), done.get("id")
        entries.append({
            "name": info.name, "source": info.source, "editable": info.source == STORED, "task": info.task,
            "schedule": info.schedule, "enabled": info.enabled, "error": info.error,
            "next": info.next_fire.isoformat() if info.next_fire is not None else None,
            "args": preview(info.args, info.kwargs) if info.error is None else "", "queue": info.queue,
            "last": fire if isinstance(fire, int) and not isinstance(fire, bool) else None,
            "last_id": tick if isinstance(tick, str) and TASK_ID_RE.match(tick) else None})
    holder, expires = lease.get("holder"), lease.get("expires")
    leading = isinstance(holder, str) and isinstance(expires, (int, float)) and expires > time.time()
    return {"entries": entries, "leader": holder if leading else None, "editable": True,
            "tasks": sorted(app.tasks), "bucket": app.names.schedules_bucket}


async def add(app: Natask, body: object) -> PeriodicEntry:
    """Store the entry a request describes (``natask beat add``): ``ConfigError`` or ``TaskNotFound``
    say what is wrong, in ``natask beat add``'s words."""
    fields = entry_fields(body)
    return await app.beat.aadd(fields.pop("name"), fields.pop("task"), **fields)


def entry_fields(body: object) -> dict[str, Any]:
    """``app.beat.add``'s arguments from a request body: a JSON object of ``FIELDS``, empty texts
    for what is not given, ``args``/``kwargs`` as JSON values or JSON texts (the form's fields)."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"the request body must be a JSON object with the fields {', '.join(FIELDS)}")
    unknown = sorted(str(k)[:50] for k in body if k not in FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}: an entry has {', '.join(FIELDS)}")
    out: dict[str, Any] = {}
    for key in ("name", "task", "cron", "queue", "tz"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key} must be a text, got {type(value).__name__}")
        if value is not None and len(value) > MAX_TEXT:
            raise ConfigError(f"{key} is longer than {MAX_TEXT} characters")
        text = (value or "").strip()
        out[key] = text if key in ("name", "task") else text or None
    every = body.get("every")
    if isinstance(every, str):
        text = every.strip()[:50]
        try:
            every = float(text) if text else None
        except ValueError:
            raise ConfigError(f"every must be a number of seconds, got {text!r}") from None
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))):
        raise ConfigError(f"every must be a number of seconds, got {type(every).__name__}")
    out["every"] = every
    out["args"] = _json_field(body.get("args"), "args", list)
    out["kwargs"] = _json_field(body.get("kwargs"), "kwargs", dict)
    return out


def _json_field(value: Any, what: str, kind: type) -> Any:
    """A JSON list or object, given as one or as its text (empty: none), checked as ``--args`` is."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return kind()
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"{what} must be JSON: {e}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{what} must be a JSON {'list' if kind is list else 'object'}, got {text[:100]}")
    return value


__all__ = ["FIELDS", "MAX_BODY", "add", "entry_fields", "read"]
