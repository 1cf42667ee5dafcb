"""``prepare.format: auto``: each standard layout is recognised as people have it, and imported;
a folder that is none of them, or several, is an error that says what to set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from detr.data.detect_layout import detect_layout, import_layout
from detr.data.formats import FormatError
from pipelines.params import PrepareConfig, ValidateConfig
from pipelines.stages import prepare
from pipelines.validation.dataset_tables import load_tables
from pipelines.validation.expectations import run_suites
from tests.data.conftest import CATEGORIES, coco_split, write_coco_dataset, write_image
from tests.data.test_formats import NAMES, TRAIN, VAL, read_boxes, write_voc, write_yolo


def _coco_json(path: Path, image_dir: Path, first_id: int, count: int) -> dict:
    """A COCO json at ``path`` for ``count`` images written into ``image_dir``."""
    data = coco_split(first_id, count, 2 * first_id)
    for image in data["images"]:
        write_image(image_dir / image["file_name"], image["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def write_coco_release(root: Path, with_test: bool = True) -> Path:
    _coco_json(root / "annotations/instances_train2017.json", root / "train2017", 1, 4)
    _coco_json(root / "annotations/instances_val2017.json", root / "val2017", 10, 2)
    (root / "annotations/captions_train2017.json").write_text("{}")  # not instances: ignored
    if with_test:
        write_image(root / "test2017" / "img_900.png", 900)
    return root


def write_roboflow_coco(root: Path, splits=("train", "valid", "test")) -> Path:
    """Roboflow's COCO export, with its unused category 0 above the real classes."""
    for k, split in enumerate(splits):
        data = _coco_json(root / split / "_annotations.coco.json", root / split, 1 + 10 * k, 3)
        for category in data["categories"]:
            category["supercategory"] = "shapes-x1y2"
        data["categories"].insert(0, {"id": 0, "name": "shapes-x1y2", "supercategory": "none"})
        (root / split / "_annotations.coco.json").write_text(json.dumps(data))
    (root / "README.roboflow.txt").write_text("exported\n")
    return root


def write_ultralytics(root: Path, roboflow: bool = False) -> Path:
    """YOLO split by folders + a data.yaml: Ultralytics' own (``path:``, ``images/train``,
    names as a dict) or Roboflow's export (``../train/images``, names as a list)."""
    flat = write_yolo(root.parent / f"{root.name}_flat", split_dirs=True)
    for split, stems in (("train", TRAIN), ("val", VAL)):
        folder = {"train": "train", "val": "valid"}[split] if roboflow else split
        images, labels = ((root / folder / "images", root / folder / "labels") if roboflow
                          else (root / "images" / folder, root / "labels" / folder))
        for stem in stems:
            (images / f"{stem}.png").parent.mkdir(parents=True, exist_ok=True)
            (flat / "images" / split / f"{stem}.png").rename(images / f"{stem}.png")
            labels.mkdir(parents=True, exist_ok=True)
            if (flat / "labels" / split / f"{stem}.txt").is_file():
                (flat / "labels" / split / f"{stem}.txt").rename(labels / f"{stem}.txt")
    if roboflow:
        data = {"train": "../train/images", "val": "../valid/images", "test": "../test/images",
                "nc": len(NAMES), "names": list(NAMES)}
    else:
        data = {"path": ".", "train": "images/train", "val": "images/val",
                "names": dict(enumerate(NAMES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


LAYOUTS = {
    "coco release": (write_coco_release, "coco", "the COCO release layout",
                     "train: annotations/instances_train2017.json + train2017/"),
    "roboflow coco": (write_roboflow_coco, "coco", "a COCO export (Roboflow)",
                      "val: valid/_annotations.coco.json + valid/"),
    "canonical": (write_coco_dataset, "coco", "the canonical layout",
                  "val: annotations/val.json + images/val/"),
    "ultralytics": (write_ultralytics, "yolo", "a YOLO dataset described by data.yaml",
                    "val: images/val/ + labels/val/"),
    "roboflow yolo": (lambda r: write_ultralytics(r, roboflow=True), "yolo",
                      "a YOLO dataset described by data.yaml",
                      "val: valid/images/ + valid/labels/"),
    "yolo plain": (write_yolo, "yolo", "a YOLO folder", "all (split by prepare.val_fraction)"),
    "voc": (write_voc, "voc", "a Pascal VOC folder", "train: ImageSets/Main/train.txt"),
    "vocdevkit": (lambda r: write_voc(r / "VOC2012") and r, "voc", "a Pascal VOC folder",
                  "VOC2012: train: ImageSets/Main/train.txt"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_each_layout_is_recognised_and_imported(tmp_path: Path, case: str) -> None:
    write, fmt, name, shown = LAYOUTS[case]
    source = tmp_path / "src"
    write(source)
    layout = detect_layout(source)
    assert (layout.format, layout.name) == (fmt, name)
    assert shown in layout.describe().replace(f"{layout.root}: ", f"{layout.root.name}: ")
    assert detect_layout(source, format=fmt) == layout  # the explicit format finds it too
    imported = import_layout(layout, tmp_path / "out", val_fraction=0.4)
    assert imported.images["train"] > 0 and imported.images["val"] > 0
    assert imported.categories in (CATEGORIES, NAMES, tuple(sorted(NAMES)))


def test_the_splits_are_kept_as_the_source_has_them(tmp_path: Path) -> None:
    for write in (write_ultralytics, lambda r: write_ultralytics(r, roboflow=True)):
        source = write(tmp_path / f"src{id(write)}")
        out = tmp_path / f"out{id(write)}"
        import_layout(detect_layout(source), out)
        boxes = read_boxes(out)
        assert (sorted(boxes["train"]), sorted(boxes["val"])) == (TRAIN, VAL)
    release = detect_layout(write_coco_release(tmp_path / "coco"))
    assert set(release.splits) == {"train", "val"}
    assert release.notes == ("the test split (test2017/) is not imported: "
                             "prepare writes train and val only",)


def test_roboflow_test_split_is_a_note_and_a_lone_split_is_split_by_ratio(tmp_path) -> None:
    layout = detect_layout(write_roboflow_coco(tmp_path / "a"))
    assert set(layout.splits) == {"train", "val"}
    assert any("test split (test/) is not imported" in n for n in layout.notes)
    imported = import_layout(layout, tmp_path / "full")
    assert imported.categories == CATEGORIES  # Roboflow's unused category 0 left out
    outcomes = run_suites(load_tables(tmp_path / "full", workers=1), ValidateConfig(workers=1))
    assert [o.name for o in outcomes if not o.success] == []
    lone = detect_layout(write_roboflow_coco(tmp_path / "b", splits=("train", "test")))
    assert set(lone.splits) == {"all"}
    imported = import_layout(lone, tmp_path / "out", val_fraction=0.4)
    assert dict(imported.images) == {"train": 2, "val": 1}  # test images never join train


def test_a_yaml_file_or_a_json_file_as_the_source(tmp_path: Path) -> None:
    source = write_ultralytics(tmp_path / "yolo")
    assert detect_layout(source / "data.yaml").splits == detect_layout(source).splits
    release = write_coco_release(tmp_path / "coco")
    one = detect_layout(release / "annotations/instances_val2017.json",
                        image_dir=release / "val2017")
    assert (one.format, set(one.splits)) == ("coco", {"all"})
    with pytest.raises(FormatError, match="prepare.image_dir: needed with a single COCO json"):
        detect_layout(release / "annotations/instances_val2017.json")


def test_a_folder_that_is_no_layout_names_what_was_looked_for(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    write_image(source / "a.png", 1)
    with pytest.raises(FormatError) as info:
        detect_layout(source)
    message = str(info.value)
    assert message.startswith(f"{source}: no dataset layout recognised (it holds: a.png)")
    for needle in ("instances_{train,val}2017.json", "_annotations.coco.json", "data.yaml",
                   "JPEGImages/", "annotations/{train,val}.json", "prepare.format",
                   "prepare.image_dir"):
        assert needle in message
    explicit = r"no voc layout \(prepare.format: voc\) .*\n  - Annotations/.*\nSet prepare.format: auto"
    with pytest.raises(FormatError, match=explicit):
        detect_layout(write_coco_release(tmp_path / "coco"), format="voc")


def test_two_layouts_in_one_folder_is_an_error_unless_the_format_is_set(tmp_path) -> None:
    source = write_ultralytics(tmp_path / "src")
    write_coco_dataset(source)
    with pytest.raises(FormatError) as info:
        detect_layout(source)
    message = str(info.value)
    assert "found more than one dataset" in message and "Set prepare.format" in message
    assert "  - coco: the canonical layout" in message and "  - yolo: a YOLO dataset" in message
    assert detect_layout(source, format="coco").name == "the canonical layout"
    assert detect_layout(source, format="yolo").format == "yolo"


def test_half_a_layout_names_the_missing_part(tmp_path: Path) -> None:
    source = write_coco_release(tmp_path / "coco", with_test=False)
    (source / "annotations/instances_val2014.json").write_text("{}")
    (source / "images/val2014").mkdir(parents=True)
    with pytest.raises(FormatError, match=r"coco: two val splits, annotations/instances_val2014"
                                          r".json and annotations/instances_val2017.json; keep"):
        detect_layout(source)
    (source / "annotations/instances_val2014.json").unlink()
    (source / "val2017").rename(source / "val")
    with pytest.raises(FormatError, match=r"instances_val2017.json: found, but not its image "
                                          r"folder .*coco/val2017/ or .*coco/images/val2017/"):
        detect_layout(source)


def test_yolo_data_yaml_errors_name_the_key(tmp_path: Path) -> None:
    source = write_ultralytics(tmp_path / "yolo")
    (source / "data.yaml").write_text(yaml.safe_dump({"train": "images/train",
                                                      "val": "images/nope", "names": ["a"]}))
    with pytest.raises(FormatError, match=r"data.yaml: 'val: images/nope': no folder"):
        detect_layout(source)
    (source / "data.yaml").write_text(yaml.safe_dump({"train": "images/train",
                                                      "val": "images/val", "names": ["a"]}))
    (source / "labels" / "val").rename(source / "labels" / "v")
    with pytest.raises(FormatError, match=r"'val' images in .*, but no label folder"):
        detect_layout(source)


def test_prepare_prints_the_layout_it_found(tmp_path: Path, capsys) -> None:
    source = write_coco_release(tmp_path / "coco")
    summary = prepare.run(cfg=PrepareConfig(source=str(source)), out_dir=tmp_path / "out")
    assert summary["images"] == {"train": 4, "val": 2}
    out = capsys.readouterr().out
    assert (f"prepare: found the COCO release layout in {source}: "
            "train: annotations/instances_train2017.json + train2017/, "
            "val: annotations/instances_val2017.json + val2017/\n") in out
    assert "prepare: note: the test split (test2017/) is not imported" in out
    previous = tmp_path / "out" / "annotations" / "train.json"
    with pytest.raises(FormatError):  # an unusable source leaves the last dataset alone
        prepare.run(cfg=PrepareConfig(source=str(tmp_path)), out_dir=tmp_path / "out")
    assert previous.is_file()


def test_coco_as_ultralytics_downloads_it(tmp_path: Path) -> None:
    """images/{train,val}2017 + labels/ + only the val json: COCO release, one split, a note
    for the train images without annotations (images/ + labels/ without class names is no
    YOLO dataset)."""
    root = tmp_path / "coco"
    _coco_json(root / "annotations/instances_val2017.json", root / "images/val2017", 1, 4)
    write_image(root / "images/train2017/img_100.png", 100)
    (root / "labels/train2017").mkdir(parents=True)
    layout = detect_layout(root)
    assert (layout.name, set(layout.splits)) == ("the COCO release layout", {"all"})
    assert layout.splits["all"].images == root / "images/val2017"
    assert layout.notes == ("images/train2017/ has no annotations/instances_train2017.json: "
                            "not imported",)


def test_one_folder_for_train_and_val_and_two_voc_years(tmp_path: Path) -> None:
    source = write_ultralytics(tmp_path / "yolo")
    (source / "data.yaml").write_text(yaml.safe_dump(
        {"train": "images/train", "val": "images/train", "names": list(NAMES)}))
    layout = detect_layout(source, image_dir="ignored")
    assert set(layout.splits) == {"all"}
    assert layout.notes == ("data.yaml: val names the train folder, so it is one split",
                            "prepare.image_dir is only read with a single COCO json: ignored")
    devkit = tmp_path / "VOCdevkit"
    write_voc(devkit / "VOC2007")
    write_voc(devkit / "VOC2012")
    with pytest.raises(FormatError, match=r"(?s)found more than one.*VOC2007.*VOC2012.*\n"
                                          r"Point prepare.source at the one to import"):
        detect_layout(devkit)
