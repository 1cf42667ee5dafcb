"""``python -m pipelines <stage> [options]``: the commands dvc.yaml runs.

Stages: prepare, validate, train, evaluate, register; promote (move @champion by hand);
rollback (@champion back to the previous champion); summary (print the last run's AP/AR
table, registration and where the UIs are); retrain (the parent flow: new data, stale stages,
push, registration); deploy (its scheduled deployment).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("pipelines.stages.prepare", "main"),
    "validate": ("pipelines.stages.validate", "main"),
    "train": ("pipelines.stages.train", "main"),
    "evaluate": ("pipelines.stages.evaluate", "main"),
    "register": ("pipelines.stages.register", "main"),
    "promote": ("pipelines.registry.commands", "promote_main"),
    "rollback": ("pipelines.registry.commands", "rollback_main"),
    "summary": ("pipelines.reporting.summary", "main"),
    "retrain": ("pipelines.ops.retrain", "main"),
    "deploy": ("pipelines.ops.deploy", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m pipelines {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    module, func = COMMANDS[argv[0]]
    from detr.config import ConfigError
    from pipelines.tracking import TrackingUnavailableError

    try:
        return getattr(importlib.import_module(module), func)(argv[1:])
    except ConfigError as exc:
        print(f"{argv[0]}: bad params: {exc}", file=sys.stderr)
        return 2
    except TrackingUnavailableError as exc:  # after the retries: no traceback, the reason
        print(f"{argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # spawn-started workers re-import __main__: keep this guard
    sys.exit(main())
