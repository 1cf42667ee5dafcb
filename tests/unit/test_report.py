"""pipelines.reporting.report: one self-contained HTML file with the AP/AR table and the
pictures."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from detr.evaluation import STAT_NAMES, evaluate_detections
from pipelines.reporting.report import Picture, render_report, stat_table, write_report


class _Page(HTMLParser):
    """Tables (rows of cell texts), <pre> texts, <img> sources and every link of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.pre: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._table, self._row, self._cell, self._in_pre = None, None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "pre":
            self.pre.append("")
            self._in_pre = True
        elif tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_pre:
            self.pre[-1] += data


@pytest.fixture
def evaluation(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog <b>"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30],
                           "area": 900, "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    found = {1: {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])}}
    return evaluate_detections(path, found)


def _pictures(tmp_path):
    plot, photo = tmp_path / "plot.png", tmp_path / "photo.png"
    Image.new("RGB", (60, 40), (200, 10, 10)).save(plot)
    Image.new("RGB", (30, 20), (10, 200, 10)).save(photo)
    return Picture(plot, "a plot"), Picture(photo, "a photo", photo=True)


def test_report_has_the_twelve_line_table_and_embeds_every_picture(evaluation, tmp_path):
    plot, photo = _pictures(tmp_path)
    path = write_report(tmp_path / "out" / "report.html", evaluation=evaluation,
                        labels={1: "cat", 2: "dog <b>"}, facts={"checkpoint": "c.pth"},
                        figures=[plot], attention=[photo], examples=[photo, photo])
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    stats = page.tables["stats"]
    assert len(stats) == 1 + 12 and stats[0][:2] == ["statistic", "IoU"]
    assert [row[0].split()[-1] for row in stats[1:]] == list(STAT_NAMES)
    assert stats[1][-1] == f"{evaluation.stats['AP']:.3f}" == "1.000"
    assert stats[6][-1] == "n/a"  # AP_large: no large object in val
    assert page.pre == [evaluation.table]  # pycocotools' 12 lines, verbatim
    classes = page.tables["classes"]
    assert classes[1][:3] == ["cat", "1", "1.000"]
    assert classes[2][:3] == ["dog <b>", "2", "no val objects"]  # escaped, shown as text
    assert len(page.images) == 4
    kinds = []
    for src in page.images:
        head, data = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            kinds.append(image.format)
    assert kinds == ["PNG", "JPEG", "JPEG", "JPEG"]
    assert all(link.startswith("#") for link in page.links)  # nothing to fetch


def test_stat_table_and_missing_pictures(evaluation, tmp_path):
    rows = stat_table(evaluation)
    assert rows[1] == {"name": "AP50", "kind": "AP", "iou": "0.50", "area": "all",
                       "max_dets": "100", "value": "1.000"}
    assert rows[6]["kind"] == "AR" and rows[6]["max_dets"] == "1"
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        render_report(evaluation=evaluation, labels={1: "cat", 2: "dog"}, facts={},
                      figures=[Picture(tmp_path / "nowhere.png", "x")], attention=[],
                      examples=[])


def test_diagnosis_section_shows_verdicts_first_and_every_check(evaluation):
    from detr.diagnosis import Diagnosis, Finding

    diagnosis = Diagnosis((
        Finding("object_size", "objects 0.4 cells wide", {"under_one_cell": 1.0},
                "objects under one cell <small>", (("data.scales", "[256]"),)),
        Finding("recall", "recall at IoU 0.1: 0.9", {"recall_iou10": 0.9})))
    html = render_report(evaluation=evaluation, labels={1: "cat", 2: "dog"}, facts={},
                         figures=[], attention=[], examples=[], diagnosis=diagnosis)
    page = _Page()
    page.feed(html)
    assert html.index('id="diagnosis"') < html.index('id="ap"')
    assert ("found: objects under one cell &lt;small&gt;; turn: data.scales to [256]"
            in html)  # escaped
    assert page.tables["diagnosis"] == [["check", "measured"],
                                        ["object_size", "objects 0.4 cells wide"],
                                        ["recall", "recall at IoU 0.1: 0.9"]]
    plain = render_report(evaluation=evaluation, labels={1: "cat", 2: "dog"}, facts={},
                          figures=[], attention=[], examples=[])
    assert 'id="diagnosis"' not in plain


def test_mask_and_panoptic_sections_when_measured(evaluation, tmp_path):
    from detr.panoptic_quality import PanopticAccumulator
    from detr.segm_evaluation import MASK_STAT_NAMES, evaluate_masks
    from pipelines.reporting.segmentation import SegmentationResults

    gt = json.loads((tmp_path / "gt.json").read_text())
    gt["annotations"][0]["segmentation"] = [[10, 10, 40, 10, 40, 40, 10, 40]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    mask = torch.zeros(1, 100, 100, dtype=torch.bool)
    mask[0, 10:40, 10:40] = True
    masks = evaluate_masks(tmp_path / "gt.json", {1: {"masks": mask, "scores": [0.9],
                                                      "labels": [1]}})
    accumulator = PanopticAccumulator([{"id": 1, "name": "cat"},
                                       {"id": 2, "name": "dog <b>", "isthing": 0}])
    segments = mask[0].numpy().astype("int32")
    accumulator.add(segments, [{"id": 1, "category_id": 1, "iscrowd": 0}], segments,
                    [{"id": 1, "category_id": 1}])
    html = render_report(evaluation=evaluation, labels={1: "cat", 2: "dog <b>"}, facts={},
                         figures=[], attention=[], examples=[],
                         segmentation=SegmentationResults(masks, accumulator.result()))
    page = _Page()
    page.feed(html)
    rows = page.tables["mask-stats"]
    assert [row[0].split()[-1] for row in rows[1:]] == list(MASK_STAT_NAMES)
    assert rows[1][-1] == "1.000"
    assert page.pre == [evaluation.table, masks.table]
    assert page.tables["mask-classes"][1][:3] == ["cat", "1", "1.000"]
    assert page.tables["panoptic"] == [
        ["class", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN"],
        ["all", "mean", "100.0", "100.0", "100.0", "", "", ""],
        ["things", "mean", "100.0", "100.0", "100.0", "", "", ""],
        ["stuff", "mean", "n/a", "n/a", "n/a", "", "", ""],
        ["cat", "thing", "100.0", "100.0", "100.0", "1", "0", "0"],
        ["dog <b>", "stuff", "n/a", "n/a", "n/a", "", "", ""]]
    plain = render_report(evaluation=evaluation, labels={1: "cat", 2: "dog"}, facts={},
                          figures=[], attention=[], examples=[])
    assert 'id="masks"' not in plain and 'id="panoptic"' not in plain
