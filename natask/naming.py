"""Every subject, stream, consumer and bucket name natask uses, derived in one place (SPEC §1)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from .errors import ConfigError

_TASK_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_QUEUE_RE: Final = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]*$")
_INBOX_TOKEN_RE: Final = re.compile(r"^[-/_=A-Za-z0-9]+$")

TASK_ID_RE: Final = re.compile(r"^[-/_=A-Za-z0-9]{1,200}$")
"""What a task id may be: it becomes a KV key and a subject token."""

MAX_TASK_NAME: Final = 200
"""Longest task name: names become subject tokens, and a subject built from a longer one (a dead
letter's, say) could pass the server's ``max_control_line`` and cost the connection."""
MAX_QUEUE_NAME: Final = 100
"""Longest queue name (a subject token and a consumer name)."""
MAX_REPLY_SUBJECT: Final = 300
"""Longest reply subject a worker answers on."""
DEFAULT_INBOX_PREFIX: Final = "_INBOX"
"""nats-py's inbox prefix; workers answer only on inbox subjects (see ``is_reply_subject``)."""
KV_KEY_RE: Final = re.compile(r"^[-/_=A-Za-z0-9]+(\.[-/_=A-Za-z0-9]+)*$")
"""A KV key natask accepts from callers: nats-py's key characters, dot-separated, no empty token and no
wildcard (a ``*`` or ``>`` key would read, or delete, many keys at once)."""
MAX_KV_KEY: Final = 1024
"""Longest claim key: it travels in a subject, which must fit the server's control line."""

# -- headers: natask's own (Natask-*) and the NATS ones natask sets or reads for their meaning --
HDR_MSG_ID: Final = "Nats-Msg-Id"
"""JetStream dedupe id: the task id on the first publish, ``<task id>:<n>`` on republishes."""
HDR_TASK: Final = "Natask-Task"
"""The task name, readable with the ``nats`` CLI without decoding the body."""
HDR_REPLY: Final = "Natask-Reply"
"""The caller's inbox subject for the result fast path."""
HDR_SCHEDULE: Final = "Nats-Schedule"
"""Server-held delay (nats-server >= 2.12): ``@at <RFC 3339 time>``."""
HDR_SCHEDULE_TARGET: Final = "Nats-Schedule-Target"
"""The subject a schedule message publishes to when it fires."""
HDR_SCHEDULER: Final = "Nats-Scheduler"
"""Set by the server (and only by it: a client's is refused) on a message a schedule fired: the
schedule's subject."""
HDR_RETRIES: Final = "Natask-Retries"
"""How many times the task was retried before this message (republishes carry it)."""
HDR_SOFT_TIME_LIMIT: Final = "Natask-Soft-Time-Limit"
"""A call's ``soft_time_limit`` (seconds, decimal), over the task's own."""
HDR_TIME_LIMIT: Final = "Natask-Time-Limit"
"""A call's ``time_limit`` (seconds, decimal), over the task's own."""
HDR_SHADOW: Final = "Natask-Shadow"
"""A call's ``shadow``: the name the worker's logs show for it."""
HDR_IGNORE_RESULT: Final = "Natask-Ignore-Result"
"""A call's ``ignore_result=True`` over a task that stores its result: ``1``."""
HDR_OBJECT: Final = "Natask-Object"
"""A claim check: the call's body (empty here) is the object of this name in the app's objects bucket
(``<task id>.args``), put there because it did not fit the server's ``max_payload``."""
RESULT_OBJECT: Final = "result_object"
"""The key of a SUCCESS record whose result did not fit ``max_payload``: the name of the object in the
app's objects bucket holding the whole record (``<task id>.result``)."""
OBJECT_NAME_RE: Final = re.compile(r"^([-/_=A-Za-z0-9]{1,200})\.(args|result)$")
"""An object natask puts in its bucket: ``<task id>.args`` or ``<task id>.result``."""
HDR_CHECK_STORED: Final = "Natask-Check-Stored"
"""``1``: this task id may have been published before (an id the caller chose, a workflow step, a
beat tick, a publish retried across a reconnect), so a worker first looks for a stored final
outcome and skips the run if there is one. JetStream's own dedupe forgets acknowledged ids when the
server restarts; this check does not. Absent on first publishes of generated ids (no read needed)."""
HDR_UNKNOWN_SINCE: Final = "Natask-Unknown-Since"
"""When a worker first met this task's name without knowing it (Unix time): the rolling-deploy
grace is counted from it."""
HDR_DLQ_REASON: Final = "Natask-Dlq-Reason"
"""Why the message was dead-lettered (``unknown task``, ``undecodable``, ``max retries exceeded``...)."""
HDR_DLQ_ERROR: Final = "Natask-Dlq-Error"
"""The exception text, on one line."""
HDR_DLQ_ATTEMPTS: Final = "Natask-Dlq-Attempts"
"""How many times the task was delivered in all."""
HDR_DLQ_TIME: Final = "Natask-Dlq-Time"
"""When it was dead-lettered (Unix time)."""
HDR_DLQ_SUBJECT: Final = "Natask-Dlq-Subject"
"""The subject it was consumed from, where a replay publishes it again."""
HDR_DLQ_ID: Final = "Natask-Dlq-Id"
"""The task id, or ``seq-<stream sequence>`` for a message with no readable id."""
HDR_DLQ_TRUNCATED: Final = "Natask-Dlq-Truncated"
"""The original body's size when it had to be left out (it did not fit ``max_payload`` beside the
dead-letter headers)."""
HDR_REPLAYS: Final = "Natask-Replays"
"""How many times this task was replayed from the DLQ (derives the replay's message id)."""
HDR_RATE_START: Final = "Natask-Rate-Start"
"""``<unix time>/<retries>``: the start this message reserved under its rate limits before it was
handed back to wait as a schedule (trusted only on a message a schedule fired, for the same retry)."""
HDR_CAP_WAITS: Final = "Natask-Cap-Waits"
"""How many times this message found its task's ``max_concurrency`` full (sets the next wait)."""
HDR_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
"""Compare-and-set: the server stores the message only if the subject's last sequence is this
(``0``: the subject holds no message). A KV key is a subject, so this is the KV revision check."""
HDR_TTL: Final = "Nats-TTL"
"""Per-message TTL in whole seconds (nats-server >= 2.11, stream ``allow_msg_ttl``): the server removes
a task message with ``expires`` once it is due, so no worker ever fetches it."""
HDR_KV_OPERATION: Final = "KV-Operation"
"""Header of a KV delete/purge marker (``DEL``/``PURGE``): no record, but a revision."""

MAX_PRIORITY: Final = 9
"""Highest task priority (``priority=0..9``, higher runs first; 0 is the default)."""
_LEVEL_RE: Final = re.compile(r"^_p([1-9])$")
_LEVEL_CONSUMER_RE: Final = re.compile(r"^_p([1-9])_(.+)$")

DLQ_STREAM: Final = "NATASK_DLQ"
"""The dead-letter stream, shared by every app on the account."""


_VALID: Final[set[str]] = set()
"""Task names and subjects validated already (a worker sees the same few again and again)."""
_VALID_MAX: Final = 8192


def _remember(value: str) -> None:
    if len(_VALID) >= _VALID_MAX:  # a flood of distinct names: start over rather than grow
        _VALID.clear()
    _VALID.add(value)


def is_task_name(name: object) -> bool:
    """Whether ``name`` is a valid task name (see ``check_task_name``); never raises."""
    if name in _VALID:
        return True
    if isinstance(name, str) and len(name) <= MAX_TASK_NAME and _TASK_NAME_RE.match(name) is not None:
        _remember(name)
        return True
    return False


def check_task_name(name: str) -> str:
    """Validate a task name: letters, digits, ``_``, ``-``, dot-separated, no empty parts, at most
    ``MAX_TASK_NAME`` characters."""
    if not is_task_name(name):
        raise ConfigError(
            f"invalid task name {_cut(name)}: use letters, digits, '_', '-' and '.' "
            f"(no empty parts, no spaces or wildcards, at most {MAX_TASK_NAME} characters), "
            "e.g. name='orders.process'"
        )
    return name


def is_queue_name(queue: object) -> bool:
    """Whether ``queue`` is a valid queue name: ``[A-Za-z0-9_-]+``, not starting with ``_``."""
    return isinstance(queue, str) and len(queue) <= MAX_QUEUE_NAME and _QUEUE_RE.match(queue) is not None


def is_reply_for(subject: str, task_id: str, prefixes: tuple[str, ...] = (DEFAULT_INBOX_PREFIX,)) -> bool:
    """Whether ``subject`` is an inbox reply subject ending in ``task_id`` (a valid id), as natask's
    producers make them (``<inbox>.<task id>``)."""
    stem, _, last = subject.rpartition(".")
    if last != task_id or not stem:
        return False
    return stem in _VALID or is_reply_subject(subject, prefixes)


def is_reply_subject(subject: object, prefixes: tuple[str, ...] = (DEFAULT_INBOX_PREFIX,)) -> bool:
    """Whether a worker may publish an answer on ``subject``: an inbox (``<prefix>.<token>...``
    for one of ``prefixes``), literal tokens only, bounded. A reply subject comes from the message,
    so anything else (``$KV.…``, ``$JS.…``, a task subject) would let its sender write with the
    worker's rights."""
    if not isinstance(subject, str) or len(subject) > MAX_REPLY_SUBJECT:
        return False
    head, _, rest = subject.partition(".")
    if head not in prefixes or not rest:
        return False
    # Replies to one caller share all but their last token: check that part once.
    stem, _, last = rest.rpartition(".")
    if not _INBOX_TOKEN_RE.match(last):
        return False
    if stem and f"{head}.{stem}" not in _VALID:
        if not all(_INBOX_TOKEN_RE.match(t) for t in stem.split(".")):
            return False
        _remember(f"{head}.{stem}")
    return True


def _cut(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "…"

def _shown(value: object) -> str:
    """A rejected value as an error message quotes it: repr'd, cut to 100 characters."""
    return repr(value[:100]) if isinstance(value, str) else f"a {type(value).__name__}"


def invalid_task_id(task_id: object, what: str = "task id") -> ConfigError:
    """The error for a task id that is not ``TASK_ID_RE``."""
    return ConfigError(
        f"invalid {what} {_shown(task_id)}: use 1 to 200 letters, digits, '_', '-', '=' or '/' "
        "(it is a KV key and a subject token, so no '.', '*', '>' or spaces)"
    )


INSPECT_COMMANDS: Final = ("ping", "stats", "active", "registered", "query_task", "active_queues", "scheduled",
                           "reserved", "revoked", "conf")
"""Control commands that only read a worker's state (``natask inspect``)."""
CONTROL_COMMANDS: Final = ("rate_limit", "time_limit", "add_consumer", "cancel_consumer", "pool_grow", "pool_shrink",
                           "shutdown")
"""Control commands that change a worker (``natask control``); revokes go through the revoked bucket."""
REVOKED_NAME_PREFIX: Final = "name."
"""Key prefix of a revoke by task name or glob in the revoked bucket (a task id has no dot)."""


def revoked_name_key(pattern: str) -> str:
    """The revoked-bucket key of a revoke by task name or glob (a digest: a glob's ``*`` is no key)."""
    return REVOKED_NAME_PREFIX + hashlib.sha256(pattern.encode()).hexdigest()[:32]


def check_task_id(task_id: object) -> str:
    """Validate a task (or group) id before it becomes a KV key or a subject token."""
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise invalid_task_id(task_id)
    return task_id


def check_kv_key(key: object, what: str = "key") -> str:
    """Validate a caller's KV key (``claim``): no wildcard, no empty token, bounded."""
    if not isinstance(key, str) or len(key) > MAX_KV_KEY or not KV_KEY_RE.match(key):
        raise ConfigError(
            f"invalid {what} {_shown(key)}: use up to {MAX_KV_KEY} letters, digits, '_', '-', '=', '/' "
            "and '.' between them (no '*', '>', spaces or empty parts)"
        )
    return key


@dataclass(frozen=True)
class Names:
    """Names on the server for one subject prefix."""

    prefix: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_routes", {})

    @property
    def stream(self) -> str:
        return f"NATASK_{self.prefix.upper()}"

    @property
    def stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.>"]

    def queue_stream(self, queue: str) -> str:
        """The stream of ``queue`` when every queue has its own (``stream_per_queue``):
        ``NATASK_<PREFIX>_q_<queue>``. Unique: the upper-cased prefix has no lower-case letter, so the
        first ``_q_`` ends it, and every other natask stream name is upper-case or starts otherwise."""
        return f"NATASK_{self.prefix.upper()}_q_{queue}"

    def queue_mirror(self, queue: str) -> str:
        """The default name of a mirror of ``queue``'s stream (disaster recovery, ``natask.failover``)."""
        return f"NATASK_{self.prefix.upper()}_mirror_{queue}"

    def queue_stream_subjects(self, queue: str) -> list[str]:
        """What a queue's own stream captures: its task subjects, each priority level's and its
        schedules (a message schedule must target a subject of its own stream)."""
        return [self.queue_filter(queue), *(self.priority_filter(queue, n) for n in range(1, MAX_PRIORITY + 1)),
                f"{self.prefix}._sched.{queue}.>"]

    def queue_of_subject(self, subject: str) -> str | None:
        """The queue a task, priority-level or schedule subject of this prefix belongs to; None for
        anything else."""
        head, _, rest = subject.partition(".")
        if head != self.prefix:
            return None
        first, _, rest = rest.partition(".")
        if first == "_sched" or _LEVEL_RE.match(first) is not None:
            first, _, rest = rest.partition(".")
        return first if rest and is_queue_name(first) else None

    @property
    def events_stream(self) -> str:
        """The dashboard's history of lifecycle events (a limits stream, created by the dashboard)."""
        return f"NATASK_EVENTS_{self.prefix.upper()}"

    @property
    def events_filter(self) -> str:
        """Every lifecycle event subject of this app (``natask.events.<prefix>.<kind>``)."""
        return f"natask.events.{self.prefix}.>"

    @property
    def results_bucket(self) -> str:
        return f"natask_results_{self.prefix}"

    def result_subject(self, task_id: str) -> str:
        """The subject a task's result is stored under (its key in the results bucket)."""
        return f"$KV.{self.results_bucket}.{task_id}"

    @property
    def revoked_bucket(self) -> str:
        return f"natask_revoked_{self.prefix}"

    @property
    def groups_bucket(self) -> str:
        """Saved group results (``GroupResult.save``): the member ids under the group's id."""
        return f"natask_groups_{self.prefix}"

    @property
    def chords_bucket(self) -> str:
        """Chord progress: one key per finished header member, plus fired/sent/failed guards."""
        return f"natask_chords_{self.prefix}"

    @property
    def beat_bucket(self) -> str:
        """The beat's leader lease and last fire times."""
        return f"natask_beat_{self.prefix}"

    @property
    def schedules_bucket(self) -> str:
        """Periodic entries stored at run time (``app.beat.add``, ``natask beat add``): one key per entry."""
        return f"natask_schedules_{self.prefix}"

    @property
    def objects_bucket(self) -> str:
        """Object Store bucket of calls and results larger than ``max_payload`` (claim checks)."""
        return f"natask_objects_{self.prefix}"

    @property
    def claims_bucket(self) -> str:
        return f"natask_claims_{self.prefix}"

    @property
    def dlq_index_bucket(self) -> str:
        """Dead-letter id -> its ``NATASK_DLQ`` sequence, so ``dlq show/replay ID`` need no scan."""
        return f"natask_dlq_{self.prefix}"

    @property
    def rates_bucket(self) -> str:
        """Global rate limits: one key per task, its next free start (GCRA's theoretical arrival time)."""
        return f"natask_rates_{self.prefix}"

    @property
    def caps_bucket(self) -> str:
        """``max_concurrency`` semaphores: one key per task, the leases of its running runs."""
        return f"natask_caps_{self.prefix}"

    @property
    def dlq_filter(self) -> str:
        """This app's part of the shared dead-letter stream."""
        return f"natask.dlq.{self.prefix}.>"

    def task_subject(self, queue: str, task: str) -> str:
        return f"{self.prefix}.{queue}.{task}"

    def queue_filter(self, queue: str) -> str:
        return f"{self.prefix}.{queue}.>"

    def priority_subject(self, queue: str, task: str, priority: int) -> str:
        """The subject of a task sent with ``priority`` 1..9: ``<prefix>._p<N>.<queue>.<task>`` (priority 0
        keeps ``task_subject``). Queue names never start with ``_``, so no queue's filter overlaps it."""
        return f"{self.prefix}._p{priority}.{queue}.{task}"

    def priority_filter(self, queue: str, priority: int) -> str:
        """What the consumer of one priority level of ``queue`` takes."""
        return f"{self.prefix}._p{priority}.{queue}.>"

    def priority_consumer(self, queue: str, priority: int) -> str:
        """The durable consumer of one priority level (1..9) of ``queue``; ``consumer(queue)`` for 0."""
        return f"_p{priority}_{queue}" if priority else queue

    @property
    def consumer_created(self) -> str:
        """The server's advisory subject for every consumer created on the task stream (the consumer's
        name is the last token): workers learn of new priority levels from it."""
        return self.consumers_created(self.stream)

    @staticmethod
    def consumers_created(stream: str) -> str:
        """The consumer-created advisory subject of ``stream`` (a queue's own, with ``stream_per_queue``)."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{stream}.*"

    @staticmethod
    def level_of_consumer(consumer: str) -> tuple[str, int] | None:
        """(queue, priority) of a priority level's consumer name; None for any other name."""
        match = _LEVEL_CONSUMER_RE.match(consumer)
        if match is None or not is_queue_name(match.group(2)):
            return None
        return match.group(2), int(match.group(1))

    def consumer(self, queue: str) -> str:
        return queue

    def schedule_subject(self, queue: str, task_id: str) -> str:
        return f"{self.prefix}._sched.{queue}.{task_id}"

    def rpc_subject(self, queue: str, task: str) -> str:
        return f"natask.rpc.{self.prefix}.{queue}.{task}"

    def dlq_subject(self, queue: str, task: str) -> str:
        return f"natask.dlq.{self.prefix}.{queue}.{task}"

    def rpc_filter(self, queue: str) -> str:
        """The subjects of every RPC call to ``queue`` (a worker subscribes to them in the queue's group)."""
        return f"natask.rpc.{self.prefix}.{queue}.>"

    def broadcast_subject(self, queue: str, task: str) -> str:
        """Core NATS subject of a broadcast task (outside the task stream: never stored)."""
        return f"natask.bcast.{self.prefix}.{queue}.{task}"

    def broadcast_filter(self, queue: str) -> str:
        """Every broadcast to ``queue`` (each worker subscribes without a queue group)."""
        return f"natask.bcast.{self.prefix}.{queue}.>"

    def task_from_broadcast_subject(self, subject: str) -> tuple[str, str] | None:
        """(queue, task name) of a broadcast subject; None if it is not one."""
        return _split(subject, f"natask.bcast.{self.prefix}.")

    def control_subject(self, command: str = "*") -> str:
        """The subject of the control ``command`` (``INSPECT_COMMANDS``, ``CONTROL_COMMANDS``); ``*``:
        every command, as workers subscribe."""
        return f"natask.control.{self.prefix}.{command}"

    def task_from_subject(self, subject: str) -> tuple[str, str] | None:
        """(queue, task name) of a task subject ``<prefix>.<queue>.<task name>``, both validated;
        None for anything else. The subject is what NATS permissions check, so it, not the body,
        says which task a message may run."""
        routes: dict[str, tuple[str, str]] = self._routes  # type: ignore[attr-defined]
        route = routes.get(subject)
        if route is None:
            route = _split(subject, self.prefix + ".")
            if route is None:
                route = self._split_level(subject)
            if route is not None:
                if len(routes) >= _VALID_MAX:
                    routes.clear()
                routes[subject] = route
        return route

    def _split_level(self, subject: str) -> tuple[str, str] | None:
        """(queue, task name) of a priority subject ``<prefix>._p<N>.<queue>.<task name>``."""
        head = self.prefix + "._p"
        if not subject.startswith(head):
            return None
        level, _, rest = subject[len(self.prefix) + 1:].partition(".")
        if _LEVEL_RE.match(level) is None:
            return None
        return _split(rest, "")

    def priority_from_subject(self, subject: str) -> int:
        """The priority a task subject says (0 for ``<prefix>.<queue>.<task>``): read from the
        subject, never the body, like the task's name."""
        head = self.prefix + "._p"
        if subject.startswith(head) and len(subject) > len(head) + 1 and subject[len(head) + 1] == ".":
            digit = subject[len(head)]
            if "1" <= digit <= "9":
                return int(digit)
        return 0

    def is_task_subject(self, subject: str) -> bool:
        """Whether ``subject`` is a task subject of this prefix (``<prefix>.<queue>.<task name>``, no
        wildcard, no schedule): where a dead letter read back from the wire may be replayed to."""
        return self.task_from_subject(subject) is not None

    def task_from_rpc_subject(self, subject: str) -> tuple[str, str] | None:
        """(queue, task name) of an RPC subject ``natask.rpc.<prefix>.<queue>.<task name>``; None if
        it is not one."""
        return _split(subject, f"natask.rpc.{self.prefix}.")


def _split(subject: str, head: str) -> tuple[str, str] | None:
    if not subject.startswith(head):
        return None
    queue, _, task = subject[len(head):].partition(".")
    if not is_queue_name(queue) or not is_task_name(task):
        return None
    return queue, task
