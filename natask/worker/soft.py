"""Soft time limits: ``SoftTimeLimitExceeded`` raised inside a running task so it can clean up.

- ``async def`` tasks: at the limit the task's asyncio task is cancelled and the cancellation is
  turned, at the coroutine's ``await``, into ``SoftTimeLimitExceeded`` (``SoftLimited`` proxies the
  coroutine and swaps the exception it is thrown).
- ``def`` tasks on threads: ``PyThreadState_SetAsyncExc`` schedules the exception in the task's
  thread. Python raises it at the thread's next bytecode: not while it waits in C code (a blocking
  ``socket.recv``, ``time.sleep`` holds out until it returns), as Celery's thread pool cannot either.
- ``def`` tasks in the process pool: ``SIGALRM`` in the child (``processes``).
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from ..errors import SoftTimeLimitExceeded


def soft_error(name: str, limit: float) -> SoftTimeLimitExceeded:
    return SoftTimeLimitExceeded(f"{name} exceeded its soft time limit of {limit:g}s")


class SoftLimited:
    """Awaits ``coro``; after ``fire()`` the next cancellation thrown into it arrives as the soft
    limit's exception instead (``fire`` cancels the task to wake the coroutine at its ``await``)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], error: SoftTimeLimitExceeded) -> None:
        self.coro = coro
        self.error: SoftTimeLimitExceeded | None = None
        self._pending = error
        self.task: asyncio.Task[Any] | None = None

    def fire(self) -> None:
        if self.task is not None and not self.task.done():
            self.error = self._pending
            self.task.cancel()

    def __await__(self) -> Generator[Any, Any, Any]:
        return self

    def __iter__(self) -> SoftLimited:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        if self.task is None:
            self.task = asyncio.current_task()
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        error = self.error
        thrown = val if val is not None else typ
        if error is not None and (isinstance(thrown, asyncio.CancelledError) or thrown is asyncio.CancelledError):
            self.error = None
            if sys.version_info >= (3, 11) and self.task is not None:
                self.task.uncancel()  # the cancellation was ours, turned into the soft limit
            return self.coro.throw(error)
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(val if val is not None else typ)

    def close(self) -> None:
        self.coro.close()


async def run_async(coro: Coroutine[Any, Any, Any], soft: float, error: SoftTimeLimitExceeded) -> Any:
    """Await ``coro`` with a soft limit."""
    limited = SoftLimited(coro, error)
    timer = asyncio.get_running_loop().call_later(soft, limited.fire)
    try:
        return await limited
    finally:
        timer.cancel()


class ThreadAlarm:
    """The soft limit of one ``def`` task on a worker thread: ``wrap`` its function, ``fire``
    from the loop at the limit (only while the function runs; a pending one is cleared after)."""

    __slots__ = ("error", "fn", "ident", "injected", "lock", "running")

    def __init__(self, fn: Callable[..., Any], error: SoftTimeLimitExceeded) -> None:
        self.fn = fn
        self.error = error
        self.lock = threading.Lock()
        self.ident = 0
        self.running = False
        self.injected = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.ident = threading.get_ident()
            self.running = True
        try:
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.running = False
                if self.injected:  # not raised yet: it must not hit the thread's next task
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), None)

    def fire(self) -> None:
        with self.lock:
            if self.running and not self.injected:
                self.injected = True
                # A class, not an instance: the C API instantiates it (no message: the type says it).
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident),
                                                           ctypes.py_object(SoftTimeLimitExceeded))
