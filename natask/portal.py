"""Portal: where the sync API runs its coroutines.

A sync call cannot await, so its coroutine runs on an event loop that is not the caller's:

- on the calling thread's **own loop**, with its own connection, once the thread has made a few
  sync calls (``OWN_LOOP_AFTER``). The loop runs only during the call, so a call costs what the
  async API costs: no hop to another thread, whose two wake-ups cost ~0.1 ms (40 % of a PubAck's
  round trip on a 2-core VM). A keeper thread runs idle loops now and then, so their connections answer
  the server's PINGs and read replies, and closes the loops of threads that have ended;
- on the app's **I/O thread** (a daemon thread running one loop) for a thread's first calls (a
  thread that makes one call does not pay for a connection), for calls from a thread that runs an
  event loop already (a sync call inside async code), for the worker's task threads
  (``use_io_thread``: a worker's 64 threads share one connection), and for the threads beyond
  ``MAX_OWN_LOOPS`` (a web server's 100 threads do not open 100 connections).
"""

from __future__ import annotations

import _thread
import asyncio
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

OWN_LOOP_AFTER: Final = 5
"""The sync call from which a thread runs its calls on a loop (and connection) of its own."""
MAX_OWN_LOOPS: Final = 16
"""Threads of one app with a loop (and a connection) of their own at most; others use the I/O thread."""
KEEP_INTERVAL: Final = 1.0
"""Seconds between the keeper's rounds over idle loops."""
KEEP_RUN: Final = 0.005
"""Seconds the keeper runs an idle loop each round (enough to answer PINGs and read replies)."""

OWN_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""Loops that run only while their thread makes a call: a reply that arrives on their connection
waits for the next call (or the keeper) to be read, so other threads should not wait on it."""

_local = threading.local()


def use_io_thread() -> None:
    """Make the current thread's sync calls go through the apps' I/O threads (worker threads)."""
    _local.io_only = True


async def _then_stop(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> T:
    # Stopping from inside saves run_until_complete's extra loop turn (its done callback).
    try:
        return await coro
    finally:
        loop.stop()


class _Home:
    """A thread's own loop; ``lock`` is held while it runs (by its thread or by the keeper)."""

    __slots__ = ("closed", "last_used", "lock", "loop", "thread")

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.lock = threading.Lock()
        self.thread = threading.current_thread()
        self.last_used = time.monotonic()
        self.closed = False
        OWN_LOOPS.add(self.loop)


class Portal:
    """The sync API's event loops: the I/O thread's and each calling thread's own.

    ``close`` makes the coroutine that closes the app's connection on the loop it runs on; it runs
    on every loop when the portal stops, and on a thread's loop when that thread has ended.
    """

    def __init__(self, name: str, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._close = close
        self._reset()
        _PORTALS.add(self)

    def _reset(self) -> None:
        # Also the state of a forked child: the parent's threads and connections are not its own.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._homes: dict[threading.Thread, _Home] = {}
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._calls = threading.local()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The I/O thread's loop, once started."""
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine to completion for a sync caller and return its result."""
        home = self._home()
        if home is None:
            return self._hop(coro)
        with home.lock:  # the keeper may be running it: it lets go within KEEP_RUN
            loop = home.loop
            task = loop.create_task(_then_stop(coro, loop))
            try:
                while not task.done():
                    loop.run_forever()
                return task.result()
            except BaseException:  # KeyboardInterrupt included: do not leave the call half done
                if not task.done():
                    task.cancel()
                    try:
                        loop.run_until_complete(task)
                    except BaseException:
                        pass
                raise
            finally:
                home.last_used = time.monotonic()

    def _home(self) -> _Home | None:
        """The calling thread's own loop, if it has (or should now get) one."""
        if asyncio._get_running_loop() is not None or getattr(_local, "io_only", False):
            return None
        calls = self._calls
        home: _Home | None = getattr(calls, "home", None)
        if home is not None:
            if not home.closed:
                return home
            if not home.loop.is_closed():  # stop() found it busy: finish closing it here
                home.loop.run_until_complete(self._close())
                home.loop.close()
            calls.home = None
        calls.count = getattr(calls, "count", 0) + 1
        if calls.count < OWN_LOOP_AFTER or len(self._homes) >= MAX_OWN_LOOPS:
            return None
        with self._lock:
            if len(self._homes) >= MAX_OWN_LOOPS:
                return None
            home = calls.home = _Home()
            self._homes[home.thread] = home
            if self._keeper is None:
                self._keeper_stop = threading.Event()
                self._keeper = threading.Thread(target=self._keep, args=(self._keeper_stop,),
                                                name=f"natask-keeper-{self._name}", daemon=True)
                self._keeper.start()
        return home

    # -- the I/O thread ---------------------------------------------------------------------
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

    def _hop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the I/O thread and block until it finishes."""
        loop = self._loop or self._start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync natask call was made from natask's own I/O thread; use the async API")
        # A bare lock is the cheapest cross-thread wake-up CPython has (run_coroutine_threadsafe
        # adds a concurrent Future and a Condition).
        done = _thread.allocate_lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        loop.call_soon_threadsafe(start)
        try:
            done.acquire()
        except BaseException:  # KeyboardInterrupt included: do not leave the coroutine running
            loop.call_soon_threadsafe(lambda: box[0].cancel() if box else coro.close())
            raise
        return box[0].result()

    # -- own loops --------------------------------------------------------------------------
    def _keep(self, stop: threading.Event) -> None:
        while not stop.wait(KEEP_INTERVAL):
            with self._lock:
                homes = list(self._homes.values())
            for home in homes:
                if not home.thread.is_alive():
                    with self._lock:
                        self._homes.pop(home.thread, None)
                    self._shut(home)
                elif time.monotonic() - home.last_used >= KEEP_INTERVAL and home.lock.acquire(blocking=False):
                    try:
                        if not home.closed:
                            home.loop.run_until_complete(asyncio.sleep(KEEP_RUN))
                    except Exception:
                        pass  # the connection's own reconnect logic deals with it
                    finally:
                        home.lock.release()

    def _shut(self, home: _Home) -> None:
        """Close a home's connection and loop; if its thread is running it, leave that to it."""
        home.closed = True
        if home.lock.acquire(timeout=1.0):
            try:
                if not home.loop.is_closed():
                    try:
                        home.loop.run_until_complete(self._close())
                    except Exception:
                        pass
                    home.loop.close()
            finally:
                home.lock.release()
        elif not home.loop.is_closed():
            # Busy in its thread: close the connection there (its call fails), the thread closes the loop.
            asyncio.run_coroutine_threadsafe(self._close(), home.loop)

    def stop(self) -> None:
        """Close the connections of every loop, stop the keeper and the I/O thread (any thread)."""
        with self._lock:
            loop, thread, keeper = self._loop, self._thread, self._keeper
            self._loop = self._thread = self._keeper = None
            homes = list(self._homes.values())
            self._homes.clear()
        if keeper is not None:
            self._keeper_stop.set()
            keeper.join(10)
        if homes:
            def shut_all() -> None:
                for home in homes:
                    self._shut(home)

            if asyncio._get_running_loop() is None:
                shut_all()
            else:  # run_until_complete cannot run in a thread running a loop: a helper thread can
                helper = threading.Thread(target=shut_all, name=f"natask-close-{self._name}", daemon=True)
                helper.start()
                helper.join(10)
        if loop is None or thread is None:
            return
        if threading.current_thread() is not thread:
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
            except Exception:
                pass
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join(10)
            loop.close()


_PORTALS: weakref.WeakSet[Portal] = weakref.WeakSet()


class HasPortal(Protocol):
    """An object whose sync methods run through a portal."""

    @property
    def _portal(self) -> Portal: ...


S = TypeVar("S", bound=HasPortal)


def blocking(afn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]], doc: str) -> Callable[Concatenate[S, P], T]:
    """The sync twin of the async method ``afn`` (``forget = blocking(aforget, "...")``): the same
    call, run to completion by the owner's portal; ``doc`` is the twin's docstring."""

    def twin(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._portal.run(afn(self, *args, **kwargs))

    functools.update_wrapper(twin, afn)  # the signature (through __wrapped__), module and qualname
    twin.__name__ = afn.__name__.removeprefix("a")
    twin.__qualname__ = twin.__qualname__.rpartition(".")[0] + "." + twin.__name__
    twin.__doc__ = doc
    return twin


def _after_fork() -> None:
    for portal in _PORTALS:
        portal._reset()


os.register_at_fork(after_in_child=_after_fork)
