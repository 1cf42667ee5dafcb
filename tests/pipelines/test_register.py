"""The register stage against a real MLflow registry (SQLite under a temporary folder).

One tiny trained checkpoint and one registry for the module; each test registers its own model
name, so the tests don't depend on each other's versions. These tests are about the registry's
mechanics with made-up metrics: the champion's measurement on today's val split is stubbed to
reproduce its logged number (the data did not change); tests/pipelines/test_registry_decisions.py
measures it for real.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from detr.evaluation import STAT_NAMES
from detr.train import fit
from pipelines import mlflow_model, tracking
from pipelines.params import RegisterConfig
from pipelines.stages import register
from tests.conftest import tiny_training
from tests.pipelines.project import local_registry

pytestmark = pytest.mark.slow
DATASET_MD5 = "0123456789abcdef0123456789abcdef.dir"
PARAMS_YAML = """\
data: {scales: [64], max_size: 64, crop_scales: [64], crop_size: [48, 64], num_workers: 0}
register: {model_name: cli, metric: AP50}
"""


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    """A trained checkpoint, a SQLite registry and a pipeline run, all under one tmp folder
    (also the working directory and DVC_ROOT, with a dvc.lock naming the dataset's md5)."""
    import mlflow

    root = tmp_path_factory.mktemp("register")
    model, loss, data, train = tiny_training(epochs=1)
    checkpoint = fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
                     data_root=tiny_dataset, out_dir=root / "checkpoints", progress=False).checkpoint
    (root / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/dataset\n"
        f"      md5: {DATASET_MD5}\n")
    with local_registry(root) as run_id:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "git_commit", "abc123")
        yield SimpleNamespace(root=root, checkpoint=checkpoint, data=data, run_id=run_id,
                              client=client, dataset=tiny_dataset)


@pytest.fixture(autouse=True)
def logged_numbers_hold(monkeypatch):
    """The champion, "measured" on today's val split, scores what it logged, on every class."""
    def measure_champion(name, version, **_):
        import mlflow

        tags = mlflow.MlflowClient().get_model_version(name, str(version)).tags
        return {"stats": {"AP": float(tags["metric_AP"])}, "per_class": {"shape": 0.1},
                "cached": False}

    monkeypatch.setattr(register, "measure_champion", measure_champion)


def _register(env, name: str, value: float, *, min_ap: float = 0.0,
              min_improvement: float = 0.0) -> dict:
    metrics = env.root / "metrics" / f"{name}.json"
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_text(json.dumps({n: value if n == "AP" else 0.01 for n in STAT_NAMES}))
    per_class = env.root / "metrics" / f"{name}-per-class.json"
    per_class.write_text(json.dumps({"shape": 0.1}))
    cfg = RegisterConfig(model_name=name, metric="AP", min_ap=min_ap,
                         min_improvement=min_improvement)
    return register.run(checkpoint=env.checkpoint, metrics_path=metrics, cfg=cfg,
                        data_cfg=env.data, per_class_path=per_class,
                        report_path=env.root / "reports" / f"{name}.json")


def _alias(env, name: str, alias: str) -> str | None:
    version = register.alias_version(env.client, name, alias)
    return None if version is None else str(version.version)


def _live_versions(env, name: str) -> list[str]:
    return sorted(str(mv.version)
                  for mv in env.client.search_model_versions(f"name = '{name}'"))


@pytest.mark.parametrize(("value", "champion", "has_champion", "min_ap", "gain", "expected"), [
    (0.3, None, False, 0.0, 0.0, "champion"),
    (0.3, None, False, 0.5, 0.0, "challenger"),  # below the floor
    (0.3, 0.3, True, 0.0, 0.0, "challenger"),  # a tie does not displace
    (0.31, 0.3, True, 0.0, 0.0, "champion"),
    (0.34, 0.3, True, 0.0, 0.05, "challenger"),  # better, but not by enough
    (0.36, 0.3, True, 0.0, 0.05, "champion"),
    (0.9, None, True, 0.0, 0.0, "challenger"),  # champion of unknown value: kept
])
def test_decide(value, champion, has_champion, min_ap, gain, expected):
    assert register.decide(value, champion, has_champion=has_champion, min_ap=min_ap,
                           min_improvement=gain).alias == expected


def test_read_metric_names_the_problem(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"AP": float("nan"), "AP50": 0.5}))
    assert register.read_metric(path, "AP50") == 0.5
    with pytest.raises(register.MetricsError, match="not a finite number"):
        register.read_metric(path, "AP")
    with pytest.raises(register.MetricsError, match="no 'AR_100'"):
        register.read_metric(path, "AR_100")
    with pytest.raises(register.MetricsError, match="not a COCO statistic"):
        register.read_metric(path, "mAP")
    with pytest.raises(register.MetricsError, match="evaluate stage"):
        register.read_metric(tmp_path / "missing.json", "AP")


def test_mask_and_panoptic_metrics_are_read_from_their_files(tmp_path):
    coco = tmp_path / "metrics" / "coco.json"
    assert register.metrics_file("AP", coco) == coco
    assert register.metrics_file("mask_AP75", coco) == tmp_path / "metrics" / "segm.json"
    assert register.metrics_file("PQ_th", coco) == tmp_path / "metrics" / "panoptic.json"
    coco.parent.mkdir()
    (tmp_path / "metrics" / "segm.json").write_text(json.dumps({"mask_AP": 0.31}))
    (tmp_path / "metrics" / "panoptic.json").write_text("{}")  # a detection run's
    assert register.read_metric(register.metrics_file("mask_AP", coco), "mask_AP") == 0.31
    with pytest.raises(register.MetricsError, match=r"panoptic.json: no 'PQ' \(found: -\)"):
        register.read_metric(register.metrics_file("PQ", coco), "PQ")
    with pytest.raises(register.MetricsError, match="register.metric: 'mask_mAP'"):
        register.read_metric(coco, "mask_mAP")


def test_champion_challenger_sequence(env):
    first = _register(env, "seq", 0.30, min_improvement=0.05)
    # no data/dataset here: drift is not measured, the registration goes on (test_drift.py)
    drift = first.pop("drift")
    assert drift["note"].startswith("today's dataset could not be profiled")
    assert first == {
        "model_name": "seq", "version": 1, "decision": "champion",
        "reason": "no champion before", "metric": "AP", "value": 0.30,
        "dataset_md5": DATASET_MD5, "champion_version_before": None,
        "champion_value_before": None, "champion_value_logged": None,
        "champion_dataset_md5": None, "champion_measurement": None, "per_class": {},
        "model_uri": "models:/seq/1", "alias_uri": "models:/seq@champion",
        "run_id": env.run_id, "tracking_uri": tracking.tracking_uri(),
        "model_card": "model_card/seq-v1.html",
    }
    assert json.loads((env.root / "reports" / "seq.json").read_text()) == {**first,
                                                                           "drift": drift}
    assert _register(env, "seq", 0.20, min_improvement=0.05)["decision"] == "challenger"
    assert (_alias(env, "seq", "champion"), _alias(env, "seq", "challenger")) == ("1", "2")
    assert _register(env, "seq", 0.33, min_improvement=0.05)["decision"] == "challenger"
    fourth = _register(env, "seq", 0.40, min_improvement=0.05)
    assert (fourth["decision"], fourth["champion_version_before"]) == ("champion", 1)
    assert fourth["champion_value_before"] == pytest.approx(0.30)
    assert (_alias(env, "seq", "champion"), _alias(env, "seq", "challenger")) == ("4", "3")
    tags = env.client.get_model_version("seq", "4").tags
    history = tags.pop("alias_history")
    assert history.endswith(" @champion (registered; was v1)")
    assert tags == {"metric_AP": "0.4", "decision": "champion", "run_id": env.run_id,
                    "decision_reason": "AP 0.4000 beats the champion's 0.3000 on the same "
                                       "val split",
                    "champion_version_before": "1", "champion_value_before": "0.3",
                    "champion_value_logged": "0.3", "champion_dataset_md5": DATASET_MD5,
                    "previous_champion": "1", "git_commit": "abc123",
                    "dataset_md5": DATASET_MD5, "drift": "not measured"}
    run_tags = env.client.get_run(env.run_id).data.tags
    assert (run_tags["registered_version"], run_tags["decision"]) == ("4", "champion")


def test_below_min_ap_never_becomes_champion(env):
    assert _register(env, "floor", 0.30, min_ap=0.5)["decision"] == "challenger"
    assert _alias(env, "floor", "champion") is None
    assert _register(env, "floor", 0.60, min_ap=0.5)["decision"] == "champion"
    assert _alias(env, "floor", "champion") == "2"


def test_champion_serves_detections(env):
    import mlflow

    _register(env, "serve", 0.1)
    val = sorted((env.dataset / "images" / "val").iterdir())[0]
    wide = env.root / "wide.png"
    with Image.open(val) as image:
        image.convert("RGB").resize((96, 40)).save(wide)
    model = mlflow.pyfunc.load_model("models:/serve@champion")
    frame = pd.DataFrame({"image": [mlflow_model.encode_image(p) for p in (val, wide)]})
    out = model.predict(frame, params={"score_threshold": 0.0, "top_k": 5})
    assert list(out.columns) == ["detections"] and len(out) == 2
    names = {c["name"] for c in json.loads(
        (env.dataset / "annotations" / "val.json").read_text())["categories"]}
    for text, (width, height) in zip(out["detections"], [(64, 64), (96, 40)], strict=True):
        dets = json.loads(text)
        assert len(dets) == 5
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        for det in dets:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
            assert det["category"] in names and isinstance(det["category_id"], int)
    default = model.predict(frame.iloc[:1])  # signature defaults: threshold 0.5, top 100
    assert all(d["score"] >= 0.5 for d in json.loads(default["detections"][0]))
    with pytest.raises(Exception, match="row 1"):
        model.predict(pd.DataFrame({"image": [frame["image"][0], "not an image"]}))


def test_promote_moves_the_alias(env):
    _register(env, "manual", 0.3)
    _register(env, "manual", 0.1)
    result = register.promote(2, model_name="manual")
    assert (result["version"], result["previous_version"]) == (2, 1)
    assert result["alias_uri"] == "models:/manual@champion"
    assert _alias(env, "manual", "champion") == "2"
    assert _alias(env, "manual", "challenger") is None  # the promoted version's, removed
    assert env.client.get_model_version("manual", "2").tags["promoted_manually"] == "true"
    assert env.client.get_model_version("manual", "1").aliases == []
    with pytest.raises(register.RegistrationError, match="version 9"):
        register.promote(9, model_name="manual")


@pytest.mark.parametrize("moved_before_failing", [False, True])
def test_failed_alias_move_keeps_the_champion(env, monkeypatch, moved_before_failing):
    from mlflow import MlflowClient

    name = f"atomic-{int(moved_before_failing)}"
    _register(env, name, 0.3)
    original = MlflowClient.set_registered_model_alias

    def flaky(self, model, alias, version):
        if str(version) == "1":  # the rollback restoring the old champion works
            return original(self, model, alias, version)
        if moved_before_failing:
            original(self, model, alias, version)
        raise RuntimeError("injected: alias service down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(register.RegistrationError, match="injected.*version 2 deleted"):
        _register(env, name, 0.9)
    assert _alias(env, name, "champion") == "1"
    assert _live_versions(env, name) == ["1"]


def test_failed_registration_leaves_no_version(env, monkeypatch):
    from mlflow import MlflowClient

    _register(env, "halfway", 0.3)

    def fail(self, *args, **kwargs):
        raise RuntimeError("injected: logged model tags")

    # mlflow.register_model creates the version, then tags the logged model: fail there.
    monkeypatch.setattr(MlflowClient, "set_logged_model_tags", fail)
    with pytest.raises(register.RegistrationError, match="deleted versions: \\['2'\\]"):
        _register(env, "halfway", 0.9)
    assert _alias(env, "halfway", "champion") == "1"
    assert _live_versions(env, "halfway") == ["1"]


def test_main_reads_params_and_reports_bad_inputs(env, capsys):
    (env.root / "params.yaml").write_text(PARAMS_YAML)
    assert register.main(["--metrics", "metrics/none.json"]) == 2
    assert "metrics/none.json" in capsys.readouterr().err
    metrics = env.root / "metrics" / "coco.json"  # the stage's default
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_text(json.dumps({n: 0.2 for n in STAT_NAMES}))
    assert register.main(["--checkpoint", str(env.checkpoint)]) == 0
    assert "models:/cli@champion" in capsys.readouterr().out
    report = json.loads((env.root / "reports" / "register.json").read_text())
    assert (report["metric"], report["version"], report["decision"]) == ("AP50", 1, "champion")
    assert register.promote_main(["--version", "1", "--alias", "stable"]) == 0
    assert _alias(env, "cli", "stable") == "1"
    assert register.promote_main(["--version", "5"]) == 2


def test_rollback_returns_to_the_previous_champion(env, capsys):
    for value in (0.3, 0.4, 0.5):  # three champions in a row: v1, v2, v3
        assert _register(env, "back", value)["decision"] == "champion"
    result = register.rollback(model_name="back")
    assert (result["version"], result["previous_version"]) == (2, 3)
    assert (_alias(env, "back", "champion"), _alias(env, "back", "challenger")) == ("2", "3")
    assert "rolled back to v2" in env.client.get_model_version("back", "3").tags["alias_history"]
    assert "rollback from v3" in env.client.get_model_version("back", "2").tags["alias_history"]
    assert register.rollback(model_name="back")["version"] == 1  # history is a stack
    with pytest.raises(register.RegistrationError, match="no previous champion recorded"):
        register.rollback(model_name="back")
    assert _alias(env, "back", "champion") == "1"
    with pytest.raises(register.RegistrationError, match="no @champion"):
        register.rollback(model_name="never-registered")


def test_rollback_after_a_promotion(env):
    _register(env, "promoted", 0.3)
    _register(env, "promoted", 0.1)  # challenger
    register.promote(2, model_name="promoted")
    assert env.client.get_model_version("promoted", "2").tags["previous_champion"] == "1"
    assert register.rollback(model_name="promoted")["version"] == 1


def test_rollback_failing_between_the_two_alias_moves_changes_nothing(env, monkeypatch):
    from mlflow import MlflowClient

    _register(env, "halfback", 0.3)
    _register(env, "halfback", 0.1)  # v2: challenger
    _register(env, "halfback", 0.5)  # v3: champion, its previous champion v1
    original = MlflowClient.set_registered_model_alias

    def fail_on_challenger(self, model, alias, version):
        if alias == "challenger" and str(version) == "3":
            raise RuntimeError("injected: second alias move")
        return original(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_on_challenger)
    monkeypatch.setenv("DETR_MLFLOW_ATTEMPTS", "1")
    with pytest.raises(register.RegistrationError, match="injected.*Rolled back"):
        register.rollback(model_name="halfback")
    assert (_alias(env, "halfback", "champion"), _alias(env, "halfback", "challenger")) == \
        ("3", "2")


def test_rollback_command(env, capsys):
    (env.root / "params.yaml").write_text(PARAMS_YAML.replace("cli", "cli-back"))
    _register(env, "cli-back", 0.3)
    _register(env, "cli-back", 0.4)
    assert register.rollback_main([]) == 0
    assert "models:/cli-back@champion -> version 1" in capsys.readouterr().out
    assert register.rollback_main([]) == 2
    assert "no previous champion recorded" in capsys.readouterr().err
