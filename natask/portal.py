"""Portal: the app's private I/O thread, through which every sync call runs its coroutine."""

from __future__ import annotations

import _thread
import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    """A daemon thread running an event loop, started on first use and stopped by ``stop()``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name=f"natask-io-{self._name}", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
            return loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the I/O thread and block until it finishes."""
        loop = self._loop or self._start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync natask call was made from natask's own I/O thread; use the async API")
        # A bare lock is the cheapest cross-thread wake-up CPython has (run_coroutine_threadsafe
        # adds a concurrent Future and a Condition): it is on the path of every sync delay().
        done = _thread.allocate_lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        loop.call_soon_threadsafe(start)
        try:
            if not done.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f"natask I/O did not finish within {timeout}s")
        except BaseException:  # KeyboardInterrupt included: do not leave the coroutine running
            loop.call_soon_threadsafe(lambda: box[0].cancel() if box else coro.close())
            raise
        return box[0].result()

    def stop(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``final`` (e.g. closing connections) on the loop, then stop and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            if final is not None:
                final.close()
            return
        if final is not None and threading.current_thread() is not thread:
            try:
                asyncio.run_coroutine_threadsafe(final, loop).result(10)
            except Exception:
                pass
        elif final is not None:
            final.close()
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join(10)
            loop.close()
