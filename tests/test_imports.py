"""The package's import graph: dependencies point one way, so no two modules import each other,
directly or through others (models use kernels, kernels never import models)."""

from __future__ import annotations

import ast
from pathlib import Path

import rwkv_cli

PACKAGE_DIR = Path(rwkv_cli.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, package: str, modules: set[str]) -> set[str]:
    """Which of ``modules`` the module ``name`` (of ``package``) imports anywhere in its source:
    at the top, inside functions and under ``if TYPE_CHECKING``, relative imports resolved.

    A package's ``__init__`` counts where it is imported by name, not where one of its submodules
    is (Python runs it first then, but the submodule does not depend on it)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # ``from package import module`` imports the module
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return found & modules - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules(path.read_text(encoding="utf-8"), name, package, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

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
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def a_cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One import cycle inside a strongly connected component, as a path back to its start."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest cycle through ``start``
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def test_the_graph_sees_imports_inside_functions_and_relative_ones() -> None:
    source = (
        "from . import b\nfrom ..top import x\n\n"
        "def f():\n    from .c import g\n    import pkg.sub.d\n"
    )
    modules = {"pkg.top", "pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.d"}
    found = imported_modules(source, "pkg.sub.a", "pkg.sub", modules)
    assert found == {"pkg.top", "pkg.sub.b", "pkg.sub.c", "pkg.sub.d"}


def test_cycles_are_found_and_shown_as_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert a_cycle_through(["a", "b", "c"], graph) == ["a", "b", "c", "a"]


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    graph = import_graph()
    found = cycles(graph)
    shown = "\n".join(
        f"{', '.join(component)}\n  e.g. {' -> '.join(a_cycle_through(component, graph))}"
        for component in found
    )
    assert not found, f"import cycles in rwkv_cli:\n{shown}"
