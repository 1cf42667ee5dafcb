"""Imports go down only (ARCHITECTURE.md): pipelines -> detr; no import circles.

Read from the static import graph (:mod:`tests.import_graph`): imports inside functions count
as much as those at the top of a module, since a circle through them still ties the modules
together and breaks as soon as someone moves the import up.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.import_graph import find_cycle, imports, modules, third_party_imports

MLOPS = ("pipelines", "mlflow", "prefect", "dvc", "great_expectations")
NOT_FOR_MODELS = ("detr.data", "detr.train", "detr.engine", "detr.checkpoint")


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _package(prefix: str) -> list[str]:
    return [m for m in modules() if _in(m, (prefix,))]


def all_imports(name: str) -> set[str]:
    """Our modules and the third-party top-level names that module ``name`` imports."""
    return set(imports(name)) | third_party_imports(name)


def offences(sources: list[str], banned: tuple[str, ...],
             edges: Callable[[str], set[str]] = all_imports) -> list[str]:
    """``"a -> b"`` for each module in ``sources`` that imports a ``banned`` name."""
    found = []
    for name in sorted(sources):
        targets = edges(name)
        found += [f"{name} -> {t}" for t in sorted(targets) if _in(t, banned)]
    return found


@pytest.mark.parametrize("package", ["detr", "pipelines"])
def test_no_import_circle(package):
    cycle = find_cycle(_package(package))
    assert cycle is None, f"import circle in {package}/: {' -> '.join(cycle)}"


def test_detr_imports_no_mlops_code():
    bad = offences(_package("detr"), MLOPS)
    assert not bad, f"detr/ must stay a plain PyTorch library: {'; '.join(bad)}"


def test_models_import_no_data_training_or_checkpoint_code():
    bad = offences(_package("detr.models"), NOT_FOR_MODELS)
    assert not bad, f"detr/models/ imports code above it: {'; '.join(bad)}"


def test_stages_import_nothing_from_what_runs_them():
    """pipelines/ops/ (servers, retrain, deploy, lock) runs the stages, not the other way
    round: a stage, its plumbing and its reports must not need it."""
    sources = [m for m in _package("pipelines") if not _in(m, ("pipelines.ops",))]
    bad = offences(sources, ("pipelines.ops",), lambda name: set(imports(name)))
    assert not bad, f"pipelines/ imports its operations: {'; '.join(bad)}"


def test_the_rules_see_a_violation():
    """The checks themselves, on a made-up graph: a circle and a banned import are named."""
    fake = {"detr.a": {"detr.b"}, "detr.b": {"detr.c", "mlflow"}, "detr.c": {"detr.a"},
            "detr.models.m": {"detr.train", "pipelines.stage", "torch"}}
    edges = lambda name: fake.get(name, set())  # noqa: E731
    assert find_cycle(fake, edges) == ["detr.a", "detr.b", "detr.c", "detr.a"]
    assert find_cycle(["detr.a", "detr.b"], edges) is None  # the circle needs detr.c
    assert offences(["detr.b", "detr.models.m"], MLOPS, edges) == [
        "detr.b -> mlflow", "detr.models.m -> pipelines.stage"]
    assert offences(["detr.models.m"], NOT_FOR_MODELS, edges) == ["detr.models.m -> detr.train"]


def test_the_graph_reads_every_kind_of_import():
    """Imports inside functions count, ``if TYPE_CHECKING:`` ones do not, ``from pkg import
    submodule`` and relative imports resolve to the submodule, lazy names to their module."""
    import ast

    from tests.import_graph import _lazy_exports, _resolve

    assert "pipelines.ops.retrain" in imports("pipelines.ops.deploy")  # inside a function
    assert "pipelines.params" not in imports("pipelines.validation.expectations")  # typing
    assert "detr.data.synthetic" in imports("pipelines.stages.prepare")  # from detr.data import
    node = ast.parse("from ..config import ConfigError").body[0]
    assert _resolve("detr.models.detr", node) == "detr.config"
    assert _resolve("detr.models", ast.parse("from . import detr").body[0]) == "detr.models"
    assert _lazy_exports("detr")["build_model"] == "detr.models"  # detr/__init__.py loads it
