"""How natask processes stop: the first SIGTERM/SIGINT starts a graceful stop, a second one ends the
process at once with exit code 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, Final, TypeVar

log = logging.getLogger("natask")

T = TypeVar("T")

SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop a natask process."""


def exit_code(signum: int) -> int:
    """The exit code of a process ended at once by ``signum``, as a shell reports a signal death."""
    return 128 + signum


class Interrupts:
    """Python-level handlers for SIGTERM and SIGINT: ``on_first(signum)`` for the first signal, an
    immediate ``os._exit`` for the second (after ``on_second(signum)``, if given).

    Python-level handlers (not ``loop.add_signal_handler``) run in the main thread even while an
    event loop is stuck or blocked, so the second signal always ends the process.
    """

    def __init__(self, on_first: Callable[[int], object],
                 on_second: Callable[[int], object] | None = None) -> None:
        self.on_first = on_first
        self.on_second = on_second
        self.received: int | None = None
        """The first signal received, if any."""
        self._previous: dict[int, Any] = {}

    def install(self) -> Interrupts:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            try:
                if self.on_second is not None:
                    self.on_second(signum)
                os.write(2, f"natask: second signal ({name}): exiting at once\n".encode())
            finally:
                os._exit(exit_code(signum))
        self.received = signum
        log.info("%s received: stopping gracefully (send it again to exit at once)", name)
        self.on_first(signum)


def run_until_signalled(main: Coroutine[Any, Any, T]) -> tuple[T | None, int | None]:
    """Run ``main`` on a new event loop until it returns, or until the first SIGTERM/SIGINT cancels
    it (its ``finally`` blocks and ``except CancelledError`` handlers do the graceful stop); a
    second signal ends the process at once. Returns ``(result, None)``, or ``(result or None,
    signum)`` when a signal stopped it."""
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[T]]] = []

    def first(signum: int) -> None:
        if not running or running[0][0].is_closed():
            os._exit(exit_code(signum))  # nothing left to stop gracefully
        loop, task = running[0]
        loop.call_soon_threadsafe(task.cancel)

    async def run() -> T:
        task = asyncio.ensure_future(main)
        running.append((asyncio.get_running_loop(), task))
        return await task

    interrupts = Interrupts(first).install()
    try:
        try:
            return asyncio.run(run()), interrupts.received
        except asyncio.CancelledError:
            if interrupts.received is None:
                raise
            return None, interrupts.received
    finally:
        interrupts.restore()
