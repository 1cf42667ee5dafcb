import pytest

from detr.config import ConfigError, LossConfig, ModelConfig, load_section


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
