"""The layout shows the architecture: `flows/` is the pure core and imports neither the agent
nor the tools; `agent/` imports `flows/` only; `dvr/` stands on both; no two modules import
each other, however indirectly (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "agent", "dvr")
# what would make the core do I/O or keep time
NOT_IN_THE_CORE = ("os", "subprocess", "socket", "select", "time", "threading", "fcntl",
                   "signal", "pyroute2", "ovs", "ovsdbapp", "os_ken", "oslo_config", "scapy")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `path` imports, at any depth of its code: a `from A import B` counts as
    an import of A.B when that is a module, else of A."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def layer(module: str) -> str:
    return module.split(".")[0]


def test_the_core_imports_neither_the_agent_nor_the_tools(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} imports {i}" for m, deps in graph.items() if layer(m) == "flows"
                 for i in deps if layer(i) in ("agent", "dvr"))
    assert bad == []


def test_the_agent_does_not_import_the_tools(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} imports {i}" for m, deps in graph.items() if layer(m) == "agent"
                 for i in deps if layer(i) == "dvr")
    assert bad == []


def test_the_core_does_no_io(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} imports {i}" for m, deps in graph.items() if layer(m) == "flows"
                 for i in deps if i.split(".")[0] in NOT_IN_THE_CORE)
    assert bad == []


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    """Tarjan's strongly connected components over our own modules: every one of size 1."""
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_check_sees_our_modules(graph: dict[str, set[str]]) -> None:
    """The graph is real: the planner imports the model and the check, the agent the
    planner, the CLI the lab (so the tests above would see a forbidden import)."""
    assert {"flows.model", "flows.check"} <= graph["flows.planner"]
    assert "flows.planner" in graph["agent.main"]
    assert "dvr.lab.lab" in graph["dvr.cli"]
