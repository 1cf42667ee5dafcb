"""Hand-made datasets and fixed-output checkpoints for the registry's decision tests.

A *fixed predictor* is a tiny DETR with one query whose heads ignore their input: every image
gets one detection, the same box and class with the same score. Its COCO AP on a hand-made val
split is then known from where the objects are: the detections are ranked in image-id order
(equal scores), so ``TP, FP, FP, FP`` gives AP 1.0 and ``FP, FP, FP, TP`` about 0.064.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from detr.checkpoint import save_file
from detr.models.detr import build_model
from pipelines.measurement import measure, per_class_ap
from pipelines.params import EvaluateConfig, RegisterConfig
from pipelines.stages import register
from tests.conftest import TINY, tiny_training
from tests.pipelines.project import local_registry

SIZE = 64
BOXES = {"P": [4.0, 4.0, 16.0, 16.0], "Q": [40.0, 40.0, 16.0, 16.0]}  # xywh px, disjoint
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def make_val(root: Path, objects: list[tuple[str, str]]) -> Path:
    """A canonical dataset under ``root`` whose val split has one object per image:
    ``objects[i] = (box key of BOXES, category name)`` for image id ``i + 1``."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations = [], []
    for i, (box, name) in enumerate(objects, start=1):
        Image.new("RGB", (SIZE, SIZE), (i * 20, 90, 120)).save(root / "images" / "val" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE})
        annotations.append({"id": i, "image_id": i, "category_id": ids[name],
                            "bbox": BOXES[box], "area": BOXES[box][2] * BOXES[box][3],
                            "iscrowd": 0})
    (root / "annotations" / "val.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


def fixed_predictor(path: Path, box: str, name: str) -> Path:
    """A checkpoint whose model detects ``name`` at ``BOXES[box]`` in every image."""
    cfg = dataclasses.replace(TINY, num_classes=len(CATEGORIES), num_queries=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    label = [c["name"] for c in CATEGORIES].index(name)
    x, y, w, h = BOXES[box]
    cxcywh = torch.tensor([x + w / 2, y + h / 2, w, h]) / SIZE
    with torch.no_grad():
        model.class_embed.weight.zero_()
        model.class_embed.bias.fill_(-5.0)
        model.class_embed.bias[label] = 5.0
        last = model.bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(cxcywh))
    save_file({"model": model.state_dict(), "params": {"model": dataclasses.asdict(cfg)},
               "label_map": {"categories": CATEGORIES}}, path)
    return path


def untrained(path: Path, seed: int = 0) -> Path:
    """A freshly initialised tiny model for CATEGORIES."""
    cfg = dataclasses.replace(TINY, num_classes=len(CATEGORIES))
    torch.manual_seed(seed)
    save_file({"model": build_model(cfg).state_dict(),
               "params": {"model": dataclasses.asdict(cfg)},
               "label_map": {"categories": CATEGORIES}}, path)
    return path


@contextmanager
def decision_registry(root: Path) -> Iterator[SimpleNamespace]:
    """A SQLite registry and a pipeline run under ``root`` (the working directory and
    DVC_ROOT, :func:`tests.pipelines.project.local_registry`); the fixed predictors at P and
    Q, detecting class a. Yields ``root``, ``data``/``train`` (tiny configs), ``client``,
    ``P``, ``Q`` (checkpoints)."""
    import mlflow

    _, _, data, train = tiny_training()
    with local_registry(root):
        yield SimpleNamespace(root=root, data=data, train=train, client=mlflow.MlflowClient(),
                              P=fixed_predictor(root / "p.pth", "P", "a"),
                              Q=fixed_predictor(root / "q.pth", "Q", "a"))


def dataset_version(env, name: str, objects: list) -> SimpleNamespace:
    """A val split (:func:`make_val`) and its made-up DVC hash."""
    return SimpleNamespace(root=make_val(env.root / "data" / name, objects),
                           md5=f"{name:0>32}.dir")


def register_on(env, name: str, checkpoint: Path, dataset: SimpleNamespace, **rule) -> dict:
    """The evaluate stage's outputs for ``checkpoint`` on ``dataset`` (measured), then the
    register stage on them, with ``dataset`` as today's data (in dvc.lock); ``rule``: more
    ``RegisterConfig`` keys. Returns the register report."""
    (env.root / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/dataset\n"
        f"      md5: {dataset.md5}\n")
    evaluation = measure(checkpoint, dataset.root, cfg=EvaluateConfig(), data_cfg=env.data,
                         train_cfg=env.train).evaluation
    out = env.root / "evaluate" / f"{name}-{dataset.md5}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "coco.json").write_text(json.dumps(evaluation.stats))
    (out / "per_class_ap.json").write_text(json.dumps(per_class_ap(evaluation)))
    return register.run(checkpoint=checkpoint, metrics_path=out / "coco.json",
                        per_class_path=out / "per_class_ap.json", dataset_dir=dataset.root,
                        cfg=RegisterConfig(model_name=name, **rule), data_cfg=env.data,
                        train_cfg=env.train, report_path=env.root / "reports" / f"{name}.json")
