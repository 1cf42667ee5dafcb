"""Pretrained starts transfer: a tiny model pretrained on three of the demo's shapes, then
fine-tuned on the other three (a new class head, ``train.init_weights``), beats the same number
of steps from scratch on the new classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detr.config import DataConfig, LossConfig, TrainConfig
from detr.data.synthetic import generate
from detr.train import fit
from tests.conftest import TINY

FIRST, SECOND = {"circle", "square", "triangle"}, {"star", "cross", "ring"}


def _subset(source: Path, target: Path, names: set[str]) -> Path:
    """A canonical dataset of the images of ``source`` whose objects are all of ``names``
    (the images folders are linked, the annotations filtered)."""
    (target / "annotations").mkdir(parents=True)
    (target / "images").symlink_to(source / "images")
    for split in ("train", "val"):
        coco = json.loads((source / "annotations" / f"{split}.json").read_text())
        ids = {c["id"] for c in coco["categories"] if c["name"] in names}
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["category_id"] in ids)
        keep = {i for i, inside in by_image.items() if all(inside)}
        coco["images"] = [i for i in coco["images"] if i["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        coco["categories"] = [c for c in coco["categories"] if c["id"] in ids]
        (target / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return target


def _fit(data_root: Path, out: Path, steps: int, init: Path | None = None):
    data = DataConfig(scales=(96,), max_size=96, crop_scales=None, num_workers=0)
    train = TrainConfig(steps=steps, epochs="auto", batch_size=8, lr=1e-3, lr_backbone=1e-3,
                        warmup_steps=20, lr_schedule="cosine", eval_every_steps=0,
                        log_every=10, precision="fp32", channels_last=False, device="cpu",
                        clip_max_norm=1.0)
    return fit(model_cfg=TINY, loss_cfg=LossConfig(ce_loss_coef=5, set_cost_class=5),
               data_cfg=data, train_cfg=train, data_root=data_root, out_dir=out,
               init_weights=init, progress=False)


@pytest.mark.slow
def test_fine_tuning_a_pretrained_model_beats_training_from_scratch(tmp_path):
    demo = tmp_path / "demo"
    generate(demo, num_train=400, num_val=80, image_size=96, max_objects=2, seed=3,
             num_workers=1)
    first = _subset(demo, tmp_path / "first", FIRST)
    second = _subset(demo, tmp_path / "second", SECOND)
    pretrained = _fit(first, tmp_path / "pre", steps=600).checkpoint
    tuned = _fit(second, tmp_path / "tuned", steps=150, init=pretrained)
    scratch = _fit(second, tmp_path / "scratch", steps=150)
    ap = tuned.evaluation.stats["AP50"], scratch.evaluation.stats["AP50"]
    loss = tuned.history[-1]["epoch_loss"], scratch.history[-1]["epoch_loss"]
    print(f"AP50 fine-tuned {ap[0]:.3f}, from scratch {ap[1]:.3f}; last epoch's loss "
          f"{loss[0]:.2f} vs {loss[1]:.2f}")
    assert ap[0] > ap[1] and loss[0] < loss[1]
