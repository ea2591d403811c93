"""Periodic tasks: schedule entries (croniter / epoch-aligned intervals) and the HA beat.

Placeholder: being built (issue 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .canvas import Signature


@dataclass(frozen=True)
class PeriodicEntry:
    """One periodic entry: fire ``signature`` on ``schedule``."""

    name: str
    schedule: str | timedelta
    signature: Signature[Any]
    tz: str | None = None


def make_entry(schedule: str | timedelta, signature: Signature[Any], *, name: str, tz: str | None) -> PeriodicEntry:
    """Validate and build an entry."""
    return PeriodicEntry(name, schedule, signature, tz)
