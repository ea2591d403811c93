"""Real nats-servers on loopback in any NATS topology: hubs and leaf nodes (with or without their own
JetStream domain), clusters joined by gateways into a super-cluster, several accounts.

A ``Topology`` holds ``Server``s; each server's config file is rendered from what it was given
(``cluster``, ``routes``, ``gateway``, ``leaf_remotes``, ``domain``, ``tags``, ``accounts``), all
ports are free loopback ports fixed for the server's life, so ``stop(name)``/``start(name)`` bring a
server back where it was. ``await topology.start()`` returns once every JetStream server answers
API requests, every leaf connection is up and every gateway is connected both ways.

    async with Topology(tmp_path) as t:
        hub = t.add("hub", leaf_listen=True)
        edge = t.add("edge", js=False, leaf_remotes=[hub])
        await t.start()
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import nats
import nats.errors

from natask.server import NatsServer, free_port

from .cluster import Node

HOST = "127.0.0.1"


class Server:
    """One nats-server of a topology, described by what it takes part in."""

    def __init__(self, name: str, root: Path, *, js: bool = True, domain: str | None = None,
                 cluster: str | None = None, gateway: str | None = None, leaf_listen: bool = False,
                 leaf_remotes: Sequence[Server | str] = (), tags: Sequence[str] = (),
                 accounts: str | None = None, leaf_account: str | None = None, extra: str = "") -> None:
        self.name = name
        self.js = js
        self.domain = domain
        self.cluster = cluster
        self.gateway = gateway
        self.leaf_listen = leaf_listen
        self.leaf_remotes = list(leaf_remotes)
        self.tags = list(tags)
        self.accounts = accounts
        self.leaf_account = leaf_account
        self.extra = extra
        self.port = free_port(HOST)
        self.http_port = free_port(HOST)
        self.cluster_port = free_port(HOST) if cluster else 0
        self.gateway_port = free_port(HOST) if gateway else 0
        self.leaf_port = free_port(HOST) if leaf_listen else 0
        self.dir = root / name
        self.store_dir = self.dir / "js"
        self.config_file = self.dir / "nats.conf"
        self.log_file = self.dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def user_url(self, user: str, password: str) -> str:
        return f"nats://{user}:{password}@{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def leaf_url(self) -> str:
        assert self.leaf_port, f"{self.name} does not accept leaf connections (leaf_listen=True)"
        return f"nats-leaf://{HOST}:{self.leaf_port}"

    def render(self, peers: Sequence[Server]) -> str:
        """This server's config file, given every server of the topology (for routes and gateways)."""
        lines = [f'server_name: "{self.name}"', f'listen: "{HOST}:{self.port}"', f'http: "{HOST}:{self.http_port}"']
        if self.tags:
            lines.append("server_tags: [" + ", ".join(f'"{t}"' for t in self.tags) + "]")
        if self.js:
            domain = f'\n  domain: "{self.domain}"' if self.domain else ""
            lines.append(f'jetstream {{\n  store_dir: "{self.store_dir}"{domain}\n}}')
        if self.accounts:
            lines.append(self.accounts)
        if self.cluster:
            # A clustered JetStream server needs a route even when alone in its cluster: its own.
            others = [p for p in peers if p is not self and p.cluster == self.cluster]
            routes = ", ".join(f'"nats-route://{HOST}:{p.cluster_port}"' for p in peers
                               if (p is not self or not others) and p.cluster == self.cluster)
            lines.append(f'cluster {{\n  name: "{self.cluster}"\n  listen: "{HOST}:{self.cluster_port}"\n'
                         f"  routes: [{routes}]\n}}")
        if self.gateway:
            by_cluster: dict[str, list[Server]] = {}
            for p in peers:
                if p.gateway:
                    by_cluster.setdefault(p.gateway, []).append(p)
            gateways = "\n".join(
                f'    {{name: "{name}", urls: [' + ", ".join(f'"nats://{HOST}:{m.gateway_port}"' for m in members)
                + "]}" for name, members in sorted(by_cluster.items()))
            lines.append(f'gateway {{\n  name: "{self.gateway}"\n  listen: "{HOST}:{self.gateway_port}"\n'
                         f"  gateways: [\n{gateways}\n  ]\n}}")
        if self.leaf_listen or self.leaf_remotes:
            block = ["leafnodes {"]
            if self.leaf_listen:
                block.append(f'  listen: "{HOST}:{self.leaf_port}"')
            if self.leaf_remotes:
                block.append("  remotes: [")
                for remote in self.leaf_remotes:
                    url = remote.leaf_url if isinstance(remote, Server) else remote
                    account = f', account: "{self.leaf_account}"' if self.leaf_account else ""
                    block.append(f'    {{url: "{url}"{account}}}')
                block.append("  ]")
            block.append("}")
            lines.append("\n".join(block))
        if self.extra:
            lines.append(self.extra)
        return "\n".join(lines) + "\n"

    # The same process handling as a cluster node's and the bundled server's (proc, _log, log_file).
    start = Node.start
    stop = NatsServer.stop

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """A monitoring document (``jsz``, ``leafz``, ``gatewayz?accs=1``...); raises if unreachable."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/{endpoint}", timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Topology:
    """Several real nats-servers wired together; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.servers: dict[str, Server] = {}

    def add(self, name: str, **kwargs: Any) -> Server:
        """Describe one more server (see ``Server``); started by ``start()``."""
        server = Server(name, self.root, **kwargs)
        self.servers[name] = server
        return server

    def __getitem__(self, name: str) -> Server:
        return self.servers[name]

    async def start(self, timeout: float = 30.0) -> Topology:
        """Start every server and wait until the whole topology is connected."""
        for server in self.servers.values():
            server.dir.mkdir(parents=True, exist_ok=True)
            server.config_file.write_text(server.render(list(self.servers.values())))
        for server in self.servers.values():
            server.start()
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def stop(self, name: str, kill: bool = False) -> None:
        self.servers[name].stop(kill=kill)

    async def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start a stopped server again on its ports and store; returns once the topology is connected."""
        self.servers[name].stop(kill=True)
        self.servers[name].start()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every live JetStream server answers API requests and every live server's leaf and
        gateway connections to live peers are up."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            live = [s for s in self.servers.values() if s.proc is not None]
            for s in live:
                if not s.alive:
                    raise RuntimeError(f"{s.name} exited:\n{s.log_tail()}")
            try:
                pending = [s.name for s in live if not await self._ready(s)]
                if not pending:
                    return
                last = f"waiting for {pending}"
            except Exception as e:  # not listening yet
                last = e
            await asyncio.sleep(0.1)
        tails = "\n".join(f"--- {s.name}\n{s.log_tail(1500)}" for s in self.servers.values() if s.alive)
        raise RuntimeError(f"topology not ready within {timeout}s (last: {last!r})\n{tails}")

    async def _ready(self, s: Server) -> bool:
        live = {n for n, p in self.servers.items() if p.alive}
        if s.leaf_remotes:
            wanted = sum(1 for r in s.leaf_remotes if not isinstance(r, Server) or r.name in live)
            if len((await asyncio.to_thread(s.monitor, "leafz")).get("leafs") or []) < wanted:
                return False
        if s.gateway:
            others = {p.gateway for p in self.servers.values() if p.gateway and p.gateway != s.gateway and p.alive}
            doc = await asyncio.to_thread(s.monitor, "gatewayz")
            # Each server dials one server of every other cluster (outbound); inbound ones vary.
            if not others <= set(doc.get("outbound_gateways") or {}):
                return False
        if s.js:
            if s.accounts:
                return True  # the JetStream account differs per test: the test waits for its own
            meta = (await asyncio.to_thread(s.monitor, "jsz")).get("meta_cluster") or {}
            if s.cluster and not meta.get("leader"):
                return False
            return await _js_answers(s.url)
        return True

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()

    async def __aenter__(self) -> Topology:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)


async def _js_answers(url: str, api: str = "$JS.API.INFO") -> bool:
    nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    try:
        msg = await nc.request(api, b"", timeout=1)
        return "error" not in json.loads(msg.data)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False
    finally:
        await nc.close()
