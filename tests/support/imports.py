"""The import graph of a package, read from its source (AST), without importing anything.

Nodes are modules: ``.py`` files and C extensions (a ``.c`` file defining ``PyInit_<stem>``).
An edge ``a -> b`` means running ``a`` imports ``b``: ``import p.b``, ``from p import b`` (``b`` a
module), ``from p.b import name``, relative forms too, and imports inside functions (a lazy
import still runs, so it cannot hide a cycle). Imports under ``if TYPE_CHECKING:`` never run
and are left out. Importing ``p.x.y`` also runs the package ``p.x``'s ``__init__``, so that is an
edge too, except to packages that contain the importer (they are initialised before it).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path


def discover(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for the package at ``root`` (its ``__init__`` included)."""
    base = root.parent
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    for path in sorted(root.rglob("*.c")):
        if re.search(rf"\bPyInit_{re.escape(path.stem)}\b", path.read_text(encoding="utf-8")):
            modules[".".join(path.relative_to(base).with_suffix("").parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` inside the package at ``root`` (see module docstring).

    A package that contains the importer is an edge only when a *name* is read from its
    ``__init__`` (``from otel_ml import __version__`` in ``otel_ml.pipeline``): it has started
    initialising before the importer runs, so that name may not exist yet.
    """
    modules = discover(root)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        if path.suffix != ".py":
            continue
        package = _package_of(name, path)

        def inside(target: str, name: str = name) -> bool:
            return name == target or name.startswith(target + ".")

        def add(target: str, name: str = name, inside: object = inside) -> None:
            parts = target.split(".")
            for cut in range(1, len(parts) + 1):
                module = ".".join(parts[:cut])
                if module in modules and not inside(module):  # type: ignore[operator]
                    edges[name].add(module)

        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
                continue
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source not in modules:
                continue
            add(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}")
                elif inside(source):
                    edges[name].add(source)  # a name read from an __init__ still initialising
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found


def levels(edges: dict[str, set[str]]) -> dict[str, int]:
    """Import level of each module of an acyclic graph: 0 imports nothing inside the package."""
    level: dict[str, int] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name not in level:
            if name in seen:
                raise ValueError(f"import cycle through {name}")
            level[name] = 1 + max((of(child, (*seen, name)) for child in edges[name]), default=-1)
        return level[name]

    for name in edges:
        of(name)
    return level
