import pytest

from detr.config import (
    AidsConfig,
    ConfigError,
    DataConfig,
    DenoisingConfig,
    LossConfig,
    ModelConfig,
    QueryGroupsConfig,
    TrainConfig,
    load_section,
    parse_params,
)


def test_defaults_are_the_paper_recipe():
    cfg = load_section(ModelConfig, {}, "model")
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers) == (256, 8, 6, 6)
    assert (cfg.dim_feedforward, cfg.num_queries, cfg.dropout, cfg.pre_norm) == (2048, 100, 0.1,
                                                                                False)
    loss = load_section(LossConfig, None, "loss")
    assert (loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou) == (1, 5, 2)
    assert (loss.bbox_loss_coef, loss.giou_loss_coef, loss.eos_coef) == (5, 2, 0.1)
    assert not (cfg.input_pos or cfg.value_pos)  # positions in queries and keys only
    assert not loss.iou_aware  # hard class targets
    assert cfg.aids == AidsConfig(dense=None, query_groups=None, denoising=None)  # no aids


@pytest.mark.parametrize(("data", "message"), [
    ({"hidden_dimm": 3}, "model.hidden_dimm: unknown key"),
    ({"hidden_dim": "256"}, "model.hidden_dim: expected int, got str"),
    ({"hidden_dim": 256.0}, "model.hidden_dim: expected int, got float"),
    ({"aux_loss": 1}, "model.aux_loss: expected bool, got int"),
    ({"dropout": True}, "model.dropout: expected float, got bool"),
    ({"backbone": "resnet152"}, "model.backbone: 'resnet152' is not one of"),
    ({"backbone_weights": 5}, "model.backbone_weights"),
    ([1, 2], "model: expected a mapping"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        load_section(ModelConfig, data, "model")


def test_ints_are_accepted_for_floats_and_null_for_optional():
    cfg = load_section(ModelConfig, {"dropout": 0, "backbone_weights": None}, "model")
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)
    assert load_section(ModelConfig, {"backbone_weights": "w.pth"}, "m").backbone_weights == "w.pth"


def test_configs_are_frozen():
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.hidden_dim = 3


def test_aids_sections_are_optional_and_nested_errors_name_the_dotted_key():
    cfg = load_section(ModelConfig, {"aids": {"query_groups": {"groups": 3},
                                              "denoising": {"groups": 2}}}, "model")
    assert cfg.aids.query_groups == QueryGroupsConfig(groups=3) and cfg.aids.dense is None
    assert cfg.aids.denoising == DenoisingConfig(groups=2, box_noise=0.4, label_noise=0.2)
    assert load_section(ModelConfig, {"aids": None}, "model").aids == AidsConfig()
    assert load_section(ModelConfig, {"aids": {"dense": None}}, "model").aids.dense is None
    for data, message in [
        ({"aids": {"dense": {"loss_coeff": 1}}}, r"model\.aids\.dense\.loss_coeff: unknown key"),
        ({"aids": {"dense": {"loss_coef": "a"}}}, r"model\.aids\.dense\.loss_coef: expected"),
        ({"aids": {"dense": 3}}, r"model\.aids\.dense: expected a mapping or null, got int 3"),
        ({"aids": {"query_groups": {"groups": 1}}},
         r"model\.aids\.query_groups\.groups: 1 must be >= 2"),
        ({"aids": {"denoise": {}}}, r"model\.aids\.denoise: unknown key"),
        ({"dense_aux": True}, r"model\.dense_aux: unknown key \(moved into model\.aids"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_section(ModelConfig, data, "model")


@pytest.mark.parametrize(("section", "data", "message"), [
    ("model", {"hidden_dim": 100, "nheads": 8}, r"model\.hidden_dim: 100 .*nheads \(8\).*e\.g\. 96"),
    ("model", {"hidden_dim": 7, "nheads": 1}, r"model\.hidden_dim: 7 must be divisible by 2"),
    ("model", {"num_queries": 0}, r"model\.num_queries: 0 must be >= 1"),
    ("model", {"num_classes": 0}, r"model\.num_classes: 0 must be >= 1"),
    ("model", {"dropout": 1.0}, r"model\.dropout: 1\.0 must be in \[0, 1\)"),
    ("model", {"enc_layers": -1}, r"model\.enc_layers: -1 must be >= 0"),
    ("model", {"dec_layers": 0}, r"model\.dec_layers: 0 must be >= 1"),
    ("loss", {"eos_coef": -0.1}, r"loss\.eos_coef: -0\.1 must be >= 0"),
    ("data", {"scales": []}, r"data\.scales: \[\] must be a non-empty list"),
    ("data", {"scales": [0, 32]}, r"data\.scales"),
    ("data", {"crop_size": [600, 384]}, r"data\.crop_size: \[600, 384\] must be \[min, max\]"),
    ("data", {"num_workers": -1}, r"data\.num_workers: -1 must be >= 0"),
    ("train", {"batch_size": 0}, r"train\.batch_size: 0 must be >= 1"),
    ("train", {"epochs": 0}, r"train\.epochs: 0 must be >= 1"),
    ("train", {"lr": 0}, r"train\.lr: 0\.0 must be > 0"),
    ("train", {"lr_backbone": -1e-5}, r"train\.lr_backbone: -1e-05 must be >= 0"),
    ("train", {"warmup_steps": -1}, r"train\.warmup_steps: -1 must be >= 0"),
])
def test_out_of_range_values_fail_where_the_config_is_read(section, data, message):
    sections = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig,
                "train": TrainConfig}
    with pytest.raises(ConfigError, match=message):
        parse_params({section: data}, sections, source="params.yaml")
    ok = {"model": {"hidden_dim": 96, "nheads": 8}}  # the value the first message suggests
    assert parse_params(ok, sections)["model"].hidden_dim == 96
