"""Bad input is refused with an error naming the file, the record and the field, and nothing
downstream changes: the COCO loader, training on an empty split, the stages' command lines with
bad params, and checkpoints that are not what they claim (to the train and evaluate stages).

The validation suite's own refusals are in tests/data (test_expectations.py, one case per
defect); checkpoint loading itself in test_checkpoint.py; params parsing in test_config.py and
test_params.py.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from detr.checkpoint import load_file
from detr.data.coco import AnnotationError, CocoDetection, ImageLoadError
from detr.data.layout import is_unsafe_file_name
from detr.train import fit
from pipelines.__main__ import main as pipelines_main
from tests.conftest import TINY, tiny_training

ROOT = Path(__file__).resolve().parents[2]


def _valid() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
                       {"id": 2, "file_name": "sub/b.png", "width": 32, "height": 24}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8],
                             "area": 80, "iscrowd": 0}],
            "categories": [{"id": 7, "name": "cat"}]}


def _dataset(root: Path, data: dict | str) -> Path:
    """images/train/{a.png, sub/b.png} (32x24) and annotations/train.json = ``data``."""
    for name in ("a.png", "sub/b.png"):
        (root / "images" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (9, 99, 199)).save(root / "images" / "train" / name)
    (root / "annotations").mkdir(exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data, allow_nan=True)
    (root / "annotations" / "train.json").write_text(text)
    return root


def _set(path: str, value) -> Callable[[dict], None]:
    """A change that sets ``data[k0][k1]...`` (dot path) to ``value``."""
    *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]

    def change(data: dict) -> None:
        target = data
        for key in keys:
            target = target[key]
        target[last] = value

    return change


# case: (change to the valid dict, or the file's text), message naming record and field
ANNOTATION_FILES = {
    "malformed JSON": ('{"images": [{"id": 1,', r"not valid JSON: .*line 1 column"),
    "not an object": ("[1, 2]", r"expected a JSON object .* got list"),
    "no images list": (lambda d: d.pop("images"), r"'images' must be a list of objects"),
    "image not an object": (_set("images.1", "b.png"), r"images\[1\] must be an object"),
    "file name with ..": (_set("images.0.file_name", "../val/a.png"),
                          r"image 1 \(images\[0\]\): file_name '\.\./val/a\.png' must be "
                          r"relative to the image folder, without '\.\.'"),
    "file name with .. inside": (_set("images.1.file_name", "sub/../../a.png"),
                                 r"image 2 \(images\[1\]\): file_name 'sub/\.\./\.\./a\.png'"),
    "absolute file name": (_set("images.0.file_name", "/etc/hostname"),
                           r"image 1 \(images\[0\]\): file_name '/etc/hostname' must be relative"),
    "empty file name": (_set("images.0.file_name", ""), r"image 1 .*file_name must be a non-empty"),
    "image id not an int": (_set("images.0.id", "1"), r"images\[0\]: id must be an integer, got '1'"),
    "duplicate image id": (_set("images.1.id", 1), r"images\[1\]: id 1 is used twice"),
    "width not a number": (_set("images.0.width", "32"), r"image 1 .*: width must be a positive"),
    "zero height": (_set("images.1.height", 0), r"image 2 .*: height must be a positive integer"),
    "category name missing": (lambda d: d["categories"][0].pop("name"),
                              r"category 7 \(categories\[0\]\): name must be a string"),
    "unknown category id": (_set("annotations.0.category_id", 99),
                            r"annotation 1 \(annotations\[0\]\): category_id 99 is not in "
                            r"'categories'"),
    "unknown image id": (_set("annotations.0.image_id", 42),
                         r"annotation 1 .*: image_id 42 is not in 'images'"),
    "bbox of three numbers": (_set("annotations.0.bbox", [1, 2, 3]),
                              r"annotation 1 .*: bbox must be \[x, y, w, h\], four finite "
                              r"numbers, got \[1, 2, 3\]"),
    "bbox with NaN": (_set("annotations.0.bbox", [1, float("nan"), 3, 4]),
                      r"annotation 1 .*: bbox must be .* got \[1, nan, 3, 4\]"),
    "bbox with a string": (_set("annotations.0.bbox", [1, 2, "3", 4]), r"annotation 1 .*: bbox"),
    "huge integer": (_set("annotations.0.bbox", [1, 2, 10**400, 4]), r"annotation 1 .*: bbox"),
    "iscrowd 2": (_set("annotations.0.iscrowd", 2), r"annotation 1 .*: iscrowd must be 0 or 1"),
    "area infinite": (_set("annotations.0.area", float("inf")),
                      r"annotation 1 .*: area must be a finite number, got inf"),
}


@pytest.mark.parametrize("case", list(ANNOTATION_FILES))
def test_loader_refuses_a_bad_annotation_file_naming_record_and_field(tmp_path, case):
    change, message = ANNOTATION_FILES[case]
    data = change if isinstance(change, str) else _valid()
    if callable(change):
        change(data)
    root = _dataset(tmp_path, data)
    with pytest.raises(AnnotationError, match=message) as error:
        CocoDetection.from_root(root, "train")
    assert str(root / "annotations" / "train.json") in str(error.value)


@pytest.mark.parametrize("text, message", [
    ('{"images": [', r"train\.json: not valid JSON"),
    (b"\xff\xfe\x00garbage", r"train\.json: not valid JSON"),
    ('{"images": {}, "annotations": [], "categories": []}',
     r"train\.json: 'images' must be a list of records"),
])
def test_validate_stage_names_a_malformed_annotation_file(tmp_path, capsys, text, message):
    from tests.data.conftest import write_coco_dataset

    root = write_coco_dataset(tmp_path / "data", n_train=2, n_val=1)
    path = root / "annotations" / "train.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "params.yaml").write_text("validate:\n  workers: 1\n")
    code = pipelines_main(["validate", "--data", str(root), "--params",
                           str(tmp_path / "params.yaml"), "--reports", str(tmp_path / "r")])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "r" / "dataset.json").exists()  # no statistics of unread data


def test_unsafe_file_name_rule():
    """One rule for the loader and the validation (detr.data.layout)."""
    for name in ("../a.png", "a/../../b.png", "/etc/passwd", "C:\\x.png", "\\\\host\\x.png",
                 "..\\a.png"):
        assert is_unsafe_file_name(name), name
    for name in ("a.png", "sub/b.png", "..a.png", "a..png", "sub/..b/c.png"):
        assert not is_unsafe_file_name(name), name


def test_the_layout_rules_import_without_torch():
    """The validation's file checks run in spawned workers that import them: no torch there."""
    code = ("import sys, detr.data.layout, pipelines.validation.dataset_tables; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_valid_file_of_these_cases_loads(tmp_path):
    dataset = CocoDetection.from_root(_dataset(tmp_path, _valid()), "train")
    assert len(dataset) == 2 and dataset[1][0].shape == (3, 24, 32)


def _image_case(root: Path, name: str) -> None:
    path = root / "images" / "train" / "a.png"
    if name == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif name == "not an image":
        path.write_text("<html>a web page, not a PNG</html>")
    elif name == "another size":
        Image.new("RGB", (24, 32)).save(path)
    else:
        path.unlink()


@pytest.mark.parametrize("case, message", [
    ("truncated", r"image id 1: cannot read .*a\.png"),
    ("not an image", r"image id 1: cannot read .*a\.png: cannot identify image file"),
    ("another size", r"image id 1: .*a\.png is 24x32 \(WxH\) but the annotations say 32x24"),
    ("missing", r"image id 1: cannot read .*a\.png"),
])
def test_loader_names_a_bad_image_file(tmp_path, case, message):
    root = _dataset(tmp_path, _valid())
    _image_case(root, case)
    dataset = CocoDetection.from_root(root, "train")
    with pytest.raises(ImageLoadError, match=message):
        dataset[0]
    assert dataset[1][0].shape == (3, 24, 32)  # the other image is fine


@pytest.mark.parametrize("split", ["train", "val"])
def test_training_refuses_an_empty_split_before_writing_anything(tiny_dataset, tmp_path, split):
    import shutil

    root = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    ann = root / "annotations" / f"{split}.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({**data, "images": [], "annotations": []}))
    model, loss, data_cfg, train = tiny_training(epochs=1)
    with pytest.raises(AnnotationError, match=rf"{split}\.json: no images in this split"):
        fit(model_cfg=model, loss_cfg=loss, data_cfg=data_cfg, train_cfg=train, data_root=root,
            out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- the stages' command lines ---------------------------------------------------------------

def _params(tmp_path: Path, change: Callable[[dict], None] | None = None) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if change:
        change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


BAD_PARAMS = {
    "unknown key": (lambda p: p["train"].update(learning_rate=0.1),
                    r"train\.learning_rate: unknown key"),
    "wrong type": (lambda p: p["model"].update(hidden_dim="128"),
                   r"model\.hidden_dim: expected int, got str"),
    "unknown section": (lambda p: p.update(trian={"epochs": 1}), r"unknown section 'trian'"),
}


@pytest.mark.parametrize("stage", ["prepare", "validate", "train", "evaluate", "register"])
@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_every_stage_refuses_bad_params_before_touching_anything(tmp_path, monkeypatch, capsys,
                                                                  stage, case):
    change, message = BAD_PARAMS[case]
    params = _params(tmp_path, change)
    monkeypatch.chdir(tmp_path)  # the stages' default paths: nothing may appear here
    (tmp_path / "checkpoints").mkdir()
    old = tmp_path / "checkpoints" / "checkpoint.pth"
    old.write_bytes(b"the previous checkpoint")
    assert pipelines_main([stage, "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{stage}: ") and "params.yaml" in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "params.yaml"]
    assert old.read_bytes() == b"the previous checkpoint"


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, message): a pickle payload, a list, an official-format file of another
    architecture, a training checkpoint whose params describe another architecture."""
    from detr.models.detr import build_model

    files = {}
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": Payload()}))
    files["pickle payload"] = (evil, r"evil\.pth: refused: the file needs arbitrary code")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    files["not a dict"] = (tmp_path / "list.pth", r"list\.pth: expected a dict, got list")
    other = build_model(TINY.__class__(**{**vars(TINY), "hidden_dim": 16, "nheads": 2}))
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    files["another architecture"] = (
        tmp_path / "other.pth", r"other\.pth: checkpoint does not fit this model \(another "
                                r"architecture\?\)")
    return files


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A real training checkpoint of the tiny config, and a copy whose params lie about it."""
    out = tmp_path_factory.mktemp("trained")
    model, loss, data, train = tiny_training(epochs=1)
    path = fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
               data_root=tiny_dataset, out_dir=out, progress=False,
               evaluate_at_end=False).checkpoint
    ckpt = load_file(path)
    ckpt["params"]["model"]["hidden_dim"] = 64  # the weights are hidden_dim 32
    torch.save(ckpt, out / "lying.pth")
    return path, out / "lying.pth"


@pytest.mark.parametrize("case", ["pickle payload", "not a dict", "another architecture",
                                  "params of another architecture"])
def test_evaluate_stage_refuses_a_bad_checkpoint(trained, tiny_dataset, tmp_path, monkeypatch,
                                                 capsys, case):
    files = _bad_checkpoints(tmp_path)
    files["another architecture"] = (files["another architecture"][0],  # weights only
                                     r"other\.pth: not a training checkpoint")
    files["params of another architecture"] = (
        trained[1], r"lying\.pth: checkpoint does not fit this model \(another architecture")
    path, message = files[case]
    monkeypatch.chdir(tmp_path)
    code = pipelines_main(["evaluate", "--params", str(_params(tmp_path)), "--checkpoint",
                           str(path), "--data", str(tiny_dataset), "--run-file", "none.json"])
    out = capsys.readouterr()
    assert code == 2 and "this must never run" not in out.out
    assert out.err.startswith("evaluate: ") and re.search(message, out.err), out.err
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("case", ["pickle payload", "not a dict", "another architecture"])
def test_train_stage_refuses_bad_init_weights(tiny_dataset, tmp_path, monkeypatch, capsys, case):
    """Fine-tuning from a file that is not a compatible state dict stops before training; the
    MLflow run it opened is marked FAILED."""
    import mlflow

    path, message = _bad_checkpoints(tmp_path)[case]
    params = _params(tmp_path, lambda p: p.update(
        model={**p["model"], **{k: getattr(TINY, k) for k in (
            "backbone", "norm", "hidden_dim", "nheads", "enc_layers", "dec_layers",
            "dim_feedforward", "num_queries")},
               "aids": {**p["model"]["aids"], "query_groups": None}},
        data={**p["data"], "scales": [64], "max_size": 64, "crop_scales": [64],
              "crop_size": [48, 64]},
        train={**p["train"], "epochs": 1, "device": "cpu", "precision": "fp32"}))
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code = pipelines_main(["train", "--params", str(params), "--data", str(tiny_dataset),
                           "--init-weights", str(path)])
    out = capsys.readouterr()
    assert code == 2 and "this must never run" not in out.out
    last = out.err.strip().splitlines()[-1]  # (MLflow logs its database set-up before)
    assert last.startswith("train: ") and re.search(message, last), out.err
    assert not (tmp_path / "checkpoints").exists()
    run_id = json.loads((tmp_path / "reports" / "mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
