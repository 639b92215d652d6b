"""The package's layout rules: no import cycles between transferkit's modules.

Imports inside functions count too: they hide a cycle from Python at import time, not from a
reader, and the next module-level import along either edge turns it into an ImportError.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """``{module: transferkit modules it imports}``, from every import statement of its source."""
    modules = _module_names()

    def owner(name: str) -> str:  # a module, or the module that defines the imported name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}".rstrip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {owner(t) for t in targets if t.split(".")[0] == "transferkit"}
        graph[module] = edges - {module, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_module_and_function_level_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    real = import_graph()
    assert "transferkit.cache.compute" in real["transferkit.cache.extraction"]
    # A function-level import is an edge: cli.training imports transferkit.training.run inside train().
    assert "transferkit.training.run" in real["transferkit.cli.training"]


def test_no_import_cycles():
    found = cycles(import_graph())
    if found:
        pytest.fail("Import cycles (function-level imports included): "
                    + "; ".join(" <-> ".join(component) for component in found))
