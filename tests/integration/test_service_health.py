"""Health endpoints of the beat (``natask beat --health-port``) and the dashboard (``/healthz``)
against real servers: healthy while connected, 503 once the NATS server is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from natask import Natask
from natask.beat import Beat
from natask.beat.health import serve
from natask.dashboard import Dashboard, History, asgi_app
from natask.server import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[2]


async def until(read: Callable[[], Awaitable[httpx.Response | None]], check: Callable[[httpx.Response], bool],
                what: str, timeout: float = 30) -> httpx.Response:
    """Ask again until the answer passes ``check`` (a state reached, not a time waited)."""
    last: httpx.Response | None = None
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        last = await read()
        if last is not None and check(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last answer: "
                         f"{None if last is None else (last.status_code, last.text)}")


def getter(http: httpx.AsyncClient, url: str) -> Callable[[], Awaitable[httpx.Response | None]]:
    async def read() -> httpx.Response | None:
        try:
            return await http.get(url)
        except httpx.TransportError:  # not listening yet
            return None

    return read


def beat_app(url: str, name: str) -> Natask:
    app = Natask(name, servers=[url], subject_prefix="hb", publish_timeout=2)
    tick = app.task(name="hb.tick")(lambda: None)
    app.add_periodic_task(timedelta(seconds=1), tick.s(), name="hb.every-second")
    return app


async def test_beat_health_is_200_for_the_leader_and_the_standby_and_503_once_nats_is_gone(
        nats_server: NatsServer) -> None:
    apps = [beat_app(nats_server.url, f"beat{i}") for i in range(2)]
    beats = [Beat(app, lease_ttl=1) for app in apps]
    servers = []
    try:
        for beat in beats:
            servers.append(await serve(beat, 0))
            await beat.start()
        async with httpx.AsyncClient(timeout=5) as http:
            reads = [getter(http, f"http://127.0.0.1:{s.port}/health") for s in servers]
            answers = [await until(read, lambda r: r.status_code == 200, "a healthy beat") for read in reads]
            roles = {a.json()["beat"]: a.json()["role"] for a in answers}
            assert sorted(roles.values()) == ["leader", "standby"]
            assert all(a.headers["content-type"] == "application/json" for a in answers)
            leader = next(i for i, b in enumerate(beats) if roles[b.id] == "leader")
            ticked = await until(reads[leader], lambda r: r.json()["last_tick"] is not None, "the leader's first tick")
            assert ticked.json()["last_tick"]["entry"] == "hb.every-second"
            assert ticked.json()["last_tick"]["fire"].endswith("Z")

            nats_server.stop()
            for read in reads:
                gone = await until(read, lambda r: r.status_code == 503, "503 with the server stopped")
                assert gone.json()["healthy"] is False and gone.json()["connected"] is False
            nats_server.start()  # same port and store: both reconnect and elect again
            for read in reads:
                await until(read, lambda r: r.status_code == 200, "200 again once the server is back")
    finally:
        for beat in beats:
            await beat.stop()
        for server in servers:
            await server.stop()
        for app in apps:
            await app.aclose()


async def test_natask_beat_serves_health_on_its_port_and_stops_on_sigterm(nats_server: NatsServer) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "natask", "beat", "-A", "natask.demo:app", "--health-port", str(port),
        env={**os.environ, "NATS_URL": nats_server.url, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            read = getter(http, f"http://127.0.0.1:{port}/health")
            ok = await until(read, lambda r: r.status_code == 200 and r.json()["role"] == "leader", "a leading beat")
            assert ok.json()["running"] is True and ok.json()["entries"] >= 1
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_natask_beat_refuses_health_port_with_a_subcommand() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "natask", "beat", "--health-port", "9999", "remove", "x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--health-port is for running a beat" in err


@pytest.fixture
async def dashboard_app(nats_server: NatsServer) -> AsyncIterator[Natask]:
    app = Natask("hz", servers=[nats_server.url], subject_prefix="hz")
    try:
        yield app
    finally:
        await app.aclose()


async def test_dashboard_healthz_needs_no_credentials_and_turns_503_when_nats_stops(
        nats_server: NatsServer, dashboard_app: Natask) -> None:
    async with Dashboard(dashboard_app, "0.0.0.0", port=0, basic_auth=["admin:s3cret-pw"],
                         history=History(enabled=False)) as dash, httpx.AsyncClient(timeout=5) as http:
        # A probe's Host header is the pod's address, unknown to the DNS-rebinding check.
        url = f"http://127.0.0.1:{dash.port}/healthz"
        ok = await http.get(url, headers={"Host": "10.1.2.3:9999"})
        assert ok.status_code == 200 and ok.json() == {"ok": True, "nats_connected": True}
        assert (await http.head(url)).status_code == 200
        assert (await http.post(url)).status_code == 405
        assert (await http.get(f"http://127.0.0.1:{dash.port}/api/state")).status_code == 401  # the rest: auth
        nats_server.stop()
        gone = await until(getter(http, url), lambda r: r.status_code == 503, "503 with the server stopped")
        assert gone.json() == {"ok": False, "nats_connected": False}
        nats_server.start()  # same port and store: the client reconnects
        await until(getter(http, url), lambda r: r.status_code == 200, "200 again once the server is back")


async def test_dashboard_healthz_works_mounted_in_another_app(nats_server: NatsServer, dashboard_app: Natask) -> None:
    inner = asgi_app(dashboard_app, basic_auth=["admin:s3cret-pw"], history=False)
    outer = Starlette(routes=[Mount("/natask", app=inner)])
    transport = httpx.ASGITransport(app=outer)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=10) as http:
            ok = await http.get("/natask/healthz")  # the first request connects, as a page would
            assert ok.status_code == 200 and ok.json()["nats_connected"] is True
            assert (await http.get("/natask/api/state")).status_code == 401
            nats_server.stop()
            gone = await until(getter(http, "/natask/healthz"), lambda r: r.status_code == 503, "503 mounted")
            assert gone.json()["ok"] is False
            nats_server.start()
            await until(getter(http, "/natask/healthz"), lambda r: r.status_code == 200, "200 mounted, reconnected")
    finally:
        await inner.stop()

