"""Task states: the ``State`` enum and the states after which a task's outcome never changes."""

from __future__ import annotations

import enum
from typing import Final


class State(str, enum.Enum):
    """The states natask itself records (``update_state`` may record custom ones beside them).

    A ``State`` is a ``str``: ``State.SUCCESS == "SUCCESS"``, and it goes on the wire as its value.
    """

    PENDING = "PENDING"
    """Unknown: not started, not stored (or its result expired)."""
    STARTED = "STARTED"
    """A worker started it (recorded for ``track_started=True`` tasks)."""
    RETRY = "RETRY"
    """It failed and waits for a retry."""
    SUCCESS = "SUCCESS"
    """It returned; the result is stored."""
    FAILURE = "FAILURE"
    """It raised (retries exhausted, rejected, dead-lettered)."""
    REVOKED = "REVOKED"
    """Revoked, expired or terminated: it will not run (again)."""
    IGNORED = "IGNORED"
    """It raised ``Ignore``: nothing is stored (a hook's outcome names it; never in the results bucket)."""

    def __str__(self) -> str:
        return self.value


FINAL_STATES: Final = frozenset({State.SUCCESS, State.FAILURE, State.REVOKED})
"""States after which a task's outcome never changes (a stored one is never replaced)."""
