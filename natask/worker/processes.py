"""The process pool (``--pool processes``): ``def`` tasks run in child processes, which a hard time
limit can kill.

The protocol (README, "Process pool", says the same for users). One duplex pipe per child
(``multiprocessing`` ``forkserver`` context: forked from a clean single-threaded server, never from
the worker with its event loop and threads). Every message is one natask-msgpack list:

    parent -> child   ["run", task name, args, kwargs, request fields, soft limit or None]
    child -> parent   ["state", state, meta]                   update_state, stored by the parent
                      ["ok", value, max rss KB]                the task returned
                      ["err", exception record, traceback text, max rss KB]

The forkserver imports the app's module once (children are forks of it); a child takes the app
(``module:attr``) from it, looks tasks up by name, rebuilds ``Request``
(id, task, retries, args, kwargs, queue, parent/root id, eta, expires, headers; ``report`` sends
``["state", ...]``), runs one task at a time in its main thread and answers. Exceptions cross as
msgpack records (class by module and name, ``args``, attributes; no pickle): the parent rebuilds
the class from a module it has imported too, else a ``RuntimeError`` naming it, with the child's
traceback text as its ``__cause__``. ``soft_time_limit`` is a
``SIGALRM`` timer in the child; the hard ``time_limit`` is kept by the parent, which kills the
child (``SIGKILL``), fails the task with ``TimeLimitExceeded`` and starts a new child for the next
task. A child that dies by itself fails its task with ``WorkerLostError``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import resource
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..errors import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from ..message import dumps, loads
from ..options import Request, current_request

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from ..task import Task

log = logging.getLogger("natask.worker")

BIG_SEND: Final = 32 * 1024
"""Messages to a child above this many bytes are written from a thread: a pipe holds 64 KiB, and a
child still importing the app does not read yet."""
_NESTED: Final = "__natask_exception__"
"""Marks an exception nested in an exception record (``Retry.exc``)."""
_MAX_NESTING: Final = 3
_REQUEST_FIELDS: Final = ("id", "task", "retries", "queue", "parent_id", "root_id", "eta", "expires")


class _RemoteTraceback(Exception):
    """The traceback text of an exception raised in a child process (its ``__cause__``)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Child:
    """One child process and the task it runs."""

    __slots__ = ("conn", "fut", "proc", "request", "rss")

    def __init__(self, proc: BaseProcess, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.fut: asyncio.Future[Any] | None = None
        self.request: Request | None = None
        self.rss = 0  # peak resident set of the child, KB (from its last answer)


class ProcessPool:
    """Child processes for the ``def`` tasks of one worker: at most ``size`` at once, started on
    demand, each running one task at a time."""

    def __init__(self, app_spec: str, size: int, max_memory_kb: int | None = None) -> None:
        self.app_spec = app_spec
        self.size = size
        self.max_memory_kb = max_memory_kb
        self.loop = asyncio.get_running_loop()
        self.context = multiprocessing.get_context("forkserver")
        # Not "__main__" (the default): `python -m natask` would run the CLI again in the server.
        # The app's module is imported once in the server: a child is a fork of it, ready at once
        # (importing it in each child costs tens of ms of CPU per child).
        self.context.set_forkserver_preload(["natask.worker.processes", app_spec.partition(":")[0]])
        self.idle: list[_Child] = []
        self.children: set[_Child] = set()
        self.replaced = 0
        """Children retired for memory, killed for a time limit, or lost."""

    async def start(self) -> None:
        """Start the fork server (it imports the app's module) off the loop: the first task does not wait for it."""
        from multiprocessing import forkserver

        await self.loop.run_in_executor(None, forkserver.ensure_running)

    # -- running ----------------------------------------------------------------------------
    async def run(self, task: Task[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any], request: Request,
                  soft: float | None, hard: float | None) -> Any:
        """Run ``task`` in a child: its value, or its exception re-raised here."""
        fields = {name: getattr(request, name) for name in _REQUEST_FIELDS}
        fields["headers"] = dict(request.headers)
        data = dumps(["run", task.name, list(args), dict(kwargs), fields, soft])
        child = self.idle.pop() if self.idle else self._spawn()
        fut: asyncio.Future[Any] = self.loop.create_future()
        child.fut, child.request = fut, request
        try:
            if len(data) > BIG_SEND:
                await self.loop.run_in_executor(None, child.conn.send_bytes, data)
            else:
                child.conn.send_bytes(data)
        except OSError as e:  # the child died between two tasks
            self._lost(child)
            raise WorkerLostError(f"the child process for {task.name} is gone ({e}); the task did not start") from None
        try:
            if hard is None:
                return await fut
            return await asyncio.wait_for(asyncio.shield(fut), hard)
        except asyncio.TimeoutError:
            self._kill(child)
            raise TimeLimitExceeded(f"{task.name} exceeded its time limit of {hard:g}s: its child process "
                                    f"{child.proc.pid} was killed") from None
        except asyncio.CancelledError:  # revoked with terminate, or the grace period ran out
            self._kill(child)
            raise
        finally:
            child.fut = child.request = None
            self._settle(child)

    def _settle(self, child: _Child) -> None:
        """After a task: the child waits for the next one, or is retired (memory, pool shrunk)."""
        if child not in self.children:
            return
        if self.max_memory_kb is not None and child.rss > self.max_memory_kb:
            log.info("child process %s uses %d KB, above --max-memory-per-child %d KB: replacing it",
                     child.proc.pid, child.rss, self.max_memory_kb)
            self._retire(child)
        elif len(self.children) > self.size:
            self._retire(child)
        else:
            self.idle.append(child)

    def resize(self, size: int) -> None:
        """At most ``size`` children from now on; idle ones above it exit now, busy ones after their task."""
        self.size = size
        while len(self.children) > size and self.idle:
            self._retire(self.idle.pop(), replaced=False)

    def shutdown(self) -> None:
        """End every child (busy ones were drained or cancelled by the worker before)."""
        for child in list(self.children):
            self._kill(child, replaced=False)

    # -- children ---------------------------------------------------------------------------
    def _spawn(self) -> _Child:
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        proc = self.context.Process(target=child_main, args=(self.app_spec, child_conn), daemon=True,
                                    name="natask-child")
        proc.start()
        child_conn.close()
        child = _Child(proc, parent_conn)
        self.children.add(child)
        self.loop.add_reader(parent_conn.fileno(), self._readable, child)
        self.loop.add_reader(proc.sentinel, self._exited, child)
        return child

    def _readable(self, child: _Child) -> None:
        try:
            message = loads(child.conn.recv_bytes())
        except (EOFError, OSError):
            self.loop.remove_reader(child.conn.fileno())
            return  # the sentinel says why
        self._answer(child, message)

    def _answer(self, child: _Child, message: Any) -> None:
        kind = message[0]
        if kind == "state":
            request = child.request
            if request is not None and request.report is not None:
                try:
                    request.report(message[1], message[2])
                except Exception as e:  # checked in the child already; the store may still refuse
                    log.warning("task %s: cannot store its state: %s", request.id, e)
            return
        child.rss = int(message[-1])
        fut = child.fut
        if fut is None or fut.done():
            return
        if kind == "ok":
            fut.set_result(message[1])
            return
        exc = exception_from(message[1])
        if not isinstance(exc, Exception):
            exc = RuntimeError(repr(exc))
        exc.__cause__ = _RemoteTraceback(message[2])
        fut.set_exception(exc)

    def _exited(self, child: _Child) -> None:
        # An answer sent just before dying is still in the pipe: read it first.
        try:
            while child.conn.poll():
                self._answer(child, loads(child.conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        child.proc.join(0)
        code = child.proc.exitcode
        fut = child.fut
        self._lost(child)
        if fut is not None and not fut.done():
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with {code}"
            fut.set_exception(WorkerLostError(f"the child process {child.proc.pid} running the task {how}"))

    def _retire(self, child: _Child, replaced: bool = True) -> None:
        self._drop(child, replaced)
        try:
            child.conn.send_bytes(dumps(["exit"]))
        except OSError:
            pass
        child.conn.close()

    def _kill(self, child: _Child, replaced: bool = True) -> None:
        if child in self.children:
            child.proc.kill()
            self._drop(child, replaced)
            child.conn.close()

    def _lost(self, child: _Child) -> None:
        if child in self.children:
            self._drop(child, True)
            child.conn.close()

    def _drop(self, child: _Child, replaced: bool) -> None:
        self.children.discard(child)
        if child in self.idle:
            self.idle.remove(child)
        self.replaced += replaced
        if not child.conn.closed:
            self.loop.remove_reader(child.conn.fileno())
        self.loop.remove_reader(child.proc.sentinel)
        # Reaped when it exits, not waited for here.
        self.loop.run_in_executor(None, child.proc.join)


# -- the child ----------------------------------------------------------------------------------
_running = False


def _soft_alarm(signum: int, frame: Any) -> None:
    if _running:
        raise SoftTimeLimitExceeded("soft time limit exceeded")


def child_main(app_spec: str, conn: Connection) -> None:
    """A child process: import the app, then run the tasks the parent sends until told to exit."""
    global _running
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker decides
    signal.signal(signal.SIGALRM, _soft_alarm)
    from ..app import find_app

    app = find_app(app_spec)  # `-A proj` finds proj.celery:app as the parent did
    app.finalize()
    while True:
        try:
            message = loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if message[0] != "run":
            return
        _, name, args, kwargs, fields, soft = message
        request = Request(**fields, report=lambda state, meta: conn.send_bytes(dumps(["state", state, meta])))
        token = current_request.set(request)
        try:
            task = app.tasks.get(name) or app.builtins[name]
            args, kwargs = task.bind_call(args, kwargs)
            request.args, request.kwargs = args, kwargs
            if task.options.bind:
                args = (task, *args)
            _running = True
            if soft:
                signal.setitimer(signal.ITIMER_REAL, soft)
            try:
                value = task.fn(*args, **kwargs)
            finally:
                _running = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            answer = dumps(["ok", value, _max_rss()])
        except Exception as e:
            answer = _failure(e)
        finally:
            current_request.reset(token)
        conn.send_bytes(answer)


def _failure(exc: Exception) -> bytes:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return dumps(["err", exception_record(exc), text, _max_rss()])


def exception_record(exc: BaseException, depth: int = 0) -> dict[str, Any]:
    """An exception as msgpack can carry it: its class (module and qualified name), ``args`` and
    the attributes msgpack can encode (an exception attribute, such as ``Retry.exc``, nested)."""
    def value(v: Any) -> tuple[bool, Any]:
        if isinstance(v, BaseException):
            return depth < _MAX_NESTING, {_NESTED: exception_record(v, depth + 1)}
        try:
            dumps(v)
        except Exception:
            return False, None
        return True, v

    args = [value(a) for a in exc.args]
    attrs = {k: value(v) for k, v in vars(exc).items() if not k.startswith("__")}
    return {"module": type(exc).__module__, "name": type(exc).__qualname__, "message": str(exc),
            "args": [v for ok, v in args if ok] if all(ok for ok, _ in args) else [str(exc)],
            "attrs": {k: v for k, (ok, v) in attrs.items() if ok}}


def exception_from(record: Any) -> BaseException:
    """The exception ``exception_record`` described, its class found among the modules this process
    has imported (nothing is imported for it); a ``RuntimeError`` naming it when that fails."""
    try:
        module, name = record["module"], record["name"]
        cls: Any = sys.modules[module]
        for part in name.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(name)
        args = [_revived(a) for a in record["args"]]
        exc: BaseException = cls.__new__(cls, *args)  # as unpickling does: __init__ is not run again
        exc.args = tuple(args)
        exc.__dict__.update({k: _revived(v) for k, v in record["attrs"].items()})
        return exc
    except Exception:
        label = f"{record.get('module')}.{record.get('name')}" if isinstance(record, dict) else "an exception"
        message = record.get("message") if isinstance(record, dict) else ""
        return RuntimeError(f"{label}: {message} (it cannot be rebuilt in the worker process)")


def _revived(v: Any) -> Any:
    return exception_from(v[_NESTED]) if isinstance(v, dict) and set(v) == {_NESTED} else v


def _max_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KB on Linux


def find_app_spec(app: Any) -> str | None:
    """``module:attr`` of an imported module holding ``app`` (for children to import it too)."""
    for name, module in list(sys.modules.items()):
        if name == "__main__" or name.endswith(".__main__") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is app:
                return f"{name}:{attr}"
    return None


__all__ = ["ProcessPool", "child_main", "find_app_spec"]
