"""The evaluate stage's HTML report: one self-contained file a person can open and read.

Everything is inside the file (pictures as base64 ``data:`` URIs, inline CSS, no script, no
link to fetch), so it can be mailed, attached to an MLflow run or opened offline. Sections:
run facts, the diagnosis (verdicts "found: ...; turn: <params key> to <value>" and what was
measured, :mod:`detr.diagnosis`), the COCO AP/AR table (pycocotools' 12 lines, as a table and
verbatim), per-class AP, the figures (PR curves, AP by size, losses, query specialisation), the decoder attention
maps and the val examples (ground truth beside predictions).

Plots are embedded as PNG; photographs (examples, attention maps) as JPEG (quality
``PHOTO_QUALITY``), which keeps a report of a few dozen pictures at a few MB.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment
from PIL import Image

from detr.diagnosis import Diagnosis
from detr.evaluation import CocoEvaluation
from pipelines.reporting.segmentation import SegmentationResults, panoptic_rows

PHOTO_QUALITY = 90
# One line of pycocotools' summary: "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all |
# maxDets=100 ] = 0.123".
_SUMMARY_LINE = re.compile(r"Average (?P<kind>Precision|Recall)\s+\((?:AP|AR)\) @\[ "
                           r"IoU=(?P<iou>[\d.:]+)\s*\| area=\s*(?P<area>\w+) \| "
                           r"maxDets=\s*(?P<dets>\d+) \] = (?P<value>-?[\d.]+)")


@dataclass(frozen=True)
class Picture:
    """A picture of the report: its file, a caption, and whether it is a photograph."""

    path: Path
    caption: str
    photo: bool = False


def render_report(*, evaluation: CocoEvaluation, labels: Mapping[int, str],
                  facts: Mapping[str, object], figures: Sequence[Picture],
                  attention: Sequence[Picture], examples: Sequence[Picture],
                  diagnosis: Diagnosis | None = None,
                  segmentation: SegmentationResults | None = None) -> str:
    """The report as one HTML string (module doc). ``labels``: display name by category id;
    ``facts``: (name, value) lines of the header (checkpoint, dataset, ...); ``diagnosis``:
    its section (left out when None); ``segmentation``: the mask AP / AR table (as the box
    one, with per-class mask AP) and the PQ table (all, things, stuff, per class), each left
    out when not measured.

    Raises:
        FileNotFoundError: a picture file is missing (the message names it).
    """
    template = Environment(autoescape=True, trim_blocks=True,
                           lstrip_blocks=True).from_string(_TEMPLATE)
    return template.render(
        facts=[(str(k), str(v)) for k, v in facts.items()],
        stats=stat_table(evaluation), table=evaluation.table,
        classes=_class_rows(evaluation, labels),
        figures=[_embedded(p) for p in figures], attention=[_embedded(p) for p in attention],
        examples=[_embedded(p) for p in examples], diagnosis=diagnosis,
        **_segmentation_content(segmentation, labels))


def write_report(path: Path, **content) -> Path:
    """:func:`render_report` written to ``path`` (parent folders made); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(**content), encoding="utf-8")
    return path


def stat_table(evaluation: CocoEvaluation) -> list[dict]:
    """The 12 statistics as rows: ``name``, ``kind`` (AP/AR), ``iou``, ``area``, ``max_dets``,
    ``value`` (text: 3 decimals, ``n/a`` where pycocotools gives -1), parsed from the
    summary lines.

    Raises:
        ValueError: the table is not pycocotools' 12-line summary.
    """
    lines = evaluation.table.splitlines()
    if len(lines) != len(evaluation.names):
        raise ValueError(f"expected pycocotools' {len(evaluation.names)}-line summary, got "
                         f"{len(lines)} lines")
    rows = []
    for name, line in zip(evaluation.names, lines, strict=True):
        match = _SUMMARY_LINE.search(line)
        if match is None:
            raise ValueError(f"not a pycocotools summary line: {line!r}")
        value = evaluation.stats[name]
        rows.append({"name": name, "kind": "AP" if match["kind"] == "Precision" else "AR",
                     "iou": match["iou"], "area": match["area"], "max_dets": match["dets"],
                     "value": "n/a" if value == -1.0 else f"{value:.3f}"})
    return rows


def _segmentation_content(results: SegmentationResults | None,
                          labels: Mapping[int, str]) -> dict[str, object]:
    """The template's ``mask_*`` and ``panoptic`` values (None: section left out)."""
    masks = None if results is None else results.masks
    panoptic = None if results is None else results.panoptic
    return {
        "mask_stats": None if masks is None else stat_table(masks),
        "mask_table": None if masks is None else masks.table,
        "mask_classes": None if masks is None else _class_rows(masks, labels),
        "panoptic": None if panoptic is None else [
            {**row, **{k: "n/a" if row[k] is None else f"{100 * row[k]:.1f}"
                       for k in ("PQ", "SQ", "RQ")},
             **{k: "" if row[k] is None else row[k] for k in ("TP", "FP", "FN")}}
            for row in panoptic_rows(panoptic, labels)],
    }


def _class_rows(evaluation: CocoEvaluation, labels: Mapping[int, str]) -> list[dict]:
    """Per-class AP rows, best first, classes without val objects last."""
    rows = [{"name": labels[c], "id": c, "ap": ap,
             "text": "no val objects" if ap is None else f"{ap:.3f}",
             "width": 0 if ap is None else round(100 * ap, 1)}
            for c, ap in evaluation.per_class_ap.items()]
    return sorted(rows, key=lambda r: (r["ap"] is None, -(r["ap"] or 0.0), r["name"]))


def _embedded(picture: Picture) -> dict:
    """``{"src": data URI, "caption", "width", "height"}`` of a picture file."""
    path = Path(picture.path)
    if not path.is_file():
        raise FileNotFoundError(f"report picture not found: {path}")
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    if picture.photo:
        rgb.save(buffer, format="JPEG", quality=PHOTO_QUALITY)
        mime = "image/jpeg"
    else:
        rgb.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"src": f"data:{mime};base64,{data}", "caption": picture.caption,
            "width": rgb.width, "height": rgb.height}


_TEMPLATE = """{% macro stat_rows(css, rows, prefix) %}
<table class="{{ css }}">
  <tr><th>statistic</th><th>IoU</th><th>area</th><th>max dets</th><th>value</th></tr>
{% for row in rows %}
  <tr{% if row.name in (prefix ~ "AP", prefix ~ "AP50", prefix ~ "AR_100") %} class="headline"{% endif %}>
    <td>{{ "Average precision" if row.kind == "AP" else "Average recall" }}
      <span class="note">{{ row.name }}</span></td><td>{{ row.iou }}</td>
    <td>{{ row.area }}</td><td class="num">{{ row.max_dets }}</td>
    <td class="num">{{ row.value }}</td></tr>
{% endfor %}
</table>
{% endmacro %}
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DETR evaluation report</title>
<style>
  body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: #1d232a; background: #f6f7f9; margin: 0; }
  main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
  h1 { font-size: 26px; margin: 8px 0 4px; }
  h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px;
       border-bottom: 2px solid #d8dde3; }
  nav a { margin-right: 14px; color: #2457a6; text-decoration: none; }
  table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px #0001; }
  th, td { padding: 5px 12px; border-bottom: 1px solid #e4e7eb; text-align: left; }
  th { background: #eef1f4; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.headline td { font-weight: 600; }
  table.facts th { background: none; font-weight: 500; color: #5b6470; }
  pre { background: #fff; padding: 10px 14px; overflow-x: auto; font-size: 13px;
        box-shadow: 0 1px 2px #0001; }
  .bar { background: #e4e7eb; width: 220px; height: 10px; display: inline-block; }
  .bar span { background: #3b7dd8; height: 10px; display: block; }
  figure { margin: 0 0 22px; background: #fff; padding: 10px; box-shadow: 0 1px 2px #0001; }
  figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
  figcaption { color: #5b6470; font-size: 13px; margin-top: 6px; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
          gap: 14px; }
  .note { color: #5b6470; font-size: 13px; }
  ul.verdicts { background: #fff4e5; border-left: 4px solid #d9822b; padding: 10px 14px 10px 32px; }
  ul.verdicts li { margin: 3px 0; }
</style>
</head>
<body>
<main>
<h1>DETR evaluation report</h1>
<nav>{% if diagnosis %}<a href="#diagnosis">Diagnosis</a>{% endif %}<a href="#ap">AP / AR</a><a href="#classes">Per class</a>{% if mask_stats %}<a href="#masks">Mask AP</a>{% endif %}{% if panoptic %}<a href="#panoptic">PQ</a>{% endif %}<a href="#plots">Plots</a>
{% if attention %}<a href="#attention">Attention</a>{% endif %}
{% if examples %}<a href="#examples">Examples</a>{% endif %}</nav>
<table class="facts">
{% for name, value in facts %}
  <tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}
</table>

{% if diagnosis %}
<h2 id="diagnosis">Diagnosis</h2>
{% if diagnosis.verdicts() %}
<ul class="verdicts">
{% for verdict in diagnosis.verdicts() %}
  <li>{{ verdict }}</li>
{% endfor %}
</ul>
{% else %}
<p>No weakness found by the checks below.</p>
{% endif %}
<table class="diagnosis">
  <tr><th>check</th><th>measured</th></tr>
{% for finding in diagnosis.findings %}
  <tr{% if finding.weak %} class="headline"{% endif %}><td>{{ finding.name }}</td>
    <td>{{ finding.summary }}</td></tr>
{% endfor %}
</table>
<p class="note">Weak findings in bold; README "Reading the diagnosis" explains each check.</p>
{% endif %}

<h2 id="ap">COCO AP / AR (val)</h2>
{{ stat_rows("stats", stats, "") }}
<p class="note">n/a: no val object in that size range (pycocotools reports -1). As printed by
pycocotools:</p>
<pre class="coco-summary">{{ table }}</pre>

<h2 id="classes">AP per class (IoU .50:.95)</h2>
<table class="classes">
  <tr><th>class</th><th>category id</th><th>AP</th><th></th></tr>
{% for row in classes %}
  <tr><td>{{ row.name }}</td><td class="num">{{ row.id }}</td><td class="num">{{ row.text }}</td>
    <td><span class="bar"><span style="width: {{ row.width }}%"></span></span></td></tr>
{% endfor %}
</table>

{% if mask_stats %}
<h2 id="masks">Mask AP / AR (val, COCOeval segm)</h2>
{{ stat_rows("mask-stats", mask_stats, "mask_") }}
<pre class="mask-summary">{{ mask_table }}</pre>
<table class="mask-classes">
  <tr><th>class</th><th>category id</th><th>mask AP</th><th></th></tr>
{% for row in mask_classes %}
  <tr><td>{{ row.name }}</td><td class="num">{{ row.id }}</td><td class="num">{{ row.text }}</td>
    <td><span class="bar"><span style="width: {{ row.width }}%"></span></span></td></tr>
{% endfor %}
</table>
{% endif %}

{% if panoptic %}
<h2 id="panoptic">Panoptic quality (val, %)</h2>
<table class="panoptic">
  <tr><th>class</th><th>kind</th><th>PQ</th><th>SQ</th><th>RQ</th><th>TP</th><th>FP</th>
    <th>FN</th></tr>
{% for row in panoptic %}
  <tr{% if row.kind == "mean" %} class="headline"{% endif %}><td>{{ row["class"] }}</td>
    <td>{{ row.kind }}</td><td class="num">{{ row.PQ }}</td><td class="num">{{ row.SQ }}</td>
    <td class="num">{{ row.RQ }}</td><td class="num">{{ row.TP }}</td>
    <td class="num">{{ row.FP }}</td><td class="num">{{ row.FN }}</td></tr>
{% endfor %}
</table>
<p class="note">PQ = SQ x RQ, panopticapi's definition; means over the classes with a
segment in ground truth or prediction (n/a: none, e.g. no stuff class).</p>
{% endif %}

<h2 id="plots">Plots</h2>
{% for picture in figures %}
<figure><img src="{{ picture.src }}" width="{{ picture.width }}" height="{{ picture.height }}"
  alt="{{ picture.caption }}"><figcaption>{{ picture.caption }}</figcaption></figure>
{% endfor %}

{% if attention %}
<h2 id="attention">Decoder attention of the top detections</h2>
<p class="note">Last decoder layer, cross-attention of each detection's query over the
encoder features, averaged over heads, upsampled to the image (dark: none, yellow: most).</p>
{% for picture in attention %}
<figure><img src="{{ picture.src }}" width="{{ picture.width }}" height="{{ picture.height }}"
  alt="{{ picture.caption }}"><figcaption>{{ picture.caption }}</figcaption></figure>
{% endfor %}
{% endif %}

{% if examples %}
<h2 id="examples">Val examples: ground truth (left) and predictions (right)</h2>
<div class="grid">
{% for picture in examples %}
<figure><img src="{{ picture.src }}" width="{{ picture.width }}" height="{{ picture.height }}"
  alt="{{ picture.caption }}"><figcaption>{{ picture.caption }}</figcaption></figure>
{% endfor %}
</div>
{% endif %}
</main>
</body>
</html>
"""
