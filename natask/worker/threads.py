"""Threads for sync tasks, with a batched hand-off back to the event loop."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..options import Request, current_request
from ..portal import use_io_thread

_Item = tuple[asyncio.Future[Any], Callable[..., Any], Sequence[Any], Mapping[str, Any], Request,
              "contextvars.Context | None"]


class ThreadRunner:
    """Long-lived daemon threads fed by a ``SimpleQueue``.

    Outcomes are collected in a deque and handed back with one ``call_soon_threadsafe`` per
    batch rather than per task: the per-task wakeup is what makes ``run_in_executor`` slow.
    """

    def __init__(self, size: int, name: str = "natask-task") -> None:
        self.size = size
        self.name = name
        self.loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = collections.deque()
        self._scheduled = False
        self._threads: list[threading.Thread] = []
        self._busy = 0

    def run(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
            request: Request, context: contextvars.Context | None = None) -> asyncio.Future[Any]:
        """Run ``fn`` on a thread with ``request`` as the current request (in ``context``, if given);
        the future resolves on the loop."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._busy += 1
        if self._busy > len(self._threads) and len(self._threads) < self.size:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._queue.put((fut, fn, args, kwargs, request, context))
        return fut

    def _work(self) -> None:
        use_io_thread()  # sync calls made by tasks share the app's I/O thread, not a loop per thread
        get, done = self._queue.get, self._done
        while True:
            item = get()
            if item is None:
                return
            fut, fn, args, kwargs, request, context = item
            token = current_request.set(request)
            try:
                value = fn(*args, **kwargs) if context is None else context.run(fn, *args, **kwargs)
                outcome = (fut, True, value)
            except BaseException as e:
                outcome = (fut, False, e)
            finally:
                current_request.reset(token)
            done.append(outcome)
            if not self._scheduled:
                self._scheduled = True
                try:
                    self.loop.call_soon_threadsafe(self._flush)
                except RuntimeError:  # loop closed: the worker is gone
                    return

    def _flush(self) -> None:
        # Clear the flag before draining, so an outcome appended meanwhile schedules a new flush.
        self._scheduled = False
        done = self._done
        while done:
            fut, ok, value = done.popleft()
            self._busy -= 1
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value if isinstance(value, Exception) else RuntimeError(repr(value)))

    def shutdown(self) -> None:
        """Ask idle threads to exit; busy ones finish their task first (they are daemons)."""
        for _ in self._threads:
            self._queue.put(None)
