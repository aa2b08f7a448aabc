"""The package's shape (docs/DESIGN.md): no import cycle, curvature/ below methods/, small files and classes.

Module-level imports only: an import inside a function (the method registry's `import_module`) runs
after both modules exist and cannot deadlock an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ctrlora"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        imported: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {other for other in imported if other in paths and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_and_curvature_never_imports_methods() -> None:
    graph = import_graph()
    assert "ctrlora.methods.base" in graph and graph["ctrlora.methods.ctr_lora"]  # the graph was read
    assert cycles(graph) == []
    upward = [(name, other) for name, imported in graph.items() for other in imported
              if name.startswith("ctrlora.curvature") and other.startswith("ctrlora.methods")]
    assert upward == []


def test_no_file_over_400_lines_and_ctr_lora_method_under_150() -> None:
    long = {module_name(path): n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
    tree = ast.parse((PACKAGE / "methods" / "ctr_lora.py").read_text())
    method = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "CtrLoraMethod")
    assert method.end_lineno - method.lineno + 1 < 150
