"""The package's floors: every import (module level, inside functions and under TYPE_CHECKING) runs
downward or sideways in `LAYERS`, and no set of modules imports itself in a circle.

`LAYERS` is the one statement of the layer order (README "Architecture" describes it). A module takes the
layer of the longest pattern that names it (`pkg.*` covers a package's submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ndsnn_cli"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("ndsnn_cli", "ndsnn_cli.errors", "ndsnn_cli.limits", "ndsnn_cli.atomic")),
    # torch-free registry keys and catalogs (recipes validate against them) and the file formats
    ("names and formats", ("ndsnn_cli.snn", "ndsnn_cli.sparse", "ndsnn_cli.kernels", "ndsnn_cli.data",
                           "ndsnn_cli.loggers", "ndsnn_cli.distributed", "ndsnn_cli.plots", "ndsnn_cli.formats",
                           "ndsnn_cli.formats.*")),
    ("recipe", ("ndsnn_cli.recipe",)),
    ("components", ("ndsnn_cli.snn.*", "ndsnn_cli.sparse.*", "ndsnn_cli.kernels.*", "ndsnn_cli.data.*",
                    "ndsnn_cli.validate")),
    ("build and persistence", ("ndsnn_cli.build", "ndsnn_cli.checkpoint", "ndsnn_cli.rundir",
                               "ndsnn_cli.evaluation")),
    ("training", ("ndsnn_cli.trainer", "ndsnn_cli.lth", "ndsnn_cli.train")),
    ("products of a run", ("ndsnn_cli.export", "ndsnn_cli.export.*", "ndsnn_cli.cost")),
    ("equal training cost", ("ndsnn_cli.equal_cost",)),
    ("comparison", ("ndsnn_cli.compare", "ndsnn_cli.compare_report")),
    ("command line", ("ndsnn_cli.cli", "ndsnn_cli.cli.*", "ndsnn_cli.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern.endswith(".*"):
                matches = module.startswith(pattern[:-1])
            else:
                matches = module == pattern
            if matches and len(pattern) > best_len:
                best, best_len = index, len(pattern)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py LAYERS: give it one")
    return best


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports, anywhere in the file. `from pkg import name` is the submodule
    pkg.name when that exists, else pkg."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ndsnn_cli"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "ndsnn_cli":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
                  for src, targets in graph.items() for dst in targets if layer_of(dst) > layer_of(src))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    for module in all_modules():
        layer_of(module)


def test_no_import_runs_up_a_layer() -> None:
    assert upward_imports(import_graph(all_modules())) == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert circles(import_graph(all_modules())) == []


@pytest.mark.parametrize("planted", ["upward", "circle"])
def test_the_checks_catch_a_planted_violation(planted: str) -> None:
    """The checks themselves can fail: plant an upward import (the validator importing an exporter, as it
    once did) or a circle (recipe <-> schedules, as it once was) into the real graph."""
    graph = import_graph(all_modules())
    if planted == "upward":
        graph["ndsnn_cli.validate"] = graph["ndsnn_cli.validate"] | {"ndsnn_cli.export.csr"}
        assert "ndsnn_cli.validate (components) imports ndsnn_cli.export.csr (products of a run)" in \
            upward_imports(graph)
    else:
        graph["ndsnn_cli.recipe"] = graph["ndsnn_cli.recipe"] | {"ndsnn_cli.sparse.schedules"}
        assert ["ndsnn_cli.recipe", "ndsnn_cli.sparse.schedules"] in circles(graph)
