"""The house's shape: a package per stage, imports pointing down only, no circles.

A module may import its own stage's modules and those of the stages below it,
never a stage above (a lower stage that needs something gets a public hook or
plain data instead). Imports inside functions count too: a lazy import is still
an arrow, and hiding a circle behind one is how circles start.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

RACKER = Path(__file__).resolve().parent.parent / "racker"

# Bottom first. A stage is a top-level module or package of racker/.
STAGES = [
    {"racker", "errors", "progress", "settings", "proc", "redact", "untrusted", "fingerprint", "files", "sizes"},
    {"store"},
    {"cpu"},
    {"sources"},
    {"images"},
    {"machines"},
    {"prepare"},
    {"promote"},
    {"vm"},
    {"engines"},
    {"report"},
    {"pytest"},
    {"checks"},
    {"nightly"},
    {"upkeep"},
    {"cli"},
    {"__main__"},
]
FLOOR = {stage: floor for floor, stages in enumerate(STAGES) for stage in stages}


def module_name(path: Path) -> str:
    parts = path.relative_to(RACKER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in RACKER.rglob("*.py")}


def _code(tree: ast.Module, name: str) -> list[ast.AST]:
    """Every node of a module's code but the package root's facade: `racker.host` is
    racker/__init__.py's lazy __getattr__ onto the pytest stage, the one arrow up."""
    nodes: list[ast.AST] = []
    for top in tree.body:
        if name == "racker" and isinstance(top, ast.FunctionDef) and top.name == "__getattr__":
            continue
        nodes.extend(ast.walk(top))
    return nodes


@functools.cache  # each module is parsed once, for its own case and again for the circles
def imported(name: str) -> frozenset[str]:
    """The racker modules `name` imports, anywhere in its code."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _code(ast.parse(path.read_text()), name):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return frozenset(module for module in found if module in MODULES and module != name)


def stage(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "racker"


def test_every_module_of_racker_belongs_to_a_stage() -> None:
    assert {stage(name) for name in MODULES} <= set(FLOOR)


def test_top_level_holds_the_ground_floor_and_one_module_or_package_per_stage() -> None:
    top = [path.name for path in RACKER.glob("*.py") if path.name != "__init__.py"]
    assert len(top) <= 15, sorted(top)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_only(name: str) -> None:
    upward = sorted(other for other in imported(name) if FLOOR[stage(other)] > FLOOR[stage(name)])
    assert not upward, f"{name} imports from a stage above it: {upward}"


def test_no_circles_between_modules() -> None:
    graph = {name: imported(name) for name in MODULES}
    # a package's __init__ and its own submodules may import each other (the
    # package's API re-exports what its parts make): the arrow from the
    # package's own __init__ down to a child is not an arrow up.
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                circles.append([*trail[trail.index(other) :], other])
            elif other not in state:
                visit(other, [*trail, other])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles
