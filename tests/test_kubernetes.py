"""deploy/kubernetes/, checked by structure (no cluster here): every manifest parses, the names KEDA
watches are the ones natask creates, every natask command line parses with natask's own CLI, the
probes ask the ports those commands serve, and the environment holds only variables natask reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from natask.config import OPTIONS, Config
from natask.naming import Names

from .test_deploy import parse_natask

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BEAT_LEASE_TTL = 5.0
"""``Beat``'s default ``lease_ttl``: a stopping leader may publish for publish_timeout + this."""


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def manifests() -> list[dict[str, Any]]:
    """Every document of every file the kustomization lists."""
    docs = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) for every container of every Deployment."""
    for doc in manifests():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def command_of(deployment: str) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """(container, natask command path, its parsed parameters) of a Deployment's one container."""
    [container] = find("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    path, params = parse_natask(container["command"])
    return container, path, params


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, a container port's name resolved."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def config_from(configmap: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Config:
    """The Config a natask process builds from the ConfigMap as its environment (validating each value)."""
    for var in [*(f.metadata["env"] for f in OPTIONS), "NATS_URL"]:
        monkeypatch.delenv(var, raising=False)
    for var, value in configmap["data"].items():
        monkeypatch.setenv(var, value)
    return Config.build("k8s")


def variables_natask_reads() -> dict[str, set[tuple[str, ...]]]:
    """Environment variable -> the commands that read it (``()``: every command, through the app's Config)."""
    from natask.cli import main

    every: set[tuple[str, ...]] = {()}
    names = {"NATS_URL": every, **{f.metadata["env"]: every for f in OPTIONS}}
    names.update({var.strip(): every for var in Config.__dataclass_fields__["connect_options"].metadata["env"]
                  .split(",")})

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        for param in command.params:
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            for var in envvars:
                names.setdefault(var, set()).add(path)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))

    walk(main, ())
    return names


def test_the_kustomization_lists_every_manifest_and_each_parses() -> None:
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in manifests())
    assert kinds == [("ConfigMap", "natask"), ("Deployment", "natask-beat"), ("Deployment", "natask-dashboard"),
                     ("Deployment", "natask-worker"), ("Namespace", "natask"), ("ScaledObject", "natask-worker"),
                     ("Service", "natask-dashboard")]
    assert not any(d["kind"] in ("StatefulSet", "Secret") for d in manifests())  # NATS: the Helm chart; secrets: yours


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its kustomize builds the set)")
def test_kubectl_kustomize_builds_the_set_into_one_namespace() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert len(docs) == len(manifests())
    assert {d["metadata"].get("namespace", "natask") for d in docs} == {kustomization()["namespace"]}


def app_names(app_spec: str, queues: list[str] | None, environment: dict[str, str]) -> dict[str, Any]:
    """What natask creates for the app a worker runs, with the ConfigMap as its environment: the
    prefix, stream and consumers. In a fresh interpreter, as the pod imports it (the app reads its
    environment when it is created; an option given in code wins over it)."""
    script = ("import json, sys; from natask.cli import load_app; app = load_app(sys.argv[1]); "
              "queues = json.loads(sys.argv[2]) or [app.config.default_queue]; "
              "print(json.dumps({'prefix': app.config.subject_prefix, 'stream': app.names.stream, "
              "'consumers': [app.names.consumer(q) for q in queues]}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATASK_", "NATS_"))}
    done = subprocess.run([sys.executable, "-c", script, app_spec, json.dumps(queues or [])], cwd=ROOT,
                          env={**env, **environment}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_the_scaled_object_watches_the_stream_and_consumer_natask_creates(monkeypatch: pytest.MonkeyPatch) -> None:
    configmap = find("ConfigMap", "natask")
    config_from(configmap, monkeypatch)  # natask accepts every value
    _, path, params = command_of("natask-worker")
    assert path == ("worker",)
    queues = [q.strip() for q in params["queues"].split(",")] if params["queues"] else None
    created = app_names(params["app_spec"], queues, configmap["data"])
    # The ConfigMap's prefix is the one the app ends up with (an app may fix its own in code).
    assert configmap["data"].get("NATASK_SUBJECT_PREFIX", created["prefix"]) == created["prefix"]
    scaled = find("ScaledObject", "natask-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "natask-worker" and spec["scaleTargetRef"].get("kind", "Deployment") \
        == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = [t["metadata"] for t in spec["triggers"] if t["type"] == "nats-jetstream"]
    assert len(triggers) == len(spec["triggers"]) >= 1
    assert sorted(t["consumer"] for t in triggers) == sorted(created["consumers"])
    namespace = kustomization()["namespace"]
    for trigger in triggers:
        assert trigger["stream"] == created["stream"] == Names(created["prefix"]).stream
        assert trigger["account"] == "$G"
        host, _, port = trigger["natsServerMonitoringEndpoint"].rpartition(":")
        # The chart's headless service: KEDA reaches each server as <pod>.<this host> to find the leader.
        assert host == f"nats-headless.{namespace}.svc.cluster.local" and port == "8222"
        assert int(trigger["lagThreshold"]) >= 1 and int(trigger["activationLagThreshold"]) >= 0
        assert trigger["useHttps"] in ("true", "false")
    assert "replicas" not in find("Deployment", "natask-worker")["spec"]  # the ScaledObject's HPA owns it


def test_every_natask_command_line_parses_and_probes_ask_the_ports_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, path, params = command_of("natask-worker")
    assert path == ("worker",) and params["http_host"] == "0.0.0.0"  # the kubelet probes the pod's address
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = worker[probe]["httpGet"]
        assert get["path"] == "/health" and port_number(worker, get["port"]) == params["health_port"], probe
    assert port_number(worker, "metrics") == params["metrics_port"]
    template = find("Deployment", "natask-worker")["spec"]["template"]
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == params["metrics_port"]
    # The pod may take longer to stop than the worker's drain: never SIGKILLed mid-drain.
    assert template["spec"]["terminationGracePeriodSeconds"] > params["grace"]

    beat, path, params = command_of("natask-beat")
    assert path == ("beat",) and params["http_host"] == "0.0.0.0" and params["health_port"] is not None
    for probe in ("readinessProbe", "livenessProbe"):
        get = beat[probe]["httpGet"]
        assert get["path"] == "/health" and port_number(beat, get["port"]) == params["health_port"], probe
    spec = find("Deployment", "natask-beat")["spec"]
    assert spec["replicas"] == 2
    publish_timeout = config_from(find("ConfigMap", "natask"), monkeypatch).publish_timeout
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > publish_timeout + BEAT_LEASE_TTL

    dashboard, path, params = command_of("natask-dashboard")
    assert path == ("dashboard",) and params["host"] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        get = dashboard[probe]["httpGet"]
        assert get["path"] == "/healthz" and port_number(dashboard, get["port"]) == params["port"], probe
    service = find("Service", "natask-dashboard")["spec"]
    [port] = service["ports"]
    assert port_number(dashboard, port["targetPort"]) == params["port"]
    labels = find("Deployment", "natask-dashboard")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert "natask-dashboard" in params["allowed_hosts"]  # the Service's name passes the Host check


def test_deployments_select_their_own_pods_and_run_one_image() -> None:
    images = set()
    for deployment, container in containers():
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert container["command"][0] == "natask"
        images.add(container["image"])
        assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    [image] = images  # one image, built once, for worker, beat and dashboard
    assert ":" in image and not image.endswith(":latest")


def test_the_environment_holds_only_variables_natask_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    known = variables_natask_reads()
    configmap = find("ConfigMap", "natask")
    assert set(configmap["data"]) <= {var for var, users in known.items() if () in users}
    assert all(isinstance(v, str) for v in configmap["data"].values())  # a ConfigMap holds strings only
    config_from(configmap, monkeypatch)  # and natask accepts each value
    for deployment, container in containers():
        path, _ = parse_natask(container["command"])
        assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["natask"]
        for var in container.get("env", []):
            users = known.get(var["name"], set())
            assert () in users or path in users, f"{deployment['metadata']['name']}: natask does not read {var['name']}"


def test_dashboard_credentials_come_from_a_secret_through_the_environment() -> None:
    dashboard, _, params = command_of("natask-dashboard")
    argv = dashboard["command"]
    assert not {"--basic-auth", "--auth-token", "--insecure-no-auth"} & set(argv)  # `ps` would show them
    [auth] = [e for e in dashboard["env"] if e["name"] == "NATASK_DASHBOARD_BASIC_AUTH"]
    assert set(auth) == {"name", "valueFrom"} and auth["valueFrom"]["secretKeyRef"]["name"] == "natask-dashboard"
    assert params["basic_auth"] == ()  # nothing from the command line
