"""Imports go down only inside detr/ (ARCHITECTURE.md), even imports inside functions."""

import ast
from pathlib import Path

import pytest

DETR = Path(__file__).resolve().parents[2] / "detr"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports from the detr package, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "detr" or n.startswith("detr.")}


def _offending(files, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{path.relative_to(DETR.parent)} imports {name}" for path in files
                  for name in _imports(path)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_the_checkpoint_module_imports_no_model_code():
    assert _offending([DETR / "checkpoint.py"], ("detr.models",)) == []


@pytest.mark.parametrize("forbidden", ["detr.data", "detr.train", "detr.engine",
                                       "detr.checkpoint", "detr.hub"])
def test_models_import_no_data_training_or_checkpoint_code(forbidden):
    assert _offending(sorted((DETR / "models").rglob("*.py")), (forbidden,)) == []
