"""Subprocess workers and server-side events for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``python -m natask worker`` in a child process; ready once it logs that it is consuming."""

    def __init__(self, url: str, prefix: str, log: Path, queues: Sequence[str] = ("default",),
                 concurrency: int = 4, ack_wait: float = 30, extra: Sequence[str] = (),
                 new_session: bool = False, app: str = "tests.integration.workerapp:app") -> None:
        env = {**os.environ, "NATS_URL": url, "NATASK_TEST_PREFIX": prefix, "NATASK_TEST_LOG": str(log),
               "NATASK_TEST_ACK_WAIT": str(ack_wait), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "natask", "worker", "-A", app,
             "-Q", ",".join(queues), "-c", str(concurrency), "--loglevel", "info", *extra],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=new_session,  # its own process group, for a signal to the whole group
        )
        self.lines: list[str] = []
        self._consuming = 0  # "consuming" lines seen: one per worker process (children of --processes too)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                if " consuming " in line:
                    self._consuming += 1
                self._changed.notify_all()
        with self._changed:
            self._consuming = -1  # the process ended: nobody is waiting for more lines
            self._changed.notify_all()

    async def ready(self, timeout: float = 20, processes: int = 1) -> WorkerProcess:
        """Wait until ``processes`` worker processes (``--processes N``: N) logged that they consume."""
        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: not 0 <= self._consuming < processes, timeout)

        ok = await asyncio.to_thread(wait)
        if not ok or self._consuming < processes or self.proc.poll() is not None:
            raise RuntimeError("worker did not start:\n" + "".join(self.lines))
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_for_line(self, text: str, timeout: float = 20) -> str:
        """Block until the process logged a line containing ``text`` and return it."""
        def seen() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: seen() is not None or self._consuming == -1, timeout)
            line = seen()
        if line is None:
            raise RuntimeError(f"the worker did not log {text!r}:\n" + "".join(self.lines))
        return line

    async def wait(self, timeout: float = 60) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self._reader.join, 5)
        self._close()
        return code

    def _close(self) -> None:
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)
        self._close()


class KVEvents:
    """Core subscription to a results bucket: lets a test await a task reaching a state."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.subject = f"$KV.natask_results_{prefix}.>"
        self.states: dict[str, list[str]] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self) -> KVEvents:
        from natask.message import loads

        self.nc = await nats.connect(self.url)

        async def on_msg(msg: Msg) -> None:
            task_id = msg.subject.rsplit(".", 1)[-1]
            try:
                state = loads(msg.data)["state"]
            except Exception:
                return
            self.states.setdefault(task_id, []).append(state)
            self._changed.set()

        await self.nc.subscribe(self.subject, cb=on_msg)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def reached(self, task_id: str, state: str, timeout: float = 20) -> None:
        async def wait() -> None:
            while state not in self.states.get(task_id, []):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
