"""Importers: VOC, YOLO and COCO sources written here round-trip into the canonical layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from detr.data.formats import FormatError, import_coco, split_by_ratio
from detr.data.voc import import_voc
from detr.data.yolo import import_yolo
from pipelines.params import ValidateConfig
from pipelines.validation.dataset_tables import load_tables
from pipelines.validation.expectations import run_suites
from tests.data.conftest import coco_split, write_coco_dataset, write_image

NAMES = ("cat", "dog", "bird")
# stem, (width, height), objects: (class name, x, y, w, h, difficult) in absolute pixels
SPEC = [
    ("a1", (64, 48), [("cat", 0, 0, 10, 12, False), ("dog", 20, 5, 44, 43, False)]),
    ("a2", (40, 60), [("bird", 3, 4, 30, 50, False), ("cat", 10, 10, 5, 5, True)]),
    ("a3", (50, 50), [("dog", 1, 1, 48, 48, False), ("bird", 30, 30, 7, 9, False)]),
    ("a4", (32, 32), []),
    ("a5", (80, 40), [("cat", 60, 20, 20, 20, False), ("dog", 0, 0, 8, 8, True)]),
]
TRAIN, VAL = ["a1", "a2", "a3"], ["a4", "a5"]


def _voc_object(name: str, x: int, y: int, w: int, h: int, difficult: bool) -> str:
    box = f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax>"
    tags = f"<name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>{box}</bndbox>"
    return f"<object>{tags}</object>"


def write_voc(root: Path, split_lists: bool = True) -> Path:
    for index, (stem, (w, h), objects) in enumerate(SPEC):
        write_image(root / "JPEGImages" / f"{stem}.jpg", index, size=(w, h))
        body = "".join(_voc_object(*o) for o in objects)
        xml = (
            f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{body}</annotation>"
        )
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    if split_lists:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for split, stems in (("train", TRAIN), ("val", VAL)):
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def _normalised(x: float, y: float, bw: float, bh: float, w: int, h: int) -> list[float]:
    """YOLO's cx cy w h, normalised by the image size."""
    return [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]


def write_yolo(root: Path, split_dirs: bool = False, names_file: str = "data.yaml") -> Path:
    for index, (stem, (w, h), objects) in enumerate(SPEC):
        sub = ("train/" if stem in TRAIN else "val/") if split_dirs else ""
        write_image(root / "images" / f"{sub}{stem}.png", index, size=(w, h))
        lines = [
            " ".join([str(NAMES.index(n)), *(f"{v:.6f}" for v in _normalised(x, y, bw, bh, w, h))])
            for n, x, y, bw, bh, _ in objects
        ]
        (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
        if stem != "a4":  # an image without a label file has no objects
            (root / "labels" / f"{sub}{stem}.txt").write_text("\n".join(lines) + "\n")
    if names_file == "data.yaml":
        (root / "data.yaml").write_text(yaml.safe_dump({"names": dict(enumerate(NAMES))}))
    else:
        (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


def read_boxes(out: Path) -> dict[str, dict[str, list]]:
    """split -> {file stem: sorted [(name, x, y, w, h, iscrowd)]}, from the canonical jsons."""
    result = {}
    for split in ("train", "val"):
        data = json.loads((out / "annotations" / f"{split}.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        stems = {im["id"]: Path(im["file_name"]).stem for im in data["images"]}
        boxes = {stem: [] for stem in stems.values()}
        for a in data["annotations"]:
            boxes[stems[a["image_id"]]].append((names[a["category_id"]], *a["bbox"], a["iscrowd"]))
        result[split] = {k: sorted(v) for k, v in boxes.items()}
    return result


def assert_boxes_match(got: list, objects: list, crowd_difficult: bool) -> None:
    expected = sorted((n, x, y, w, h, int(d and crowd_difficult)) for n, x, y, w, h, d in objects)
    assert [g[0] for g in got] == [e[0] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert all(abs(a - b) <= 1 for a, b in zip(g[1:5], e[1:5], strict=True)), (g, e)
        assert g[5] == e[5]


def test_voc_round_trip(tmp_path: Path) -> None:
    imported = import_voc(tmp_path / "out", write_voc(tmp_path / "voc"), class_names=NAMES)
    assert imported.categories == NAMES
    assert dict(imported.images) == {"train": 3, "val": 2}
    boxes = read_boxes(tmp_path / "out")
    assert (sorted(boxes["train"]), sorted(boxes["val"])) == (TRAIN, VAL)
    for stem, _, objects in SPEC:
        assert_boxes_match({**boxes["train"], **boxes["val"]}[stem], objects, crowd_difficult=True)
    link = tmp_path / "out" / "images" / "train" / "a1.jpg"
    assert (
        link.is_symlink()
        and link.resolve() == (tmp_path / "voc" / "JPEGImages" / "a1.jpg").resolve()
    )
    outcomes = run_suites(load_tables(tmp_path / "out", workers=1), ValidateConfig(workers=1))
    assert [o.name for o in outcomes if not o.success] == []


@pytest.mark.parametrize("difficult, expected", [("keep", 8), ("drop", 6)])
def test_voc_difficult_choices(tmp_path: Path, difficult: str, expected: int) -> None:
    imported = import_voc(tmp_path / "out", write_voc(tmp_path / "voc"), difficult=difficult)
    assert sum(imported.annotations.values()) == expected
    crowd = [
        b
        for split in read_boxes(tmp_path / "out").values()
        for bs in split.values()
        for b in bs
        if b[5]
    ]
    assert crowd == []


def test_voc_without_split_lists_splits_by_ratio(tmp_path: Path) -> None:
    voc = write_voc(tmp_path / "voc", split_lists=False)
    first = import_voc(tmp_path / "a", voc, val_fraction=0.4, seed=3)
    import_voc(tmp_path / "b", voc, val_fraction=0.4, seed=3)
    assert dict(first.images) == {"train": 3, "val": 2}
    assert read_boxes(tmp_path / "a") == read_boxes(tmp_path / "b")
    assert first.categories == ("bird", "cat", "dog")  # sorted names when none are given


@pytest.mark.parametrize("split_dirs, names_file", [(False, "data.yaml"), (True, "classes.txt")])
def test_yolo_round_trip(tmp_path: Path, split_dirs: bool, names_file: str) -> None:
    yolo = write_yolo(tmp_path / "yolo", split_dirs, names_file)
    imported = import_yolo(tmp_path / "out", yolo, val_fraction=0.4, seed=0)
    assert imported.categories == NAMES
    boxes = read_boxes(tmp_path / "out")
    assert sum(len(s) for s in boxes.values()) == len(SPEC)
    if split_dirs:
        assert (sorted(boxes["train"]), sorted(boxes["val"])) == (TRAIN, VAL)
    for stem, _, objects in SPEC:
        assert_boxes_match({**boxes["train"], **boxes["val"]}[stem], objects, crowd_difficult=False)
    data = json.loads((tmp_path / "out" / "annotations" / "train.json").read_text())
    sizes = {Path(im["file_name"]).stem: (im["width"], im["height"]) for im in data["images"]}
    assert all(sizes[stem] == size for stem, size, _ in SPEC if stem in sizes)


def test_coco_split_by_ratio_keeps_ids(tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = coco_split(1, 10, 1)
    for image in data["images"]:
        write_image(src / "images" / image["file_name"], image["id"])
    (src / "all.json").write_text(json.dumps(data))
    imported = import_coco(
        tmp_path / "out", {"all": (src / "all.json", src / "images")}, val_fraction=0.3
    )
    assert dict(imported.images) == {"train": 7, "val": 3}
    out = [
        json.loads((tmp_path / "out" / "annotations" / f"{s}.json").read_text())
        for s in ("train", "val")
    ]
    assert sorted(im["id"] for d in out for im in d["images"]) == list(range(1, 11))
    by_id = {a["id"]: a for d in out for a in d["annotations"]}
    assert by_id == {a["id"]: a for a in data["annotations"]}


def test_coco_train_val_as_is_with_copies(pristine_dataset: Path, tmp_path: Path) -> None:
    sources = {
        s: (pristine_dataset / "annotations" / f"{s}.json", pristine_dataset / "images" / s)
        for s in ("train", "val")
    }
    import_coco(tmp_path / "out", sources, link="copy")
    for split in ("train", "val"):
        name = f"annotations/{split}.json"
        assert json.loads((tmp_path / "out" / name).read_text()) == json.loads(
            (pristine_dataset / name).read_text()
        )
    copy = tmp_path / "out" / "images" / "train" / "img_001.png"
    assert (
        not copy.is_symlink()
        and copy.read_bytes() == (pristine_dataset / "images/train/img_001.png").read_bytes()
    )


def test_hardlinks_and_in_place_reimport(tmp_path: Path) -> None:
    root = write_coco_dataset(tmp_path / "ds")
    sources = {
        s: (root / "annotations" / f"{s}.json", root / "images" / s) for s in ("train", "val")
    }
    import_coco(tmp_path / "hard", sources, link="hardlink")
    assert os.path.samefile(
        tmp_path / "hard/images/val/img_007.png", root / "images/val/img_007.png"
    )
    import_coco(root, sources)  # in place: the images must survive
    assert (root / "images" / "val" / "img_007.png").stat().st_size > 0


def _bad(path: Path, text: str) -> None:
    path.write_text(text)


FORMAT_ERRORS = {
    "bad xml": (
        "voc",
        lambda r: _bad(r / "Annotations/a2.xml", "<annotation><filename>"),
        "a2.xml: not valid XML",
    ),
    "voc box not a number": (
        "voc",
        lambda r: _bad(
            r / "Annotations/a1.xml",
            "<annotation><object><name>cat</name><bndbox><xmin>x</xmin>"
            "</bndbox></object></annotation>",
        ),
        r"a1.xml: object 0 \(cat\): <bndbox><xmin> is 'x'",
    ),
    "voc missing image": (
        "voc",
        lambda r: (r / "JPEGImages/a3.jpg").unlink(),
        "a3.xml: image .*a3.jpg not found",
    ),
    "voc split list names no xml": (
        "voc",
        lambda r: _bad(r / "ImageSets/Main/val.txt", "a4\nzz9\n"),
        r"val.txt:2: 'zz9' has no Annotations",
    ),
    "yolo wrong field count": (
        "yolo",
        lambda r: _bad(r / "labels/a2.txt", "2 0.5 0.5 0.2 0.2\n0 0.5 0.5\n"),
        r"a2.txt:2: expected 5 fields 'class cx cy w h' or a polygon .*, got 3",
    ),
    "yolo class out of range": (
        "yolo",
        lambda r: _bad(r / "labels/a3.txt", "3 0.5 0.5 0.2 0.2\n"),
        r"a3.txt:1: class index 3 out of range 0..2",
    ),
    "yolo not a number": (
        "yolo",
        lambda r: _bad(r / "labels/a1.txt", "cat 0.5 0.5 0.2 0.2\n"),
        "a1.txt:1: not an integer",
    ),
    "yolo label without image": (
        "yolo",
        lambda r: (r / "images/a5.png").unlink(),
        "a5.txt: no image",
    ),
    "yolo no class names": ("yolo", lambda r: (r / "data.yaml").unlink(), "no class names"),
    "coco missing image": (
        "coco",
        lambda r: (r / "images/val/img_008.png").unlink(),
        "val.json: image id 8: file .*img_008.png not found",
    ),
    "coco bad bbox": (
        "coco",
        lambda r: _edit_coco(r, lambda d: d["annotations"][2].update(bbox=[1, 2])),
        r"train.json: annotation id 3: bbox must be 4 numbers",
    ),
    "coco unknown image": (
        "coco",
        lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(image_id=77)),
        "train.json: annotation id 1: image_id 77 is not in images",
    ),
}


def _edit_coco(root: Path, change) -> None:
    path = root / "annotations" / "train.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", list(FORMAT_ERRORS))
def test_malformed_input_names_file_and_record(tmp_path: Path, case: str) -> None:
    kind, change, message = FORMAT_ERRORS[case]
    src = {"voc": write_voc, "yolo": write_yolo, "coco": write_coco_dataset}[kind](tmp_path / kind)
    change(src)
    with pytest.raises(FormatError, match=message):
        if kind == "voc":
            import_voc(tmp_path / "out", src, class_names=NAMES)
        elif kind == "yolo":
            import_yolo(tmp_path / "out", src)
        else:
            import_coco(
                tmp_path / "out",
                {s: (src / f"annotations/{s}.json", src / "images" / s) for s in ("train", "val")},
            )


def test_split_by_ratio_is_seeded_and_complete() -> None:
    keys = [f"k{i}" for i in range(20)]
    parts = split_by_ratio(keys, val_fraction=0.25, seed=1)
    assert len(parts["val"]) == 5 and sorted(parts["train"] + parts["val"]) == sorted(keys)
    assert split_by_ratio(list(reversed(keys)), val_fraction=0.25, seed=1) == parts
    assert split_by_ratio(keys[:2], val_fraction=0.01, seed=0)["val"] != []
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_ratio(keys, val_fraction=1.0, seed=0)
