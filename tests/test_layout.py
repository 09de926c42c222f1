"""The package's shape: the config is a leaf that imports no torch, and no module imports another in a cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pyraflow

PACKAGE = Path(pyraflow.__file__).parent


def test_the_config_imports_no_torch():
    code = "import pyraflow.config, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """pyraflow modules imported by a file, at any depth of the file (lazy imports in functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyraflow"):
            for alias in node.names:  # "from pyraflow.data import cache" imports the module pyraflow.data.cache
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pyraflow")}
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(files)) - {name} for name, path in files.items()}
    # importing a module first runs its package's __init__: an edge to every enclosing package, except the
    # importer's own packages (a package's __init__ importing its submodules, which import each other, is no cycle)
    for name, targets in graph.items():
        own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts))} - own - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_another_in_a_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "pyraflow.train.trainer" in graph["pyraflow.train.loop"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_leaves_import_no_other_pyraflow_module():
    graph = import_graph()
    for leaf in ("pyraflow.config.buckets", "pyraflow.config.loading", "pyraflow.storage", "pyraflow.packing"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"
    # the home of weights on disk knows files and configs, no model
    assert graph["pyraflow.weights"] <= {"pyraflow", "pyraflow.config", "pyraflow.storage"}, graph["pyraflow.weights"]
    assert graph["pyraflow.config.sections"] <= {"pyraflow.config.buckets"}
    assert graph["pyraflow.config"] <= {"pyraflow.config.loading", "pyraflow.config.sections", "pyraflow.config.buckets"}
    assert graph["pyraflow.schedule"] <= {"pyraflow.config"}
