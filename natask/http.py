"""A tiny asyncio HTTP/1.1 server for /metrics and /health (no web framework needed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

log = logging.getLogger("natask.http")

Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]
"""Returns (status, content type, body)."""

_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpServer:
    """Serves ``GET <path>`` from a dict of handlers; anything else is 404/405."""

    def __init__(self, routes: dict[str, Handler], host: str = "0.0.0.0", port: int = 0) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = target.split("?", 1)[0]
            handler = self.routes.get(path)
            if handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            elif method != "GET":
                status, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                status, ctype, body = await handler()
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except Exception as e:  # a bad client must never hurt the worker
            log.debug("http: %s", e)
        finally:
            writer.close()
