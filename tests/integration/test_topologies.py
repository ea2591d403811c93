"""The server configs of docs/topologies.md (deploy/local/*.conf) started with the real bundled
nats-server, their ports moved to free ones and their store dirs to a temp dir: each layout comes up,
JetStream answers where it is on (in the domain the layout gives it), leaf and gateway connections are
established (the monitoring endpoints /leafz and /gatewayz say so), and tenants in their own accounts
do not see each other's streams."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import nats

from natask.server import _die_with_parent, find_binary, free_port

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy" / "local"
DOC = ROOT / "docs" / "topologies.md"
STORE_ROOT = "/tmp/natask/"
"""Where every config keeps its JetStream store (rewritten to the test's temp dir)."""
LAYOUTS: dict[str, tuple[str, ...]] = {
    "single": ("single.conf",),
    "cluster": ("cluster-n1.conf", "cluster-n2.conf", "cluster-n3.conf"),
    "leaf": ("hub.conf", "leaf.conf"),
    "domain": ("hub.conf", "edge.conf"),
    "supercluster": ("supercluster-eu1.conf", "supercluster-eu2.conf", "supercluster-us1.conf",
                     "supercluster-us2.conf", "supercluster-us3.conf"),
    "accounts": ("accounts.conf",),
}
"""Each layout of docs/topologies.md and the servers it runs."""
READY_TIMEOUT = 30.0
_LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:(\d+)")


@dataclass
class Server:
    name: str
    config: Path
    client_port: int
    http_port: int
    users: list[tuple[str, str]]
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def monitor(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def log_text(self) -> str:
        return (self.config.parent / f"{self.config.stem}.log").read_text(errors="replace")[-3000:]


def rewrite(layout: str, tmp: Path) -> list[Server]:
    """The layout's configs with every loopback port moved to a free one (the same port gets the same
    new one in every file, so routes, leaf remotes and gateways still meet) and stores under ``tmp``."""
    ports: dict[str, str] = {}
    servers = []
    for name in LAYOUTS[layout]:
        text = (LOCAL / name).read_text()
        for port in _LOOPBACK_PORT.findall(text):
            ports.setdefault(port, str(free_port()))
        text = _LOOPBACK_PORT.sub(lambda m: f"127.0.0.1:{ports[m.group(1)]}", text)
        text = text.replace(STORE_ROOT, f"{tmp}/store/")
        config = tmp / name
        config.write_text(text)
        servers.append(Server(name, config, int(_setting(text, "listen")), int(_setting(text, "http")),
                              re.findall(r"user:\s*(\w+),\s*password:\s*([\w-]+)", text)))
    return servers


def _setting(text: str, key: str) -> str:
    match = re.search(rf"^{key}:\s*127\.0\.0\.1:(\d+)\s*$", text, re.M)
    assert match, f"no `{key}: 127.0.0.1:PORT` line"
    return match.group(1)


@contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    try:
        for server in servers:
            server.log = open(server.config.parent / f"{server.config.stem}.log", "wb")
            server.proc = subprocess.Popen(
                [find_binary(), "-c", str(server.config)], stdout=server.log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        for server in servers:  # listening (a refused monitoring request fails at once, a client connect does not)
            until(lambda s=server: s.monitor("/varz")["server_name"], f"{server.name} to listen", servers)
        yield servers
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.terminate()
                server.proc.wait(10)
            if server.log is not None:
                server.log.close()


def until(check: Callable[[], Any], what: str, servers: list[Server]) -> Any:
    """Ask again until ``check`` returns something true (the state reached, not a time waited)."""
    deadline = time.monotonic() + READY_TIMEOUT
    last: object = None
    while time.monotonic() < deadline:
        for server in servers:
            if server.proc is not None and server.proc.poll() is not None:
                raise AssertionError(f"{server.name} exited:\n{server.log_text()}")
        try:
            value = check()
        except Exception as e:  # not listening yet, no meta leader yet...
            last = e
        else:
            if value:
                return value
            last = value
        time.sleep(0.05)
    logs = "\n".join(f"--- {s.name}\n{s.log_text()}" for s in servers)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{logs}")


def js_info(server: Server, domain: str | None = None, user: tuple[str, str] | None = None,
            streams: bool = False) -> dict[str, Any]:
    """The answer of the JetStream API (``$JS.API.INFO``, or ``$JS.<domain>.API.INFO``) to a client of
    ``server``; with ``streams``, also the stream names it lists."""
    async def ask() -> dict[str, Any]:
        auth = {"user": user[0], "password": user[1]} if user else {}
        nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=2, **auth)
        try:
            prefix = f"$JS.{domain}.API" if domain else "$JS.API"
            info = json.loads((await nc.request(f"{prefix}.INFO", b"", timeout=2)).data)
            if streams:
                names = json.loads((await nc.request(f"{prefix}.STREAM.NAMES", b"{}", timeout=2)).data)
                info["stream_names"] = names.get("streams") or []
            return info  # type: ignore[no-any-return]
        finally:
            await nc.close()

    return asyncio.run(ask())


def answered(info: dict[str, Any]) -> bool:
    return info.get("type") == "io.nats.jetstream.api.v1.account_info_response" and "error" not in info


def test_every_config_belongs_to_a_layout_uses_loopback_and_temp_stores() -> None:
    configs = {p.name for p in LOCAL.glob("*.conf")}
    assert configs == {name for names in LAYOUTS.values() for name in names}
    for name in configs:
        text = (LOCAL / name).read_text()
        for key in ("listen", "http"):
            _setting(text, key)
        hosts = re.findall(r"(?:listen:|nats://|\")\s*([\w.]+):\d+", text)
        assert hosts and set(hosts) == {"127.0.0.1"}, f"{name}: only loopback addresses ({set(hosts)})"
        stores = re.findall(r"store_dir:\s*(\S+)", text)
        assert all(s.startswith(STORE_ROOT) for s in stores), name
        assert f".venv/bin/nats-server -c deploy/local/{name}" in text, f"{name}: says how to start it"


def test_the_docs_give_the_command_of_every_config() -> None:
    doc = DOC.read_text()
    for name in {name for names in LAYOUTS.values() for name in names}:
        assert f".venv/bin/nats-server -c deploy/local/{name}" in doc, name


def test_single_server(tmp_path: Path) -> None:
    with running(rewrite("single", tmp_path)) as [server]:
        assert answered(until(lambda: js_info(server), "the JetStream API", [server]))


def test_three_node_cluster(tmp_path: Path) -> None:
    with running(rewrite("cluster", tmp_path)) as servers:
        for server in servers:
            until(lambda s=server: answered(js_info(s)), f"the JetStream API on {server.name}", servers)
            meta = until(lambda s=server: s.monitor("/jsz").get("meta_cluster", {}).get("leader"),
                         "a meta leader", servers)
            assert meta in {"n1", "n2", "n3"}
            assert server.monitor("/jsz")["meta_cluster"]["cluster_size"] == 3


def test_hub_and_leaf_without_jetstream(tmp_path: Path) -> None:
    with running(rewrite("leaf", tmp_path)) as servers:
        hub, leaf = servers
        until(lambda: leaf.monitor("/leafz")["leafnodes"] == 1, "the leaf connection", servers)
        # The leaf has no JetStream: the plain JetStream API of its clients is answered by the hub.
        info = until(lambda: js_info(leaf), "the hub's JetStream through the leaf", servers)
        assert answered(info) and info["domain"] == "hub"
        assert hub.monitor("/leafz")["leafnodes"] == 1


def test_leaf_with_its_own_jetstream_domain(tmp_path: Path) -> None:
    with running(rewrite("domain", tmp_path)) as servers:
        hub, edge = servers
        until(lambda: edge.monitor("/leafz")["leafnodes"] == 1, "the leaf connection", servers)
        local = until(lambda: js_info(edge), "the edge's own JetStream", servers)
        assert answered(local) and local["domain"] == "edge"
        remote = until(lambda: js_info(edge, domain="hub"), "the hub's JetStream as domain hub", servers)
        assert answered(remote) and remote["domain"] == "hub"
        assert js_info(hub)["domain"] == "hub"


def test_super_cluster_of_two_clusters_joined_by_gateways(tmp_path: Path) -> None:
    with running(rewrite("supercluster", tmp_path)) as servers:
        clusters = {"eu": [s for s in servers if "-eu" in s.name], "us": [s for s in servers if "-us" in s.name]}
        for own, members in clusters.items():
            other = "us" if own == "eu" else "eu"
            for server in members:  # each server has its own outbound gateway to every other cluster
                gateways = until(lambda s=server, o=other: (g := s.monitor("/gatewayz"))
                                 .get("outbound_gateways", {}).get(o) and g, f"{server.name}'s gateway to {other}",
                                 servers)
                assert gateways["name"] == own
            # ...and the other cluster's servers each dialled one of ours.
            until(lambda m=members, o=other: any(s.monitor("/gatewayz").get("inbound_gateways", {}).get(o)
                                                 for s in m), f"inbound gateways from {other} into {own}", servers)
        for server in servers:
            until(lambda s=server: answered(js_info(s)), f"the JetStream API on {server.name}", servers)
        meta = until(lambda: (m := servers[0].monitor("/jsz").get("meta_cluster", {})).get("leader") and m,
                     "a meta leader", servers)
        assert meta["cluster_size"] == 5  # one JetStream across both clusters
        tags = {s.name: s.monitor("/varz").get("tags") for s in servers}
        assert tags["supercluster-eu1.conf"] == ["region:eu"] and tags["supercluster-us3.conf"] == ["region:us"]


def test_two_tenants_isolated_by_accounts(tmp_path: Path) -> None:
    with running(rewrite("accounts", tmp_path)) as [server]:
        tenants = [u for u in server.users if u[0] != "sys"]
        assert len(tenants) == 2
        for user in tenants:
            assert answered(until(lambda u=user: js_info(server, user=u), f"JetStream for {user[0]}", [server]))

        async def create(user: tuple[str, str], stream: str) -> None:
            nc = await nats.connect(server.url, user=user[0], password=user[1])
            try:
                await nc.jetstream().add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
            finally:
                await nc.close()

        asyncio.run(create(tenants[0], "ONLY_MINE"))
        assert js_info(server, user=tenants[0], streams=True)["stream_names"] == ["ONLY_MINE"]
        assert js_info(server, user=tenants[1], streams=True)["stream_names"] == []
