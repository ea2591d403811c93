"""The operator surface under abuse: the worker's HTTP endpoints, the dashboard's binding, signals."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from natask import Natask
from natask.http import MAX_REQUEST, HttpServer
from natask.server import NatsServer, free_port

from .helpers import WorkerProcess
from .test_ops import http_get

FLOOD: int = 1100
"""Idle connections opened against the health port: more than the usual 1024-descriptor limit."""


@contextmanager
def worker_descriptor_limit(limit: int) -> Iterator[None]:
    """Children started inside get a soft RLIMIT_NOFILE of ``limit`` (the usual default); this
    process gets enough to open the flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"the hard descriptor limit ({hard}) is too low to open {FLOOD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 200), hard))


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port`` (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].partition(":")[2], 16) == port:
            return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"nothing listens on port {port}")


def open_idle(port: int, count: int, batch: int = 50) -> list[socket.socket]:
    """``count`` connections that never send a byte, opened in batches the server has accepted
    before the next one starts (an overflowing accept queue would leave half-open connections
    that never reach the server)."""
    out: list[socket.socket] = []
    while len(out) < count:
        opened = []
        for _ in range(min(batch, count - len(out))):
            s = socket.socket()
            s.setblocking(False)
            code = s.connect_ex(("127.0.0.1", port))
            assert code in (0, errno.EINPROGRESS), os.strerror(code)
            opened.append(s)
        with selectors.DefaultSelector() as selector:
            for s in opened:
                selector.register(s, selectors.EVENT_WRITE)
            connected = 0
            while connected < len(opened):
                ready = selector.select(10)
                assert ready, f"connections to port {port} hang after {len(out)} were opened"
                for key, _ in ready:
                    selector.unregister(key.fileobj)
                    connected += 1
        out += opened
        deadline = time.monotonic() + 10
        while accept_queue(port):
            assert time.monotonic() < deadline, f"the server stopped accepting after {len(out)} connections"
            time.sleep(0.005)
    return out


def wait_dropped(sockets: list[socket.socket], timeout: float) -> None:
    """Return once the server closed or reset every one of ``sockets``."""
    selector = selectors.DefaultSelector()
    for s in sockets:
        selector.register(s, selectors.EVENT_READ)
    left = len(sockets)
    while left:
        ready = selector.select(timeout)
        assert ready, f"{left} idle connections still open after {timeout}s"
        for key, _ in ready:
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                if sock.recv(1024):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass  # reset: dropped too
            selector.unregister(sock)
            left -= 1
    selector.close()


class DescriptorPeak:
    """Samples a process's open descriptors in a thread; ``peak`` is the most seen."""

    def __init__(self, pid: int) -> None:
        self.path = f"/proc/{pid}/fd"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, len(os.listdir(self.path)))
            except OSError:
                return
            self._stop.wait(0.01)

    def __enter__(self) -> DescriptorPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def listening_address(port: int) -> str:
    """The address a TCP socket listens on at ``port`` (from /proc/net/tcp), e.g. ``127.0.0.1``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(host)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


async def test_idle_connections_to_the_health_port_cannot_exhaust_the_worker(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    port = free_port()
    with worker_descriptor_limit(1024):
        proc = WorkerProcess(nats_server.url, "fd", tmp_path / "log", extra=["--health-port", str(port)])
    app = Natask("fd", servers=[nats_server.url], subject_prefix="fd")
    idle: list[socket.socket] = []
    try:
        await proc.ready()
        assert listening_address(port) == "127.0.0.1"  # loopback unless --http-host says otherwise
        with DescriptorPeak(proc.proc.pid) as fds:
            idle = await asyncio.to_thread(open_idle, port, FLOOD)
            results = [await app.asend_task("it.add", [i, i]) for i in range(20)]  # the task opens a file
            assert [await r.aget(timeout=20) for r in results] == [2 * i for i in range(20)]
            await asyncio.to_thread(wait_dropped, idle, 30)  # over the cap: at once; the rest: request timeout
        assert fds.peak < 300, f"the worker held {fds.peak} descriptors"
        code, body = await http_get(port, "/health")
        assert code == 200, body
    finally:
        for s in idle:
            s.close()
        await app.aclose()
        proc.kill()


async def test_http_endpoints_default_to_loopback_and_refuse_large_requests() -> None:
    async def ok() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    server = HttpServer({"/health": ok}, port=0)
    await server.start()
    try:
        assert server.address == "127.0.0.1"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nX-Junk: " + b"x" * MAX_REQUEST + b"\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 431 ")
        writer.close()
        assert (await http_get(server.port, "/health"))[0] == 200
    finally:
        await server.stop()
