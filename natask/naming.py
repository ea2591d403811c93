"""Every subject, stream, consumer and bucket name natask uses, derived in one place (SPEC §1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from .errors import ConfigError
from .message import TASK_ID_RE

_TASK_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_QUEUE_RE: Final = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]*$")
KV_KEY_RE: Final = re.compile(r"^[-/_=A-Za-z0-9]+(\.[-/_=A-Za-z0-9]+)*$")
"""A KV key natask accepts from callers: nats-py's key characters, dot-separated, no empty token and no
wildcard (a ``*`` or ``>`` key would read, or delete, many keys at once)."""
MAX_KV_KEY: Final = 1024
"""Longest claim key: it travels in a subject, which must fit the server's control line."""

DLQ_STREAM: Final = "NATASK_DLQ"
"""The dead-letter stream, shared by every app on the account."""


def check_task_name(name: str) -> str:
    """Validate a task name: letters, digits, ``_``, ``-``, dot-separated, no empty parts."""
    if not isinstance(name, str) or not _TASK_NAME_RE.match(name):
        raise ConfigError(
            f"invalid task name {name!r}: use letters, digits, '_', '-' and '.' "
            "(no empty parts, no spaces or wildcards), e.g. name='orders.process'"
        )
    return name


def _shown(value: object) -> str:
    """A rejected value as an error message quotes it: repr'd, cut to 100 characters."""
    return repr(value[:100]) if isinstance(value, str) else f"a {type(value).__name__}"


def invalid_task_id(task_id: object, what: str = "task id") -> ConfigError:
    """The error for a task id that is not ``TASK_ID_RE``."""
    return ConfigError(
        f"invalid {what} {_shown(task_id)}: use 1 to 200 letters, digits, '_', '-', '=' or '/' "
        "(it is a KV key and a subject token, so no '.', '*', '>' or spaces)"
    )


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

    @property
    def stream(self) -> str:
        return f"NATASK_{self.prefix.upper()}"

    @property
    def stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.>"]

    @property
    def results_bucket(self) -> str:
        return f"natask_results_{self.prefix}"

    @property
    def revoked_bucket(self) -> str:
        return f"natask_revoked_{self.prefix}"

    @property
    def chords_bucket(self) -> str:
        """Chord progress: one key per finished header member, plus fired/sent/failed guards."""
        return f"natask_chords_{self.prefix}"

    @property
    def claims_bucket(self) -> str:
        return f"natask_claims_{self.prefix}"

    @property
    def dlq_index_bucket(self) -> str:
        """Dead-letter id -> its ``NATASK_DLQ`` sequence, so ``dlq show/replay ID`` need no scan."""
        return f"natask_dlq_{self.prefix}"

    @property
    def dlq_filter(self) -> str:
        """This app's part of the shared dead-letter stream."""
        return f"natask.dlq.{self.prefix}.>"

    def task_subject(self, queue: str, task: str) -> str:
        return f"{self.prefix}.{queue}.{task}"

    def queue_filter(self, queue: str) -> str:
        return f"{self.prefix}.{queue}.>"

    def consumer(self, queue: str) -> str:
        return queue

    def schedule_subject(self, queue: str, task_id: str) -> str:
        return f"{self.prefix}._sched.{queue}.{task_id}"

    def rpc_subject(self, queue: str, task: str) -> str:
        return f"natask.rpc.{self.prefix}.{queue}.{task}"

    def dlq_subject(self, queue: str, task: str) -> str:
        return f"natask.dlq.{self.prefix}.{queue}.{task}"

    def is_task_subject(self, subject: str) -> bool:
        """Whether ``subject`` is a task subject of this prefix (``<prefix>.<queue>.<task name>``, no
        wildcard, no schedule): where a dead letter read back from the wire may be replayed to."""
        prefix, _, rest = subject.partition(".")
        queue, _, task = rest.partition(".")
        return prefix == self.prefix and bool(_QUEUE_RE.match(queue)) and bool(_TASK_NAME_RE.match(task))

    def task_from_subject(self, subject: str) -> tuple[str, str]:
        """(queue, task name) of a task subject; task name may contain dots."""
        _, queue, task = subject.split(".", 2)
        return queue, task
