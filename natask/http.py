"""A tiny asyncio HTTP/1.1 server for /metrics and /health (no web framework needed).

It binds loopback unless told otherwise and bounds what clients can hold: a few connections at a
time, a few seconds to send a small request and to read the answer, so idle or slow clients can
never take the worker's file descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

log = logging.getLogger("natask.http")

Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]
"""Returns (status, content type, body)."""

DEFAULT_HOST: Final = "127.0.0.1"
"""Where /metrics and /health listen unless told otherwise (``0.0.0.0`` exposes them to the network)."""
MAX_CONNECTIONS: Final = 32
"""Connections served at once; a new one beyond this is closed at once (a scraper or probe needs one)."""
REQUEST_TIMEOUT: Final = 5.0
"""Seconds a client has to send its whole request head, and to take the response."""
MAX_REQUEST: Final = 8192
"""Largest request head accepted, in bytes; a larger one gets 431 and the connection is closed."""

_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                   503: "Service Unavailable"}


class HttpServer:
    """Serves ``GET <path>`` from a dict of handlers; anything else is 404/405."""

    def __init__(self, routes: dict[str, Handler], host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self.connections = 0
        """Connections being served now."""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """The bound address, e.g. ``127.0.0.1``."""
        assert self._server is not None
        return str(self._server.sockets[0].getsockname()[0])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.transport.abort()  # frees the descriptor now; the client sees a reset
            return
        self.connections += 1
        clean = False
        try:
            status, ctype, body = await self._answer(reader)
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
            clean = True
        except Exception as e:  # a bad client must never hurt the worker
            log.debug("http: %s", e)
        finally:
            self.connections -= 1
            if clean:
                writer.close()
            else:
                writer.transport.abort()  # close() would wait for a client that does not read

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except asyncio.LimitOverrunError:
            return 431, "text/plain", b"request too large\n"
        method, target, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        handler = self.routes.get(target.split("?", 1)[0])
        if handler is None:
            return 404, "text/plain", b"not found\n"
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        return await handler()
