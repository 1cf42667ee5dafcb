"""The ``register`` stage: log the trained model, register a version, move an alias by a rule.

    python -m pipelines register [--params params.yaml] [--checkpoint checkpoints/checkpoint.pth]
        [--metrics metrics/coco.json] [--per-class reports/evaluation/per_class_ap.json]
        [--data data/dataset] [--report reports/register.json]
    python -m pipelines promote --version N [--params params.yaml] [--alias champion]
    python -m pipelines rollback [--params params.yaml]

Reads the checkpoint, ``metrics_path`` (``evaluate``'s COCO statistics: ``{"AP": 0.41, ...}``,
at the top level or under ``"stats"``; a ``mask_*`` ``register.metric`` is read from
``segm.json`` beside it, a PQ one from ``panoptic.json``: :func:`metrics_file`), ``per_class_path`` (its ``{class: AP or null}``) and the
run id in ``reports/mlflow_run.json``. Logs the model into that run (:mod:`pipelines.mlflow_model`),
registers a new version of ``register.model_name`` and points ``@champion`` or ``@challenger``
at it.

Like for like: the current champion is evaluated again on today's val split (``dataset_dir``)
with the evaluate stage's code and settings (:mod:`pipelines.registry.champion`, cached by
version and dataset md5), and the rule (:func:`pipelines.registry.decision.decide`) compares
the two numbers measured on the same images: the new version becomes ``@champion`` iff its
``metric`` reaches ``min_ap``, and there is no champion, or it beats the champion's value by
more than ``min_improvement`` and no class loses more than ``max_class_drop`` AP (and, with
``register.drift.gate``, the data did not drift). Otherwise ``@challenger``. A champion that
cannot be measured on this val split (other categories, no checkpoint artifact) is kept:
promote by hand. Today's dataset is profiled and compared with the champion's
(:mod:`pipelines.registry.drift`): the report, the run and the version say what drifted.

All or nothing: the version is created with its tags (``metric_<name>``, ``decision``,
``decision_reason``, ``champion_version_before``, ``champion_value_before`` (same val split),
``champion_value_logged``, ``champion_dataset_md5``, ``run_id``, ``git_commit``,
``dataset_md5``, ``data_profile`` and ``drift`` (:mod:`pipelines.registry.drift`), and for a
new champion the alias history of :mod:`pipelines.registry.aliases`),
then the alias is moved. If anything fails after the version exists, the alias is put back
where it was and the version is deleted; the error is re-raised.

Writes ``report_path`` (JSON, see :func:`run`). One writer at a time: two concurrent
registrations of the same model may both read the same champion.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from detr.checkpoint import CheckpointError
from detr.config import ConfigError, DataConfig, TrainConfig
from detr.evaluation import STAT_NAMES
from detr.panoptic_quality import STAT_NAMES as PANOPTIC_STAT_NAMES
from detr.segm_evaluation import MASK_STAT_NAMES
from pipelines import mlflow_model, stage, tracking
from pipelines.measurement import EvaluationInputError
from pipelines.params import PARAMS_FILE, EvaluateConfig, RegisterConfig, load
from pipelines.registry import drift as data_drift
from pipelines.registry.aliases import (  # noqa: F401  (the stage's public names)
    CHALLENGER,
    CHAMPION,
    HISTORY,
    NOT_FOUND,
    PREVIOUS_CHAMPION,
    RegistrationError,
    alias_version,
    history_entry,
    move_alias,
    promote,
    rollback,
)
from pipelines.registry.card import publish_card
from pipelines.registry.champion import CACHE_DIR, measure_champion
from pipelines.registry.commands import promote_main, rollback_main  # noqa: F401  (as above)
from pipelines.registry.decision import Decision, class_drops, decide
from pipelines.registry.report import report_markdown, summary

DATASET = "data/dataset"  # the dataset's DVC output path (its md5 in dvc.lock)
PER_CLASS = Path("reports/evaluation/per_class_ap.json")


class MetricsError(ValueError):
    """The metrics file lacks the configured statistic, or it is not a finite number."""


def run(*, checkpoint: Path, metrics_path: Path = Path("metrics/coco.json"),
        cfg: RegisterConfig, data_cfg: DataConfig, eval_cfg: EvaluateConfig | None = None,
        train_cfg: TrainConfig | None = None, dataset_dir: Path = Path(DATASET),
        per_class_path: Path = PER_CLASS, cache_dir: Path = CACHE_DIR,
        run_file: Path = tracking.RUN_FILE,
        report_path: Path = Path("reports/register.json")) -> dict[str, Any]:
    """Log, register and alias the model; write and return the report.

    ``eval_cfg``, ``data_cfg`` and ``train_cfg`` (device, precision) are the evaluate stage's
    settings, used to measure the champion on ``dataset_dir``'s val split.

    Report (``report_path``): ``model_name``, ``version`` (int), ``decision`` ("champion" or
    "challenger"), ``reason`` (one line), ``metric``, ``value``, ``dataset_md5``,
    ``champion_version_before``, ``champion_value_before`` (measured on this val split; null
    without a champion or when it could not be measured), ``champion_value_logged`` (its number
    when registered), ``champion_dataset_md5``, ``champion_measurement`` (null, or where the
    number comes from: "measured" / "cached" / why not), ``per_class`` (``{class: {"new",
    "champion"}}``), ``model_uri`` (``models:/<name>/<version>``), ``alias_uri``
    (``models:/<name>@<decision>``), ``run_id``, ``tracking_uri``, ``drift`` (today's dataset
    against the champion's: :func:`pipelines.registry.drift.assess`), ``model_card`` (the run
    artifact of the HTML model card, :mod:`pipelines.registry.card`; null if not published).
    The card is also the version's description.

    Raises:
        MetricsError: ``cfg.metric`` unknown or missing from ``metrics_path``, or not finite,
            or ``per_class_path`` unreadable when there is a champion to compare with.
        CheckpointError: ``checkpoint`` is not a readable training checkpoint.
        FileNotFoundError: a champion exists but ``dataset_dir`` has no val split.
        RegistrationError: the version could not be registered or aliased (registry unchanged).
    """
    import mlflow

    value = read_metric(metrics_file(cfg.metric, Path(metrics_path)), cfg.metric)
    dataset_md5 = tracking.dvc_hash(DATASET)
    with tracking.resume_run(Path(run_file)) as active:
        run_id = active.info.run_id
        client = mlflow.MlflowClient()
        nms = None if eval_cfg is None else eval_cfg.nms  # served as evaluate measured it
        info = tracking.retry(lambda: mlflow_model.log_model(Path(checkpoint), data_cfg,
                                                             nms=nms), what="log the model")
        drift = data_drift.assess(client, cfg.drift, dataset_dir=Path(dataset_dir),
                                  run_id=run_id, dataset_md5=dataset_md5,
                                  champion=alias_version(client, cfg.model_name, CHAMPION))
        before = compare(client, cfg, value, dataset_md5=dataset_md5, dataset_dir=dataset_dir,
                         per_class_path=Path(per_class_path), eval_cfg=eval_cfg or EvaluateConfig(),
                         data_cfg=data_cfg, train_cfg=train_cfg or TrainConfig(),
                         cache_dir=Path(cache_dir), drifted=drift["drifted"])
        decision = before.pop("decision")
        tags = {**version_tags(client, run_id, cfg.metric, value, decision, before, dataset_md5),
                **data_drift.version_tags(drift)}
        holder = alias_version(client, cfg.model_name, decision.alias)  # read before the window
        version = register_version(client, info.model_uri, cfg.model_name, tags)
        move_alias(client, cfg.model_name, decision.alias, version, previous=holder)
        tracking.retry(lambda: _tag_run(run_id, version, decision.alias), what="tag the run")
    report = {
        "model_name": cfg.model_name, "version": int(version), "decision": decision.alias,
        "reason": decision.reason, "metric": cfg.metric, "value": value,
        "dataset_md5": dataset_md5, **before, "drift": drift,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "alias_uri": f"models:/{cfg.model_name}@{decision.alias}",
        "run_id": run_id, "tracking_uri": tracking.tracking_uri(),
    }
    report["model_card"] = publish_card(client, report, stats=_stats(Path(metrics_path)),
                                        per_class=_per_class_if_any(Path(per_class_path)))
    _write_json(Path(report_path), report)
    print(summary(report))
    stage.publish_markdown(key="registration", markdown=report_markdown(report),
                           description=f"{cfg.model_name} v{version}: {decision.alias}")
    data_drift.publish(drift)
    return report


def compare(client, cfg: RegisterConfig, value: float, *, dataset_md5: str | None,
            dataset_dir: Path, per_class_path: Path, eval_cfg: EvaluateConfig,
            data_cfg: DataConfig, train_cfg: TrainConfig, cache_dir: Path,
            drifted: list[str] | None = None) -> dict[str, Any]:
    """The champion, measured on this val split, against ``value``: the report's
    ``champion_*`` and ``per_class`` entries, and ``decision`` (a :class:`Decision`;
    ``drifted``: the data statistics past ``register.drift``, for its gate)."""
    version, logged = champion_state(client, cfg.model_name, cfg.metric)
    out = {"champion_version_before": version, "champion_value_before": None,
           "champion_value_logged": logged, "champion_dataset_md5": None,
           "champion_measurement": None, "per_class": {}}
    drops = None
    if version is not None:
        champion = alias_version(client, cfg.model_name, CHAMPION)
        out["champion_dataset_md5"] = champion.tags.get("dataset_md5")
        try:
            measured = measure_champion(cfg.model_name, version, dataset_dir=dataset_dir,
                                        dataset_md5=dataset_md5, cfg=eval_cfg,
                                        data_cfg=data_cfg, train_cfg=train_cfg,
                                        cache_dir=cache_dir)
        except (EvaluationInputError, CheckpointError, _mlflow_error()) as exc:
            out["champion_measurement"] = f"not measured: {exc}"
            print(f"register: champion v{version} not measured on {dataset_dir}: {exc}",
                  file=sys.stderr)
        else:
            out["champion_measurement"] = "cached" if measured["cached"] else "measured"
            if cfg.metric not in measured["stats"]:
                out["champion_measurement"] = (f"not measured: its measurement has no "
                                               f"{cfg.metric} (register.metric)")
            else:
                out["champion_value_before"] = float(measured["stats"][cfg.metric])
            new = read_per_class(per_class_path)
            out["per_class"] = {name: {"new": new.get(name), "champion": ap}
                                for name, ap in measured["per_class"].items()}
            drops = class_drops(new, measured["per_class"])
    out["decision"] = decide(value, out["champion_value_before"],
                             has_champion=version is not None, min_ap=cfg.min_ap,
                             min_improvement=cfg.min_improvement, class_drops=drops,
                             max_class_drop=cfg.max_class_drop, metric=cfg.metric,
                             drifted=drifted, drift_gate=cfg.drift.gate)
    return out


def read_per_class(path: Path) -> dict[str, float | None]:
    """The evaluate stage's ``per_class_ap.json``: ``{class: AP or null}``.

    Raises:
        MetricsError: missing or unreadable file, or not a JSON object.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MetricsError(f"{path}: cannot read the per-class AP (run the evaluate stage): "
                           f"{exc}") from exc
    if not isinstance(data, dict):
        raise MetricsError(f"{path}: not a {{class: AP}} object")
    return {str(k): None if v is None else float(v) for k, v in data.items()}


def _stats(path: Path) -> dict[str, float]:
    """All statistics of the metrics file (read_metric checked the one that decides)."""
    data = json.loads(path.read_text())
    return dict(data.get("stats", data))


def _per_class_if_any(path: Path) -> dict[str, float | None]:
    try:
        return read_per_class(path)
    except MetricsError:
        return {}


def _mlflow_error() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def metrics_file(metric: str, metrics_path: Path) -> Path:
    """Where the evaluate stage writes ``metric``: ``metrics_path`` (``metrics/coco.json``)
    for a box statistic, ``segm.json`` beside it for ``mask_*``, ``panoptic.json`` for PQ."""
    if metric in MASK_STAT_NAMES:
        return Path(metrics_path).with_name("segm.json")
    if metric in PANOPTIC_STAT_NAMES:
        return Path(metrics_path).with_name("panoptic.json")
    return Path(metrics_path)


def read_metric(path: Path, metric: str) -> float:
    """``metric`` (a COCO box or mask statistic, or a PQ statistic) from the metrics JSON at
    ``path``.

    Raises:
        MetricsError: unknown statistic, missing file or key, or a value that is not finite.
    """
    known = STAT_NAMES + MASK_STAT_NAMES + PANOPTIC_STAT_NAMES
    if metric not in known:
        raise MetricsError(f"register.metric: {metric!r} is not a COCO statistic nor a "
                           f"panoptic one (one of {', '.join(known)})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MetricsError(f"{path}: cannot read the metrics (run the evaluate stage): "
                         f"{exc}") from exc
    stats = data.get("stats", data) if isinstance(data, dict) else {}
    if not isinstance(stats, dict) or metric not in stats:
        raise MetricsError(f"{path}: no {metric!r} (found: {', '.join(map(str, stats)) or '-'})")
    try:
        value = float(stats[metric])
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"{path}: {metric} is not a number: {stats[metric]!r}") from exc
    if not math.isfinite(value):
        raise MetricsError(f"{path}: {metric} is {value}, not a finite number")
    return value


def champion_state(client, name: str, metric: str) -> tuple[int | None, float | None]:
    """(version, metric value) of ``name@champion``; (None, None) without one. The value comes
    from the version's ``metric_<metric>`` tag, else from its run's metrics (None if neither)."""
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return None, None
    tag = champion.tags.get(f"metric_{metric}")
    if tag is not None:
        return int(champion.version), float(tag)
    if not champion.run_id:
        return int(champion.version), None
    metrics = tracking.retry(lambda: client.get_run(champion.run_id),
                             what=f"read run {champion.run_id}").data.metrics
    value = next((metrics[k] for k in (metric, f"val_{metric}") if k in metrics), None)
    return int(champion.version), value


def version_tags(client, run_id: str, metric: str, value: float, decision: Decision,
                 before: dict[str, Any], dataset_md5: str | None) -> dict[str, str]:
    """The tags a new version is created with (all strings; "none" for a missing value)."""
    run_tags = tracking.retry(lambda: client.get_run(run_id), what=f"read run {run_id}").data.tags
    champion = before["champion_version_before"]
    tags = {f"metric_{metric}": repr(value), "decision": decision.alias,
            "decision_reason": decision.reason[:500], "run_id": run_id,
            "champion_version_before": str(champion or "none"),
            **{key: "none" if before[key] is None else repr(before[key])
               for key in ("champion_value_before", "champion_value_logged")},
            "champion_dataset_md5": str(before["champion_dataset_md5"] or "none")}
    if run_tags.get("git_commit"):
        tags["git_commit"] = run_tags["git_commit"]
    if dataset_md5:
        tags["dataset_md5"] = dataset_md5
    if decision.alias == CHAMPION:
        tags[PREVIOUS_CHAMPION] = str(champion or "none")
        tags[HISTORY] = history_entry(f"@champion (registered; was v{champion or 'none'})")
    return tags


def register_version(client, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Create version N of ``name`` from the logged model ``model_uri`` (``models:/m-<id>``),
    with ``tags``, and wait until it is READY. Not retried (a retry could create two versions);
    on failure, any version made from ``model_uri`` is deleted. Returns N (a string)."""
    import mlflow

    try:
        created = mlflow.register_model(model_uri, name, tags=tags)
        if created.status != "READY":
            raise RegistrationError(f"{name} version {created.version} is {created.status}: "
                                    f"{created.status_message}")
        return str(created.version)
    except BaseException as exc:
        leftovers = _delete_versions_of(client, name, model_uri)
        if not isinstance(exc, Exception):
            raise
        raise RegistrationError(f"could not register {model_uri} as {name!r} (deleted "
                                f"versions: {leftovers or 'none'}): {exc}") from exc


def _delete_versions_of(client, name: str, model_uri: str) -> list[str]:
    """Delete the versions of ``name`` registered from the logged model in ``model_uri``."""
    model_id = model_uri.removeprefix("models:/")
    try:
        found = client.search_model_versions(f"name = '{name}'")
        # The SQL store leaves ModelVersion.model_id empty; its source is the models:/ URI.
        doomed = [str(mv.version) for mv in found
                  if mv.model_id == model_id or model_id in str(mv.source)]
        for version in doomed:
            client.delete_model_version(name, version)
        return doomed
    except Exception:  # best effort: the caller raises the original error
        return []


def _tag_run(run_id: str, version: str, decision: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, "registered_version", version)
    client.set_tag(run_id, "decision", decision)
    client.log_metric(run_id, "registered_version", float(version))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


@flow(name="register", validate_parameters=False, log_prints=True)
def register_flow(**kwargs: Any) -> dict[str, Any]:
    """Prefect flow over :func:`run` (same keyword arguments)."""
    return run(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines register``: exit 0 registered, 2 unusable params or inputs."""
    parser = argparse.ArgumentParser(prog="python -m pipelines register",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/best.pth"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/coco.json"))
    parser.add_argument("--per-class", type=Path, default=PER_CLASS)
    parser.add_argument("--data", type=Path, default=Path(DATASET),
                        help="the dataset whose val split the champion is measured on")
    parser.add_argument("--report", type=Path, default=Path("reports/register.json"))
    args = parser.parse_args(argv)
    try:
        params = load(args.params)
        stage.invoke(register_flow, run, checkpoint=args.checkpoint, metrics_path=args.metrics,
                     cfg=params["register"], data_cfg=params["data"],
                     eval_cfg=params["evaluate"], train_cfg=params["train"],
                     dataset_dir=args.data, per_class_path=args.per_class,
                     report_path=args.report)
    except (ConfigError, MetricsError, CheckpointError, FileNotFoundError) as exc:
        print(f"register: {exc}", file=sys.stderr)
        return 2
    return 0
