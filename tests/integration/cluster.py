"""A three-node JetStream cluster of real nats-servers on loopback, for the scale-out tests.

Each node has its own client port, route port, monitoring port, store dir and config file; the nodes
route to each other under one cluster name. ``start()`` returns once every node answers JetStream API
requests and reports a meta leader with all peers current, so R3 streams can be placed at once.
``kill(i)`` SIGKILLs a node, ``restart(i)`` brings it back on the same ports and store.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import nats
import nats.errors
from nats.aio.client import Client

from natask.server import NatsServer, _die_with_parent, find_binary, free_port

HOST = "127.0.0.1"


class Node:
    """One nats-server of the cluster: ports and store dir fixed for its whole life."""

    def __init__(self, index: int, name: str, root: Path) -> None:
        self.index = index
        self.name = name
        self.port = free_port(HOST)
        self.cluster_port = free_port(HOST)
        self.http_port = free_port(HOST)
        self.store_dir = root / name / "js"
        self.config_file = root / name / "nats.conf"
        self.log_file = root / name / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, cluster_name: str, peers: Sequence[Node]) -> None:
        routes = ", ".join(f'"nats-route://{HOST}:{p.cluster_port}"' for p in peers if p is not self)
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "{HOST}:{self.port}"\n'
            f'http: "{HOST}:{self.http_port}"\n'
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            f'cluster {{\n  name: "{cluster_name}"\n  listen: "{HOST}:{self.cluster_port}"\n'
            f"  routes: [{routes}]\n}}\n"
        )

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(self.config_file)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Its own session (a Ctrl-C meant for pytest does not reach it first) and SIGTERM when
            # the test process dies, so no server outlives the run. Linux sends that signal when the
            # spawning *thread* ends: start nodes from a long-lived thread (the event loop's), not
            # from asyncio.to_thread.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    stop = NatsServer.stop  # same process handling as the single bundled server (proc, _log)

    def jsz(self) -> dict[str, Any]:
        """The node's ``/jsz`` monitoring document (meta group, streams); raises if unreachable."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/jsz", timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def stream_state(self, stream: str) -> dict[str, Any] | None:
        """The state (``messages``, ``first_seq``, ``last_seq``...) of this node's own copy of
        ``stream``, from its monitoring port; ``None`` if it holds no copy (yet)."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/jsz?streams=true", timeout=2) as resp:
            doc = json.loads(resp.read())
        for account in doc.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return detail.get("state")  # type: ignore[no-any-return]
        return None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class NatsCluster:
    """Three (or ``size``) routed nats-servers with JetStream on free loopback ports."""

    def __init__(self, root: str | os.PathLike[str] | None = None, size: int = 3, name: str = "natask-test") -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="natask-cluster-")
            root = self._tmp.name
        self.root = Path(root)
        self.name = name
        self.nodes = [Node(i, f"n{i}", self.root) for i in range(size)]
        for node in self.nodes:
            node.write_config(name, self.nodes)

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (dead ones included: clients skip them)."""
        return [n.url for n in self.nodes]

    def url(self, i: int) -> str:
        return self.nodes[i].url

    def index_of(self, server_name: str) -> int:
        """The node index of a ``server_name`` as JetStream reports it (e.g. a stream leader)."""
        for node in self.nodes:
            if node.name == server_name:
                return node.index
        raise KeyError(f"no node named {server_name!r} in {[n.name for n in self.nodes]}")

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every live node answers ``$JS.API.INFO`` and sees a meta leader with every peer
        current (a stream with all replicas can then be placed)."""
        deadline = time.monotonic() + timeout
        live = [n for n in self.nodes if n.alive]
        last: object = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with {node.proc.returncode}:\n{node.log_tail()}")
            try:
                if all([await self._js_answers(n) for n in live]) and all(
                    [await asyncio.to_thread(self._meta_ready, n) for n in live]
                ):
                    return
                last = {n.name: await asyncio.to_thread(_meta, n) for n in live}
            except Exception as e:  # not listening yet, or mid-election
                last = e
            await asyncio.sleep(0.1)
        tails = "\n".join(f"--- {n.name}\n{n.log_tail(1500)}" for n in live)
        raise RuntimeError(f"JetStream cluster not ready within {timeout}s (last: {last!r})\n{tails}")

    async def _js_answers(self, node: Node) -> bool:
        nc = await _connect(node)
        try:
            msg = await nc.request("$JS.API.INFO", b"", timeout=1)
            return "error" not in json.loads(msg.data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return False
        finally:
            await nc.close()

    def _meta_ready(self, node: Node) -> bool:
        meta = node.jsz().get("meta_cluster") or {}
        replicas = meta.get("replicas") or []
        others = len(self.nodes) - 1
        if not meta.get("leader"):
            return False
        if meta.get("leader") != node.name:
            return True  # followers do not track peers; the leader's view is checked on the leader
        return len(replicas) == others and all(r.get("current") and not r.get("offline") for r in replicas)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: no lame duck, no leadership hand-over, unflushed writes lost."""
        self.nodes[i].stop(kill=True)

    def stop(self, i: int) -> None:
        """Stop node ``i`` gracefully (SIGTERM)."""
        self.nodes[i].stop()

    def restart(self, i: int) -> None:
        """Start node ``i`` again on the same ports and store dir (after ``kill``/``stop``); returns at
        once, ``await wait_listening(i)`` for it to answer."""
        self.nodes[i].stop(kill=True)
        self.nodes[i].start()

    async def wait_listening(self, i: int, timeout: float = 20.0) -> None:
        """Until node ``i`` accepts clients and answers JetStream API requests."""
        node = self.nodes[i]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(f"{node.name} is not running:\n{node.log_tail()}")
            try:
                if await self._js_answers(node):
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{node.name} not answering within {timeout}s:\n{node.log_tail()}")

    def close(self) -> None:
        """Stop every node and delete the temporary root."""
        for node in self.nodes:
            node.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> NatsCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- who leads what -------------------------------------------------------------------------
    async def stream_info(self, stream: str, timeout: float = 20.0, via: Sequence[int] | None = None) -> Any:
        """``js.stream_info(stream)`` through any live node (``via`` limits which), retried through
        elections until ``timeout``."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive or (via is not None and node.index not in via):
                    continue
                try:
                    nc = await _connect(node)
                except Exception as e:
                    last = e
                    continue
                try:
                    return await nc.jetstream().stream_info(stream)
                except Exception as e:  # timeout or 503 while a leader is being elected
                    last = e
                finally:
                    await nc.close()
            await asyncio.sleep(0.2)
        raise TimeoutError(f"no stream info for {stream} within {timeout}s: {last!r}")

    async def stream_leader(self, stream: str, timeout: float = 20.0) -> int:
        """Index of the node leading ``stream`` (waits through an election, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.stream_info(stream, timeout=max(0.5, deadline - time.monotonic()))
            leader = info.cluster.leader if info.cluster else None
            if leader:
                index = self.index_of(leader)
                if self.nodes[index].alive:
                    return index
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stream {stream} has no live leader within {timeout}s (info: {info.cluster})")
            await asyncio.sleep(0.2)

    async def move_leader(self, stream: str, i: int, consumers: Sequence[str] = (), timeout: float = 20.0) -> None:
        """Make node ``i`` the leader of ``stream`` and of its ``consumers`` (leader step-down with a
        preferred placement), so a test knows exactly what a kill of that node takes down."""
        target = self.nodes[i].name
        body = json.dumps({"placement": {"preferred": target}}).encode()
        deadline = time.monotonic() + timeout
        subjects: dict[str | None, str] = {None: f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}"}
        subjects.update({c: f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{c}" for c in consumers})
        nc = await _connect(self.nodes[i])
        try:
            js = nc.jetstream()
            for consumer, subject in subjects.items():
                while True:
                    info = await (js.stream_info(stream) if consumer is None else js.consumer_info(stream, consumer))
                    if info.cluster is not None and info.cluster.leader == target:
                        break
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{consumer or stream} leader is {info.cluster}, not {target}")
                    try:
                        await nc.request(subject, body, timeout=2)
                    except nats.errors.TimeoutError:
                        pass
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def wait_replicas_current(self, stream: str, timeout: float = 30.0,
                                    names: Sequence[str] | None = None) -> Any:
        """Until ``stream`` has a live leader and every replica (or those in ``names``) is current
        with lag 0 and not offline; returns the final cluster info."""
        deadline = time.monotonic() + timeout
        wanted = set(names) if names is not None else {n.name for n in self.nodes}
        cluster: Any = None
        while time.monotonic() < deadline:
            info = await self.stream_info(stream, timeout=max(0.5, deadline - time.monotonic()))
            cluster = info.cluster
            if cluster is not None and cluster.leader:
                peers = {r.name: r for r in (cluster.replicas or [])}
                ok = all(
                    name == cluster.leader
                    or (name in peers and peers[name].current and not peers[name].offline and not peers[name].lag)
                    for name in wanted
                )
                if ok:
                    return cluster
            await asyncio.sleep(0.2)
        raise TimeoutError(f"replicas of {stream} not current within {timeout}s: {cluster}")

    async def wait_caught_up(self, i: int, stream: str, timeout: float = 30.0) -> dict[str, Any]:
        """Until node ``i``'s own copy of ``stream`` holds what the leader holds (same first and last
        sequence and message count) and the leader reports it current with no lag; returns that state."""
        name = self.nodes[i].name
        deadline = time.monotonic() + timeout
        mine: dict[str, Any] | None = None
        theirs: Any = None
        while time.monotonic() < deadline:
            cluster = await self.wait_replicas_current(stream, timeout=max(0.5, deadline - time.monotonic()),
                                                       names=[name])
            leader = self.index_of(cluster.leader)
            theirs = await asyncio.to_thread(self.nodes[leader].stream_state, stream)
            mine = await asyncio.to_thread(self.nodes[i].stream_state, stream)
            keys = ("messages", "first_seq", "last_seq")
            if theirs and mine and all(mine.get(k) == theirs.get(k) for k in keys):
                return mine
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{name} did not catch up on {stream} within {timeout}s: {mine} vs leader {theirs}")


async def _quiet(e: Exception) -> None:
    """nats-py's default error callback logs a traceback per refused connect: the helpers expect those."""


async def _connect(node: Node) -> Client:
    """A short-lived client of one node only, for cluster bookkeeping."""
    return await nats.connect(node.url, allow_reconnect=False, connect_timeout=1, max_reconnect_attempts=0,
                              error_cb=_quiet)


def _meta(node: Node) -> Any:  # for error messages only
    try:
        return node.jsz().get("meta_cluster")
    except Exception as e:
        return repr(e)
