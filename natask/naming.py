"""Every subject, stream, consumer and bucket name natask uses, derived in one place (SPEC §1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from .errors import ConfigError

_TASK_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

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

    def task_from_subject(self, subject: str) -> tuple[str, str]:
        """(queue, task name) of a task subject; task name may contain dots."""
        _, queue, task = subject.split(".", 2)
        return queue, task
