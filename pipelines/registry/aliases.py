"""Registry aliases: read them, move them all or nothing, promote by hand, roll back.

Alias history, kept as version tags: a version that becomes ``@champion`` (registered, promoted
or rolled back to) gets ``previous_champion`` (the version it displaced, "none" for the first)
unless it already has one, and every move appends ``<UTC time> <event>`` to ``alias_history``
of the versions involved. :func:`rollback` follows ``previous_champion``: rolling back twice
goes two champions back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipelines import tracking

CHAMPION, CHALLENGER = "champion", "challenger"
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
PREVIOUS_CHAMPION, HISTORY = "previous_champion", "alias_history"
HISTORY_CHARS = 4000  # the newest events are kept (MLflow tag values are bounded)


class RegistrationError(RuntimeError):
    """Registering failed; the registry was left as it was (the message says what failed)."""


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


def move_alias(client, name: str, alias: str, version: str, *, previous) -> None:
    """Point ``name@alias`` at the new ``version``. ``previous``: the ModelVersion holding the
    alias before (None if unset), read before ``version`` was created. On any failure
    (interrupts included) the alias goes back to ``previous`` and ``version`` is deleted.

    Raises:
        RegistrationError: the alias could not be moved (the message says what was undone).
    """
    try:
        tracking.retry(lambda: client.set_registered_model_alias(name, alias, version),
                       what=f"set {name}@{alias}")
    except BaseException as exc:
        problems = _restore(client, name, alias, version, previous)
        try:
            client.delete_model_version(name, version)
        except Exception as undo:  # reported along with the original error
            problems.append(f"deleting version {version}: {undo}")
        if not isinstance(exc, Exception):
            raise
        undo = (f"version {version} deleted, @{alias} "
                f"{f'on version {previous.version}' if previous else 'unset'}")
        raise RegistrationError(
            f"could not point {name}@{alias} at version {version}: {exc}. "
            + (f"Rolled back: {undo}" if not problems else
               f"Rollback incomplete ({'; '.join(problems)}); what remains to do: {undo}")
        ) from exc


def move_aliases(client, name: str, moves: list[tuple[str, str | None, Any]]) -> None:
    """Apply ``moves`` (``(alias, version or None to remove it, previous ModelVersion or
    None)``) in order, all or nothing: on any failure every alias touched goes back to its
    previous holder (or is removed if it had none) and RegistrationError names what failed."""
    done = []
    try:
        for alias, version, previous in moves:
            done.append((alias, version, previous))
            if version is None:
                tracking.retry(lambda a=alias: client.delete_registered_model_alias(name, a),
                               what=f"remove {name}@{alias}")
            else:
                tracking.retry(lambda a=alias, v=version:
                               client.set_registered_model_alias(name, a, v),
                               what=f"set {name}@{alias}")
    except BaseException as exc:
        problems = [p for alias, version, previous in reversed(done)
                    for p in _restore(client, name, alias, version, previous)]
        if not isinstance(exc, Exception):
            raise
        state = ", ".join(f"@{a} {f'on version {p.version}' if p else 'unset'}"
                          for a, _, p in done)
        raise RegistrationError(
            f"could not move the aliases of {name}: {exc}. "
            + (f"Rolled back: {state}" if not problems else
               f"Rollback incomplete ({'; '.join(problems)}); what remains to do: {state}")
        ) from exc


def _restore(client, name: str, alias: str, version: str | None, previous) -> list[str]:
    """Put ``alias`` back on ``previous``, or remove it if it had no holder and now points at
    ``version``; returns what could not be done (the original error matters more)."""
    try:
        if previous is not None:
            client.set_registered_model_alias(name, alias, previous.version)
        elif version is not None and str(
                getattr(alias_version(client, name, alias), "version", "")) == str(version):
            client.delete_registered_model_alias(name, alias)
    except Exception as exc:
        return [f"restoring @{alias}: {exc}"]
    return []


def history_entry(event: str) -> str:
    """``<UTC time> <event>``: one entry of the ``alias_history`` tag."""
    return f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%MZ')} {event}"


def record(client, name: str, version, event: str, *, previous_champion=None) -> None:
    """Append ``event`` to ``version``'s ``alias_history`` tag; with ``previous_champion``
    (a version, or "none"), also set that tag unless the version already has one."""
    mv = tracking.retry(lambda: client.get_model_version(name, str(version)),
                        what=f"read {name} version {version}")
    history = "; ".join(filter(None, [mv.tags.get(HISTORY), history_entry(event)]))
    tags = {HISTORY: history[-HISTORY_CHARS:]}
    if previous_champion is not None and PREVIOUS_CHAMPION not in mv.tags:
        tags[PREVIOUS_CHAMPION] = str(previous_champion)
    for key, value in tags.items():
        tracking.retry(lambda k=key, v=value: client.set_model_version_tag(name, str(version),
                                                                          k, v),
                       what=f"tag {name} version {version}")


def promote(version: int, *, model_name: str, alias: str = CHAMPION) -> dict[str, Any]:
    """Point ``model_name@alias`` at ``version`` by hand; the previous holder just loses the
    alias. Tags the version ``promoted_manually=true`` (and the history); promoting to champion
    also removes the version's ``@challenger``, all or nothing. Returns ``{model_name, version,
    alias, previous_version, alias_uri, tracking_uri}``.

    Raises:
        RegistrationError: the model or the version does not exist, or an alias would not move.
    """
    import mlflow

    tracking.configure()
    client = mlflow.MlflowClient()
    target = _version(client, model_name, version)
    previous = alias_version(client, model_name, alias)
    tracking.retry(lambda: client.set_model_version_tag(model_name, target.version,
                                                        "promoted_manually", "true"),
                   what="tag the version")
    moves = [(alias, target.version, previous)]
    if alias == CHAMPION and CHALLENGER in (target.aliases or []):
        moves.append((CHALLENGER, None, target))
    move_aliases(client, model_name, moves)
    before = previous.version if previous else "none"
    record(client, model_name, target.version, f"@{alias} (promoted; was v{before})",
           previous_champion=before if alias == CHAMPION else None)
    return {"model_name": model_name, "version": int(target.version), "alias": alias,
            "previous_version": int(previous.version) if previous else None,
            "alias_uri": f"models:/{model_name}@{alias}", "tracking_uri": tracking.tracking_uri()}


def rollback(*, model_name: str) -> dict[str, Any]:
    """Move ``@champion`` back to the version it displaced (the current champion's
    ``previous_champion`` tag); the demoted version becomes ``@challenger``. Both moves or
    neither. Returns ``{model_name, version, previous_version, alias_uri, tracking_uri}``
    (``version``: the champion now).

    Raises:
        RegistrationError: no champion, no recorded previous champion (or it was deleted), or
            an alias would not move (both aliases are then where they were).
    """
    import mlflow

    tracking.configure()
    client = mlflow.MlflowClient()
    current = alias_version(client, model_name, CHAMPION)
    if current is None:
        raise RegistrationError(f"{model_name}: no @champion in {tracking.tracking_uri()}: "
                                f"nothing to roll back")
    before = current.tags.get(PREVIOUS_CHAMPION, "none")
    if before == "none":
        raise RegistrationError(f"{model_name} version {current.version} (@champion) has no "
                                f"previous champion recorded ({PREVIOUS_CHAMPION} tag): promote "
                                f"a version by hand (python -m pipelines promote --version N)")
    target = _version(client, model_name, before)
    challenger = alias_version(client, model_name, CHALLENGER)
    move_aliases(client, model_name, [(CHAMPION, target.version, current),
                                      (CHALLENGER, current.version, challenger)])
    record(client, model_name, target.version, f"@champion (rollback from v{current.version})")
    record(client, model_name, current.version, f"@challenger (rolled back to v{before})")
    return {"model_name": model_name, "version": int(target.version),
            "previous_version": int(current.version),
            "alias_uri": f"models:/{model_name}@{CHAMPION}",
            "tracking_uri": tracking.tracking_uri()}


def _version(client, name: str, version):
    from mlflow.exceptions import MlflowException

    try:
        return tracking.retry(lambda: client.get_model_version(name, str(version)),
                              what=f"read {name} version {version}")
    except MlflowException as exc:
        raise RegistrationError(f"{name} version {version}: not in the registry at "
                                f"{tracking.tracking_uri()}: {exc}") from exc
