"""Periodic tasks: schedule entries (``schedule``), the HA beat that fires them (``leader``) and the
entries stored while beats run (``schedules``: ``app.beat``)."""

from .leader import Beat, BeatState, bucket_name, read_state
from .schedule import (
    EPOCH,
    TICK_SEP,
    TICK_TIME_FORMAT,
    UTC,
    PeriodicEntry,
    describe,
    due_ticks,
    make_entry,
    next_fire,
    prev_fire,
    schedule_text,
    tick_id,
)
from .schedules import ScheduleInfo, Schedules

__all__ = [
    "EPOCH", "TICK_SEP", "TICK_TIME_FORMAT", "UTC", "Beat", "BeatState", "PeriodicEntry", "ScheduleInfo", "Schedules",
    "bucket_name", "describe", "due_ticks", "make_entry", "next_fire", "prev_fire", "read_state", "schedule_text",
    "tick_id",
]
