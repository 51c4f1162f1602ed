"""metalab's modules import only downward: the import graph of src/metalab has no cycle.

The graph is read from the source (every `import` and `from ... import` at any depth, inside
functions too, relative imports resolved), so an import moved into a function to dodge a
cycle is still an edge and still fails here. The root package `metalab` itself is left out
as an importer: its `__getattr__` imports `metalab.api` only when `metalab.load_learner` is
first used, to keep `import metalab` cheap, and every module is below the root package by
being inside it (importing `metalab` for `__version__` is importing the root, not a layer).
"""

import ast
from pathlib import Path

import metalab

PACKAGE = "metalab"
SOURCE = Path(metalab.__file__).resolve().parent


def modules(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: its file} under `root` (the package's folder)."""
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = [package, *file.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def imported(module: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its file."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import submodule` imports the submodule; `from module import name` the module.
            names = [source, *(f"{source}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name != PACKAGE:
                targets.add(name)
    return targets


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    known = modules(root, package)
    return {module: imported(module, file, known) if module != package else set() for module, file in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph(SOURCE, PACKAGE)
    assert "metalab.algorithms.base" in graph and graph["metalab.algorithms.base"]  # the graph is read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in found)


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    """The check itself: a cycle closed by a function-level, relative import is reported, naming it."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "low.py").write_text("def f():\n    from .sub import high  # here only\n")
    (root / "sub" / "high.py").write_text("from pkg.low import f\n")
    (root / "leaf.py").write_text("import pkg.low\n")
    assert cycles(import_graph(root, "pkg")) == [["pkg.low", "pkg.sub.high"]]


def test_settings_is_a_leaf():
    """The settings and defaults are the bottom layer: they import only metalab.errors."""
    assert import_graph(SOURCE, PACKAGE)["metalab.settings"] == {"metalab.errors"}
