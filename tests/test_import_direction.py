"""Arrows point one way: applications (vla_prune_cli, sim, ros_nodes, bench) -> vla_prune.

Two checks: every vla_prune module imports in a fresh interpreter where `sim`, `ros_nodes` and
`vla_prune_cli` cannot be imported at all; and a static import graph of the three packages
(module-level and function-level imports alike) has no cycle between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vla_prune", "vla_prune_cli", "sim", "ros_nodes")
APPLICATIONS = ("sim", "ros_nodes", "vla_prune_cli")

HIDE_AND_IMPORT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    HIDDEN = {hidden!r}

    class Block:  # a meta-path finder that refuses the applications
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ImportError(f"vla_prune imported the application {{name!r}}")
            return None

    sys.meta_path.insert(0, Block())
    import vla_prune
    names = [m.name for m in pkgutil.walk_packages(vla_prune.__path__, "vla_prune.")]
    for name in names:
        importlib.import_module(name)
    print(len(names))
    """
)


def test_library_imports_without_its_applications():
    code = HIDE_AND_IMPORT.format(hidden=set(APPLICATIONS))
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 30  # it walked the whole library, not an empty list


def test_the_block_catches_an_application_import(tmp_path):
    """The same harness fails when a library module does import an application."""
    code = HIDE_AND_IMPORT.format(hidden=set(APPLICATIONS)).replace(
        "import vla_prune\n", "import vla_prune\nimport sim.envs\n", 1
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0 and "imported the application 'sim" in r.stderr


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module `path` imports anywhere in its body (lazy imports count too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def import_graph() -> dict[str, set[str]]:
    files = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            files[_module_name(f)] = f
    packages = {n for n, f in files.items() if f.name == "__init__.py"}
    graph = {}
    for name, f in files.items():
        targets = _imports(f, name, name in packages) & set(files)
        # An edge into a package's __init__ is a re-export, not a dependency on a module.
        graph[name] = {t for t in targets if t not in packages and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "vla_prune.policy" in graph and "sim.train" in graph  # the walk found the code
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_library_modules_never_name_an_application():
    graph = import_graph()
    bad = {
        (a, b)
        for a, targets in graph.items()
        if a.startswith("vla_prune.")
        for b in targets
        if b.split(".")[0] in APPLICATIONS
    }
    assert not bad


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["vla_prune.models.checkpoints"] = graph["vla_prune.models.checkpoints"] | {
        "vla_prune.policy"
    }
    graph["vla_prune.policy"] = graph["vla_prune.policy"] | {"vla_prune.models.checkpoints"}
    assert find_cycle(graph) is not None
