"""The model card of a registered version: its MLflow description (Markdown) and an HTML file.

:func:`card_markdown` takes a :class:`CardFacts` and writes, in order: what the model detects,
the data version (DVC md5, images and boxes per split, class balance, box sizes), the code
version (git commit, dirty or not), the validation summary, the AP/AR
table, AP per class and per size, the decision and the comparison behind it, known limits
(the weakest classes and sizes, measured), how to load and serve it, and last (cut first
when the description is too long) the training params. Missing inputs (no
dataset statistics, no validation report) are said to be missing, not guessed.
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detr.evaluation import STAT_NAMES
from pipelines import stage
from pipelines.registry.report import report_markdown

DATASET_STATS = stage.DATASET_STATS
VALIDATION = stage.VALIDATION_REPORT
ARTIFACT_DIR = "model_card"
DESCRIPTION_CHARS = 5000  # MLflow's SQL store keeps at most this much of a description
SIZES = ("small", "medium", "large")
WEAKEST = 3  # classes listed under known limits


@dataclass
class CardFacts:
    """Everything the card shows. ``report``: the registration report (``reports/register.json``);
    ``stats``: the 12 COCO statistics; ``per_class``: ``{class: AP or None}``;
    ``dataset``: validate's ``reports/validation/dataset.json`` (None: absent); ``validation``: its
    ``reports/validation/validation.json`` (None: absent); ``run_tags`` / ``params``: the
    MLflow run's tags and params."""

    report: dict[str, Any]
    stats: dict[str, float]
    per_class: dict[str, float | None]
    dataset: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    run_tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


def publish_card(client, report: dict[str, Any], *, stats: dict[str, float],
                 per_class: dict[str, float | None]) -> str | None:
    """Set the card as the description of ``report``'s version and log it as HTML to its run
    (``model_card/<name>-v<version>.html``); returns that artifact's path, None when MLflow
    refused (the registration stands: the card is said to be missing, on stderr)."""
    from pipelines import tracking

    name, version, run_id = report["model_name"], str(report["version"]), report["run_id"]
    try:
        run = tracking.retry(lambda: client.get_run(run_id), what=f"read run {run_id}")
        facts = CardFacts(report, stats, per_class, _read(DATASET_STATS), _read(VALIDATION),
                          dict(run.data.tags), dict(run.data.params))
        text = card_markdown(facts)
        artifact = f"{ARTIFACT_DIR}/{name}-v{version}.html"
        tracking.retry(lambda: client.log_text(run_id, card_html(text, title=f"{name} v{version}"),
                                               artifact), what="log the model card")
        tracking.retry(lambda: client.update_model_version(
            name, version, description=_description(text, artifact)),
            what="describe the version")
        return artifact
    except Exception as exc:  # the version and its aliases are right; only the card is missing
        print(f"register: model card of {name} v{version} not published: {exc}",
              file=sys.stderr)
        return None


def _description(text: str, artifact: str) -> str:
    """``text``, or as much as fits, pointing at the full HTML card."""
    if len(text) <= DESCRIPTION_CHARS:
        return text
    note = f"\n\n... (cut; the full card is the run's artifact `{artifact}`)\n"
    return text[:DESCRIPTION_CHARS - len(note)] + note


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def card_markdown(facts: CardFacts) -> str:
    """The card as Markdown (module doc)."""
    r = facts.report
    sections = [
        f"# Model card: {r['model_name']} version {r['version']}",
        f"**What it detects:** {', '.join(facts.per_class) or '-'} "
        f"({len(facts.per_class)} classes)",
        "## Data\n" + _data(facts, r.get("dataset_md5")),
        "## Code\n" + _code(facts.run_tags),
        "## Validation\n" + _validation(facts.validation),
        "## COCO AP/AR (val)\n" + _rows(("statistic", "value"),
                                         [(n, _fmt(facts.stats.get(n))) for n in STAT_NAMES]),
        "## AP per class\n" + _rows(("class", "AP"),
                                    [(c, _fmt(ap)) for c, ap in facts.per_class.items()]),
        "## AP per size\n" + _rows(("size", "AP", "AR"),
                                   [(s, _fmt(facts.stats.get(f"AP_{s}")),
                                     _fmt(facts.stats.get(f"AR_{s}"))) for s in SIZES]),
        "## Decision\n" + report_markdown(r).split("\n", 1)[1].strip(),
        "## Known limits (measured)\n" + _limits(facts),
        "## Load and serve\n" + _usage(r),
        "## Training params\n" + _params(facts.params),
    ]
    return "\n\n".join(sections) + "\n"


def card_html(markdown_text: str, *, title: str) -> str:
    """A self-contained HTML page of the card."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;max-width:60em;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
            f"</style></head><body>\n{body}\n</body></html>\n")


def _data(facts: CardFacts, md5: str | None) -> str:
    lines = [f"DVC md5 of `data/dataset`: `{md5 or 'unknown (no dvc.lock)'}`"]
    if not facts.dataset:
        return "\n\n".join(lines + ["No dataset statistics (reports/validation/dataset.json) found."])
    splits = [s for s in ("train", "val") if s in facts.dataset]
    lines.append(_rows(("split", "images", "boxes", *(f"{s} boxes" for s in SIZES)),
                       [(s, facts.dataset[s]["images"], facts.dataset[s]["boxes"],
                         *(facts.dataset[s].get("area", {}).get(z, "-") for z in SIZES))
                        for s in splits]))
    classes = sorted({c for s in splits for c in facts.dataset[s].get("per_class", {})})
    lines.append("Class balance (boxes):\n\n" + _rows(
        ("class", *splits),
        [(c, *(facts.dataset[s]["per_class"].get(c, 0) for s in splits)) for c in classes]))
    return "\n\n".join(lines)


def _code(tags: dict[str, str]) -> str:
    commit = tags.get("git_commit")
    if not commit:
        return "git commit: unknown (not run from a git checkout)"
    dirty = "dirty (uncommitted changes)" if tags.get("git_dirty") == "true" else "clean"
    return f"git commit `{commit}`, {dirty}"


def _params(params: dict[str, str]) -> str:
    if not params:
        return "No params logged."
    return _rows(("param", "value"), sorted(params.items()))


def _validation(validation: dict[str, Any] | None) -> str:
    if not validation:
        return "No validation report (reports/validation/validation.json) found."
    counts = validation.get("counts", {})
    verdict = "passed" if validation.get("success") else "FAILED"
    return (f"Great Expectations suite {verdict}: {counts.get('passed', '?')} of "
            f"{counts.get('expectations', '?')} expectations met"
            + (f"; failed: {', '.join(validation['failed'])}" if validation.get("failed") else ""))


def _limits(facts: CardFacts) -> str:
    measured = sorted((ap, c) for c, ap in facts.per_class.items() if ap is not None)
    sizes = sorted((facts.stats[f"AP_{s}"], s) for s in SIZES
                   if facts.stats.get(f"AP_{s}", -1.0) >= 0)
    lines = [f"- weakest classes: {', '.join(f'{c} (AP {ap:.3f})' for ap, c in measured[:WEAKEST])}"
             if measured else "- no class has val objects: per-class AP unmeasured"]
    lines.append(f"- weakest object size: {sizes[0][1]} (AP {sizes[0][0]:.3f})" if sizes
                 else "- AP per size undefined (no val objects)")
    absent = [c for c, ap in facts.per_class.items() if ap is None]
    if absent:
        lines.append(f"- not measured (no val objects): {', '.join(absent)}")
    return "\n".join(lines)


def _usage(r: dict[str, Any]) -> str:
    uri = r["model_uri"]
    return ("```python\nimport mlflow, pandas as pd\nfrom pipelines.mlflow_model import "
            f"encode_image\nmodel = mlflow.pyfunc.load_model('{uri}')\n"
            "model.predict(pd.DataFrame({'image': [encode_image('photo.jpg')]}))\n```\n\n"
            f"Serve it: `mlflow models serve -m {uri} --env-manager local` (from the project "
            "environment), then POST images as base64 to `/invocations`.")


def _rows(header: tuple, rows: list) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or value == -1.0 else f"{value:.4f}"
