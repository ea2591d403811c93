"""Periodic entries stored in the schedules bucket (``natask_schedules_<prefix>``, one key per entry
name): their wire form and its validation. Anyone allowed to write the bucket writes these values, so
every one read is checked as hostile input. No I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from ..canvas import Signature
from ..errors import ConfigError
from ..message import MAX_TIMESTAMP, dumps, loads
from ..naming import is_queue_name, is_task_name
from .schedule import PeriodicEntry, make_entry

if TYPE_CHECKING:
    from ..client import App

STORED_VERSION: Final = 1
"""Version of a stored entry's value (``"v"``); another version is refused (written by a newer natask)."""
MAX_STORED_BYTES: Final = 64 * 1024
"""Largest stored value read or written (arguments included)."""
MAX_CRON_TEXT: Final = 200
"""Longest cron expression stored."""
MAX_TZ_TEXT: Final = 100
"""Longest time zone name stored (IANA names are far shorter)."""
MAX_EVERY: Final = 10 * 366 * 86400
"""Longest stored interval in seconds (ten years)."""
OVERRIDE: Final = "override"
"""``"kind"`` of a value that only enables or disables a code-defined entry of the same name."""
ENTRY: Final = "entry"
"""``"kind"`` of a value holding a whole entry."""


@dataclass(frozen=True)
class StoredEntry:
    """One value of the schedules bucket, validated: a whole entry (``kind`` ``"entry"``), or an
    override (``"override"``) that only says whether the code-defined entry ``name`` is enabled."""

    name: str
    task: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    every: int | None = None
    cron: str | None = None
    tz: str | None = None
    enabled: bool = True
    created: float = 0.0
    updated: float = 0.0
    kind: str = ENTRY

    def to_entry(self, app: App) -> PeriodicEntry:
        """The entry the beat fires (``ConfigError`` if the schedule is not valid after all)."""
        if self.kind != ENTRY:
            raise ConfigError(f"stored value {self.name!r} is an override, not an entry")
        options = {"queue": self.queue} if self.queue else None
        signature: Signature[Any] = Signature(app, self.task, self.args, self.kwargs, options)
        schedule: str | timedelta = self.cron if self.cron is not None else timedelta(seconds=self.every or 0)
        return make_entry(schedule, signature, name=self.name, tz=self.tz)

    def encode(self) -> bytes:
        """The value as stored (msgpack)."""
        value: dict[str, Any] = {"v": STORED_VERSION, "kind": self.kind, "enabled": self.enabled,
                                 "created": self.created, "updated": self.updated}
        if self.kind == ENTRY:
            value.update(task=self.task, args=list(self.args), kwargs=self.kwargs, queue=self.queue,
                         every=self.every, cron=self.cron, tz=self.tz)
        data = dumps(value)
        if len(data) > MAX_STORED_BYTES:
            raise ConfigError(f"periodic entry {self.name!r}: {len(data)} bytes stored, more than the "
                              f"{MAX_STORED_BYTES} allowed: pass smaller arguments (an id to look the data up)")
        return data


def decode(name: str, data: bytes, app: App) -> tuple[StoredEntry, PeriodicEntry | None]:  # noqa: C901 - one check per field of a hostile value
    """Validate a value read from the bucket under key ``name``: the stored value and, for a whole
    entry, the entry it fires (its cron parses, its time zone exists); ``ConfigError`` says what is wrong."""
    if len(data) > MAX_STORED_BYTES:
        raise ConfigError(f"{len(data)} bytes, more than {MAX_STORED_BYTES}")
    try:
        value = loads(data, MAX_STORED_BYTES)
    except Exception as e:  # DecodeError, and whatever a hostile ext payload raises
        raise ConfigError(f"not a stored entry ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"not a map but {type(value).__name__}")
    if value.get("v") != STORED_VERSION:
        raise ConfigError(f"unknown version {_short(value.get('v'))} (this natask reads {STORED_VERSION})")
    fields: dict[str, Any] = value
    kind: Any = fields.get("kind")
    enabled: Any = fields.get("enabled")
    created: Any = fields.get("created")
    updated: Any = fields.get("updated")
    if not isinstance(enabled, bool):
        raise ConfigError(f"'enabled' must be true or false, got {_short(enabled)}")
    for what, when in (("created", created), ("updated", updated)):
        if isinstance(when, bool) or not isinstance(when, (int, float)) or not 0 <= when <= MAX_TIMESTAMP \
                or not math.isfinite(when):
            raise ConfigError(f"{what!r} must be a unix time, got {_short(when)}")
    if kind == OVERRIDE:
        return StoredEntry(name, enabled=enabled, created=float(created), updated=float(updated), kind=OVERRIDE), None
    if kind != ENTRY:
        raise ConfigError(f"unknown kind {_short(kind)}")
    task: Any = fields.get("task")
    args: Any = fields.get("args")
    kwargs: Any = fields.get("kwargs")
    queue: Any = fields.get("queue")
    every: Any = fields.get("every")
    cron: Any = fields.get("cron")
    tz: Any = fields.get("tz")
    if not is_task_name(task):
        raise ConfigError(f"invalid task name {_short(task)}")
    if not isinstance(args, (list, tuple)):
        raise ConfigError(f"'args' must be a list, got {_short(args)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"'kwargs' must be a map with string keys, got {_short(kwargs)}")
    if queue is not None and not is_queue_name(queue):
        raise ConfigError(f"invalid queue name {_short(queue)}")
    if (every is None) == (cron is None):
        raise ConfigError("exactly one of 'every' and 'cron' must be set")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= MAX_EVERY):
        raise ConfigError(f"'every' must be whole seconds from 1 to {MAX_EVERY}, got {_short(every)}")
    if cron is not None and (not isinstance(cron, str) or len(cron) > MAX_CRON_TEXT):
        raise ConfigError(f"'cron' must be a text of at most {MAX_CRON_TEXT} characters, got {_short(cron)}")
    if tz is not None and (not isinstance(tz, str) or len(tz) > MAX_TZ_TEXT):
        raise ConfigError(f"'tz' must be a time zone name, got {_short(tz)}")
    stored = StoredEntry(name, task, tuple(args), kwargs, queue, every, cron, tz, enabled, float(created),
                         float(updated))
    return stored, stored.to_entry(app)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
