"""The operator surface under abuse: the worker's HTTP endpoints, the dashboard's binding, signals."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from natask import ConfigError, Natask, Reject, TaskFailed
from natask.dashboard import Dashboard
from natask.http import MAX_REQUEST, HttpServer
from natask.message import dumps
from natask.server import NatsServer, free_port
from natask.testing import worker

from .helpers import ROOT, KVEvents, WorkerProcess
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


# -- the dashboard beyond loopback ---------------------------------------------------------------
APP = "tests.integration.workerapp:app"


class Cli:
    """``python -m natask ...`` as a child process, its output read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []

    @classmethod
    async def start(cls, url: str, *args: str, prefix: str = "ops") -> Cli:
        env = {**os.environ, "NATS_URL": url, "NATASK_TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT),
               "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "natask", *args, env=env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def stdout_line(self, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, f"no output; stderr: {await self._rest()}"
        return line.decode().strip()

    async def stderr_until(self, text: str, timeout: float = 20) -> None:
        assert self.proc.stderr is not None

        async def read() -> None:
            while True:
                line = (await self.proc.stderr.readline()).decode()  # type: ignore[union-attr]
                assert line, f"ended before logging {text!r}: {''.join(self.stderr)}"
                self.stderr.append(line)
                if text in line:
                    return

        await asyncio.wait_for(read(), timeout)

    async def _rest(self) -> str:
        assert self.proc.stderr is not None
        return "".join(self.stderr) + (await self.proc.stderr.read()).decode()

    async def finish(self, timeout: float = 20) -> tuple[int, str]:
        """Wait for the exit (killing it past ``timeout``); (exit code, the rest of stderr)."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"still running after {timeout}s: {await self._rest()}") from None
        return self.proc.returncode or 0, await self._rest()


async def test_dashboard_refuses_to_serve_beyond_loopback_without_the_opt_out(nats_server: NatsServer) -> None:
    cli = await Cli.start(nats_server.url, "dashboard", "-A", APP, "--host", "0.0.0.0", "-p", "0")
    code, err = await cli.finish()
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("Error: refusing to serve the dashboard on 0.0.0.0") and "--insecure-no-auth" in line

    app = Natask("dash", servers=[nats_server.url])
    try:
        for host in ("0.0.0.0", "::", "192.0.2.10", "dash.example"):
            with pytest.raises(ConfigError, match=r"allow_insecure=True"):
                Dashboard(app, host, 0)
        for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
            Dashboard(app, host, 0)  # loopback needs no opt-out
    finally:
        await app.aclose()


async def raw_request(port: int, host_header: str, method: str = "GET", path: str = "/api/state",
                      headers: str = "") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Length: 0\r\n{headers}\r\n".encode())
    await writer.drain()
    status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    writer.close()
    return status


async def test_dashboard_on_every_interface_still_checks_the_host_header(nats_server: NatsServer) -> None:
    app = Natask("dash", servers=[nats_server.url], subject_prefix="dashhost")

    @app.task(name="d.refuse")
    def refuse() -> None:
        raise Reject("no")

    try:
        async with worker(app):
            lost = await refuse.adelay()
            with pytest.raises(TaskFailed):
                await lost.aget(timeout=10)
        dash = Dashboard(app, "0.0.0.0", 0, allow_insecure=True, allowed_hosts=["dash.example"])
        async with dash:
            port, replay = dash.port, f"/api/dlq/{lost.id}/replay"
            for evil in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
                assert await raw_request(port, evil) == 403
                assert await raw_request(port, evil, "POST", replay, "X-Natask-Dashboard: 1\r\n") == 403
            assert await raw_request(port, f"127.0.0.1:{port}") == 200
            assert await raw_request(port, f"localhost:{port}") == 200
            assert await raw_request(port, f"{socket.gethostname()}:{port}") == 200
            assert await raw_request(port, "dash.example") == 200  # an --allowed-host name, any port
            assert await raw_request(port, "DASH.example:8443") == 200
            assert await raw_request(port, f"127.0.0.1:{port + 1}") == 403  # another port: another origin
            assert await raw_request(port, f"127.0.0.1:{port}", "POST", replay, "X-Natask-Dashboard: 1\r\n") == 200
    finally:
        await app.aclose()


async def test_dashboard_on_another_loopback_address_accepts_its_own_name(nats_server: NatsServer) -> None:
    app = Natask("dash", servers=[nats_server.url], subject_prefix="dashlo")
    try:
        async with Dashboard(app, "127.0.0.2", 0) as dash:
            reader, writer = await asyncio.open_connection("127.0.0.2", dash.port)
            writer.write(f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.2:{dash.port}\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
            writer.close()
    finally:
        await app.aclose()


async def test_dashboard_cli_with_the_opt_out_checks_hosts_and_stops_on_sigterm(nats_server: NatsServer) -> None:
    cli = await Cli.start(nats_server.url, "dashboard", "-A", APP, "--host", "0.0.0.0", "-p", "0",
                          "--insecure-no-auth", "--allowed-host", "dash.example")
    url = await cli.stdout_line()
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert await raw_request(port, "evil.example") == 403
    assert await raw_request(port, "dash.example") == 200
    cli.proc.send_signal(signal.SIGTERM)
    code, err = await cli.finish()
    assert code == 0, err


# -- signals -------------------------------------------------------------------------------------
async def test_dashboard_on_a_busy_port_exits_at_once_with_one_line(nats_server: NatsServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for _ in range(4):  # it hung in 2 of 4 tries
            cli = await Cli.start(nats_server.url, "dashboard", "-A", APP, "-p", str(busy.getsockname()[1]))
            code, err = await cli.finish()
            assert code == 1
            assert err.splitlines() == [f"Error: cannot listen on 127.0.0.1:{busy.getsockname()[1]}: "
                                        "address already in use"], err


async def test_a_second_sigterm_ends_a_draining_worker_at_once(nats_server: NatsServer, tmp_path: Path) -> None:
    app = Natask("sig", servers=[nats_server.url], subject_prefix="sig")
    proc = await WorkerProcess(nats_server.url, "sig", tmp_path / "log", concurrency=2).ready()
    try:
        async with KVEvents(nats_server.url, "sig") as kv:
            long = await app.asend_task("it.sleep", [120, "long"])  # a sync task: its thread cannot be stopped
            await kv.reached(long.id, "STARTED")
        proc.signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait_for_line, "draining 1 in-flight")
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=20) == 128 + signal.SIGTERM  # not after the 30 s grace
        assert "second signal (SIGTERM): exiting at once" in proc.output()
    finally:
        proc.kill()
        await app.aclose()


async def test_events_beat_and_server_stop_on_sigterm(nats_server: NatsServer) -> None:
    events = await Cli.start(nats_server.url, "events", "-A", APP, prefix="ev")
    app = Natask("ev", servers=[nats_server.url], subject_prefix="ev")
    try:
        broker = await app.client.broker()
        batch = dumps({"worker": "w1", "type": "worker-heartbeat", "events": [[1.0, None, None, {}]]})

        async def first_line() -> str:
            while True:  # until `natask events` has subscribed and prints what it receives
                await broker.publish_core("natask.events.ev.worker-heartbeat", batch)
                try:
                    line = await events.stdout_line(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if not line.startswith("-- "):  # a line naming the day comes before the first event
                    return line

        assert "worker-heartbeat" in await asyncio.wait_for(first_line(), 20)
    finally:
        await app.aclose()
    events.proc.send_signal(signal.SIGTERM)
    code, err = await events.finish()
    assert code == 0, ("events", err)

    beat = await Cli.start(nats_server.url, "beat", "-A", APP, prefix="ev")
    await beat.stderr_until(" started with ")
    beat.proc.send_signal(signal.SIGTERM)
    code, err = await beat.finish()
    assert code == 0, ("beat", err)

    server = await Cli.start(nats_server.url, "server", "-p", "0")
    assert (await server.stdout_line()).startswith("nats://127.0.0.1:")
    server.proc.send_signal(signal.SIGTERM)
    code, err = await server.finish()
    assert code == 0, ("server", err)


async def test_ctrl_c_drains_every_worker_process_of_a_supervisor(nats_server: NatsServer, tmp_path: Path) -> None:
    app = Natask("cc", servers=[nats_server.url], subject_prefix="cc")
    proc = WorkerProcess(nats_server.url, "cc", tmp_path / "log", extra=["--processes", "2"], new_session=True)
    try:
        await proc.ready(processes=2)
        async with KVEvents(nats_server.url, "cc") as kv:
            running = await app.asend_task("it.sleep", [1, "in-flight"])
            await kv.reached(running.id, "STARTED")
        os.killpg(proc.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: every process of the foreground group
        assert await proc.wait(timeout=60) == 0
        assert await running.aget(timeout=10) == "in-flight"  # drained, not cut off
    finally:
        proc.kill()
        await app.aclose()


async def exited(pid: int) -> None:
    """Return once process ``pid`` (not our child) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_a_second_sigterm_ends_a_supervisor_and_its_children_at_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    app = Natask("sup", servers=[nats_server.url], subject_prefix="sup")
    proc = WorkerProcess(nats_server.url, "sup", tmp_path / "log", extra=["--processes", "2"])
    try:
        await proc.ready(processes=2)
        children = [int(line.rsplit("pid ", 1)[1].rstrip(")\n")) for line in proc.lines if "started (pid" in line]
        assert len(children) == 2
        async with KVEvents(nats_server.url, "sup") as kv:
            long = await app.asend_task("it.sleep", [120, "long"])
            await kv.reached(long.id, "STARTED")
        proc.signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait_for_line, "draining 1 in-flight")
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=20) == 128 + signal.SIGTERM
        await asyncio.wait_for(asyncio.gather(*map(exited, children)), 20)  # not after the 30 s grace
    finally:
        proc.kill()
        await app.aclose()


async def test_a_subscribe_cancelled_mid_flush_leaves_the_connection_working(app: Natask) -> None:
    """Stopping on a signal cancels whatever runs, e.g. a subscribe waiting for its PONG: the
    connection must survive it (nats-py's read loop dies if a PONG meets a cancelled flush)."""
    broker = await app.client.broker()

    async def on_msg(msg: Any) -> None:
        pass

    for _ in range(3):
        subscribing = asyncio.ensure_future(broker.subscribe("ops.cancelled", cb=on_msg))
        await asyncio.sleep(0)  # the SUB and the PING are on their way
        subscribing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await subscribing
        await broker.nc.flush(timeout=5)  # PONGs still arrive: the read loop is alive
    assert not broker.nc._reading_task.done()
