"""``natask dashboard``: the ASGI app served by uvicorn on one socket, startable and stoppable from
Python (``Dashboard``) for tests and embedding."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Final

import uvicorn

from .auth import HostCheck, check_binding
from .feed import REFRESH, History
from .web import DashboardApp

if TYPE_CHECKING:
    from ..app import Natask

DEFAULT_PORT: Final = 5555
"""Flower's port: an operator's muscle memory."""
STOP_TIMEOUT: Final = 5
"""Seconds a stop waits for open connections (event streams end first) before closing them."""
MAX_CONNECTIONS: Final = 100
"""Connections served at once (each open page holds one for its event stream); beyond, 503."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the CLI (or the caller) decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Dashboard:
    """The dashboard on ``host:port``: ``async with Dashboard(app, port=0) as dash: dash.url``."""

    def __init__(self, app: Natask, host: str = "127.0.0.1", port: int = DEFAULT_PORT, refresh: float = REFRESH,  # noqa: PLR0913 - the dashboard's options, keyword-only
                 *, allow_insecure: bool = False, allowed_hosts: Iterable[str] = (),
                 basic_auth: Iterable[str | tuple[str, str]] = (), auth_token: str | None = None,
                 auth_header: str | None = None, history: History | None = None,
                 history_limit: int | None = None) -> None:
        self.asgi = DashboardApp(app, basic_auth=basic_auth, auth_token=auth_token, auth_header=auth_header,
                                 history=history, history_limit=history_limit, refresh=refresh)
        check_binding(host, allow_insecure, authenticated=self.asgi.auth.enabled)
        self.app = app
        self.host = host
        self.port = port
        self.allowed_hosts = tuple(allowed_hosts)
        self.model = self.asgi.model
        self.feed = self.asgi.feed
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    def __repr__(self) -> str:
        return f"Dashboard({self.app.name!r}, {self.url!r}, auth={self.asgi.auth!r})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}/"

    def summary(self) -> dict[str, Any]:
        return self.asgi.web.summary()

    def state(self) -> dict[str, Any]:
        """What ``/api/state`` answers."""
        return self.asgi.web.snapshot()

    async def read(self) -> None:
        """Read queues, dead letters and workers now (the feed does every ``refresh`` seconds)."""
        await self.feed.read()

    async def start(self) -> None:
        # Listen first: a busy port fails at once, before a connection or a background job exists.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host.strip("[]"), self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.asgi.hosts = HostCheck.listening(self.host, self.port, self.allowed_hosts)
        self.asgi._guarded.hosts = self.asgi.hosts
        try:
            await self.asgi.start()
            # No access log: a browser's first visit may carry ?token=. No log_config: the app's
            # logging setup stays as it is (uvicorn's records go to the root logger).
            config = uvicorn.Config(self.asgi, lifespan="off", log_level="warning", access_log=False,
                                    log_config=None, timeout_graceful_shutdown=STOP_TIMEOUT, server_header=False,
                                    limit_concurrency=MAX_CONNECTIONS)
            self._server = _Server(config)
            self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
            while not self._server.started:
                if self._serving.done():
                    await self._serving  # raises what stopped it
                    raise OSError(f"cannot serve on {self.host}:{self.port}")
                await asyncio.sleep(0.01)  # uvicorn sets a flag, it has no event to await
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.asgi.stop()  # event streams end, so open connections finish
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._serving), 2 * STOP_TIMEOUT)
        if self._socket is not None:
            self._socket.close()

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(app: Natask, host: str, port: int, ready: Callable[[str], None], **options: Any) -> None:
    """Run the dashboard until cancelled (``natask dashboard``: by its first SIGTERM/SIGINT), then
    close the app. ``options``: those of ``Dashboard``."""
    dashboard = Dashboard(app, host, port, **options)
    try:
        async with dashboard:
            ready(dashboard.url)
            await asyncio.Event().wait()
    finally:
        await app.aclose()
