"""python -m detr.predict: outputs on disk, folder expansion, model specs, exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detr.checkpoint import load_file
from detr.predict import ModelSpec, main, output_names, parse_model


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture
def image_dir(tiny_dataset, tmp_path):
    """A folder with two val images (and a file that is not an image), plus a third image
    outside it, wider than tall."""
    folder = tmp_path / "photos"
    folder.mkdir()
    val = sorted((tiny_dataset / "images" / "val").glob("*.jpg"))
    for path in val[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not an image")
    Image.open(val[2]).resize((96, 48)).save(tmp_path / "wide.png")
    return folder


def test_writes_detections_json_and_one_drawing_per_image(checkpoint, image_dir, tmp_path):
    out = tmp_path / "out"
    status = main([str(image_dir), str(tmp_path / "wide.png"), "--model", str(checkpoint),
                   "--out", str(out), "--score-threshold", "0", "--top-k", "3",
                   "--device", "cpu"])
    assert status == 0
    content = json.loads((out / "detections.json").read_text())
    paths = [Path(image["path"]) for image in content["images"]]
    assert [p.name for p in paths] == ["000000.jpg", "000001.jpg", "wide.png"]
    assert [image["id"] for image in content["images"]] == [0, 1, 2]
    assert (content["images"][2]["width"], content["images"][2]["height"]) == (96, 48)
    label_map = load_file(checkpoint)["label_map"]["categories"]
    assert content["categories"] == [{"id": c["id"], "name": c["name"]} for c in label_map]
    per_image = [sum(d["image_id"] == i for d in content["detections"]) for i in range(3)]
    assert per_image == [3, 3, 3]  # threshold 0, top-k 3
    ids = {c["id"] for c in label_map}
    assert all(d["category_id"] in ids and len(d["bbox"]) == 4 for d in content["detections"])
    for image in content["images"]:
        with Image.open(out / image["drawing"]) as drawn:
            assert drawn.size == (image["width"], image["height"])


def test_a_missing_image_exits_2_and_names_it(checkpoint, tmp_path, capsys):
    status = main([str(tmp_path / "nope.jpg"), "--model", str(checkpoint),
                   "--out", str(tmp_path / "out")])
    assert status == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_model_exits_2_and_names_it(image_dir, tmp_path, capsys):
    for model in ("missing.pth", "official:r101:missing-official.pth"):
        assert main([str(image_dir), "--model", model, "--out", str(tmp_path / "out")]) == 2
        assert model.rpartition(":")[2] in capsys.readouterr().err


def test_an_unreadable_image_exits_2_and_names_it(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert main([str(broken), "--model", str(checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_model_specs():
    assert parse_model("ckpt/checkpoint.pth") == ModelSpec(False, Path("ckpt/checkpoint.pth"))
    assert parse_model("official") == ModelSpec(True, True, "r50")
    assert parse_model("official:r101-dc5") == ModelSpec(True, True, "r101-dc5")
    assert parse_model("official:w/detr.pth") == ModelSpec(True, Path("w/detr.pth"), "r50")
    assert parse_model("official:r50-dc5:w/dc5.pth") == ModelSpec(True, Path("w/dc5.pth"),
                                                                  "r50-dc5")


def test_repeated_stems_get_distinct_drawings():
    assert output_names([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg")]) == [
        "x.png", "x-1.png", "y.png"]


def test_module_entry_point_exits_2_on_a_missing_image(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "detr.predict", str(tmp_path / "nope.jpg"),
                           "--model", "official", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.jpg" in proc.stderr


def test_tiled_prediction_keeps_the_output_contract(checkpoint, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    status = main([str(tmp_path / "wide.png"), "--model", str(checkpoint), "--out", str(out),
                   "--score-threshold", "0", "--top-k", "5", "--device", "cpu",
                   "--tile", "32", "--overlap", "0.25", "--tile-whole", "--merge", "iou"])
    assert status == 0, capsys.readouterr().err
    content = json.loads((out / "detections.json").read_text())
    assert (content["images"][0]["width"], content["images"][0]["height"]) == (96, 48)
    assert 0 < len(content["detections"]) <= 5
    for det in content["detections"]:
        x, y, w, h = det["bbox"]
        assert 0 <= x and x + w <= 96 + 1e-3 and 0 <= y and y + h <= 48 + 1e-3


@pytest.mark.parametrize(("option", "culprit"), [(["--tile", "big"], "--tile"),
                                                 (["--tile", "auto", "--overlap", "1.5"],
                                                  "overlap")])
def test_bad_tile_options_exit_2_and_name_them(checkpoint, image_dir, tmp_path, capsys,
                                               option, culprit):
    status = main([str(image_dir), "--model", str(checkpoint), "--out", str(tmp_path / "o"),
                   "--device", "cpu", *option])
    assert status == 2
    assert culprit in capsys.readouterr().err
