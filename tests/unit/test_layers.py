"""The package's layer order and its import graph, read from the source (an AST walk, imports inside
functions included: a deferred import is still a dependency, only a hidden one).

LAYERS is the target layout of docs/architecture.md, lowest first: each layer names the package
prefixes it holds, the layers it may import, and the outside packages it must not import. Entry points
sit above everything and nothing in the package imports them. The real package is checked against the
table and for cycles; the checker itself is tested on planted trees.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "blip2_train"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE


@dataclass(frozen=True)
class Layer:
    modules: tuple[str, ...]  # module names and package prefixes (relative to the package)
    may_import: tuple[str, ...] = ()  # other layers of the package it may import
    never_imports: tuple[str, ...] = ()  # outside packages it must not import


# lowest first; a layer imports itself and the layers it names, nothing else of the package
LAYERS = {
    "utils": Layer(("utils",), never_imports=("lightning", "hydra")),
    "config": Layer(("config",), ("utils",), never_imports=("lightning", "torch")),
    "pure": Layer(("losses", "retrieval", "metrics"), ("utils",), never_imports=("lightning", "hydra", "omegaconf")),
    "models": Layer(("models",), ("utils", "pure"), never_imports=("lightning", "hydra", "omegaconf")),
    "data": Layer(("data",), ("utils", "config", "pure", "models")),
    "interop": Layer(("interop",), ("utils", "config", "pure", "models", "data")),
    "training": Layer(("training",), ("utils", "config", "pure", "models", "data", "interop")),
    "bench": Layer(("bench",), ("utils", "config", "pure", "models", "data", "interop", "training")),
    "entry": Layer(("__main__", "evaluate", "export", "generate", "consolidate", "slurm", "report"),
                   ("utils", "config", "pure", "models", "data", "interop", "training")),
}
ROOT = ""  # the package's own __init__: may import nothing of the package (it stays empty of imports)


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def modules_of(root: Path, package: str) -> dict[str, Path]:
    return {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of ``path``. A name imported
    from a package counts as the submodule when there is one (``from pkg import mod``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            deferred = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in known else base, child.lineno, in_function))
            visit(child, deferred)

    visit(tree, False)
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def import_graph(root: Path, package: str) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> the modules of the package it imports (line, inside a function)."""
    modules = modules_of(root, package)
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = []
        for target, line, deferred in imports_of(path, name, known):
            while target and target not in known and "." in target:  # pkg.mod.attr -> pkg.mod
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                edges.append((target, line, deferred))
        graph[name] = edges
    return graph


def layer_of(module: str, package: str, layers: dict[str, Layer]) -> str | None:
    relative = module[len(package) + 1:] if module != package else ROOT
    if relative == ROOT:
        return ROOT
    for layer, spec in layers.items():
        if any(relative == m or relative.startswith(m + ".") for m in spec.modules):
            return layer
    return None


def layer_violations(root: Path, package: str, layers: dict[str, Layer]) -> list[str]:
    """Every import that breaks the table, and every module that no layer holds."""
    modules = modules_of(root, package)
    known = set(modules)
    problems = []
    for name, path in modules.items():
        layer = layer_of(name, package, layers)
        if layer is None:
            problems.append(f"{name}: in no layer of the table")
            continue
        allowed = {layer} | set(layers[layer].may_import if layer != ROOT else ())
        for target, line, deferred in imports_of(path, name, known):
            where = f"{path.relative_to(root.parent)}:{line}{' (inside a function)' if deferred else ''}"
            top = target.split(".")[0]
            if top != package:
                if layer != ROOT and top in layers[layer].never_imports:
                    problems.append(f"{where}: layer {layer} imports {target}")
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            target_layer = layer_of(target, package, layers)
            if target_layer == ROOT or target == name:
                continue  # the package itself (a parent of every module) or a self-reference
            if target_layer not in allowed:
                problems.append(f"{where}: {name} (layer {layer}) imports {target} (layer {target_layer})")
    return problems


def import_cycles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(cycles)


def describe(cycle: list[str], graph) -> str:
    members = set(cycle)
    edges = [f"{a} -> {b}:{line}{'*' if deferred else ''}"
             for a in cycle for b, line, deferred in graph[a] if b in members]
    return "; ".join(edges)


# --- the real package -----------------------------------------------------------------------------

def test_package_follows_the_layer_table():
    problems = layer_violations(PACKAGE_DIR, PACKAGE, LAYERS)
    assert not problems, "imports against the layer order (docs/architecture.md):\n" + "\n".join(problems)


def test_package_has_no_import_cycles():
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (* = import inside a function):\n" + "\n".join(
        describe(cycle, graph) for cycle in cycles)


def test_the_walk_sees_the_whole_package():
    """The checker reads every module, the imports inside functions and the relative ones included."""
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    assert f"{PACKAGE}.models.encoders" in graph and f"{PACKAGE}.config" in graph
    assert len(graph) >= 30
    edges = {(a, b): deferred for a, targets in graph.items() for b, _, deferred in targets}
    assert edges[(f"{PACKAGE}.__main__", f"{PACKAGE}.config")] is False  # a module-level import
    assert any(edges.values())  # some imports are deferred into functions, and they are counted


# --- the checker on planted trees -----------------------------------------------------------------

def plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for relative, source in {"__init__.py": "", **files}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for directory in [p for p in package.rglob("*") if p.is_dir()]:
        (directory / "__init__.py").touch()
    return package


CLEAN = {
    "utils.py": "import os\n",
    "config.py": "import hydra\nfrom pkg import utils\n",
    "losses.py": "import torch\nfrom pkg import utils\n",
    "models/encoders.py": "import torch\nfrom pkg.losses import itc\nfrom . import qformer\n",
    "models/qformer.py": "from ..utils import atomic_write\n",
    "training/fit.py": "import lightning\nfrom pkg.models import encoders\nfrom pkg.data import webdataset\n",
    "data/webdataset.py": "from pkg.models.encoders import build\n",
    "__main__.py": "from pkg.training.fit import fit\n",
}


def test_a_layered_tree_passes(tmp_path):
    package = plant(tmp_path, CLEAN)
    assert layer_violations(package, "pkg", LAYERS) == []
    assert import_cycles(import_graph(package, "pkg")) == []


@pytest.mark.parametrize("module,source,expected", [
    ("models/encoders.py", "from pkg.training import fit\n",
     "pkg.models.encoders (layer models) imports pkg.training.fit (layer training)"),
    ("models/encoders.py", "def build():\n    from pkg.training.fit import fit\n",
     "(inside a function): pkg.models.encoders (layer models) imports pkg.training.fit (layer training)"),
    ("models/qformer.py", "from ..data import webdataset\n",
     "pkg.models.qformer (layer models) imports pkg.data.webdataset (layer data)"),
    ("models/qformer.py", "import hydra\n", "layer models imports hydra"),
    ("losses.py", "from pkg.config import VALID\n", "pkg.losses (layer pure) imports pkg.config (layer config)"),
    ("training/fit.py", "import pkg.__main__\n", "pkg.training.fit (layer training) imports pkg.__main__ (layer entry)"),
    ("stage9.py", "", "pkg.stage9: in no layer of the table"),
])
def test_a_planted_upward_import_is_reported(tmp_path, module, source, expected):
    package = plant(tmp_path, {**CLEAN, module: CLEAN.get(module, "") + source})
    problems = layer_violations(package, "pkg", LAYERS)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_cycle_through_a_function_level_import_is_reported(tmp_path):
    package = plant(tmp_path, {**CLEAN, "data/cache.py": "from pkg.data.webdataset import x\n",
                               "data/webdataset.py": "def f():\n    from pkg.data import cache\n"})
    graph = import_graph(package, "pkg")
    assert import_cycles(graph) == [["pkg.data.cache", "pkg.data.webdataset"]]
    assert "pkg.data.webdataset -> pkg.data.cache:2*" in describe(import_cycles(graph)[0], graph)
