"""A loopback TCP fault proxy for integration tests: clients connect to it, it relays to a real
nats-server, and a test cuts, freezes or corrupts the traffic on purpose.

```python
async with FaultProxy(nats_server.port) as proxy:
    app = Natask("t", servers=[proxy.url])     # or a worker process with NATS_URL=proxy.url
    await proxy.cut()                          # every relayed connection dropped: clients reconnect
    proxy.freeze()                             # nothing flows either way, sockets stay open
    proxy.thaw()                               # the held bytes flow again, in order
    proxy.inject_to_clients(b"-ERR 'Unknown Protocol Operation'\\r\\n")
```
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

_CHUNK: Final = 65536


class _Link:
    """One relayed connection: the client's socket and ours to the server."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.pumps: list[asyncio.Task[None]] = []

    def drop(self) -> None:
        # abort(): reset at once, like a cable pulled (close() would first flush what is held).
        for writer in (self.client, self.server):
            writer.transport.abort()


class FaultProxy:
    """Relays loopback TCP connections to ``host:port``; ``cut()``, ``freeze()``/``thaw()`` and
    ``inject_to_clients()`` act on every connection relayed at that moment."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (a reconnect through the proxy adds one)."""
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        await self.cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults -----------------------------------------------------------------------------------
    async def cut(self) -> int:
        """Drop every relayed connection (both sides); returns how many. Clients reconnect through
        the proxy, which relays their new connections as usual."""
        links, self._links = list(self._links), set()
        for link in links:
            link.drop()
        for link in links:
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
        return len(links)

    def freeze(self) -> None:
        """Stop relaying in both directions; the sockets stay open and what arrives is held."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Relay again: the held bytes go first, in order."""
        self._flowing.set()

    def inject_to_clients(self, data: bytes) -> None:
        """Send ``data`` to every client as if the server had sent it. Meant for idle connections:
        it lands between two relayed chunks, which need not end on a protocol line."""
        for link in self._links:
            link.client.write(data)

    async def wait_accepted(self, count: int, timeout: float = 20) -> None:
        """Wait until ``count`` connections in all have been accepted (e.g. a reconnect after a cut)."""
        async def reached() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.accepted >= count)

        await asyncio.wait_for(reached(), timeout)

    # -- relaying ---------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, server_writer)
        link.pumps = [asyncio.create_task(self._pump(reader, server_writer, link)),
                      asyncio.create_task(self._pump(server_reader, writer, link))]
        self._links.add(link)
        async with self._changed:
            self.accepted += 1
            self._changed.notify_all()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # frozen: hold this chunk, and read no more, until thawed
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side went away: so does the other, as a real connection would.
            self._links.discard(link)
            with contextlib.suppress(Exception):
                link.drop()
