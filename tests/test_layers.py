"""The import rule of the package map (README, Development): each subpackage is a layer and
imports only from layers below it or from its own; no two modules import each other, even
through others, and even lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import filterx

PACKAGE = Path(filterx.__file__).resolve().parent

# Bottom to top. A module of layer i may import filterx modules of layers 0..i.
LAYERS = ("core", "runners", "kernels", "math", "io", "decode", "models", "scorers", "train", "stages", "report", "cli")
# Top-level modules outside the layers: the package itself (it enables portable numerics),
# ``python -m filterx``, and the public import path of the manifest reader.
FACADES = {"filterx": "core", "filterx.__main__": "cli", "filterx.manifest": "io"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module in FACADES:
        return LAYERS.index(FACADES[module])
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        raise AssertionError(f"{module} belongs to no layer: put it in one of {LAYERS}")
    return LAYERS.index(parts[1])


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The filterx modules ``path`` imports anywhere in its code (a name imported from a
    package counts as that submodule when one exists)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("filterx"):
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {m: imported_modules(p, known) - {m} for m, p in paths.items()}


def test_every_module_belongs_to_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_layer_imports_a_higher_one():
    bad = [f"{m} (layer {LAYERS[layer_of(m)]}) imports {d} (layer {LAYERS[layer_of(d)]})"
           for m, deps in import_graph().items() for d in sorted(deps)
           if d != "filterx" and layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` as a path that starts and ends at the same module, or None.
    A package's own ``__init__`` importing its submodules (a registry importing the modules that
    register into it) is no loop."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "filterx" or m.startswith(d + "."):
                continue  # a module naming its own package (its registry) is the package's business
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_loops():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_what_they_guard():
    """The rule's own checks, on made-up graphs: a loop through three modules is found, an
    upward import is named."""
    graph = {"filterx.io.a": {"filterx.io.b"}, "filterx.io.b": {"filterx.io.c"}, "filterx.io.c": {"filterx.io.a"}}
    assert find_cycle(graph) == ["filterx.io.a", "filterx.io.b", "filterx.io.c", "filterx.io.a"]
    assert find_cycle({"filterx.io.a": {"filterx.core.b"}, "filterx.core.b": set()}) is None
    assert layer_of("filterx.io.tario") < layer_of("filterx.stages.score")
