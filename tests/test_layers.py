"""The package's shape: each layer imports only from the layers below it, no import
circles, no oversized module. Pure Python (reads the source; no KVM)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hlpool"

# Lowest first. A module may import from its own layer and from lower ones.
LAYERS = ["kvm", "guest", "memory", "machine", "snapshot", "sandbox", "pool", "ray", "service", "cli"]
LEAVES = {"hlpool.errors", "hlpool.defaults", "hlpool.version", "hlpool._mapping", "hlpool.kept"}
TOP = {"hlpool", "hlpool.worker", "hlpool.supervisor"}  # re-exports of the public API
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.is_dir() or any(path.with_suffix(s).exists() for s in (".py", ".pyx"))


def _imports(path: Path) -> set[str]:
    """hlpool modules imported anywhere in the file (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for sub in node.body for n in ast.walk(sub))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "hlpool" or n.startswith("hlpool."))
    return out


def _rank(module: str) -> int:
    if module in LEAVES or any(module.startswith(leaf + ".") for leaf in LEAVES):
        return -1
    if module in TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


SOURCES = sorted(p for p in ROOT.rglob("*.py") if "programs" not in p.parts)


def test_every_module_belongs_to_a_layer():
    for path in SOURCES:
        name = _module_name(path)
        assert name in LEAVES or name in TOP or name.split(".")[1] in LAYERS, f"{name} is in no layer"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_point_down(path):
    me = _module_name(path)
    mine = _rank(me)
    for target in _imports(path):
        if target == "hlpool" and me in TOP:
            continue
        if target in ("hlpool",):
            pytest.fail(f"{me} imports the top-level package (import the defining module instead)")
        assert _rank(target) <= mine, f"{me} (layer {mine}) imports {target} (layer {_rank(target)}) from above"
        if mine == -1:
            assert _rank(target) == -1 and target != me, f"leaf {me} imports {target}"


def test_no_import_circles():
    graph = {_module_name(p): set() for p in SOURCES}
    for path in SOURCES:
        for target in _imports(path):
            while target and target not in graph:
                target = target.rpartition(".")[0]
            if target and target != _module_name(path) and not _module_name(path).startswith(target + "."):
                graph[_module_name(path)].add(target)
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, trail: list[str]) -> None:
        seen[node] = 1
        for nxt in graph[node]:
            if seen.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in seen:
                visit(nxt, trail + [node])
        seen[node] = 2

    for node in graph:
        if node not in seen:
            visit(node, [])


@pytest.mark.parametrize("path", SOURCES + sorted(ROOT.rglob("*.pyx")), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_module_size(path):
    lines = sum(1 for _ in path.open())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (at most {MAX_LINES}: split it by job)"
