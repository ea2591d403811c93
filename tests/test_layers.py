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
PENDING_CYCLES: Final[frozenset[str]] = frozenset({
    # the client under the app (issue 15), being built by the lead
    "natask.app", "natask.beat", "natask.beat.enqueue", "natask.beat.leader", "natask.beat.records",
    "natask.beat.schedule", "natask.beat.timetable", "natask.canvas", "natask.canvas.plan", "natask.canvas.send",
    "natask.canvas.signature", "natask.result", "natask.task", "natask.waiting",
    # inside the NATS layer
    "natask.broker.kv", "natask.broker.provision",
})
"""Modules still in import circles among themselves (the client under the app, issue 15, is being
built): a circle made only of these is tolerated for now; one that reaches any other module fails."""


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


def test_the_worker_is_imported_only_from_above() -> None:
    below = {"natask.broker", "natask.app", "natask.task", "natask.result", "natask.canvas", "natask.control"}
    offenders = sorted(name for name, deps in graph().items()
                       if any(name == b or name.startswith(b + ".") for b in below)
                       and any(d == "natask.worker" or d.startswith("natask.worker.") for d in deps))
    assert offenders == []
