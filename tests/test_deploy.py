"""docker-compose.yml and the Dockerfile, checked by structure (no Docker engine here); the same
topology runs for real in tests/integration/test_cluster.py with local servers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml

ROOT = Path(__file__).resolve().parent.parent


def parse_natask(argv: Sequence[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Parse a ``natask ...`` command line with natask's own click CLI, without running it: the
    command path (``("worker",)``, ``("beat",)``) and its parameters with defaults filled in. A
    mistyped option or value raises click's usage error."""
    from natask.cli import main

    assert argv[0] == "natask", argv
    command: click.Command = main
    path: list[str] = []
    args = list(argv[1:])
    parent: click.Context | None = None
    while True:
        ctx = command.make_context(" ".join(["natask", *path]), args, parent=parent)
        # Click 8 keeps the subcommand's name apart (Click 9 leaves it in ctx.args).
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not isinstance(command, click.Group) or not rest:
            assert not rest, f"{argv}: left unparsed: {rest}"
            return tuple(path), dict(ctx.params)
        name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None, argv
        command, parent = sub, ctx
        path.append(name)


def probe_port(test: Sequence[str]) -> tuple[int, str]:
    """(port, path) of the URL in a compose healthcheck that fetches one."""
    url = next(word for part in test for word in re.findall(r"https?://[^'\"\s)]+", part))
    parts = urlsplit(url)
    assert parts.hostname == "localhost" and parts.port is not None, url
    return parts.port, parts.path


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_three_node_jetstream_cluster() -> None:
    services = compose()["services"]
    nodes = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("nats:")}
    assert sorted(nodes) == ["n1", "n2", "n3"]
    for name, node in nodes.items():
        version = re.match(r"nats:(\d+)\.(\d+)", node["image"])
        assert version and (int(version[1]), int(version[2])) >= (2, 12), node["image"]
        cmd = node["command"]
        assert "-js" in cmd and cmd[cmd.index("--name") + 1] == name
        assert cmd[cmd.index("--cluster_name") + 1] == "natask"
        routes = set(cmd[cmd.index("--routes") + 1].split(","))
        assert routes == {f"nats://{other}:6222" for other in nodes if other != name}
        assert any(v.endswith(":/data") for v in node["volumes"])  # JetStream state survives restarts
        assert version[0] == "nats:2.15"  # pinned to the server version the tests run against
        assert any(p.endswith(":4222") for p in node["ports"])  # every server reachable from the host
    assert len({p for n in nodes.values() for p in n["ports"]}) == 3


def test_workers_beat_and_dashboard_use_the_cluster_with_three_replicas() -> None:
    services = compose()["services"]
    for name in ("worker", "beat", "dashboard"):
        svc = services[name]
        env = svc["environment"]
        assert env["NATS_URL"] == "nats://n1:4222,nats://n2:4222,nats://n3:4222"
        assert env["NATASK_STREAM_REPLICAS"] == "3"
        assert svc["build"] == "." and svc["image"] == "natask-demo:local"  # one image, built once
        assert set(svc["depends_on"]) == {"n1", "n2", "n3"}
        assert svc["command"][:2] == ["natask", name] and "-A" in svc["command"]
    assert services["beat"]["deploy"]["replicas"] >= 2  # HA beat: several may run
    dashboard = services["dashboard"]
    assert "--insecure-no-auth" not in dashboard["command"]  # behind auth, from the environment
    assert dashboard["environment"]["NATASK_DASHBOARD_BASIC_AUTH"].startswith("admin:${DASHBOARD_PASSWORD:?")
    assert services["worker"]["stop_grace_period"] == "40s"  # longer than the worker's 30 s drain


def test_every_service_has_a_healthcheck_on_the_port_its_command_serves() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"  # the nats nodes: from their anchor
    expected = {"worker": "/health", "beat": "/health", "dashboard": "/healthz"}
    for name, path in expected.items():
        svc = services[name]
        command, params = parse_natask(svc["command"])
        assert command == (name,)
        port = params["port"] if name == "dashboard" else params["health_port"]
        assert probe_port(svc["healthcheck"]["test"]) == (port, path), name
    assert services["beat"]["healthcheck"]["test"][0] == "CMD"


def test_the_app_module_named_by_compose_exists_and_has_a_periodic_entry() -> None:
    from natask.cli import load_app

    app = load_app("natask.demo:app")
    assert "demo.checksum" in app.tasks and app.periodic_entries


def test_dockerfile_installs_natask() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[0-9]", text, re.M)
    assert "pip install" in text and "COPY natask" in text and "natask" in text.split("CMD", 1)[1]
