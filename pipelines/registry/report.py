"""The registration report (``reports/register.json``) for people: the terminal summary and the
Markdown of the Prefect artifact (also the retrain flow's). Reports written before the champion
was re-measured (no ``reason``, ``champion_value_logged`` ...) still render."""

from __future__ import annotations

from typing import Any

from pipelines.registry.drift import drift_lines, drift_markdown


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: the decision and why, where it is, how to look at it."""
    before = ("no champion before" if report["champion_version_before"] is None else
              f"champion v{report['champion_version_before']}: "
              f"{_fmt(report['champion_value_before'])} on this val split, "
              f"{_fmt(report.get('champion_value_logged'))} as logged")
    lines = [f"register: {report['model_name']} v{report['version']} -> @{report['decision']} "
             f"({report['metric']} {_fmt(report['value'])}; {before})"]
    if report.get("reason"):
        lines.append(f"  why: {report['reason']}")
    lines += [f"  data drift: {line}" for line in drift_lines(report.get("drift"))]
    return "\n".join(lines + [
        f"  {report['alias_uri']} in {report['tracking_uri']}",
        f"  browse it: make mlflow-ui, then http://127.0.0.1:5000/#/models/"
        f"{report['model_name']}"])


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the decision and its reason, both models' statistic on the same
    val split, the champion's logged number for reference, the data versions, per-class AP,
    the data drift table."""
    metric = report["metric"]
    lines = [f"# {report['model_name']} version {report['version']}: @{report['decision']}", ""]
    if report.get("reason"):
        lines += [f"**Why:** {report['reason']}", ""]
    lines += [
        f"| | version | {metric} on this val split | {metric} as logged | dataset (DVC md5) |",
        "|---|---|---|---|---|",
        f"| new | {report['version']} | {_fmt(report['value'])} | {_fmt(report['value'])} | "
        f"{report.get('dataset_md5') or '-'} |",
        f"| champion before | {report['champion_version_before'] or '-'} | "
        f"{_fmt(report['champion_value_before'])} | "
        f"{_fmt(report.get('champion_value_logged'))} | "
        f"{report.get('champion_dataset_md5') or '-'} |", ""]
    per_class = report.get("per_class") or {}
    if per_class:
        lines += ["| class | new AP | champion AP (same val) |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(row.get('new'))} | {_fmt(row.get('champion'))} |"
                  for name, row in per_class.items()]
        lines.append("")
    if "drift" in report:
        lines += [drift_markdown(report["drift"]), ""]
    lines.append(f"`{report['alias_uri']}` in `{report['tracking_uri']}`")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
