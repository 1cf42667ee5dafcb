"""Settings resolved from the dataset (``auto`` in params.yaml): detr.settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detr.auto_tiles import tile_rule
from detr.config import DataConfig, ModelConfig, TrainConfig, load_section, to_dict
from detr.data.profile import DatasetProfile
from detr.settings import AUTO_KEYS, resolve, resolve_configs
from detr.strict import ConfigError


def _coco(images: int, side: int | tuple[int, int], sizes: tuple[float, float],
          objects: tuple[int, int], seed: int = 0) -> dict:
    """A COCO dict: ``images`` of ``side`` px, objects of sqrt(area) uniform in ``sizes``,
    ``objects`` (min, max) per image."""
    rng = np.random.default_rng(seed)
    h, w = (side, side) if isinstance(side, int) else side
    imgs, anns = [], []
    for i in range(images):
        imgs.append({"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            s = float(rng.uniform(*sizes))
            anns.append({"id": len(anns), "image_id": i, "bbox": [0, 0, s, s], "iscrowd": 0})
    return {"images": imgs, "annotations": anns}


def _auto(**explicit) -> dict:
    """The demo's params.yaml sections with every auto-able key auto, but ``explicit``
    (``"data.scales": [200]``)."""
    sections = {"model": {"last_stage": "layer2", "dilation": False}, "data": {},
                "train": {"grad_accum": 1}}
    for section, key in AUTO_KEYS:
        sections[section][key] = "auto"
    for dotted, value in explicit.items():
        section, key = dotted.split(".")
        sections[section][key] = value
    return sections


def _demo_profile() -> DatasetProfile:
    """The demo's statistics (2,000 images of 256 px, objects of 14-176 px, 1-6 each)."""
    return DatasetProfile(images=2000, short_side=256, long_side=256, aspect_p95=1.0,
                          objects_max=6, objects_p95=6.0, object_size_p10=20.5,
                          object_size_median=58.3)


def test_the_demo_resolves_to_the_numbers_it_was_tuned_with():
    res = resolve(_auto(), _demo_profile(), device="cpu", val_images=500)
    assert res.resolved == {
        "data.scales": [112, 128], "data.max_size": 128, "train.batch_size": 8,
        "model.num_queries": 30, "train.steps": 3000, "train.epochs": 12,
        "train.warmup_steps": 200, "train.eval_every_steps": 500, "train.eval_images": 0,
        "train.log_every": 50, "train.lr_drop": 8, "train.lr": 1e-3, "train.lr_backbone": 1e-3}
    assert not res.warnings
    assert all(s.source == "rule" and s.why for s in res.settings)


def test_a_small_aerial_set_gets_a_larger_scale_more_queries_and_enough_steps():
    """Like the first real dataset a user tried: 43 train tiles of 320 px, up to 35 boxes."""
    profile = DatasetProfile.from_coco(_coco(43, 320, (7, 40), (5, 35)))
    res = resolve(_auto(), profile, device="cpu", val_images=11)
    values = res.resolved
    assert max(values["data.scales"]) == 256  # wants ~320; the CPU budget caps it
    assert values["train.batch_size"] == 2
    assert values["model.num_queries"] >= 1.5 * profile.objects_max
    assert values["train.steps"] >= 3000
    assert values["train.epochs"] == -(-3000 // 22)  # 43 images / 2 per step = 22 steps
    assert values["train.eval_images"] == 0


@pytest.mark.parametrize(("batch", "world", "accum", "lr"), [
    (8, 1, 1, 1e-3), (32, 1, 1, 1e-3), (2, 1, 1, 5e-4), (3, 1, 1, 6.1e-4), (2, 4, 1, 1e-3),
    (1, 1, 2, 5e-4)])
def test_the_learning_rate_scales_with_the_square_root_of_a_global_batch_under_8(
        batch, world, accum, lr):
    sections = _auto(**{"train.batch_size": batch, "train.grad_accum": accum})
    res = resolve(sections, _demo_profile(), world_size=world)
    assert res.resolved["train.lr"] == lr
    assert res.resolved["train.lr_backbone"] == lr  # from scratch: the same


def test_a_pretrained_backbone_learns_at_a_tenth_and_explicit_rates_win():
    res = resolve(_auto(**{"train.batch_size": 2, "model.backbone_weights": "imagenet"}),
                  _demo_profile())
    assert (res.resolved["train.lr"], res.resolved["train.lr_backbone"]) == (5e-4, 5e-5)
    res = resolve(_auto(**{"train.init_weights": "detr-r50.pth"}), _demo_profile())
    assert res.resolved["train.lr_backbone"] == 1e-4
    res = resolve(_auto(**{"train.lr": 2e-4, "train.batch_size": 2}), _demo_profile())
    assert res.sections["train"]["lr"] == 2e-4 and "train.lr" not in res.resolved
    assert res.resolved["train.lr_backbone"] == 2e-4


def test_a_checkpoint_given_beside_the_params_counts_as_a_pretrained_start(tiny_dataset):
    from detr.train import with_init_weights

    train = TrainConfig(steps="auto", epochs="auto", batch_size=8, lr="auto",
                        lr_backbone="auto")
    assert with_init_weights(train, None) is train
    given = with_init_weights(train, Path("detr-r50.pth"))
    assert given.init_weights == "detr-r50.pth"
    _, _, resolved, _ = resolve_configs(ModelConfig(backbone="resnet18", last_stage="layer2"),
                                        DataConfig(), given, tiny_dataset)
    assert (resolved.lr, resolved.lr_backbone) == (1e-3, 1e-4)


def test_on_a_gpu_the_same_set_is_not_capped():
    profile = DatasetProfile.from_coco(_coco(43, 320, (7, 40), (5, 35)))
    res = resolve(_auto(), profile, device="cuda:0")
    assert max(res.resolved["data.scales"]) > 256
    assert res.resolved["train.batch_size"] > 2


def test_objects_too_small_for_the_budget_are_reported_with_what_to_do():
    profile = DatasetProfile.from_coco(_coco(60, 640, (8, 40), (20, 40)))
    res = resolve(_auto(), profile, device="cpu")
    assert max(res.resolved["data.scales"]) == 256
    (warning,) = res.warnings
    assert "feature cells" in warning and "prepare.tile" in warning and "GPU" in warning


def test_a_large_set_gets_epochs_not_a_fixed_step_count():
    profile = DatasetProfile.from_coco(_coco(40_000, 256, (20, 120), (1, 6)))
    values = resolve(_auto(), profile, device="cuda").resolved
    per_epoch = -(-40_000 // values["train.batch_size"])
    assert values["train.epochs"] == 12  # 12 epochs are more than 3,000 steps
    assert values["train.steps"] == 12 * per_epoch > 3000
    assert values["train.warmup_steps"] == round(12 * per_epoch / 15)
    on_cpu = resolve(_auto(), profile, device="cpu")  # the CPU's budget stops earlier
    per_epoch = -(-40_000 // on_cpu.resolved["train.batch_size"])
    assert on_cpu.resolved["train.epochs"] == -(-6000 // per_epoch) < 12
    assert any("budget stops at 6000" in w for w in on_cpu.warnings)


def test_explicit_values_win_and_the_rules_use_them():
    res = resolve(_auto(**{"data.scales": [200], "data.max_size": 300,
                           "model.num_queries": 7}), _demo_profile(), device="cpu")
    by_key = {s.key: s for s in res.settings}
    assert by_key["data.scales"].value == [200] and by_key["data.scales"].source == "explicit"
    assert by_key["model.num_queries"].value == 7
    assert res.resolved["train.batch_size"] == 131072 // (200 * 200)  # from the explicit scale
    assert res.sections["data"]["scales"] == [200]


def test_steps_or_epochs_set_the_length_but_not_both():
    profile = _demo_profile()
    by_steps = resolve(_auto(**{"train.steps": 1000}), profile).sections["train"]
    assert (by_steps["epochs"], by_steps["steps"]) == (4, 1000)  # 250 steps per epoch
    by_epochs = resolve(_auto(**{"train.epochs": 2}), profile).sections["train"]
    assert (by_epochs["epochs"], by_epochs["steps"]) == (2, 500)
    assert by_epochs["eval_every_steps"] == 84  # the cadence follows the length
    with pytest.raises(ValueError, match="train.steps .* and train.epochs .* both set"):
        resolve(_auto(**{"train.steps": 1000, "train.epochs": 2}), profile)


def test_a_split_without_boxes_cannot_choose_a_scale():
    profile = DatasetProfile.from_coco(_coco(10, 256, (10, 20), (0, 0)))
    with pytest.raises(ValueError, match="data.scales: auto needs boxes"):
        resolve(_auto(), profile)


def test_auto_is_a_valid_value_only_for_the_auto_keys():
    cfg = load_section(TrainConfig, {"epochs": "auto", "steps": "auto", "log_every": "auto"},
                       "train")
    assert cfg.epochs == "auto"
    assert load_section(DataConfig, {"scales": "auto"}, "data").scales == "auto"
    assert load_section(TrainConfig, {"lr": "auto"}, "train").lr == "auto"
    with pytest.raises(ConfigError, match="train.weight_decay"):
        load_section(TrainConfig, {"weight_decay": "auto"}, "train")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_section(TrainConfig, {"epochs": "many"}, "train")


def test_typed_configs_resolve_against_a_dataset_on_disk(tiny_dataset):
    model = ModelConfig(backbone="resnet18", last_stage="layer2", num_queries="auto")
    data = DataConfig(scales="auto", max_size="auto")
    train = TrainConfig(steps="auto", epochs="auto", batch_size=4, eval_every_steps="auto")
    model, data, train, res = resolve_configs(model, data, train, tiny_dataset)
    assert isinstance(model.num_queries, int) and model.num_queries >= 5
    assert isinstance(data.scales, tuple) and data.max_size >= max(data.scales)
    assert train.epochs * 2 >= 3000  # 8 images in batches of 4: 2 steps per epoch
    assert "train.batch_size" not in res.resolved  # explicit
    assert "auto" not in [to_dict(train)[k] for k in ("steps", "epochs", "log_every", "lr_drop")]


def test_tiles_only_where_the_objects_need_more_than_the_budget_gives():
    many_small = DatasetProfile.from_coco(_coco(60, 640, (8, 40), (20, 40)))
    size, why = tile_rule(many_small, last_stage="layer2", device="cpu")
    assert size is not None and size % 32 == 0 and size < 640 and "tiles of" in why
    # at that tile size, the scale rule fits the objects within the budget: no warning
    tiles = DatasetProfile.from_coco(_coco(60 * 16, size, (8, 40), (2, 5)))
    assert not resolve(_auto(), tiles, device="cpu").warnings
    assert tile_rule(_demo_profile(), last_stage="layer2", device="cpu")[0] is None
    on_gpu, why = tile_rule(many_small, last_stage="layer2", device="cuda")
    assert on_gpu is None and "no tiles" in why  # 800 px allows nearly the 830 px needed


def test_prepare_tiles_automatically_and_evaluate_follows(tmp_path):
    from detr.data.synthetic import generate
    from pipelines.measurement import with_tile
    from pipelines.params import EvaluateConfig, PrepareConfig
    from pipelines.stages import prepare

    source = tmp_path / "source"
    generate(source, num_train=4, num_val=2, image_size=384, objects=(4, 8),
             object_sizes=(8, 16), seed=0, num_workers=1)
    out = tmp_path / "dataset"
    prepare.run(cfg=PrepareConfig(source=str(source), tile="auto"), out_dir=out,
                last_stage="layer2", device="cpu")
    decided = json.loads((out / "annotations" / "tiling.json").read_text())
    assert decided["size"] == 128 and "tiles of 128 px" in decided["why"]
    train = json.loads((out / "annotations" / "train.json").read_text())
    assert {(i["width"], i["height"]) for i in train["images"]} == {(128, 128)}
    tile = with_tile(EvaluateConfig(tile="auto"), out).tile
    assert (tile.size, tile.overlap) == (128, decided["overlap"])

    demo = tmp_path / "demo"  # objects that fit: no tiles, evaluate on the val split as is
    prepare.run(cfg=PrepareConfig(source=str(source), tile="auto"), out_dir=demo,
                last_stage="layer4", device="cuda")
    assert json.loads((demo / "annotations" / "tiling.json").read_text())["size"] is None
    assert with_tile(EvaluateConfig(tile="auto"), demo).tile is None


def test_stuff_segments_count_as_objects_but_not_in_the_object_sizes():
    """Panoptic data: a stuff region is not an object that must span a few feature cells."""
    coco = {"images": [{"id": 1, "width": 256, "height": 256}],
            "categories": [{"id": 1, "name": "thing"}, {"id": 9, "name": "sky", "isthing": 0}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
                            {"id": 2, "image_id": 1, "category_id": 9,
                             "bbox": [0, 0, 256, 200]}]}
    profile = DatasetProfile.from_coco(coco)
    assert profile.objects_max == 2
    assert profile.object_size_median == profile.object_size_p10 == 20
