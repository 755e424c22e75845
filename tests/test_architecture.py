"""The layering of lit_dpo, written down: read every module's imports with `ast` (lazy ones inside functions
included) and check the rules the layout stands for.

    losses            pure math: no lightning, transformers or peft
    models/           the only importer of peft and bitsandbytes; `models.sources` (paths, tokenizers),
                      which the data side uses, imports neither
    data/             knows no model: nothing from models' loading, the module, the forward or the callbacks,
                      not even through another module
    callbacks/        watch the run, never the data (nor the recommendation wing, which reads it)
    compat            the only place that touches another library's private names
    top-level parts   (cli, module, forward, data, models, callbacks, rec, sweep, commands, ...) import each
                      other without cycles, and so do the modules
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_dpo"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file; `from a import b` counts `a.b` when that is a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
    return names


IMPORTS = {name: imports(path) for name, path in MODULES.items()}


def importers_of(*targets: str) -> set[str]:
    """The package modules importing any of `targets` (or a submodule of one)."""
    return {m for m, names in IMPORTS.items() if any(n == t or n.startswith(f"{t}.") for n in names for t in targets)}


def reachable(module: str) -> set[str]:
    """Every package module `module` imports, directly or through others (what importing it runs)."""
    seen, todo = set(), [module]
    while todo:
        for name in IMPORTS.get(todo.pop(), ()):
            if name in MODULES and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def part(module: str) -> str:
    """The top-level part a module belongs to: `lit_dpo.rec.scoring` -> `rec`, `lit_dpo.cli` -> `cli`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "lit_dpo"


def test_the_package_is_all_there():
    assert {"lit_dpo.losses", "lit_dpo.forward", "lit_dpo.module", "lit_dpo.cli", "lit_dpo.compat", "lit_dpo.files",
            "lit_dpo.models.sources", "lit_dpo.models.loading", "lit_dpo.data.datamodule", "lit_dpo.rec.callback",
            "lit_dpo.sweep.plan", "lit_dpo.commands"} <= MODULES.keys()


def test_losses_import_no_framework():
    assert not {n for n in IMPORTS["lit_dpo.losses"] if n.split(".")[0] in ("lightning", "transformers", "peft")}


@pytest.mark.parametrize("library", ["peft", "bitsandbytes"])
def test_only_models_import_peft_and_bitsandbytes(library):
    outside = {m for m in importers_of(library) if not m.startswith("lit_dpo.models")}
    assert not outside, f"{library} imported outside lit_dpo/models/: {sorted(outside)}"
    assert "lit_dpo.models.sources" not in importers_of(library)  # what the data side may use stays light


def test_data_knows_no_model():
    forbidden = ("lit_dpo.models.loading", "lit_dpo.models.adapters", "lit_dpo.module", "lit_dpo.forward",
                 "lit_dpo.callbacks", "lit_dpo.reference_cache", "lit_dpo.cli")
    offenders = {m: sorted(n for n in reachable(m) if n.startswith(forbidden)) for m in MODULES if m.startswith("lit_dpo.data")}
    assert not {m: n for m, n in offenders.items() if n}


def test_callbacks_do_not_read_the_data():
    offenders = {m: sorted(n for n in reachable(m) if n.startswith(("lit_dpo.data", "lit_dpo.rec")))
                 for m in MODULES if m.startswith("lit_dpo.callbacks")}
    assert not {m: n for m, n in offenders.items() if n}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges`, as a list of nodes ending where it starts, or None."""
    path: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(edges) if (cycle := visit(node))), None)


def test_no_import_cycles_between_top_level_parts():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, names in IMPORTS.items():
        for name in names:
            if name.startswith("lit_dpo.") and part(name) != part(module):
                edges[part(module)].add(part(name))
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle between top-level parts: {' -> '.join(cycle)}"


def test_no_import_cycles_between_modules():
    # a package's __init__ re-exporting its modules is not a cycle of theirs
    edges = {m: {n for n in names if n in MODULES and n != m and not m.startswith(f"{n}.")} for m, names in IMPORTS.items()}
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle between modules: {' -> '.join(cycle)}"


def private_uses(path: Path) -> list[str]:
    """`x._name` where x is not self/cls (so `super()._name` too), and `getattr(x, "_name")`: another
    object's private attribute."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and private(name.value):
                found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {name.value!r})")
    return found


def test_private_names_of_other_libraries_only_in_compat():
    uses = [use for name, path in MODULES.items() if name != "lit_dpo.compat" for use in private_uses(path)]
    assert not uses, f"private attributes used outside lit_dpo/compat.py: {uses}"
