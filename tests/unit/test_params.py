"""params.yaml and the presets load strictly; the pipeline's own sections are typed."""

from pathlib import Path

import pytest

from detr.config import AidsConfig, ConfigError
from pipelines.params import load

ROOT = Path(__file__).resolve().parents[2]


# every preset in configs/, so that a new one cannot drift from the schema unnoticed
PARAMS_FILES = ["params.yaml",
                *sorted(f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_files_load(name):
    params = load(ROOT / name)
    assert set(params) == {"prepare", "validate", "model", "loss", "data", "train", "evaluate",
                           "register", "schedule", "alerts"}
    queries = params["model"].num_queries  # auto: chosen above the most boxes at training
    assert params["validate"].num_queries == (None if queries == "auto" else queries)


def test_the_r50_preset_is_the_paper_recipe():
    p = load(ROOT / "configs/detr_r50_coco.yaml")
    m, t, d = p["model"], p["train"], p["data"]
    assert (m.backbone, m.norm, m.hidden_dim, m.enc_layers, m.dec_layers) == (
        "resnet50", "frozen_bn", 256, 6, 6)
    assert (m.num_queries, m.dropout, m.pre_norm) == (100, 0.1, False)
    assert m.aids == AidsConfig()  # no training aids
    assert (t.lr, t.lr_backbone, t.weight_decay, t.clip_max_norm) == (1e-4, 1e-5, 1e-4, 0.1)
    assert d.scales == tuple(range(480, 801, 32)) and d.max_size == 1333


def test_the_gpu_demo_preset_is_r50_at_the_papers_scales_on_cuda():
    p = load(ROOT / "configs/gpu_demo.yaml")
    m, t, d = p["model"], p["train"], p["data"]
    assert (m.backbone, m.last_stage, m.enc_layers, m.dec_layers) == ("resnet50", "layer4", 6, 6)
    assert m.norm != "frozen_bn"  # from scratch: frozen BN would be no normalisation at all
    assert d.scales == tuple(range(480, 801, 32)) and d.max_size == 1333
    assert p["prepare"].source == "demo" and p["prepare"].demo.image_size >= 480
    assert t.device == "auto" and t.batch_size > 2


def test_unknown_section_key_or_type_names_the_culprit(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load(path)
    path.write_text("train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train.epochs: expected int"):
        load(path)
    path.write_text("prepare:\n  demo:\n    num_trian: 3\n")
    with pytest.raises(ConfigError, match=r"prepare.demo.num_trian: unknown key"):
        load(path)


def test_schedule_section_refuses_a_bad_cron_or_timezone(tmp_path):
    path = tmp_path / "params.yaml"
    assert load(ROOT / "params.yaml")["schedule"].cron == "0 3 * * 1"
    path.write_text("schedule:\n  cron: '61 3 * * 1'\n")
    with pytest.raises(ConfigError, match=r"schedule: cron '61 3 \* \* 1'.*Invalid cron"):
        load(path)
    path.write_text("schedule:\n  timezone: Mars/Olympus\n")
    with pytest.raises(ConfigError, match="Invalid timezone"):
        load(path)
    path.write_text("schedule:\n  crontab: '0 3 * * 1'\n")
    with pytest.raises(ConfigError, match=r"schedule.crontab: unknown key"):
        load(path)


@pytest.mark.parametrize("line", ["attention_queries: 0", "attention_images: -1",
                                  "score_threshold: 1.5", "batch_size: 0"])
def test_evaluate_section_refuses_out_of_range_values(tmp_path, line):
    path = tmp_path / "params.yaml"
    path.write_text(f"evaluate:\n  {line}\n")
    with pytest.raises(ConfigError, match=f"evaluate.{line.split(':')[0]}: .* out of range"):
        load(path)


@pytest.mark.parametrize("section, line", [
    ("register", "min_ap: 1.5"), ("register", "min_ap: -0.1"),
    ("register", "min_improvement: -0.01"), ("register", "model_name: ' '"),
    ("register", "max_class_drop: 1.5"),
    ("validate", "workers: 0"), ("validate", "min_class_fraction: 2"),
    ("schedule", "lock_wait_s: -1")])
def test_pipeline_sections_refuse_out_of_range_values(tmp_path, section, line):
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {line}\n")
    key = line.split(":")[0]
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .* (out of range|is negative)"):
        load(path)


def test_register_limits_are_inclusive(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("register:\n  min_ap: 1.0\n  min_improvement: 0.0\n")
    assert load(path)["register"].min_ap == 1.0


@pytest.mark.parametrize(("params", "name"), [
    ("", "detr-demo"),
    ("prepare:\n  source: data/raw/My Boats\n", "detr-my-boats"),
    ("prepare:\n  source: data/coco/data.yaml\n", "detr-coco"),
    ("prepare:\n  source: data/raw\nregister:\n  model_name: boats\n", "boats"),
])
def test_register_model_name_defaults_to_one_derived_from_the_dataset(tmp_path, params, name):
    path = tmp_path / "params.yaml"
    path.write_text(params)
    assert load(path)["register"].model_name == name


def test_the_default_floor_keeps_untrained_models_out():
    from pipelines.params import RegisterConfig

    # An untrained demo model scores ~0.0001 AP (measured, see params.yaml's comment).
    assert 0.01 <= RegisterConfig().min_ap <= 0.05
    assert load(ROOT / "params.yaml")["register"].min_ap == RegisterConfig().min_ap


def test_project_root_is_dvc_root_else_the_working_directory(monkeypatch, tmp_path):
    from pipelines.params import project_root

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert project_root() == tmp_path.resolve()
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()


def test_prepare_format_is_auto_by_default_and_checked(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  source: data/raw\n")
    assert load(path)["prepare"].format == "auto"
    assert load(ROOT / "configs/detr_r50_coco.yaml")["prepare"].format == "auto"
    path.write_text("prepare:\n  format: coco\n")
    assert load(path)["prepare"].format == "coco"  # explicit formats keep working
    path.write_text("prepare:\n  format: yolov8\n")
    with pytest.raises(ConfigError, match=r"prepare.format: 'yolov8' is not one of 'auto', "
                                          r"'coco', 'coco_panoptic', 'voc', 'yolo'"):
        load(path)
    from pipelines.params import PrepareConfig

    with pytest.raises(ConfigError, match=r"prepare.format: 'x' is not one of auto, coco"):
        PrepareConfig(format="x")
