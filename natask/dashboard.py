"""``natask dashboard``: one web page doing Flower's job — queues, workers, recent and failed tasks,
dead letters with a replay button — served by a small asyncio HTTP server with Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import re
import socket
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from .broker import Message
from .control import inspect
from .dlq import DeadLetter, DeadLetterNotFound, DeadLetters, parse_count
from .errors import ConfigError, NataskError
from .events import MAX_NAME, EventStream, check_fields, follow, is_ident, is_number
from .http import MAX_CONNECTIONS
from .message import Envelope, loads
from .naming import HDR_MSG_ID, HDR_REPLAYS, HDR_RETRIES, HDR_SCHEDULE_TARGET, TASK_ID_RE
from .states import FINAL_STATES, State
from .worker import HEARTBEAT_INTERVAL

if TYPE_CHECKING:
    from .app import Natask

log = logging.getLogger("natask.dashboard")

DEFAULT_PORT: Final = 5555
"""Flower's port: an operator's muscle memory."""
MAX_TASKS: Final = 200
"""Recent tasks kept (and shown)."""
MAX_FAILED: Final = 100
"""Failed tasks kept apart, so a burst of successes does not push them out."""
MAX_DEAD_LETTERS: Final = 100
"""Newest dead letters shown."""
MAX_WORKERS: Final = 1000
"""Workers tracked at most (idents come from events anyone allowed to publish them may send)."""
MAX_QUEUES: Final = 1000
"""Queues seen in publishes tracked at most."""
MAX_STATE: Final = 40
"""Longest task state shown (custom states of ``update_state`` included)."""
PREVIEW_CHARS: Final = 200
"""Longest argument preview."""
REFRESH: Final = 1.0
"""Seconds between queue and dead-letter readings."""
WORKER_POLL: Final = 3.0
"""Seconds between ``inspect stats`` rounds (events update workers in between)."""
RATE_WINDOW: Final = 10.0
"""Seconds of queue readings a rate is computed over."""
MAX_DECODE: Final = 1024 * 1024
"""Larger task messages and result records are not decoded (their id and name come from headers)."""
KEEPALIVE: Final = 15.0
"""Seconds between comment lines on an idle event stream (proxies close silent connections)."""
STOP_TIMEOUT: Final = 5.0
"""Seconds ``stop()`` waits for each background job and unsubscribe before going on without it."""
REDACTED: Final = "***"

_OUTCOME_STATES: Final = {"task-succeeded": State.SUCCESS.value, "task-failed": State.FAILURE.value,
                           "task-revoked": State.REVOKED.value}
_SECRET_KEY: Final = re.compile(
    r"passw|passphrase|pwd|secret|token|key|auth|credential|creds|jwt|bearer|cookie|session|signature|card|cvv"
    r"|cvc|ssn|iban|^pass$|^pin$", re.IGNORECASE)
_SECRET_PART: Final = frozenset({"pw", "otp", "totp", "hotp"})
"""Secret names too short to look for inside words: hidden only as a whole part of a key (``db_pw``,
``user-otp``, ``otpCode``), so ``pwm``, ``upward`` or ``footprint`` stay visible."""
_NAME_PART: Final = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1")
_ANY_ADDRESS: Final = ("0.0.0.0", "::", "")
_SIOCGIFADDR: Final = 0x8915
"""Linux ioctl: an interface's IPv4 address."""
_REPLAY_PATH: Final = re.compile(r"^/api/dlq/([^/]+)/replay$")
_QUEUE_RE: Final = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]{0,199}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_REASONS: Final = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                   405: "Method Not Allowed", 409: "Conflict", 500: "Internal Server Error"}


# -- argument previews -------------------------------------------------------------------------
class _Cut:
    def __repr__(self) -> str:
        return "…"


_CUT: Final = _Cut()


def is_secret(key: object) -> bool:
    """Whether a mapping key or keyword names something to hide (password, api_key, card_number...)."""
    if not isinstance(key, str):
        return False
    return bool(_SECRET_KEY.search(key)) or any(part.lower() in _SECRET_PART for part in _NAME_PART.findall(key))


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with the values of secret-looking keys replaced, at any depth (containers
    cut to what a preview can show)."""
    if depth > 8:
        return _CUT
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret(k) else redact(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [redact(v, depth + 1) for v in list(value)[:50]]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def preview(args: Any, kwargs: Mapping[str, Any], limit: int = PREVIEW_CHARS) -> str:
    """``(1, 'a', password='***')``: the call's arguments, redacted, at most ``limit`` characters."""
    parts = [_short_repr(redact(a), limit) for a in list(args)[:50]]
    parts += [f"{k}={REDACTED!r}" if is_secret(k) else f"{k}={_short_repr(redact(v), limit)}"
              for k, v in list(kwargs.items())[:50]]
    text = "(" + ", ".join(parts) + ")"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_repr(value: Any, limit: int) -> str:
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit]


# -- binding -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, allow_insecure: bool, opt_out: str = "allow_insecure=True") -> None:
    """Refuse to serve the dashboard, which has no authentication yet, beyond loopback unless the
    caller opted out (``opt_out`` names how, for the message)."""
    if not allow_insecure and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without authentication: anyone who reaches it can read "
            f"tasks and replay dead letters. Bind 127.0.0.1 (tunnel or proxy to it), or pass {opt_out}"
        )


def _split_host(value: str) -> tuple[str, int | None]:
    """A Host header as (lower-cased name or address, port or None): ``[::1]:80`` -> ``('::1', 80)``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    try:
        return name.rstrip("."), int(port) if port else None
    except ValueError:
        return name, -1  # never matches


def local_names(host: str) -> frozenset[str]:
    """The names a browser may use to reach a dashboard bound to ``host``: that address, this
    machine's host names and their addresses, and (bound to every interface) every interface's
    address."""
    names = {host.strip("[]").lower(), *_LOOPBACK, socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names.update(str(info[4][0]).lower() for info in socket.getaddrinfo(socket.gethostname(), None))
    if host in _ANY_ADDRESS:
        names.update(_interface_addresses())
    return frozenset(names)


def _interface_addresses() -> set[str]:
    addresses: set[str] = set()
    if not sys.platform.startswith("linux"):
        return addresses
    import fcntl
    import struct

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                addresses.add(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            addresses.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    return addresses


# -- what the page shows -----------------------------------------------------------------------
@dataclass
class TaskRow:
    """One task as the dashboard has seen it (publishes, events, result records)."""

    id: str
    name: str
    queue: str = ""
    state: str = State.PENDING.value
    args: str = ""
    sent: float | None = None
    started: float | None = None
    finished: float | None = None
    runtime: float | None = None
    worker: str = ""
    retries: int = 0
    error: str = ""
    version: int = 0
    msg_id: str = field(default="", repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["msg_id"]
        return d


@dataclass
class _Reading:
    at: float
    done: int
    sent: int


class Dashboard:
    """The state behind the page, fed by core subscriptions (every task publish, every result
    record), lifecycle events and periodic readings; plus the HTTP server that serves it."""

    def __init__(self, app: Natask, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 refresh: float = REFRESH, *, allow_insecure: bool = False, allowed_hosts: Iterable[str] = ()) -> None:
        check_binding(host, allow_insecure)
        self.app = app
        self.host = host
        self.allowed_hosts = frozenset(_split_host(h)[0] for h in allowed_hosts)
        """Extra names (``--allowed-host``) a non-loopback dashboard may be reached by, on any port."""
        self._local_names: frozenset[str] = frozenset()
        self.port = port
        self.refresh = refresh
        self.prefix = app.config.subject_prefix
        self.version = 0
        self.tasks: OrderedDict[str, TaskRow] = OrderedDict()
        self.failed: OrderedDict[str, TaskRow] = OrderedDict()
        self.workers: dict[str, dict[str, Any]] = {}
        self.queues: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []
        self.dead_total = 0
        self.error = ""
        self.seen = 0
        self.dropped = 0  # malformed events, result records and replies left out
        self._events = EventStream(app)
        self._sent_by_queue: dict[str, int] = {}
        self._readings: dict[str, deque[_Reading]] = {}
        self._started = time.monotonic()
        self._dlq_dirty = True
        self._dlq_checked = 0.0
        self._workers_polled = 0.0
        self._wake = asyncio.Event()
        self._listeners: set[asyncio.Event] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._subs: list[Any] = []
        self._jobs: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self._page = resources.files("natask").joinpath("dashboard.html").read_bytes()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}/"

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if not is_loopback(self.host):
            self._local_names = local_names(self.host)
        # Listen first: a busy port fails at once, before a connection or a background job exists
        # (cancelling a subscribe's flush half-way can leave nats-py's connection unusable).
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            broker = await self.app.client.broker()
            for subject, cb in ((f"{self.prefix}.>", self._on_publish),
                                (f"$KV.{self.app.names.results_bucket}.>", self._on_result),
                                (f"natask.dlq.{self.prefix}.>", self._on_dead_letter)):
                self._subs.append(await broker.subscribe(subject, cb=cb))
            self._jobs = [asyncio.create_task(self._follow_events()), asyncio.create_task(self._poll())]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        self._closing = True  # the jobs' loops end on this even if a cancellation gets lost
        pending, deadline = set(self._jobs), time.monotonic() + STOP_TIMEOUT
        while pending and time.monotonic() < deadline:
            # Before Python 3.12, asyncio.wait_for (inside nats-py's flush) can drop a cancellation
            # that arrives as its result does: cancel again until the job is gone.
            for job in pending:
                job.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), STOP_TIMEOUT)
        if self._server is not None:
            self._server.close()
        for listener in self._listeners:
            listener.set()  # event streams end (cancelling a handler would upset asyncio.streams)
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _touch(self) -> int:
        self.version += 1
        for listener in self._listeners:
            listener.set()
        return self.version

    # -- feeds -------------------------------------------------------------------------------
    def _row(self, task_id: str, name: str) -> TaskRow:
        row = self.tasks.get(task_id) or self.failed.get(task_id)
        if row is None:
            row = TaskRow(id=task_id, name=name or "?")
            self.seen += 1
        elif name and row.name == "?":
            row.name = name
        self.tasks[task_id] = row
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > MAX_TASKS:
            self.tasks.popitem(last=False)
        return row

    def _changed(self, row: TaskRow) -> None:
        if row.state in FINAL_STATES and row.started is not None and row.finished is not None:
            row.runtime = max(0.0, row.finished - row.started)
        if row.state == State.SUCCESS:
            row.error = ""  # an earlier attempt's exception
        row.version = self._touch()
        if row.state == State.FAILURE:
            self.failed[row.id] = row
            self.failed.move_to_end(row.id)
            while len(self.failed) > MAX_FAILED:
                self.failed.popitem(last=False)

    async def _on_publish(self, msg: Message) -> None:
        """Every task publish (the audit pattern): a new call, a retry, a replay or a schedule."""
        headers = msg.headers or {}
        rest = msg.subject[len(self.prefix) + 1:]
        scheduled = rest.startswith("_sched.")
        queue = ([*rest.split(".", 2), ""][1]) if scheduled else rest.split(".", 1)[0]
        if not _QUEUE_RE.match(queue):
            return  # not a task subject natask would publish
        msg_id = headers.get(HDR_MSG_ID, "")
        target = headers.get(HDR_SCHEDULE_TARGET, "") if scheduled else msg.subject
        route = self.app.names.task_from_subject(target) if isinstance(target, str) else None
        task_id, name, args = msg_id.split(":", 1)[0], route[1] if route else "", ""
        if len(msg.data) <= MAX_DECODE:
            try:
                env = Envelope.decode(msg.data, headers)
                task_id, name, args = env.id, env.task, preview(env.args, env.kwargs)
            except NataskError:
                args = f"<undecodable, {len(msg.data)} bytes>"
        else:
            args = f"<{len(msg.data)} bytes>"
        if not TASK_ID_RE.match(task_id):
            return
        if queue in self._sent_by_queue or len(self._sent_by_queue) < MAX_QUEUES:
            self._sent_by_queue[queue] = self._sent_by_queue.get(queue, 0) + (not scheduled)
        row = self._row(task_id, name)
        if msg_id and msg_id == row.msg_id:
            return  # a duplicate publish, which JetStream dropped
        row.msg_id = msg_id
        row.queue, row.args, row.sent = queue, args, time.time()
        row.retries = max(row.retries, parse_count(headers.get(HDR_RETRIES)))
        if row.state in FINAL_STATES or scheduled or HDR_REPLAYS in headers:
            row.started = row.finished = row.runtime = None
            row.error = row.error if scheduled else ""
        row.state = "SCHEDULED" if scheduled else State.PENDING.value
        self._changed(row)

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Apply one lifecycle event (``natask.events.<prefix>.*``). ``decode_batch`` has dropped
        malformed events already; values of unexpected types are ignored here too (an event is
        dropped, never the subscription or the page)."""
        kind, ts, worker = event.get("type"), event.get("ts"), event.get("worker")
        if not isinstance(kind, str):
            return
        ts = float(ts) if is_number(ts) else time.time()
        worker = worker if is_ident(worker) else ""
        if kind.startswith("worker-"):
            fields = check_fields({k: v for k, v in event.items() if k not in ("type", "ts", "worker", "id", "name")})
            if not worker or fields is None or (worker not in self.workers and len(self.workers) >= MAX_WORKERS):
                self.dropped += 1
                return
            info = self.workers.setdefault(worker, {"worker": worker})
            info.update(fields)
            info["status"] = "offline" if kind == "worker-offline" else "online"
            info["last_seen"] = time.time()
            self._touch()
            return
        task_id = event.get("id")
        if not kind.startswith("task-") or not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
            return
        row = self._row(task_id, _task_name(event.get("name")))
        row.worker = worker or row.worker
        retries = event.get("retries")
        if type(retries) is int and retries >= 0:
            row.retries = retries
        if kind == "task-started":
            row.started = ts
            if row.state not in FINAL_STATES:  # else the outcome's record came in first
                row.state = State.STARTED.value
        elif kind == "task-retried":
            row.state = State.RETRY.value
            row.error = _error_text(event.get("exc_type"), event.get("message"))
        elif kind in ("task-succeeded", "task-failed", "task-revoked", "task-finished"):
            row.state = _state(event.get("state")) or _OUTCOME_STATES.get(kind, "FINISHED")
            row.finished = ts
        else:
            return
        self._changed(row)

    async def _follow_events(self) -> None:
        while not self._closing:
            try:
                async for event in follow(self.app, stream=self._events):
                    try:
                        self.on_event(event)
                    except Exception:  # one odd event must not end the subscription
                        self.dropped += 1
                        log.debug("dashboard: event %r not applied", event, exc_info=True)
                log.warning("events: the subscription ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("events: %s; resubscribing", e)
            await asyncio.sleep(self.refresh)

    async def _on_result(self, msg: Message) -> None:
        """A result record stored in the results bucket: error messages and custom states."""
        if not msg.data or len(msg.data) > MAX_DECODE or (msg.headers or {}).get("KV-Operation"):
            return
        try:
            record = loads(msg.data)
        except NataskError:
            return
        state = _state(record.get("state")) if isinstance(record, dict) else ""
        task_id = msg.subject.rsplit(".", 1)[-1]
        if not state or not TASK_ID_RE.match(task_id):
            self.dropped += 1
            return
        name = _task_name(record.get("task"))
        if task_id not in self.tasks and task_id not in self.failed and not name:
            return
        row = self._row(task_id, name)
        if row.state in FINAL_STATES and state not in FINAL_STATES:
            return  # a progress record overtaken by the outcome
        info: dict[str, Any] = record["info"] if isinstance(record.get("info"), dict) else {}
        row.state = state
        worker = record.get("worker") if is_ident(record.get("worker")) else info.get("worker")
        row.worker = worker if is_ident(worker) else row.worker
        if state in (State.FAILURE, State.RETRY):
            source: dict[str, Any] = record if state == State.FAILURE else info
            row.error = _error_text(source.get("exc_type"), source.get("message"))
        if state in FINAL_STATES and row.finished is None:
            done = record.get("date_done")
            row.finished = float(done) if is_number(done) else time.time()
        self._changed(row)

    async def _on_dead_letter(self, msg: Message) -> None:
        self._dlq_dirty = True
        self._wake.set()

    # -- readings ----------------------------------------------------------------------------
    async def _poll(self) -> None:
        while not self._closing:
            try:
                await self.read()
                self.error = ""
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the server may be away: show it, keep trying
                log.warning("dashboard refresh failed: %s", e)
                self.error = str(e) or type(e).__name__
            self._touch()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh)

    async def read(self) -> None:
        """Queues with rates, dead letters (when changed), workers (every few seconds)."""
        now = time.monotonic()
        jobs = [self._read_queues()]
        if self._dlq_dirty or now - self._dlq_checked > 10 * self.refresh:
            jobs.append(self._read_dead_letters())
        if now - self._workers_polled > WORKER_POLL:
            self._workers_polled = now
            jobs.append(self._read_workers())
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _read_queues(self) -> None:
        broker = await self.app.client.broker()
        now = time.monotonic()
        queues = []
        for c in await broker.consumer_states(self.app.names.stream):
            queues.append({"name": c.name, "pending": c.pending, "in_flight": c.in_flight,
                           "redelivered": c.redelivered, "waiting_pulls": c.waiting_pulls,
                           "consumer": True, **self._rates(c.name, now, c.delivered - c.in_flight)})
        known = {q["name"] for q in queues}
        for name in sorted(set(self._sent_by_queue) - known):  # sent to, but no worker has consumed yet
            subject = self.app.names.queue_filter(name)
            state = await broker.stream_state(self.app.names.stream, subject)
            waiting = sum(state.subjects.values()) if state is not None else 0
            queues.append({"name": name, "pending": waiting, "in_flight": 0, "redelivered": 0,
                           "waiting_pulls": 0, "consumer": False, **self._rates(name, now, 0)})
        self.queues = sorted(queues, key=lambda q: str(q["name"]))

    def _rates(self, queue: str, now: float, done: int) -> dict[str, float]:
        readings = self._readings.setdefault(queue, deque([_Reading(self._started, done, 0)]))
        readings.append(_Reading(now, done, self._sent_by_queue.get(queue, 0)))
        while len(readings) > 2 and now - readings[0].at > RATE_WINDOW:
            readings.popleft()
        first, span = readings[0], now - readings[0].at
        if span <= 0:
            return {"in_rate": 0.0, "out_rate": 0.0}
        return {"in_rate": round(max(0, readings[-1].sent - first.sent) / span, 2),
                "out_rate": round(max(0, done - first.done) / span, 2)}

    async def _read_dead_letters(self) -> None:
        self._dlq_dirty, self._dlq_checked = False, time.monotonic()
        dlq = DeadLetters(self.app)
        (entries, _), self.dead_total = await asyncio.gather(dlq.page(MAX_DEAD_LETTERS), dlq.count())
        dead = []
        for e in entries:  # newest first
            info = e.as_dict()
            try:
                env = Envelope.decode(e.data)
                info["args"] = preview(env.args, env.kwargs)
            except NataskError:
                info["args"] = f"<undecodable, {len(e.data)} bytes>"
            dead.append(info)
        self.dead_letters = dead

    async def _read_workers(self) -> None:
        replies = await inspect(self.app, "stats", timeout=0.5)
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
            if info.get("status") == "online" and silent > 3 * HEARTBEAT_INTERVAL:
                info["status"] = "unresponsive"
            if info.get("status") != "online" and silent > 300:
                del self.workers[ident]

    # -- views -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        workers = sorted(self.workers.values(), key=lambda w: str(w.get("worker")))
        return {"app": self.app.name, "prefix": self.prefix, "error": self.error, "queues": self.queues,
                "workers": workers, "seen": self.seen, "dropped": self.dropped + self._events.dropped,
                "dead_letters": {"total": self.dead_total, "entries": self.dead_letters}}

    def tasks_since(self, version: int = 0) -> list[dict[str, Any]]:
        """Task rows (recent and failed) changed after ``version``; all of them for 0."""
        rows = {r.id: r for r in (*self.failed.values(), *self.tasks.values()) if r.version > version}
        return [r.as_dict() for r in rows.values()]

    def state(self) -> dict[str, Any]:
        """The whole picture (``/api/state``, and the first event of a stream)."""
        return {"version": self.version, "now": time.time(), "full": True, "tasks": self.tasks_since(),
                "summary": self.summary()}

    async def replay(self, entry_id: str) -> DeadLetter:
        entry = await DeadLetters(self.app).replay(entry_id)
        self._dlq_dirty = True
        self._wake.set()
        return entry

    # -- HTTP --------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:
            writer.transport.abort()  # idle or slow clients must not take every file descriptor
            return
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}
            path = target.split("?", 1)[0]
            if not self._host_allowed(headers.get("host", "")):
                await _respond(writer, 403, "text/plain", b"unknown Host header\n")
            elif path == "/api/events" and method == "GET":
                await self._stream(writer)
            else:
                await _respond(writer, *await self._route(method, path, headers))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError,
                ValueError):
            pass  # a client that went away or spoke nonsense
        except Exception:
            log.exception("dashboard: request failed")
        finally:
            writer.close()

    def _host_allowed(self, host: str) -> bool:
        """Only names of this machine (and ``allowed_hosts``) may be used in the Host header: a
        DNS-rebinding page reaches the dashboard under a name of its own."""
        if is_loopback(self.host):
            bound = f"[{self.host}]" if ":" in self.host else self.host
            return host in {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", bound)}
        name, port = _split_host(host)
        if name in self.allowed_hosts:
            return True  # e.g. a reverse proxy's name, on its own port
        return name in self._local_names and (port or 80) == self.port

    async def _route(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        if path == "/":
            return (200, "text/html; charset=utf-8", self._page) if method == "GET" else _not_allowed()
        if path == "/api/state":
            return (200, "application/json", _json(self.state())) if method == "GET" else _not_allowed()
        if path == "/favicon.ico":
            return 204, "image/x-icon", b""
        replay = _REPLAY_PATH.match(path)
        if replay is None:
            return 404, "application/json", _json({"error": "not found"})
        if method != "POST":
            return _not_allowed()
        # A custom header cannot be sent cross-origin without a CORS preflight, which we never allow.
        origin = headers.get("origin", "")
        if headers.get("x-natask-dashboard") != "1" or (origin and origin.partition("://")[2] != headers.get("host")):
            return 403, "application/json", _json({"error": "cross-origin request refused"})
        entry_id = unquote(replay.group(1))
        try:
            entry = await self.replay(entry_id)
        except DeadLetterNotFound as e:
            return 404, "application/json", _json({"error": str(e)})
        except NataskError as e:
            return 409, "application/json", _json({"error": str(e)})
        except Exception as e:  # an answer, not a closed connection: the page shows it
            log.exception("dashboard: replay of %r failed", entry_id[:100])
            return 500, "application/json", _json({"error": f"replay failed: {type(e).__name__}"})
        return 200, "application/json", _json({"replayed": entry.id, "subject": entry.subject})

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        """Server-Sent Events: the full state first, then the rows changed since, coalesced."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                     b"Connection: keep-alive\r\n\r\n")
        changed = asyncio.Event()
        self._listeners.add(changed)
        try:
            last, last_summary = 0, b""
            while not self._closing:
                changed.clear()
                tasks = self.tasks_since(last)
                message: dict[str, Any] = {"version": self.version, "now": time.time(), "full": last == 0,
                                           "tasks": tasks}
                last = self.version
                summary = self.summary()
                blob = _json(summary)
                if blob != last_summary:
                    message["summary"], last_summary = summary, blob
                if tasks or "summary" in message:
                    writer.write(b"data: " + _json(message) + b"\n\n")
                    await writer.drain()
                while True:
                    try:
                        await asyncio.wait_for(changed.wait(), KEEPALIVE)
                        break
                    except asyncio.TimeoutError:
                        writer.write(b": keepalive\n\n")  # also finds out that the client left
                        await writer.drain()
                if not self._closing:
                    await asyncio.sleep(0.2)  # one message per burst of changes
        finally:
            self._listeners.discard(changed)


def _json(value: Any) -> bytes:
    try:
        return json.dumps(value, default=str, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # NaN or infinity slipped in: JSON.parse would refuse the whole message
        return json.dumps(_finite(value), default=str, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _task_name(value: object) -> str:
    """A task name read from the wire, or "" if it is not one."""
    return value if isinstance(value, str) and len(value) <= MAX_NAME and _NAME_RE.match(value) else ""


def _state(value: object) -> str:
    """A task state read from the wire (natask's or a custom one), or "" if it is not one."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_STATE and value.isprintable() else ""


def _error_text(exc_type: object, message: object) -> str:
    return f"{'' if exc_type is None else exc_type}: {'' if message is None else message}"[:500]


def _not_allowed() -> tuple[int, str, bytes]:
    return 405, "application/json", _json({"error": "method not allowed"})


async def _respond(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes) -> None:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()


async def serve(app: Natask, host: str, port: int, ready: Callable[[str], None], *, allow_insecure: bool = False,
                allowed_hosts: Iterable[str] = ()) -> None:
    """Run the dashboard until cancelled (``natask dashboard``: by its first SIGTERM/SIGINT), then
    close the app."""
    dashboard = Dashboard(app, host, port, allow_insecure=allow_insecure, allowed_hosts=allowed_hosts)
    try:
        async with dashboard:
            ready(dashboard.url)
            await asyncio.Event().wait()
    finally:
        await app.aclose()
