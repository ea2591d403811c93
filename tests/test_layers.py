"""The import graph of the ``natask`` package, read from the source (``ast``, so imports under
``if TYPE_CHECKING:`` and inside functions count too): no import circles, and nats-py imported
only by the NATS layer, ``natask.broker``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1] / "natask"
"""The package whose modules are checked."""
NATS_LAYER: Final = "natask.broker"
"""The only package that may import nats-py."""
LAYERS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 pure: no I/O, nothing of natask above it
    ("errors", "states", "naming", "config", "message", "options", "retry", "hooks", "signals", "logs",
     "shutdown", "routes"),
    # 1 the NATS layer
    ("broker",),
    # 2 the client: connections per loop, publishing, waiting, the sync portal
    ("portal", "waiting", "client"),
    # 3 what users hold: tasks, result handles, workflows, periodic entries
    ("result", "task", "canvas", "beat.schedule", "beat.stored", "beat.schedules", "remote"),
    # 4 the app: configuration, registry, one client
    ("app", "settings", "shared"),
    # 5 services
    ("worker", "beat", "control", "dlq", "failover", "events", "metrics", "http", "dashboard", "supervisor", "server",
     "testing", "otel", "sentry"),
    # 6 the command line and the package's own re-exports
    ("cli", "demo", "__main__", "celery", ""),
)
"""natask's layers, bottom to top (module names under ``natask.``; a package covers its modules,
the longest match wins): a module imports only from its own layer or below (docs/ARCHITECTURE.md)."""
PENDING_CYCLES: Final[frozenset[str]] = frozenset()
"""Modules still in import circles among themselves (none left)."""


def rank(module: str) -> int:
    """The layer of ``module``; a module no layer names fails the test (give it one)."""
    rel = module.removeprefix("natask").removeprefix(".")
    best, found = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (rel == name or rel.startswith(name + ".") or name == "") and len(name) > best:
                best, found = len(name), i
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module ``name`` imports (absolute names; ``from pkg import mod`` gives ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_natask_modules() -> None:
    outside = [sorted(c) for c in cycles(graph()) if not c <= PENDING_CYCLES]
    assert outside == [], "import circles (TYPE_CHECKING imports count): break them with a Protocol"


def test_only_the_nats_layer_imports_nats() -> None:
    known = modules()
    offenders = sorted(name for name, path in known.items()
                       if not (name == NATS_LAYER or name.startswith(NATS_LAYER + "."))
                       and any(m == "nats" or m.startswith("nats.") for m in imported(name, path, known)))
    assert offenders == []


def test_every_module_imports_only_its_own_layer_or_below() -> None:
    edges = graph()
    unplaced = sorted(m for m in edges if rank(m) < 0 or (m != "natask" and rank(m) == len(LAYERS) - 1
                                                          and not any(m == f"natask.{n}" for n in LAYERS[-1])))
    assert unplaced == [], "modules without a layer: add them to LAYERS"
    upward = sorted(f"{m} ({rank(m)}) -> {d} ({rank(d)})" for m, deps in edges.items() for d in deps
                    if rank(d) > rank(m))
    assert upward == [], "imports from a higher layer: move the code down or hand it a Protocol"


def test_the_app_and_the_worker_are_imported_only_from_above() -> None:
    for top, layer in (("natask.app", 4), ("natask.worker", 5)):
        offenders = sorted(m for m, deps in graph().items() if rank(m) < layer
                           and any(d == top or d.startswith(top + ".") for d in deps))
        assert offenders == [], f"{top} imported from below"
