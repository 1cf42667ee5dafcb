"""The evaluate stage end to end: a tiny trained checkpoint -> files, MLflow run, exit codes."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from detr.evaluation import STAT_NAMES
from detr.panoptic_quality import gt_panoptic_map
from detr.segm_evaluation import MASK_STAT_NAMES, mask_to_rle
from detr.train import fit
from pipelines import tracking
from pipelines.params import EvaluateConfig
from pipelines.stages import evaluate
from tests.conftest import tiny_training

pytestmark = pytest.mark.slow
EVAL_CFG = EvaluateConfig(batch_size=2, num_examples=2, score_threshold=0.0,
                          attention_images=2, attention_queries=3)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    model, loss, data, train = tiny_training(epochs=1)
    out = tmp_path_factory.mktemp("trained")
    return fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
               data_root=tiny_dataset, out_dir=out, progress=False).checkpoint


def _run(checkpoint: Path, dataset: Path, out: Path, run_file: Path | None):
    _, _, data, train = tiny_training(epochs=1)
    return evaluate.run(checkpoint=checkpoint, dataset_dir=dataset, cfg=EVAL_CFG, data_cfg=data,
                        train_cfg=train, metrics_path=out / "metrics" / "coco.json",
                        plots_dir=out / "plots", report_dir=out / "reports" / "evaluation",
                        run_file=run_file)


@pytest.fixture(scope="module")
def tracked(checkpoint, tiny_dataset, tmp_path_factory):
    """Evaluate into an MLflow run kept under a temporary folder: (out dir, run id, result)."""
    with _tracked_run(checkpoint, tiny_dataset, tmp_path_factory.mktemp("evaluate")) as found:
        yield found


@contextlib.contextmanager
def _tracked_run(checkpoint: Path, dataset: Path, out: Path, measure=None):
    """A tracked evaluate run; ``measure`` replaces ``evaluate.measure`` for that run only
    (the environment and cwd stay set while the module's tests read the run)."""
    import mlflow

    (out / "plots").mkdir()
    (out / "plots" / "train_loss.csv").write_text("epoch,loss,loss_ce\n0,3.5,1.2\n1,3.1,1.0\n")
    (out / "plots" / "val_ap.csv").write_text("step,AP,AP50\n500,0.1,0.2\n1000,0.2,0.4\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DVC_ROOT", str(out))
        mp.chdir(out)
        tracking.configure()  # sqlite:///<out>/mlflow.db
        mlflow.create_experiment(tracking.EXPERIMENT,
                                 artifact_location=(out / "mlartifacts").as_uri())
        run_id = tracking.start_run(run_file=out / "mlflow_run.json")
        with pytest.MonkeyPatch.context() as run_only:
            if measure is not None:
                run_only.setattr(evaluate, "measure", measure)
            result = _run(checkpoint, dataset, out, out / "mlflow_run.json")
        client = mlflow.MlflowClient(tracking.tracking_uri())
        yield out, client.get_run(run_id), client, result


def test_metrics_file_has_the_twelve_statistics(tracked):
    out, _, _, result = tracked
    metrics = json.loads((out / "metrics" / "coco.json").read_text())
    assert list(metrics) == list(STAT_NAMES)
    assert all(isinstance(v, float) and (v == -1.0 or 0.0 <= v <= 1.0) for v in metrics.values())
    assert metrics == result.stats
    for name in ("segm.json", "panoptic.json"):  # a detection model: nothing measured
        assert json.loads((out / "metrics" / name).read_text()) == {}
    assert 'id="masks"' not in (out / "reports" / "evaluation" / "report.html").read_text()


def test_reports_table_per_class_and_examples(tracked, tiny_dataset):
    out, _, _, result = tracked
    reports = out / "reports" / "evaluation"
    table = (reports / "coco_table.txt").read_text().splitlines()
    assert len(table) == 12 and table[0].lstrip().startswith("Average Precision")
    per_class = json.loads((reports / "per_class_ap.json").read_text())
    assert set(per_class) == set(result.category_names.values())
    assert all(v is None or 0.0 <= v <= 1.0 for v in per_class.values())
    val = json.loads((tiny_dataset / "annotations" / "val.json").read_text())
    first = sorted(image["id"] for image in val["images"])[:EVAL_CFG.num_examples]
    examples = sorted((reports / "examples").glob("*.png"))
    assert sorted(p.stem for p in examples) == sorted(str(i) for i in first)
    with Image.open(examples[0]) as image:
        assert image.mode == "RGB" and image.width > image.height  # two panels side by side


def test_plot_csvs(tracked):
    out, _, _, result = tracked
    with (out / "plots" / "pr_curve.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:2] == ["recall", "all"]
    assert len(rows[0]) == len(result.pr_curves) + 2  # recall, all, one column per class
    assert len(rows) == 101 and float(rows[0]["recall"]) == 0 and float(rows[-1]["recall"]) == 1
    assert all(0.0 <= float(v) <= 1.0 for row in rows for v in row.values())
    with (out / "plots" / "ap_by_size.csv").open(newline="") as f:
        sizes = list(csv.DictReader(f))
    assert [r["size"] for r in sizes] == ["small", "medium", "large"]
    assert float(sizes[0]["AP"]) == result.stats["AP_small"]


def test_mlflow_run_has_metrics_and_artifacts(tracked):
    _, run, client, result = tracked
    defined = {k for k, v in result.stats.items() if v != -1.0}
    assert {"AP", "AP50", "AP75", "AR_100"} <= set(run.data.metrics)
    assert defined <= set(run.data.metrics)
    assert run.data.metrics["AP"] == pytest.approx(result.stats["AP"])
    assert any(k.startswith("AP_class_") for k in run.data.metrics)
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    for name in ("coco_table.txt", "coco_stats.json", "per_class_ap.json", "pr_curves.png",
                 "ap_by_size.png", "train_loss.png", "val_ap.png", "examples_grid.png",
                 "examples", "diagnosis.json",
                 "query_specialisation.png", "attention", "report.html"):
        assert f"evaluation/{name}" in paths
    attention = client.list_artifacts(run.info.run_id, "evaluation/attention")
    assert len(attention) == EVAL_CFG.attention_images
    table = client.download_artifacts(run.info.run_id, "evaluation/coco_table.txt")
    assert Path(table).read_text().rstrip("\n") == result.table
    stats = json.loads(Path(client.download_artifacts(
        run.info.run_id, "evaluation/coco_stats.json")).read_text())
    assert stats["columns"][:2] == ["metric", "value"] and len(stats["data"]) == 12
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(
        Path(tracked[0]))  # nothing written outside the test's folder


def _stage_outs(stages: dict, name: str) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stages[name].get("outs", [])]


def test_every_dvc_plot_is_written_by_evaluate_or_train(tracked):
    """Each path under `plots:` in dvc.yaml is an output of evaluate (then this run wrote it:
    a file, or a folder with PNGs) or of train (the fixture wrote train_loss.csv and val_ap.csv)."""
    out = tracked[0]
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    plots = [next(iter(p)) if isinstance(p, dict) else p for p in pipeline["plots"]]
    evaluate_outs = _stage_outs(pipeline["stages"], "evaluate")
    train_outs = _stage_outs(pipeline["stages"], "train")

    def under(path: str, outs: list[str]) -> bool:
        return any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs)

    images = [p for p in plots if p.endswith(".png") or "." not in Path(p).name]
    assert len(images) >= 4  # examples, attention, query specialisation, PR curves
    for plot in plots:
        assert under(plot, evaluate_outs) or under(plot, train_outs), plot
        target = out / plot
        assert target.exists(), plot
        if target.is_dir():
            assert len(list(target.glob("*.png"))) == EVAL_CFG.attention_images, plot
        elif target.suffix == ".png":
            with Image.open(target) as image:
                assert image.width > 100 and image.height > 100, plot


def test_attention_maps_and_html_report(tracked, tiny_dataset):
    out, _, _, result = tracked
    reports = out / "reports" / "evaluation"
    val = json.loads((tiny_dataset / "annotations" / "val.json").read_text())
    first = sorted(image["id"] for image in val["images"])[:EVAL_CFG.attention_images]
    attention = sorted((reports / "attention").glob("*.png"))
    assert sorted(p.stem for p in attention) == sorted(str(i) for i in first)
    with Image.open(attention[0]) as image:  # the overview + one panel per query, one row
        assert image.width > 3 * image.height
    html = (reports / "report.html").read_text(encoding="utf-8")
    assert result.table in html
    figures = 5  # PR curves, AP by size, losses, val AP, query specialisation (examples: one each)
    assert html.count('src="data:image/') == (figures + EVAL_CFG.attention_images
                                               + EVAL_CFG.num_examples)
    assert "http://" not in html and "https://" not in html


def test_diagnosis_in_json_stdout_html_and_mlflow(tracked):
    """The tiny model (stride 32, 64 px images) cannot see its objects: the diagnosis says so
    everywhere, with the curves the fixture wrote (val AP still rising: train longer)."""
    out, run, client, result = tracked
    diagnosis = json.loads((out / "reports" / "evaluation" / "diagnosis.json").read_text())
    names = [f["name"] for f in diagnosis["findings"]]
    assert names == ["object_size", "classification", "recall", "decoder_layers", "loss_trend",
                     "val_curve", "duplicates"]
    assert any("turn: data.scales to [" in v for v in diagnosis["verdicts"])
    assert any("turn: train.epochs to 2" in v for v in diagnosis["verdicts"])  # val AP rising
    metrics = diagnosis["metrics"]
    assert metrics["diag_AP_layer_1"] == pytest.approx(result.stats["AP"])
    for name in ("diag_class_agnostic_AP", "diag_recall_iou10", "diag_AP_layer_0",
                 f"diag_duplicates_{EVAL_CFG.score_threshold:g}", "diag_duplicates_0.3"):
        assert run.data.metrics[name] == pytest.approx(metrics[name]), name
    html = (out / "reports" / "evaluation" / "report.html").read_text(encoding="utf-8")
    assert 'id="diagnosis"' in html and "turn: data.scales to [" in html
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/diagnosis.json" in paths


def test_without_run_file_the_files_are_still_written(checkpoint, tiny_dataset, tmp_path,
                                                      capsys):
    result = _run(checkpoint, tiny_dataset, tmp_path, tmp_path / "absent.json")
    assert json.loads((tmp_path / "metrics" / "coco.json").read_text()) == result.stats
    assert (tmp_path / "plots" / "pr_curve.csv").is_file()
    assert list((tmp_path / "reports" / "evaluation" / "examples").glob("*.png"))
    captured = capsys.readouterr()
    assert "Average Precision" in captured.out and "absent.json" in captured.err
    assert "Diagnosis:" in captured.out and "found: " in captured.out
    assert not (tmp_path / "mlflow.db").exists()


def _params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("evaluate: {batch_size: 2, num_examples: 1}\n"
                    "data: {scales: [64], max_size: 64, num_workers: 0}\n"
                    "train: {device: cpu, precision: fp32, channels_last: false}\n")
    return path


def test_main_runs_the_stage(checkpoint, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = evaluate.main(["--params", str(_params(tmp_path)), "--checkpoint", str(checkpoint),
                          "--data", str(tiny_dataset), "--metrics", str(tmp_path / "m.json"),
                          "--plots", str(tmp_path / "plots"), "--reports", str(tmp_path / "r"),
                          "--run-file", str(tmp_path / "none.json")])
    assert code == 0
    assert list(json.loads((tmp_path / "m.json").read_text())) == list(STAT_NAMES)
    assert len(list((tmp_path / "r" / "examples").glob("*.png"))) == 1


@pytest.mark.parametrize("missing", ["checkpoint", "data"])
def test_main_names_a_missing_input_and_exits_2(missing, checkpoint, tiny_dataset, tmp_path,
                                                capsys):
    paths = {"checkpoint": checkpoint, "data": tiny_dataset, missing: tmp_path / "nowhere"}
    code = evaluate.main(["--params", str(_params(tmp_path)), "--checkpoint",
                          str(paths["checkpoint"]), "--data", str(paths["data"]),
                          "--run-file", str(tmp_path / "none.json")])
    assert code == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def _with_masks(dataset: Path, out: Path) -> Path:
    """A copy of ``dataset`` whose val annotations carry exact masks (each box's pixels that
    no earlier box took, as RLE; annotations left without pixels dropped): a panoptic
    ground truth without stuff."""
    copy = out / "dataset"
    shutil.copytree(dataset, copy)
    path = copy / "annotations" / "val.json"
    val = json.loads(path.read_text())
    taken = {i["id"]: np.zeros((i["height"], i["width"]), bool) for i in val["images"]}
    kept = []
    for ann in val["annotations"]:
        x, y, w, h = (round(v) for v in ann["bbox"])
        mask = np.zeros_like(taken[ann["image_id"]])
        mask[y:y + h, x:x + w] = True
        mask &= ~taken[ann["image_id"]]
        if mask.any():
            taken[ann["image_id"]] |= mask
            kept.append({**ann, "segmentation": mask_to_rle(mask), "area": int(mask.sum())})
    val["annotations"] = kept
    path.write_text(json.dumps(val))
    return copy


def _perfect_segmentation(measured):
    """``measured`` with every val image predicted as its ground truth, masks and panoptic
    map included (the segmentation model's contract)."""
    gt = measured.val.coco
    measured.predictions = dict(measured.predictions)  # raw_predictions may be the same dict
    for image_id in gt.getImgIds():
        anns = gt.imgToAnns[image_id]
        segments, segments_info = gt_panoptic_map(gt, image_id)
        measured.predictions[image_id] = {
            "boxes": np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4),
            "scores": np.ones(len(anns)), "labels": np.array([a["category_id"] for a in anns]),
            "masks": np.stack([gt.annToMask(a).astype(bool) for a in anns]),
            "panoptic": {"segments": segments, "segments_info": segments_info}}
    return measured


@pytest.fixture(scope="module")
def tracked_segmentation(checkpoint, tiny_dataset, tmp_path_factory):
    """As ``tracked``, for a model whose predictions carry perfect masks and panoptic maps."""
    out = tmp_path_factory.mktemp("evaluate_segmentation")
    dataset = _with_masks(tiny_dataset, out)
    real = evaluate.measure  # patched for that run only: the module's other tests run after it
    with _tracked_run(checkpoint, dataset, out,
                      lambda *a, **k: _perfect_segmentation(real(*a, **k))) as found:
        yield found


def test_segmentation_metrics_files_mlflow_and_report(tracked_segmentation):
    out, run, client, _ = tracked_segmentation
    segm = json.loads((out / "metrics" / "segm.json").read_text())
    assert list(segm) == list(MASK_STAT_NAMES) and segm["mask_AP"] == pytest.approx(1.0)
    panoptic = json.loads((out / "metrics" / "panoptic.json").read_text())
    assert panoptic["PQ"] == pytest.approx(1.0) and panoptic["PQ_th"] == pytest.approx(1.0)
    assert panoptic["PQ_st"] == -1.0  # the demo has no stuff class
    assert run.data.metrics["mask_AP"] == pytest.approx(1.0)
    assert run.data.metrics["PQ"] == pytest.approx(1.0) and "PQ_st" not in run.data.metrics
    assert any(k.startswith("mask_AP_class_") for k in run.data.metrics)
    assert any(k.startswith("PQ_class_") for k in run.data.metrics)
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    for name in ("mask_table.txt", "per_class_mask_ap.json", "panoptic_table.txt",
                 "per_class_pq.json"):
        assert f"evaluation/{name}" in paths
    html = (out / "reports" / "evaluation" / "report.html").read_text(encoding="utf-8")
    assert 'id="masks"' in html and 'id="panoptic"' in html
