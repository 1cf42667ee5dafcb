"""The project's settings that store a dataset once (README: "Disk and scale"); the disk itself
is measured end to end in tests/pipelines/test_dataset_disk.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.params import PrepareConfig

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")


def test_dvc_links_its_cache_and_prepare_hard_links() -> None:
    done = subprocess.run([DVC, "config", "--project", "cache.type"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().split(",")[0] == "hardlink", done.stdout
    assert PrepareConfig().link == "hardlink"


@pytest.mark.parametrize(("path", "ignored"), [
    ("data/raw.dvc", False),  # `dvc add data/raw` refuses a .dvc file that git ignores
    ("data/raw/images/a.jpg", True),
    ("data/dataset/annotations/train.json", True),
])
def test_git_versions_dvc_files_only_under_data(path: str, ignored: bool) -> None:
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert done.returncode == (0 if ignored else 1), path
