"""Data drift: today's dataset against the one the champion was registered with.

Each registered version carries the profile of its dataset (:mod:`pipelines.registry.profile`)
as an artifact of its run (``data_profile/profile-<dataset md5>.json``: two registrations from
one run keep both, named by the version tag ``data_profile``). :func:`assess` profiles today's dataset, logs that profile, and compares it
with the champion's, one row per statistic (:data:`STATISTICS`):

- class balance, boxes per image, box size, image size: the Jensen-Shannon distance between the
  two histograms (``scipy.spatial.distance.jensenshannon``, base 2: 0 = the same
  proportions, 1 = nothing in common); insensitive to the datasets' sizes;
- colour: the largest shift over R, G, B of the sampled pixels' mean, in units of the champion's
  std for that channel (a standardised mean difference).

A row has drifted when its distance is above its threshold in ``register.drift``
(:class:`pipelines.params.DriftConfig`). The result goes into the register report (``drift``),
the version's tags, the run's metrics (``drift_<statistic>``) and a Markdown table artifact
(``data_profile/drift.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import tracking
from pipelines.params import DriftConfig
from pipelines.registry.profile import dataset_profile

PROFILE_DIR = "data_profile"
TABLE_ARTIFACT = f"{PROFILE_DIR}/drift.md"
PROFILE_TAG = "data_profile"
STATISTICS = ("class_balance", "boxes_per_image", "box_size", "image_size", "colour")
LABELS = {"class_balance": "class balance", "boxes_per_image": "boxes per image",
          "box_size": "box size", "image_size": "image size", "colour": "colour"}
JS = "Jensen-Shannon distance"


def assess(client, cfg: DriftConfig, *, champion, dataset_dir: Path, dataset_md5: str | None,
           run_id: str) -> dict[str, Any]:
    """Profile ``dataset_dir``, log the profile to ``run_id``, compare it with ``champion``'s
    (a ModelVersion or None). Returns the report's ``drift`` entry: ``champion_version``
    (None without one), ``note`` (None, or why nothing was compared), ``rows`` (see
    :func:`compare`), ``drifted`` (the statistics past their threshold), ``gate``,
    ``profile`` (the run artifact; None when not profiled). A dataset that cannot be profiled
    (no annotations) is a note, not an error: drift is advisory."""
    out = {"champion_version": None if champion is None else int(champion.version),
           "note": None, "rows": [], "drifted": [], "gate": cfg.gate, "profile": None}
    try:
        profile = dataset_profile(dataset_dir, sample_images=cfg.sample_images)
    except (OSError, ValueError) as exc:
        print(f"register: data drift not measured: {exc}", file=sys.stderr)
        out["note"] = f"today's dataset could not be profiled: {exc}"
        return out
    old, out["note"] = (None, "no champion to compare with") if champion is None \
        else champion_profile(champion)  # read before logging: it may be in the same run
    artifact = f"{PROFILE_DIR}/profile-{(dataset_md5 or 'unknown').removesuffix('.dir')}.json"
    tracking.retry(lambda: client.log_dict(run_id, profile, artifact),
                   what="log the dataset profile")
    out["profile"] = artifact
    if old is None:
        return out
    out["rows"] = compare(profile, old, cfg)
    out["drifted"] = [row["statistic"] for row in out["rows"] if row["drifted"]]
    metrics = {f"drift_{row['statistic']}": row["distance"] for row in out["rows"]}
    tracking.retry(lambda: _log_table(client, run_id, metrics, out), what="log the drift table")
    return out


def champion_profile(champion) -> tuple[dict | None, str | None]:
    """(the profile logged with ``champion``, None), or (None, why there is none)."""
    import mlflow

    path = champion.tags.get(PROFILE_TAG)
    if not path or not champion.run_id:
        return None, (f"champion v{champion.version} has no dataset profile (registered before "
                      f"drift was measured): nothing to compare")
    try:
        return tracking.retry(lambda: mlflow.artifacts.load_dict(
            f"runs:/{champion.run_id}/{path}"), what="read the champion's dataset profile"), None
    except Exception as exc:  # a missing artifact must not stop a registration
        print(f"register: the dataset profile of champion v{champion.version} is unreadable: "
              f"{exc}", file=sys.stderr)
        return None, f"champion v{champion.version}'s dataset profile is unreadable: {exc}"


def _log_table(client, run_id: str, metrics: dict[str, float], drift: dict[str, Any]) -> None:
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_text(run_id, drift_markdown(drift), TABLE_ARTIFACT)


def publish(drift: dict[str, Any] | None) -> None:
    """The drift table as the Prefect table artifact ``data-drift`` (inside a flow run, when
    there is one)."""
    from pipelines import stage

    if drift and drift["rows"]:
        stage.publish_table(key="data-drift", rows=drift["rows"],
                            description=f"today's data against champion "
                                        f"v{drift['champion_version']}'s (register.drift)")


def version_tags(drift: dict[str, Any]) -> dict[str, str]:
    """The version tags: where its profile is, and what drifted ("none", "not measured")."""
    drifted = ",".join(drift["drifted"]) or ("none" if drift["rows"] else "not measured")
    return {**({PROFILE_TAG: drift["profile"]} if drift["profile"] else {}), "drift": drifted}


def compare(new: dict[str, Any], old: dict[str, Any], cfg: DriftConfig) -> list[dict[str, Any]]:
    """One row per statistic: ``statistic``, ``measure``, ``champion`` and ``new`` (short
    summaries of each dataset), ``distance``, ``threshold``, ``drifted`` (distance above it)."""
    rows = [
        ("class_balance", JS, js_distance(old["class_balance"], new["class_balance"]),
         _classes),
        ("boxes_per_image", JS, js_distance(old["boxes_per_image"], new["boxes_per_image"]),
         lambda p: f"mean {_mean_boxes(p['boxes_per_image']):.2f}"),
        ("box_size", JS, js_distance(old["box_size"]["counts"], new["box_size"]["counts"]),
         lambda p: f"mean {p['box_size']['mean']:.1f} px (sqrt area)"),
        ("image_size", JS, js_distance(old["image_size"]["counts"],
                                       new["image_size"]["counts"]),
         lambda p: f"mean {p['image_size']['mean_width']:.0f} x "
                   f"{p['image_size']['mean_height']:.0f} px"),
        ("colour", "mean shift / std (max of R, G, B)", colour_shift(old["colour"], new["colour"]),
         _colours),
    ]
    return [{"statistic": name, "measure": measure, "champion": summary(old),
             "new": summary(new), "distance": round(distance, 4),
             "threshold": getattr(cfg, name), "drifted": distance > getattr(cfg, name)}
            for name, measure, distance, summary in rows]


def js_distance(p: dict[str, int] | list[int], q: dict[str, int] | list[int]) -> float:
    """Jensen-Shannon distance (base 2) of two histograms (lists by bin or dicts by name, a
    missing name counting 0): 0 when both are empty, 1 when only one is."""
    if isinstance(p, dict) or isinstance(q, dict):
        keys = sorted(set(p) | set(q))
        p, q = [p.get(k, 0) for k in keys], [q.get(k, 0) for k in keys]
    a, b = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0 if a.sum() == b.sum() else 1.0
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(a, b, base=2))


def colour_shift(old: dict[str, Any], new: dict[str, Any]) -> float:
    """max over channels of |new mean - old mean| / old std (0 when either was not sampled;
    a std under 1 grey level counts as 1)."""
    if not old.get("mean") or not new.get("mean"):
        return 0.0
    shifts = [abs(n - o) / max(s, 1.0) for n, o, s in zip(new["mean"], old["mean"], old["std"],
                                                          strict=True)]
    return float(max(shifts))


def _mean_boxes(counts: list[int]) -> float:
    total = sum(counts)
    return sum(i * c for i, c in enumerate(counts)) / total if total else 0.0


def _classes(profile: dict[str, Any], shown: int = 4) -> str:
    counts = profile["class_balance"]
    total = sum(counts.values()) or 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{name} {n / total:.0%}" for name, n in top[:shown])
    return text + (f", +{len(top) - shown} more" if len(top) > shown else "") or "no boxes"


def _colours(profile: dict[str, Any]) -> str:
    c = profile["colour"]
    if not c.get("mean"):
        return "no image read"
    return ("mean " + "/".join(f"{m:.0f}" for m in c["mean"]) + ", std "
            + "/".join(f"{s:.0f}" for s in c["std"]) + f" ({c['sampled']} images)")


def drift_markdown(drift: dict[str, Any] | None) -> str:
    """The drift table as Markdown (or one line saying why there is none)."""
    if not drift:
        return "Data drift: not measured (a report from before drift checks)."
    if not drift["rows"]:
        return f"Data drift: not measured: {drift.get('note') or 'no rows'}."
    gate = "on: a drifted dataset keeps the new version @challenger" if drift["gate"] else "off"
    lines = [f"Data drift against the data of champion v{drift['champion_version']} "
             f"(register.drift.gate {gate}):", "",
             "| statistic | measure | champion's data | today's data | distance | threshold "
             "| drifted |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {LABELS[r['statistic']]} | {r['measure']} | {r['champion']} | {r['new']} | "
              f"{r['distance']:.4f} | {r['threshold']} | {'**yes**' if r['drifted'] else 'no'} |"
              for r in drift["rows"]]
    return "\n".join(lines)


def drift_lines(drift: dict[str, Any] | None) -> list[str]:
    """One line per drifted statistic: what moved past which threshold."""
    rows = {r["statistic"]: r for r in (drift or {}).get("rows", [])}
    return [f"{LABELS[name]}: {rows[name]['measure']} {rows[name]['distance']:.4f} > "
            f"register.drift.{name} {rows[name]['threshold']} (champion's data: "
            f"{rows[name]['champion']}; today's: {rows[name]['new']})"
            for name in (drift or {}).get("drifted", [])]
