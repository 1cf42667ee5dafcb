"""Every ``dvc.yaml`` stage lists all the code its outputs depend on, so "up to date" is true.

A stage runs ``python -m pipelines <command>``: ``pipelines/__main__.py`` and the module that
``COMMANDS[<command>]`` names there are its entry modules. Their static import closure inside
``detr/`` and ``pipelines/`` (:mod:`tests.import_graph`) must be covered by the stage's
``deps:``, each module by its own file or by a folder above it.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import PurePosixPath

import pytest
import yaml

from tests.import_graph import ROOT, closure, module_file

MAIN = "pipelines.__main__"


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def commands() -> dict[str, str]:
    """``COMMANDS`` of ``pipelines/__main__.py``, read statically: command -> module."""
    tree = ast.parse((ROOT / "pipelines/__main__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMMANDS":
            return {cmd: module for cmd, (module, _) in ast.literal_eval(node.value).items()}
    raise AssertionError("pipelines/__main__.py: no COMMANDS dict")


def entry_modules(stage: str, cmd: str) -> tuple[str, ...]:
    """The modules ``cmd`` (``python -m pipelines <command>``) starts from."""
    words = shlex.split(cmd)
    if words[:3] != ["python", "-m", "pipelines"] or len(words) < 4:
        raise AssertionError(f"dvc.yaml: stage {stage!r}: cmd {cmd!r} is not "
                             "`python -m pipelines <command>`; teach this test its entry")
    if words[3] not in commands():
        raise AssertionError(f"dvc.yaml: stage {stage!r}: command {words[3]!r} is not in "
                             "COMMANDS of pipelines/__main__.py")
    return MAIN, commands()[words[3]]


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    """The files that no dep (a file, or a folder above it) covers."""
    dep_paths = [PurePosixPath(d.rstrip("/")) for d in deps]
    return sorted(f for f in files
                  if not any(PurePosixPath(f) == d or d in PurePosixPath(f).parents
                             for d in dep_paths))


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_deps_cover_the_code_it_imports(stage):
    spec = stages()[stage]
    needed = {module_file(m) for m in closure(*entry_modules(stage, spec["cmd"]))}
    missing = uncovered(needed, spec.get("deps", []))
    assert not missing, (f"dvc.yaml: stage {stage!r} imports code that its deps do not list "
                         f"(add the file or its folder): {', '.join(missing)}")


def test_every_dep_exists():
    for stage, spec in stages().items():
        for dep in spec.get("deps", []):
            if dep.startswith(("detr", "pipelines")):
                assert (ROOT / dep).exists(), f"dvc.yaml: stage {stage!r}: dep {dep} is missing"


def test_the_check_sees_a_missing_dep():
    """The comparison itself: a module outside every dep is named."""
    assert uncovered({"detr/models/detr.py", "detr/config.py"},
                     ["detr/models", "pipelines/stages/train.py"]) == ["detr/config.py"]
    assert uncovered({"detr/models/detr.py"}, ["detr/models/"]) == []
