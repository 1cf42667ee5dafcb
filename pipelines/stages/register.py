"""The ``register`` stage: log the trained model, register a version, move an alias by a rule.

    python -m pipelines register [--params params.yaml] [--checkpoint checkpoints/checkpoint.pth]
        [--metrics metrics/coco.json] [--report reports/register.json]
    python -m pipelines promote --version N [--params params.yaml] [--alias champion]

Reads the checkpoint, ``metrics_path`` (``evaluate``'s COCO statistics: ``{"AP": 0.41, ...}``,
at the top level or under ``"stats"``) and the run id in ``reports/mlflow_run.json``. Logs the
model into that run (:mod:`pipelines.mlflow_model`), registers a new version of
``register.model_name`` and points ``@champion`` or ``@challenger`` at it.

The alias rule (``register:`` in params.yaml): the new version becomes ``@champion`` iff its
``metric`` reaches ``min_ap`` and either there is no champion or it beats the champion's value
by more than ``min_improvement`` (strictly: ``value > champion + min_improvement``; a tie does
not displace the champion). Otherwise it becomes ``@challenger``. A champion whose value is
unknown (no ``metric_<name>`` tag, no run metric) is kept: promote by hand.

All or nothing: the version is created with its tags (``metric_<name>``, ``decision``,
``champion_version_before``, ``champion_value_before``, ``run_id``, ``git_commit``,
``dataset_md5``), then the alias is moved. If anything fails after the version exists, the alias
is put back where it was and the version is deleted; the error is re-raised.

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
from detr.config import ConfigError, DataConfig
from detr.evaluation import STAT_NAMES
from pipelines import mlflow_model, stage, tracking
from pipelines.params import PARAMS_FILE, RegisterConfig, load

CHAMPION, CHALLENGER = "champion", "challenger"
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class RegistrationError(RuntimeError):
    """Registering failed; the registry was left as it was (the message says what failed)."""


class MetricsError(ValueError):
    """The metrics file lacks the configured statistic, or it is not a finite number."""


def run(*, checkpoint: Path, metrics_path: Path = Path("metrics/coco.json"),
        cfg: RegisterConfig, data_cfg: DataConfig, run_file: Path = tracking.RUN_FILE,
        report_path: Path = Path("reports/register.json")) -> dict[str, Any]:
    """Log, register and alias the model; write and return the report.

    Report (``report_path``): ``model_name``, ``version`` (int), ``decision`` ("champion" or
    "challenger"), ``metric``, ``value``, ``champion_version_before`` / ``champion_value_before``
    (null without a champion), ``model_uri`` (``models:/<name>/<version>``), ``alias_uri``
    (``models:/<name>@<decision>``), ``run_id``, ``tracking_uri``.

    Raises:
        MetricsError: ``cfg.metric`` unknown or missing from ``metrics_path``, or not finite.
        CheckpointError: ``checkpoint`` is not a readable training checkpoint.
        RegistrationError: the version could not be registered or aliased (registry unchanged).
    """
    import mlflow

    value = read_metric(Path(metrics_path), cfg.metric)
    with tracking.resume_run(Path(run_file)) as active:
        run_id = active.info.run_id
        client = mlflow.MlflowClient()
        info = tracking.retry(lambda: mlflow_model.log_model(Path(checkpoint), data_cfg),
                              what="log the model")
        before_version, before_value = champion_state(client, cfg.model_name, cfg.metric)
        decision = decide(value, before_value, has_champion=before_version is not None,
                          min_ap=cfg.min_ap, min_improvement=cfg.min_improvement)
        tags = version_tags(client, run_id, cfg.metric, value, decision,
                            before_version, before_value)
        holder = alias_version(client, cfg.model_name, decision)  # read before the window
        version = register_version(client, info.model_uri, cfg.model_name, tags)
        move_alias(client, cfg.model_name, decision, version, previous=holder)
        tracking.retry(lambda: _tag_run(run_id, version, decision), what="tag the run")
    report = {
        "model_name": cfg.model_name, "version": int(version), "decision": decision,
        "metric": cfg.metric, "value": value, "champion_version_before": before_version,
        "champion_value_before": before_value,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "alias_uri": f"models:/{cfg.model_name}@{decision}",
        "run_id": run_id, "tracking_uri": tracking.tracking_uri(),
    }
    _write_json(Path(report_path), report)
    print(summary(report))
    stage.publish_markdown(key="registration", markdown=report_markdown(report),
                           description=f"{cfg.model_name} v{version}: {decision}")
    return report


def read_metric(path: Path, metric: str) -> float:
    """``metric`` (a COCO statistic name) from the metrics JSON at ``path``.

    Raises:
        MetricsError: unknown statistic, missing file or key, or a value that is not finite.
    """
    if metric not in STAT_NAMES:
        raise MetricsError(f"register.metric: {metric!r} is not a COCO statistic "
                         f"(one of {', '.join(STAT_NAMES)})")
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


def decide(value: float, champion_value: float | None, *, has_champion: bool,
           min_ap: float, min_improvement: float) -> str:
    """"champion" iff ``value >= min_ap`` and (no champion, or ``value > champion_value +
    min_improvement``); else "challenger". A champion of unknown value is never displaced."""
    if value < min_ap:
        return CHALLENGER
    if not has_champion:
        return CHAMPION
    if champion_value is None:
        return CHALLENGER
    return CHAMPION if value > champion_value + min_improvement else CHALLENGER


def alias_version(client, name: str, alias: str):
    """The ModelVersion holding ``name@alias``; None when the model or the alias is missing.

    Reads the registered model's alias table rather than ``get_model_version_by_alias``, whose
    "not found" is an INVALID_PARAMETER_VALUE error, like a malformed alias name.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = tracking.retry(lambda: client.get_registered_model(name), what=f"read {name}")
    except MlflowException as exc:
        if exc.error_code == NOT_FOUND:
            return None
        raise
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    return tracking.retry(lambda: client.get_model_version(name, str(version)),
                          what=f"read {name} version {version}")


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


def version_tags(client, run_id: str, metric: str, value: float, decision: str,
                 before_version: int | None, before_value: float | None) -> dict[str, str]:
    """The tags a new version is created with (all strings; "none" for a missing value)."""
    run_tags = tracking.retry(lambda: client.get_run(run_id), what=f"read run {run_id}").data.tags
    tags = {f"metric_{metric}": repr(value), "decision": decision, "run_id": run_id,
            "champion_version_before": str(before_version or "none"),
            "champion_value_before": "none" if before_value is None else repr(before_value)}
    if run_tags.get("git_commit"):
        tags["git_commit"] = run_tags["git_commit"]
    dataset_md5 = tracking.dvc_hash("data/dataset")
    if dataset_md5:
        tags["dataset_md5"] = dataset_md5
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


def move_alias(client, name: str, alias: str, version: str, *, previous) -> None:
    """Point ``name@alias`` at ``version``. ``previous``: the ModelVersion holding the alias
    before (None if unset), read before ``version`` was created. On any failure (interrupts
    included) the alias goes back to ``previous`` and ``version`` is deleted: all or nothing.

    Raises:
        RegistrationError: the alias could not be moved (the message says what was undone).
    """
    try:
        tracking.retry(lambda: client.set_registered_model_alias(name, alias, version),
                       what=f"set {name}@{alias}")
    except BaseException as exc:
        problems = _roll_back(client, name, alias, version, previous)
        if not isinstance(exc, Exception):
            raise
        undo = (f"version {version} deleted, @{alias} "
                f"{f'on version {previous.version}' if previous else 'unset'}")
        raise RegistrationError(
            f"could not point {name}@{alias} at version {version}: {exc}. "
            + (f"Rolled back: {undo}" if not problems else
               f"Rollback incomplete ({'; '.join(problems)}); what remains to do: {undo}")
        ) from exc


def _roll_back(client, name: str, alias: str, version: str, previous) -> list[str]:
    """Put ``alias`` back on ``previous`` (or remove it) and delete ``version``; returns what
    could not be done (the original error matters more than these)."""
    problems = []
    try:
        if previous is not None:
            client.set_registered_model_alias(name, alias, previous.version)
        elif str(getattr(alias_version(client, name, alias), "version", "")) == version:
            client.delete_registered_model_alias(name, alias)
    except Exception as exc:  # reported along with the original error
        problems.append(f"restoring @{alias}: {exc}")
    try:
        client.delete_model_version(name, version)
    except Exception as exc:
        problems.append(f"deleting version {version}: {exc}")
    return problems


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


def promote(version: int, *, model_name: str, alias: str = CHAMPION) -> dict[str, Any]:
    """Point ``model_name@alias`` at ``version`` by hand; the previous holder just loses the
    alias. Tags the version ``promoted_manually=true``; promoting to champion also removes the
    version's ``@challenger``. Returns ``{model_name, version, alias, previous_version,
    alias_uri, tracking_uri}``.

    Raises:
        RegistrationError: the model or the version does not exist.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.configure()
    client = mlflow.MlflowClient()
    try:
        target = tracking.retry(lambda: client.get_model_version(model_name, str(version)),
                                what=f"read {model_name} version {version}")
    except MlflowException as exc:
        raise RegistrationError(f"{model_name} version {version}: not in the registry at "
                                f"{tracking.tracking_uri()}: {exc}") from exc
    previous = alias_version(client, model_name, alias)
    tracking.retry(lambda: client.set_model_version_tag(model_name, target.version,
                                                        "promoted_manually", "true"),
                   what="tag the version")
    tracking.retry(lambda: client.set_registered_model_alias(model_name, alias, target.version),
                   what=f"set {model_name}@{alias}")
    if alias == CHAMPION and CHALLENGER in (target.aliases or []):
        tracking.retry(lambda: client.delete_registered_model_alias(model_name, CHALLENGER),
                       what=f"remove {model_name}@{CHALLENGER}")
    return {"model_name": model_name, "version": int(target.version), "alias": alias,
            "previous_version": int(previous.version) if previous else None,
            "alias_uri": f"models:/{model_name}@{alias}", "tracking_uri": tracking.tracking_uri()}


def summary(report: dict[str, Any]) -> str:
    """Three lines for the terminal: the decision, where it is, how to look at it."""
    before = ("no champion before" if report["champion_version_before"] is None else
              f"champion was v{report['champion_version_before']} "
              f"({_fmt(report['champion_value_before'])})")
    return (f"register: {report['model_name']} v{report['version']} -> @{report['decision']} "
            f"({report['metric']} {_fmt(report['value'])}; {before})\n"
            f"  {report['alias_uri']} in {report['tracking_uri']}\n"
            f"  browse it: make mlflow-ui, then http://127.0.0.1:5000/#/models/"
            f"{report['model_name']}")


def report_markdown(report: dict[str, Any]) -> str:
    """The registration report (``reports/register.json``, as :func:`run` returns it) as
    Markdown: the decision, the new version and the champion before, with their metric."""
    return "\n".join([
        f"# {report['model_name']} version {report['version']}: @{report['decision']}", "",
        f"| | version | {report['metric']} |", "|---|---|---|",
        f"| new | {report['version']} | {_fmt(report['value'])} |",
        f"| champion before | {report['champion_version_before'] or '-'} | "
        f"{_fmt(report['champion_value_before'])} |", "",
        f"`{report['alias_uri']}` in `{report['tracking_uri']}`"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


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
    parser.add_argument("--report", type=Path, default=Path("reports/register.json"))
    args = parser.parse_args(argv)
    try:
        params = load(args.params)
        stage.invoke(register_flow, run, checkpoint=args.checkpoint, metrics_path=args.metrics,
                     cfg=params["register"], data_cfg=params["data"], report_path=args.report)
    except (ConfigError, MetricsError, CheckpointError) as exc:
        print(f"register: {exc}", file=sys.stderr)
        return 2
    return 0


def promote_main(argv: list[str] | None = None) -> int:
    """``python -m pipelines promote --version N``: exit 0 moved, 2 no such version/params."""
    parser = argparse.ArgumentParser(prog="python -m pipelines promote",
                                     description="Point a registry alias at a model version.")
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--alias", default=CHAMPION)
    args = parser.parse_args(argv)
    try:
        name = load(args.params)["register"].model_name
        result = promote(args.version, model_name=name, alias=args.alias)
    except (ConfigError, RegistrationError) as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 2
    print(f"promote: {result['alias_uri']} -> version {result['version']} (was "
          f"{result['previous_version'] or 'unset'}) in {result['tracking_uri']}")
    return 0
