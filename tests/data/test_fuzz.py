"""Fuzz the COCO loader and the validation suite with random annotation files (hypothesis).

Random JSON of any shape, and COCO-like files whose fields are sometimes of the wrong type,
missing, NaN/inf, huge, negative, unicode or path-like (``..``, absolute). Whatever the file,
the loader (:class:`detr.data.coco.CocoDetection`, every item read) and the validation
(:func:`pipelines.validation.dataset_tables.load_tables`, the statistics, the Great Expectations
suite)
either accept it or refuse it with the project's own error type and a message that names the
file (and, for records, the record and the field); they never fail with anything else.

Deterministic (``derandomize``) so that CI sees the same examples on every run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from detr.data.coco import AnnotationError, CocoDetection, ImageLoadError
from pipelines.params import ValidateConfig
from pipelines.stages.validate import dataset_statistics
from pipelines.stages.validate import run as validate_run
from pipelines.validation.dataset_tables import DatasetLayoutError, load_tables

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UNICODE_NAME = "ünï 图 ✓.png"
# Files in every images/<split>/ folder: (name, content). Sizes are (W, H).
GOOD = {"a.png": (64, 48), "b.png": (32, 32), UNICODE_NAME: (40, 30)}
BROKEN = {"trunc.png": "truncated", "text.png": "not an image"}

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
ODD_NUMBERS = (st.sampled_from([0, -1, 1e30, -1e300, 2**64, 10**400])
               | st.floats(allow_nan=True, allow_infinity=True))
ODD_FILE_NAMES = (st.sampled_from([*BROKEN, "missing.png", "../train/a.png", "sub/../a.png",
                                   "/etc/hostname", "C:\\x.png", "", ".", "a.png\x00",
                                   "\ud800.png"])
                  | st.text(max_size=10))
JUNK = st.one_of(ANY_JSON, ODD_NUMBERS, ODD_FILE_NAMES)


@st.composite
def coco_dicts(draw) -> dict:
    """A COCO detection dict: consistent ids and mostly sensible values, then 0-3 mutations
    (a field set to junk, a key or a record dropped, a list replaced)."""
    categories = [{"id": cid, "name": draw(st.text(max_size=6)), "supercategory": "x"}
                  for cid in draw(st.lists(st.integers(0, 99), max_size=3, unique=True))]
    images = []
    for image_id in range(1, draw(st.sampled_from([0, 1, 2, 3, 4, 4])) + 1):
        odd = draw(st.integers(0, 4)) == 0
        name = draw(ODD_FILE_NAMES if odd else st.sampled_from(sorted(GOOD)))
        width, height = GOOD.get(name, (64, 48))
        if draw(st.integers(0, 5)) == 0:  # declared size wrong
            width, height = draw(st.sampled_from([(width + 1, height), (0, height), (10**12, 1)]))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    annotations = []
    if images and categories:
        coords = st.floats(-10, 80, allow_nan=False) | st.integers(-10, 80)
        for ann_id in range(1, draw(st.integers(0, 8)) + 1):
            bbox = draw(st.lists(coords, min_size=4, max_size=4))
            annotations.append({
                "id": ann_id, "image_id": draw(st.sampled_from([i["id"] for i in images])),
                "category_id": draw(st.sampled_from([c["id"] for c in categories])),
                "bbox": bbox, "area": bbox[2] * bbox[3],
                "iscrowd": draw(st.sampled_from([0, 0, 0, 1]))})
    data = {"images": images, "annotations": annotations, "categories": categories}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        _mutate(draw, data)
    return data


def _mutate(draw, data: dict) -> None:
    key = draw(st.sampled_from(["images", "annotations", "categories"]))
    records = data.get(key)
    if not isinstance(records, list) or not records or draw(st.integers(0, 5)) == 0:
        if draw(st.booleans()):
            data[key] = draw(JUNK)
        else:
            data.pop(key, None)
        return
    index = draw(st.integers(0, len(records) - 1))
    record = records[index]
    if not isinstance(record, dict) or draw(st.integers(0, 6)) == 0:
        records[index] = draw(JUNK)
        return
    field = draw(st.sampled_from(sorted(record) + ["extra"]))
    if field in record and draw(st.integers(0, 3)) == 0:
        del record[field]
    elif field == "bbox" and isinstance(record["bbox"], list) and len(record["bbox"]) == 4:
        record["bbox"][draw(st.integers(0, 3))] = draw(ODD_NUMBERS | JUNK)
    else:
        record[field] = draw(JUNK)


def _dump(data) -> bytes:
    return json.dumps(data, allow_nan=True).encode()


COCO_FILE = coco_dicts().map(_dump)
OTHER_FILES = [
    ANY_JSON.map(_dump),  # any JSON value
    st.binary(max_size=40),  # not JSON at all, or not UTF-8
    coco_dicts().map(lambda d: _dump(d)[:-3]),  # cut short
]
# Four in five are COCO dicts (st.one_of would weigh the branches equally).
ANNOTATION_FILE = st.integers(0, 14).flatmap(lambda k: OTHER_FILES[k - 12] if k >= 12
                                             else COCO_FILE)


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in GOOD.items():
        Image.new("RGB", size, (30, 60, 90)).save(folder / name)
    full = folder / "a.png"
    (folder / "trunc.png").write_bytes(full.read_bytes()[:40])
    (folder / "text.png").write_text("hello")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A dataset root with image files (good and broken) in images/train and images/val."""
    root = tmp_path_factory.mktemp("fuzz")
    for split in ("train", "val"):
        _write_images(root / "images" / split)
    (root / "annotations").mkdir()
    return root


def _names_the_culprit(message: str, *culprits: Path) -> bool:
    return any(str(c) in message or c.name in message for c in culprits)


@FUZZ
@given(content=ANNOTATION_FILE)
def test_loader_accepts_or_refuses_with_its_own_errors(workdir: Path, content: bytes) -> None:
    ann_file = workdir / "annotations" / "train.json"
    ann_file.write_bytes(content)
    try:
        dataset = CocoDetection.from_root(workdir, "train")
        for index in range(len(dataset)):
            image, target = dataset[index]
            boxes = target["boxes"]
            assert image.shape[0] == 3 and boxes.shape[-1] == 4
            assert bool((boxes[:, 2:] > boxes[:, :2]).all())  # no degenerate box survives
            assert len(target["labels"]) == len(boxes)
            assert all(0 <= int(label) < dataset.num_classes for label in target["labels"])
        event(f"accepted, {'some' if len(dataset) else 'no'} images")
    except AnnotationError as exc:
        event("AnnotationError")
        assert str(ann_file) in str(exc), exc
    except ImageLoadError as exc:
        event("ImageLoadError")
        assert "image id" in str(exc) and str(workdir / "images" / "train") in str(exc), exc


def _write_split_files(root: Path, train: bytes, val: bytes) -> None:
    (root / "annotations" / "train.json").write_bytes(train)
    (root / "annotations" / "val.json").write_bytes(val)


@FUZZ
@given(train=ANNOTATION_FILE, val=ANNOTATION_FILE)
def test_validation_tables_accept_or_refuse_with_their_own_error(workdir: Path, train: bytes,
                                                                 val: bytes) -> None:
    """The tables and statistics behind the suite: any input gives tables or a layout error
    naming the file; the statistics are plain finite numbers (they become DVC metrics)."""
    _write_split_files(workdir, train, val)
    try:
        tables = load_tables(workdir, workers=1)
    except DatasetLayoutError as exc:
        event("DatasetLayoutError")
        assert _names_the_culprit(str(exc), workdir / "annotations" / "train.json",
                                  workdir / "annotations" / "val.json"), exc
        return
    event(f"tables: {len(tables.images)} images, {len(tables.annotations)} annotations")
    stats = dataset_statistics(tables)
    json.dumps(stats, allow_nan=False)
    _all_finite(stats)


def _all_finite(tree) -> None:
    for value in tree.values():
        if isinstance(value, dict):
            _all_finite(value)
        else:
            assert isinstance(value, int | float) and math.isfinite(value), tree


@settings(FUZZ, max_examples=30)
@given(train=COCO_FILE, val=COCO_FILE)
def test_validation_suite_reports_instead_of_crashing(workdir: Path, tmp_path_factory,
                                                      train: bytes, val: bytes) -> None:
    """The whole validate stage (Great Expectations included, about 1 s an example): every
    expectation evaluates (none errors out) and the report is strict JSON."""
    _write_split_files(workdir, train, val)
    reports = workdir / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    try:
        report = validate_run(workdir, ValidateConfig(workers=1), reports)
    except DatasetLayoutError as exc:
        event("DatasetLayoutError")
        assert "annotations" in str(exc), exc
        return
    event(f"validated: {'passed' if report.success else 'failed'}")
    assert [o.name for o in report.outcomes if o.error] == []
    saved = json.loads(report.report_path.read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in validation.json"))
    assert saved["success"] == report.success
    if not report.success:
        assert saved["failed"] and all(o.examples or o.observed is not None
                                       for o in report.failed)


# What the fuzzer found (each crashed the validation before the fix), kept as plain cases.
FOUND = {
    "file name with a lone surrogate": (("images", 0, "file_name"), "\ud800.png",
                                        "image_file_name_present"),
    "file name with a NUL byte": (("images", 0, "file_name"), "img\x00.png", "image_file_exists"),
    "id too large for a float": (("images", 1, "id"), 10**400, "image_id_present"),
    "category name a number": (("categories", 0, "name"), 480, "category_name_present"),
    "category name a list": (("categories", 0, "name"), ["cat"], "category_name_present"),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_what_the_fuzzer_found_is_reported_not_raised(dataset: Path, tmp_path: Path, case):
    (table, index, field), value, expectation = FOUND[case]
    path = dataset / "annotations" / "train.json"
    data = json.loads(path.read_text())
    data[table][index][field] = value
    path.write_text(json.dumps(data))
    report = validate_run(dataset, ValidateConfig(workers=1), tmp_path / "reports")
    assert expectation in {o.name for o in report.failed}
    assert [o.name for o in report.outcomes if o.error] == []
    json.loads((tmp_path / "reports" / "dataset.json").read_text(), parse_constant=pytest.fail)
    failed = next(o for o in report.failed if o.name == expectation)
    assert any(e.get("split") == "train" for e in failed.examples), failed.examples
