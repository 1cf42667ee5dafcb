"""``python -m pipelines promote`` and ``python -m pipelines rollback``: the registry's alias
moves by hand (:func:`pipelines.registry.aliases.promote` / ``rollback``), for the model named
by ``register.model_name`` in params.yaml. Exit 0 moved, 2 nothing moved (the reason on
stderr)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detr.config import ConfigError
from pipelines.params import PARAMS_FILE, load
from pipelines.registry.aliases import CHAMPION, RegistrationError, promote, rollback


def promote_main(argv: list[str] | None = None) -> int:
    """``python -m pipelines promote --version N``: exit 0 moved, 2 no such version/params."""
    parser = _parser("promote", "Point a registry alias at a model version.")
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--alias", default=CHAMPION)
    args = parser.parse_args(argv)
    return _move("promote", args, lambda name: promote(args.version, model_name=name,
                                                       alias=args.alias),
                 lambda r: f"(was {r['previous_version'] or 'unset'})")


def rollback_main(argv: list[str] | None = None) -> int:
    """``python -m pipelines rollback``: exit 0 moved back, 2 nothing to roll back to."""
    args = _parser("rollback", "Move @champion back to the previous champion.").parse_args(argv)
    return _move("rollback", args, lambda name: rollback(model_name=name),
                 lambda r: f"(version {r['previous_version']} is @challenger)")


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipelines {command}",
                                     description=description)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    return parser


def _move(command: str, args: argparse.Namespace, action: Callable[[str], dict[str, Any]],
          before: Callable[[dict[str, Any]], str]) -> int:
    """Run ``action`` on ``register.model_name`` of ``args.params``; print what moved."""
    try:
        result = action(load(args.params)["register"].model_name)
    except (ConfigError, RegistrationError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    print(f"{command}: {result['alias_uri']} -> version {result['version']} {before(result)} "
          f"in {result['tracking_uri']}")
    return 0
