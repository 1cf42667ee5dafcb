"""A user's dataset brought in with ``prepare.source`` is stored once (README: "Disk and
scale"), and ``dvc repro`` still sees a changed image: it re-runs prepare and validate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from detr.data import synthetic
from tests.pipelines.project import (
    BIN,
    make_project,
    project_env,
    ran_stages,
    real_disk,
    sh,
    use_own_data,
)

DVC = str(BIN / "dvc")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict, int]:
    """A copy of the project with 50 images in ``data/raw``, ``dvc add``ed, ``prepare``
    pointed at them as the README says; also the real disk of the source as DVC tracks it
    (``data/raw`` and the DVC cache, before any stage ran)."""
    root = tmp_path_factory.mktemp("own-data")
    env = project_env()
    make_project(root, env)
    synthetic.generate(root / "data" / "raw", num_train=45, num_val=5, image_size=256,
                       num_workers=1)
    sh([DVC, "add", "data/raw"], root, env)
    source = sum(real_disk([root / "data" / "raw", root / ".dvc" / "cache"]))
    use_own_data(root)
    return root, env, source


@pytest.mark.slow
def test_a_dataset_is_stored_once_and_a_changed_image_reruns_prepare(project) -> None:
    root, env, source = project
    first = sh([DVC, "repro", "validate"], root, env)
    assert ran_stages(first.stdout) == {"prepare", "validate"}, first.stdout
    _stored_once(root, source)

    changed = root / "data" / "raw" / "images" / "train" / "000003.jpg"
    _replace_image(changed)
    status = sh([DVC, "status"], root, env).stdout
    assert "prepare" in status and "data/raw" in status, status
    sh([DVC, "add", "data/raw"], root, env)
    again = sh([DVC, "repro", "validate"], root, env)
    assert ran_stages(again.stdout) == {"prepare", "validate"}, again.stdout
    imported = root / "data" / "dataset" / "images" / "train" / changed.name
    assert imported.read_bytes() == changed.read_bytes()
    _stored_once(root, source)
    assert ran_stages(sh([DVC, "repro", "validate"], root, env).stdout) == set()


def _stored_once(root: Path, source: int) -> None:
    """The images of data/dataset are the files of data/raw (one inode, read-only), and the
    DVC cache plus data/dataset add at most 10% of the source beyond the annotations."""
    raw, dataset = root / "data" / "raw", root / "data" / "dataset"
    images = sorted(dataset.glob("images/*/*.jpg"))
    assert len(images) == 50
    for image in images:
        assert os.path.samefile(image, raw / image.relative_to(dataset)), image
        assert not os.stat(image).st_mode & 0o222, f"{image}: writable, so is the DVC cache"
    total = sum(real_disk([raw, root / ".dvc" / "cache", dataset]))
    annotations = real_disk([dataset / "annotations"])[0]
    assert total - source <= 0.10 * source + annotations, (total, source, annotations)


def _replace_image(path: Path) -> None:
    """A new version of ``path`` (darker pixels, same size), written as a new file: the old
    one is a read-only hard link to the DVC cache."""
    with Image.open(path) as image:
        darker = image.point(lambda v: v // 2)
    tmp = path.with_suffix(".new.jpg")
    darker.save(tmp, quality=92)
    os.replace(tmp, path)
