"""``natask worker --processes N``: N worker processes, restarted when they crash, drained together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .server import _die_with_parent
from .shutdown import Interrupts

log = logging.getLogger("natask.supervisor")

BACKOFF_START: Final = 0.5
BACKOFF_MAX: Final = 30.0
"""A child that keeps crashing is restarted at most every BACKOFF_MAX seconds."""
STABLE_AFTER: Final = 10.0
"""A child that ran this long resets its restart backoff."""


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float = 0.0
    restarts: int = 0
    history: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``argv`` (a single-process worker command) N times and keeps N alive.

    SIGTERM/SIGINT are forwarded to every child, which drains (finishes in-flight tasks within
    its grace period) and exits; the supervisor exits 0 once all have. A second signal is
    forwarded too, which ends every child and the supervisor at once. A child that exits on its
    own (a crash, or ``--max-tasks-per-child`` reached) is restarted, with exponential backoff
    while it keeps failing fast.
    """

    def __init__(self, argv: Sequence[str], processes: int, grace: float = 30.0) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.argv = list(argv)
        self.children = [_Child(i) for i in range(processes)]
        self.grace = grace
        self.stopping = False

    def _spawn(self, child: _Child) -> None:
        child.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
        child.started = time.monotonic()
        log.info("child %d started (pid %d)", child.slot, child.proc.pid)

    def _on_signal(self, signum: int) -> None:
        self.stopping = True
        log.info("%s: draining %d child(ren)", signal.Signals(signum).name, len(self.children))
        self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    def run(self) -> int:
        # A second signal reaches the children too (each exits at once), then ends the supervisor.
        Interrupts(self._on_signal, on_second=lambda signum: self._forward(signal.SIGTERM)).install()
        for child in self.children:
            self._spawn(child)
        deadline: float | None = None
        while True:
            now = time.monotonic()
            alive = 0
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is None:
                    alive += 1
                    continue
                if self.stopping:
                    continue
                if proc is not None:  # exited on its own: schedule a restart
                    code = proc.returncode
                    child.history.append(code)
                    child.proc = None
                    if now - child.started >= STABLE_AFTER or code == 0:
                        child.backoff = BACKOFF_START
                    child.restart_at = now + (0 if code == 0 else child.backoff)
                    if code != 0:
                        log.warning("child %d (pid %d) exited with %d; restarting in %.1fs",
                                    child.slot, proc.pid, code, child.restart_at - now)
                        child.backoff = min(BACKOFF_MAX, child.backoff * 2)
                if now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
                    alive += 1
            if self.stopping:
                if alive == 0:
                    return 0
                deadline = deadline or now + self.grace + 15
                if now > deadline:
                    for child in self.children:
                        if child.proc is not None and child.proc.poll() is None:
                            child.proc.kill()
            time.sleep(0.1)


def _child_setup() -> None:
    """In a child before exec: a process group of its own, so a terminal's Ctrl-C (SIGINT to the
    foreground group) reaches only the supervisor, which forwards one SIGTERM (a child given both
    would take the second as "exit at once"); and SIGTERM when the supervisor dies, so no child
    outlives it."""
    os.setpgid(0, 0)
    if sys.platform == "linux":
        _die_with_parent()


def child_argv(argv: Sequence[str]) -> list[str]:
    """The worker command line for a child: the same arguments without ``--processes``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "natask", *out]
