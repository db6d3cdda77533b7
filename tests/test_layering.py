"""The package's import structure (docs/architecture.md, "Layers"): no import cycle inside
megatron_t2i, and no module importing a layer above its own.

Imports are read with `ast` from the source, so a function-level import counts as much as a
top-level one (it is the same dependency, only deferred); imports under `if TYPE_CHECKING:`
do not count (they never run).
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

PACKAGE = "megatron_t2i"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Layer of each top-level module or subpackage: a module may import its own layer and those
# below it. Anything not listed is an application (the top layer).
LAYERS: dict[str, int] = {
    # 0: the foundation every other part may use
    "__init__": 0, "config": 0, "vocab": 0, "platform": 0, "distributed": 0, "timers": 0,
    "files": 0,
    # 1: tokenizers, token files and samples, the model
    "tokenizers": 1, "data": 1, "model": 1,
    # 2: training, evaluation and checkpoint tools built on them
    "training": 2, "eval": 2, "checkpoint": 2,
}
TOP = 3
NAMES = {0: "foundation", 1: "tokenizers/data/model", 2: "training/eval/checkpoint",
         3: "applications"}

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (anywhere in the file except TYPE_CHECKING)."""
    module, is_package = module_name(path), path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            # `from megatron_t2i.data import loader` imports the module data.loader
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                         for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {_owning_module(name, known) for name in found
            if name == PACKAGE or name.startswith(PACKAGE + ".")} - {module, None}


def _owning_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    return _graph(ROOT)


@functools.lru_cache(maxsize=2)
def _graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) for f in files}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "__init__", TOP)


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, deps in graph.items() for b in deps if layer(b) > layer(a)}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_inside_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_no_layer_imports_a_layer_above_it():
    found = sorted(upward_imports(import_graph()))
    assert not found, "upward imports: " + "; ".join(
        f"{a} ({NAMES[layer(a)]}) imports {b} ({NAMES[layer(b)]})" for a, b in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_see_function_level_relative_and_type_checking_imports(tmp_path,
                                                                          monkeypatch):
    _write(tmp_path, {
        "__init__.py": "",
        "config.py": "def f():\n    from megatron_t2i.training import trainer\n",
        "data/__init__.py": "",
        "data/loader.py": "from ..training.metrics import Stopwatch\n",
        "data/dataset.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    from megatron_t2i.eval import perplexity\n",
        "training/__init__.py": "",
        "training/trainer.py": "import megatron_t2i.config\n",
        "training/metrics.py": "from megatron_t2i import config\n",
        "eval/__init__.py": "",
        "eval/perplexity.py": "",
    })
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / PACKAGE)
    graph = import_graph()
    assert graph["megatron_t2i.data.dataset"] == set()
    assert cycles(graph) == [{"megatron_t2i.config", "megatron_t2i.training.trainer"}]
    assert upward_imports(graph) == {
        ("megatron_t2i.config", "megatron_t2i.training.trainer"),
        ("megatron_t2i.data.loader", "megatron_t2i.training.metrics")}


if __name__ == "__main__":  # pragma: no cover - a listing for whoever fixes a violation
    for edge in sorted(upward_imports(import_graph())):
        print("upward:", *edge)
    for component in cycles(import_graph()):
        print("cycle:", sorted(component))
    pytest.main([__file__])
