"""`lightning_modules` is layered one way: the graph of its imports of its own modules has no cycle.

Every `import` / `from ... import` statement counts, at module level and inside functions (a lazy import
hides a loop at import time, it does not remove it), relative ones resolved. An import of a package's
submodule is an edge to that submodule (not to the package's `__init__`, which `lightning_modules`'s keeps
lazy, PEP 562)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "lightning_modules"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


@functools.cache
def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (`lightning_modules.networks` for its `__init__.py`)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (at `path`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c`: the submodule a.b.c where there is one, else the module a.b
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _targets(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_module_level_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "lightning_modules.networks.families" in graph["lightning_modules.checkpoint"]  # module level
    assert "lightning_modules.checkpoint" in graph["lightning_modules.priors"]
    assert "lightning_modules.priors" in graph["lightning_modules.module"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_function_level_import_counts(tmp_path) -> None:
    src = "def f():\n    from lightning_modules.checkpoint import load_torch_file\n    from . import sde\n"
    path = tmp_path / "x.py"
    path.write_text(src)
    modules = _modules()
    found = _targets("lightning_modules.sampling.x", path, modules)
    assert found == {"lightning_modules.checkpoint", "lightning_modules.sampling.sde"}


def test_lightning_modules_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
