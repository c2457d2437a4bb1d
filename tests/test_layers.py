"""The project's packages are layered one way, and the graph of their imports of one another has no cycle.

Every `import` / `from ... import` statement counts, at module level and inside functions (a lazy import
hides a loop at import time, it does not remove it), relative ones resolved. An import of a package's
submodule is an edge to that submodule (not to the package's `__init__`, which the packages keep lazy, PEP
562).

The layers, lowest first: `lfmri_utils` (files, errors, options, metrics) < `degradations` (the physics and
the `Measurement`) < `diffusion` (the diffusion maths: networks, SDEs, samplers, data consistency, losses,
inference, checkpoint I/O; no Lightning) < `datamodules` < `lightning_modules` (the Lightning layer) <
`lfmri` (the commands). A module imports only from its own layer and those below it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["lfmri_utils", "degradations", "diffusion", "datamodules", "lightning_modules", "lfmri"]


@functools.cache
def _modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (`diffusion.networks` for its `__init__.py`)."""
    out = {}
    for path in sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking_guard(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports under it are for annotations, never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that `name` (at `path`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for guard in ast.walk(tree) if _is_type_checking_guard(guard)
                   for stmt in guard.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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
    assert "diffusion.networks.families" in graph["diffusion.checkpoint"]  # module level
    assert "diffusion.checkpoint" in graph["lightning_modules.priors"]
    assert "lightning_modules.priors" in graph["lightning_modules.module"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_function_level_import_counts(tmp_path) -> None:
    src = "def f():\n    from diffusion.checkpoint import load_torch_file\n    from . import sde\n"
    path = tmp_path / "x.py"
    path.write_text(src)
    modules = _modules()
    found = _targets("diffusion.sampling.x", path, modules)
    assert found == {"diffusion.checkpoint", "diffusion.sampling.sde"}
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from diffusion import losses\n")
    assert _targets("diffusion.sampling.x", path, modules) == set()  # annotations only: no edge


def test_the_packages_have_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of everything the file at `path` imports (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge of `graph` from a module to a module of a higher layer, as 'a -> b'."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if rank[b.split(".")[0]] > rank[a.split(".")[0]])


def test_the_layers_import_one_way() -> None:
    assert upward_imports({"degradations.x": {"diffusion.y"}, "lfmri.a": {"diffusion.y"}}) == [
        "degradations.x -> diffusion.y"]
    assert upward_imports(import_graph()) == []


def test_the_diffusion_maths_imports_no_lightning() -> None:
    files = sorted((REPO / "diffusion").rglob("*.py"))
    assert len(files) >= 10
    offenders = [str(f.relative_to(REPO)) for f in files if "lightning" in third_party_imports(f)]
    assert offenders == []
    assert "lightning" in third_party_imports(REPO / "lightning_modules" / "module.py")  # the check sees it
