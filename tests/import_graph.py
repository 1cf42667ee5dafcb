"""The static import graph of the project's own packages (``detr``, ``pipelines``).

Read with :mod:`ast`, never by importing: every ``import x`` and ``from x import y`` counts,
at module level and inside functions alike (``y`` may be a submodule; relative imports are
resolved). Imports under ``if TYPE_CHECKING:`` are skipped (they never run). ``from pkg import
name`` where ``pkg`` loads ``name`` lazily (a module-level ``_EXPORTS = {"name": "module"}``,
as ``detr/__init__.py`` does) counts as an import of that module.

Modules are dotted names (``pipelines.stages.train``); :func:`module_file` gives their file
relative to the repository root.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detr", "pipelines")


@cache
def modules() -> dict[str, Path]:
    """Every module of :data:`PACKAGES`: dotted name -> file (absolute)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def module_file(name: str) -> str:
    """The file of module ``name``, relative to the repository root (``detr/config.py``)."""
    return modules()[name].relative_to(ROOT).as_posix()


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


@cache
def _lazy_exports(name: str) -> dict[str, str]:
    """``_EXPORTS`` of package ``name`` (attribute -> module it is loaded from), or {}."""
    tree = ast.parse(modules()[name].read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "_EXPORTS"):
            return dict(ast.literal_eval(node.value))
    return {}


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` in module ``name`` imports from."""
    if not node.level:
        return node.module or ""
    is_package = modules()[name].name == "__init__.py"
    base = name.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _own(name: str) -> str | None:
    """``name`` or its nearest enclosing module that is one of ours; None for third party."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports(name: str) -> frozenset[str]:
    """The modules of ours that module ``name`` imports (directly)."""
    found = set()
    for node in _runtime_nodes(ast.parse(modules()[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(_own(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules():
                    found.add(sub)
                elif source in modules() and alias.name in _lazy_exports(source):
                    found.add(_lazy_exports(source)[alias.name])
                else:
                    found.add(_own(source))
    found.discard(None)
    found.discard(name)
    return frozenset(found)


def third_party_imports(name: str) -> frozenset[str]:
    """Top-level names of every absolute import in module ``name`` (``mlflow``, ``torch``)."""
    found = set()
    for node in _runtime_nodes(ast.parse(modules()[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return frozenset(found)


def parents(name: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``name`` loads (``detr``, ``detr.models``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(*entries: str) -> set[str]:
    """Every module that importing ``entries`` may load: their imports, transitively, and the
    ``__init__`` of every package on the way."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imports(name))
        todo.extend(p for p in parents(name) if p in modules())
    return seen


def find_cycle(names: Iterable[str],
               edges: Callable[[str], Iterable[str]] = imports) -> list[str] | None:
    """One import circle among ``names`` (``[a, b, ..., a]``), following only the ``edges``
    (a module -> the modules it imports) inside ``names``; None when there is none."""
    names = set(names)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(set(edges(node)) & names):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(names):
        if start not in state and (found := visit(start)):
            return found
    return None
