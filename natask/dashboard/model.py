"""What the dashboard knows: task rows (an index bounded by the history limit, not payloads), the
workers, queues and dead letters last read, per-minute series for the charts, and every count the
page shows. Counts live here only, as totals of what was seen, so the tiles, the workers table and
the charts agree however many rows the index has let go."""

from __future__ import annotations

import bisect
import random
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..events import MAX_NAME, check_fields, is_ident, is_number
from ..naming import TASK_ID_RE
from ..states import FINAL_STATES, State

DEFAULT_HISTORY_LIMIT: Final = 100_000
"""Task rows kept in memory (``--history-limit``); the oldest-changed go first."""
MAX_WORKERS: Final = 1000
"""Workers tracked at most (idents come from events anyone allowed to publish them may send)."""
MAX_STATE: Final = 40
"""Longest task state shown (custom states of ``update_state`` included)."""
MAX_TIMELINE: Final = 24
"""Entries of a task's timeline kept (a task retried many times keeps its first and latest)."""
MAX_CHANGES: Final = 300
"""Rows one live update carries at most (the page shows the newest; search reads the rest)."""
MAX_PAGE: Final = 500
"""Rows one search page returns at most."""
SERIES_MINUTES: Final = 120
"""Minutes of per-task and per-queue chart data kept."""
MAX_SERIES_KEYS: Final = 200
"""Task names (and queues) one minute of chart data tracks at most."""
MAX_SAMPLES: Final = 256
"""Runtimes kept per task (or queue) and minute for the percentiles (a uniform sample beyond)."""
PENDING: Final = State.PENDING.value
SCHEDULED: Final = "SCHEDULED"
OUTCOMES: Final = {"task-succeeded": State.SUCCESS.value, "task-failed": State.FAILURE.value,
                   "task-revoked": State.REVOKED.value}
"""Outcome events and the state each one records."""
COUNTED: Final = (State.SUCCESS.value, State.FAILURE.value, State.REVOKED.value, State.RETRY.value)
"""States whose events are counted (in all, per worker, per task and per queue)."""

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def task_name(value: object) -> str:
    """A task name read from the wire, or "" if it is not one."""
    return value if isinstance(value, str) and len(value) <= MAX_NAME and _NAME_RE.match(value) else ""


def task_state(value: object) -> str:
    """A task state read from the wire (natask's or a custom one), or "" if it is not one."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_STATE and value.isprintable() else ""


def error_text(exc_type: object, message: object) -> str:
    return f"{'' if exc_type is None else exc_type}: {'' if message is None else message}"[:500]


@dataclass(slots=True)
class TaskRow:
    """One task as the dashboard has seen it (publishes, events, result records)."""

    id: str
    name: str
    queue: str = ""
    state: str = PENDING
    args: str = ""
    sent: float | None = None
    started: float | None = None
    finished: float | None = None
    runtime: float | None = None
    worker: str = ""
    retries: int = 0
    error: str = ""
    parent_id: str = ""
    root_id: str = ""
    version: int = 0
    msg_id: str = ""
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    """(time, what, detail): sent, started, retried, finished..."""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "queue": self.queue, "state": self.state, "args": self.args,
                "sent": self.sent, "started": self.started, "finished": self.finished, "runtime": self.runtime,
                "worker": self.worker, "retries": self.retries, "error": self.error, "parent_id": self.parent_id,
                "root_id": self.root_id, "version": self.version}

    def note(self, ts: float, what: str, detail: str = "") -> None:
        if len(self.timeline) >= MAX_TIMELINE:
            del self.timeline[1]  # keep the first entry (sent) and the latest
        self.timeline.append((ts, what, detail[:300]))

    @property
    def activity(self) -> float:
        return max(self.sent or 0.0, self.started or 0.0, self.finished or 0.0)


@dataclass
class Query:
    """A search over the task index (``/api/tasks``); empty fields match everything."""

    text: str = ""
    """Part of the id, name, arguments, worker or error (case-insensitive)."""
    name: str = ""
    state: str = ""
    worker: str = ""
    queue: str = ""
    since: float | None = None
    until: float | None = None
    offset: int = 0
    limit: int = 50

    def matches(self, row: TaskRow) -> bool:
        if self.state and row.state != self.state:
            return False
        if self.name and row.name != self.name:
            return False
        if self.worker and row.worker != self.worker:
            return False
        if self.queue and row.queue != self.queue:
            return False
        if self.since is not None or self.until is not None:
            at = row.activity
            if (self.since is not None and at < self.since) or (self.until is not None and at > self.until):
                return False
        if self.text:
            text = self.text.lower()
            return any(text in v.lower() for v in (row.id, row.name, row.args, row.worker, row.error))
        return True


@dataclass
class _Cell:
    """One task (or queue) in one minute: outcomes and a sample of runtimes."""

    succeeded: int = 0
    failed: int = 0
    seen_runtimes: int = 0
    runtimes: list[float] = field(default_factory=list)

    def add(self, state: str, runtime: float | None) -> None:
        if state == State.SUCCESS:
            self.succeeded += 1
        elif state == State.FAILURE:
            self.failed += 1
        if runtime is not None:
            self.seen_runtimes += 1
            if len(self.runtimes) < MAX_SAMPLES:
                self.runtimes.append(runtime)
            else:  # reservoir sampling: every runtime of the minute equally likely to be kept
                slot = random.randrange(self.seen_runtimes)
                if slot < MAX_SAMPLES:
                    self.runtimes[slot] = runtime


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Series:
    """Outcomes and runtimes per minute, per task name and per queue (the charts)."""

    def __init__(self) -> None:
        self.minutes: dict[int, dict[str, dict[str, _Cell]]] = {}

    def add(self, ts: float, name: str, queue: str, state: str, runtime: float | None) -> None:
        minute = int(ts // 60)
        if self.minutes and minute < max(self.minutes) - SERIES_MINUTES:
            return
        cells = self.minutes.get(minute)
        if cells is None:
            cells = self.minutes[minute] = {"task": {}, "queue": {}}
            for old in sorted(self.minutes)[:-SERIES_MINUTES]:
                del self.minutes[old]
        for kind, key in (("task", name), ("queue", queue), ("all", "")):
            by_key = cells.setdefault(kind, {})
            cell = by_key.get(key)
            if cell is None and len(by_key) < MAX_SERIES_KEYS:
                cell = by_key[key] = _Cell()
            if cell is not None:
                cell.add(state, runtime)

    def points(self, task: str = "", queue: str = "", now: float | None = None, minutes: int = 60,
               ) -> list[dict[str, Any]]:
        """One point per minute (oldest first): succeeded, failed, p50 and p95 runtime."""
        last = int((now if now is not None else time.time()) // 60)
        kind, key = ("task", task) if task else ("queue", queue) if queue else ("all", "")
        out = []
        for minute in range(last - minutes + 1, last + 1):
            cell = self.minutes.get(minute, {}).get(kind, {}).get(key) or _Cell()
            out.append({"t": minute * 60, "succeeded": cell.succeeded, "failed": cell.failed,
                        "p50": percentile(cell.runtimes, 0.5), "p95": percentile(cell.runtimes, 0.95)})
        return out

    def keys(self) -> dict[str, list[str]]:
        tasks: set[str] = set()
        queues: set[str] = set()
        for cells in self.minutes.values():
            tasks.update(cells.get("task", {}))
            queues.update(cells.get("queue", {}))
        return {"tasks": sorted(t for t in tasks if t), "queues": sorted(q for q in queues if q)}


class Model:
    """Task rows, workers, queues, dead letters and counts; fed by ``Feed``, read by the web app."""

    def __init__(self, limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"history limit must be at least 1, not {limit}")
        self.limit = limit
        self.version = 0
        self.rows: OrderedDict[str, TaskRow] = OrderedDict()
        """By last change, oldest first (what a live update and eviction walk)."""
        self.seen = 0
        """Calls published since the history starts (rows let go included): retries and replays
        are not new calls."""
        self.totals: Counter[str] = Counter()
        """Outcome and retry events seen, by state: the one source of every count shown."""
        self.by_worker: dict[str, Counter[str]] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.queues: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []
        self.dead_total = 0
        self.error = ""
        self.dropped = 0
        """Malformed events, records and replies left out."""
        self.series = Series()
        self.history_from: float | None = None
        """When the oldest event the history holds happened (None: no history stream)."""

    # -- rows ----------------------------------------------------------------------------------
    def touch(self) -> int:
        self.version += 1
        return self.version

    def task(self, task_id: str) -> TaskRow | None:
        return self.rows.get(task_id)

    def row(self, task_id: str, name: str) -> TaskRow:
        row = self.rows.get(task_id)
        if row is None:
            row = self.rows[task_id] = TaskRow(id=task_id, name=name or "?")
            while len(self.rows) > self.limit:
                self.rows.popitem(last=False)
        elif name and row.name == "?":
            row.name = name
        return row

    def changed(self, row: TaskRow) -> None:
        if row.state in FINAL_STATES and row.started is not None and row.finished is not None:
            row.runtime = max(0.0, row.finished - row.started)
        if row.state == State.SUCCESS:
            row.error = ""  # an earlier attempt's exception
        row.version = self.touch()
        self.rows.move_to_end(row.id)

    def publish(self, task_id: str, name: str, queue: str, args: str, *, msg_id: str = "", retries: int = 0,  # noqa: PLR0913 - the fields of an event, keyword-only
                scheduled: bool = False, replayed: bool = False, parent_id: str = "", root_id: str = "",
                ts: float | None = None) -> None:
        """A task message published (a new call, a retry, a replay or a schedule)."""
        row = self.row(task_id, name)
        if msg_id and msg_id == row.msg_id:
            return  # a duplicate publish, which JetStream dropped
        ts = time.time() if ts is None else ts
        if not row.msg_id and not retries and not replayed:
            self.seen += 1  # a new call (a row made again after the index let it go is not counted twice)
        row.msg_id = msg_id or row.msg_id or "?"
        row.queue, row.args, row.sent = queue or row.queue, args or row.args, ts
        row.parent_id, row.root_id = parent_id or row.parent_id, root_id or row.root_id
        row.retries = max(row.retries, retries)
        if row.state in FINAL_STATES or scheduled or replayed:
            row.started = row.finished = row.runtime = None
            row.error = row.error if scheduled else ""
        row.state = SCHEDULED if scheduled else PENDING
        row.note(ts, "scheduled" if scheduled else "replayed" if replayed else "retry sent" if retries else "sent",
                 queue)
        self.changed(row)

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Apply one lifecycle event (``events.decode_batch`` has dropped malformed ones; values of
        unexpected types are ignored here too: an event is dropped, never the page)."""
        kind, ts, worker = event.get("type"), event.get("ts"), event.get("worker")
        if not isinstance(kind, str):
            return
        ts = float(ts) if is_number(ts) else time.time()
        worker = worker if is_ident(worker) else ""
        if kind.startswith("worker-"):
            self._worker_event(kind, worker, event)
            return
        task_id = event.get("id")
        if not kind.startswith("task-") or not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
            return
        if kind == "task-sent":
            self._sent_event(task_id, ts, event)
            return
        row = self.row(task_id, task_name(event.get("name")))
        row.worker = worker or row.worker
        retries = event.get("retries")
        if type(retries) is int and retries >= 0:
            row.retries = retries
        if kind == "task-started":
            if row.started == ts:
                return  # seen already (history and live overlap)
            row.started = ts
            row.note(ts, "started", worker)
            if row.state not in FINAL_STATES:  # else the outcome's record came in first
                row.state = State.STARTED.value
        elif kind == "task-retried":
            if any(t == ts and what == "retried" for t, what, _ in row.timeline):
                return
            row.state = State.RETRY.value
            row.error = error_text(event.get("exc_type"), event.get("message"))
            row.note(ts, "retried", row.error)
            self._count(row, State.RETRY.value, worker, ts, None)
        elif kind in ("task-succeeded", "task-failed", "task-revoked", "task-finished"):
            state = task_state(event.get("state")) or OUTCOMES.get(kind, "FINISHED")
            if row.finished == ts and row.state == state:
                return  # seen already
            row.state, row.finished = state, ts
            if kind == "task-failed":
                row.error = error_text(event.get("exc_type"), event.get("message"))
            elif kind == "task-revoked" and isinstance(event.get("reason"), str):
                row.error = f"revoked: {event['reason']}"[:500]
            row.note(ts, state.lower(), row.error if state != State.SUCCESS else "")
            runtime = max(0.0, ts - row.started) if row.started is not None else None
            self._count(row, state, worker, ts, runtime)
        else:
            return
        self.changed(row)

    def _sent_event(self, task_id: str, ts: float, event: Mapping[str, Any]) -> None:
        """A publish the dashboard recorded in the history (events carry no arguments otherwise)."""

        def text(key: str) -> str:
            value = event.get(key)
            return value if isinstance(value, str) else ""

        row = self.rows.get(task_id)
        if row is not None and row.sent is not None and row.sent >= ts:
            return
        if row is not None and row.activity > ts:
            # Recorded after the worker's events of the same call (the dashboard batches its records):
            # fill in what only the publish carries, keep the state the events gave.
            row.queue = row.queue or text("queue")[:200]
            row.args = row.args or text("args")[:1000]
            row.parent_id = row.parent_id or text("parent_id")[:100]
            row.root_id = row.root_id or text("root_id")[:100]
            row.sent = ts
            bisect.insort(row.timeline, (ts, "sent", row.queue))
            self.changed(row)
            return
        self.publish(task_id, task_name(event.get("name")), text("queue")[:200], text("args")[:1000],
                     retries=r if type(r := event.get("retries")) is int and r >= 0 else 0,
                     scheduled=event.get("scheduled") is True, replayed=event.get("replayed") is True,
                     parent_id=text("parent_id")[:100], root_id=text("root_id")[:100], ts=ts)

    def _count(self, row: TaskRow, state: str, worker: str, ts: float, runtime: float | None) -> None:
        self.totals[state] += 1
        if worker and (worker in self.by_worker or len(self.by_worker) < MAX_WORKERS):
            self.by_worker.setdefault(worker, Counter())[state] += 1
        if state != State.RETRY:
            self.series.add(ts, row.name, row.queue, state, runtime)

    def _worker_event(self, kind: str, worker: str, event: Mapping[str, Any]) -> None:
        fields = check_fields({k: v for k, v in event.items() if k not in ("type", "ts", "worker", "id", "name")})
        if not worker or fields is None or (worker not in self.workers and len(self.workers) >= MAX_WORKERS):
            self.dropped += 1
            return
        info = self.workers.setdefault(worker, {"worker": worker})
        info.update(fields)
        info["status"] = "offline" if kind == "worker-offline" else "online"
        info["last_seen"] = time.time()
        self.touch()

    def on_result(self, task_id: str, record: object) -> None:
        """A result record stored in the results bucket: error messages and custom states."""
        state = task_state(record.get("state")) if isinstance(record, dict) else ""
        if not state or not TASK_ID_RE.match(task_id) or not isinstance(record, dict):
            self.dropped += 1
            return
        name = task_name(record.get("task"))
        if task_id not in self.rows and not name:
            return
        row = self.row(task_id, name)
        if row.state in FINAL_STATES and state not in FINAL_STATES:
            return  # a progress record overtaken by the outcome
        info: dict[str, Any] = record["info"] if isinstance(record.get("info"), dict) else {}
        row.state = state
        worker = record.get("worker") if is_ident(record.get("worker")) else info.get("worker")
        row.worker = worker if is_ident(worker) else row.worker
        if state in (State.FAILURE, State.RETRY):
            source: dict[str, Any] = record if state == State.FAILURE else info
            row.error = error_text(source.get("exc_type"), source.get("message"))
        if state in FINAL_STATES and row.finished is None:
            done = record.get("date_done")
            row.finished = float(done) if is_number(done) else time.time()
        self.changed(row)

    def worker_stats(self, replies: list[dict[str, Any]], heartbeat: float) -> None:
        """``inspect stats`` replies: gauges of the workers that answered; silent ones age out."""
        now = time.time()
        for reply in replies:
            ident = reply.get("worker")
            fields = check_fields({k: v for k, v in reply.items() if k != "worker"})
            if not is_ident(ident) or fields is None or (ident not in self.workers
                                                         and len(self.workers) >= MAX_WORKERS):
                self.dropped += 1
                continue
            info = self.workers.setdefault(ident, {"worker": ident})
            info.update(fields, status="online", last_seen=now)
        for ident, info in list(self.workers.items()):
            silent = now - float(info.get("last_seen") or 0)
            if info.get("status") == "online" and silent > 3 * heartbeat:
                info["status"] = "unresponsive"
            if info.get("status") != "online" and silent > 300:
                del self.workers[ident]

    # -- views ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Every count the page shows, from one place."""
        return {"seen": self.seen, "succeeded": self.totals[State.SUCCESS.value],
                "failed": self.totals[State.FAILURE.value], "retried": self.totals[State.RETRY.value],
                "revoked": self.totals[State.REVOKED.value], "indexed": len(self.rows),
                "dead_letters": self.dead_total}

    def worker_rows(self) -> list[dict[str, Any]]:
        out = []
        for ident in sorted(set(self.workers) | set(self.by_worker)):
            info = dict(self.workers.get(ident) or {"worker": ident, "status": "offline"})
            counted = self.by_worker.get(ident, Counter())
            # The worker's own processed/failed count since its start, not since the history's:
            # left out so that one count never disagrees with another.
            info.pop("processed", None)
            info.pop("failed", None)
            info.update(succeeded=counted[State.SUCCESS.value], failed=counted[State.FAILURE.value],
                        retried=counted[State.RETRY.value])
            out.append(info)
        return out

    def summary(self, app: str, prefix: str) -> dict[str, Any]:
        return {"app": app, "prefix": prefix, "error": self.error, "queues": self.queues,
                "workers": self.worker_rows(), "counts": self.counts(), "seen": self.seen,
                "dropped": self.dropped, "history_from": self.history_from,
                "dead_letters": {"total": self.dead_total, "entries": self.dead_letters}}

    def newest(self) -> Iterator[TaskRow]:
        return reversed(self.rows.values())

    def changes(self, since: int = 0, limit: int = MAX_CHANGES) -> list[dict[str, Any]]:
        """Rows changed after version ``since``, newest first, at most ``limit``."""
        out: list[dict[str, Any]] = []
        for row in self.newest():
            if row.version <= since or len(out) >= limit:
                break
            out.append(row.as_dict())
        return out

    def recent(self, limit: int = 200, failed: int = 100) -> list[dict[str, Any]]:
        """The newest rows, and the newest failed ones (so a burst of successes does not hide them)."""
        out: list[dict[str, Any]] = []
        bad = 0
        for row in self.newest():
            if len(out) < limit:
                out.append(row.as_dict())
            elif row.state == State.FAILURE and bad < failed:
                out.append(row.as_dict())
            if row.state == State.FAILURE:
                bad += 1
            if len(out) >= limit and bad >= failed:
                break
        return out

    def search(self, query: Query) -> tuple[list[dict[str, Any]], int]:
        """One page of matching rows, newest activity first, and how many match in all."""
        matching = [row for row in self.rows.values() if query.matches(row)]
        keys = [row.activity for row in matching]
        order = sorted(range(len(matching)), key=keys.__getitem__, reverse=True)
        limit = max(1, min(query.limit, MAX_PAGE))
        page = [matching[i].as_dict() for i in order[max(0, query.offset):max(0, query.offset) + limit]]
        return page, len(matching)

    def children(self, task_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows.values() if r.parent_id == task_id][:limit]

    def workflow(self, root_id: str, limit: int = 200) -> list[dict[str, Any]]:
        rows = [r for r in self.rows.values() if r.root_id == root_id or r.id == root_id]
        rows.sort(key=lambda r: r.sent or 0.0)
        return [r.as_dict() for r in rows[:limit]]


__all__ = ["DEFAULT_HISTORY_LIMIT", "Model", "Query", "Series", "TaskRow"]
