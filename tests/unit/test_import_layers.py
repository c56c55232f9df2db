"""The import layers: router -> worker's MLX-free modules and cachestore; worker ->
cachestore; cachestore -> nothing of ours. Every import counts, including the ones
inside functions, and no module may reach itself through a chain of imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"router": "kvrouter.router", "worker": "kvrouter.worker", "cachestore": "kvrouter.cachestore"}
# What each layer may import of ours (besides itself).
ALLOWED = {
    "kvrouter.router": {"kvrouter.worker", "kvrouter.cachestore", "kvrouter_proto"},
    "kvrouter.worker": {"kvrouter.cachestore", "kvrouter_proto"},
    "kvrouter.cachestore": set(),
}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` (at `path`) imports, resolved to the longest known module."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    found.add(candidate)
                    break
            if t.split(".")[0] in PACKAGES:
                found.add("BARE:" + t)
            if t.startswith("kvrouter_proto"):
                found.add("kvrouter_proto")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def layer(module: str) -> str:
    return ".".join(module.split(".")[:2]) if module.startswith("kvrouter.") else module


def test_no_module_imports_a_layer_above_it():
    bad = []
    for name, deps in graph().items():
        own = layer(name)
        for dep in deps:
            if dep.startswith("BARE:"):
                bad.append(f"{name} imports bare {dep[5:]} (use kvrouter.*)")
            elif layer(dep) != own and layer(dep) not in ALLOWED[own]:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports that run up the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if dep not in g:
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("folder", ["tests", "router", "worker", "cachestore"])
def test_code_imports_only_the_kvrouter_namespace(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.relative_to(ROOT)}: import {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bad, "\n".join(bad)
