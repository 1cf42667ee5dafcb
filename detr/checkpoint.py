"""Checkpoint files: safe loading, atomic saving, and loading weights into a model.

This module knows no model code: which keys are training-only or sized by the number of
classes, the model says (``training_only_prefixes()`` / ``class_sized_prefixes()``).
Rebuilding a model from a checkpoint is :func:`detr.hub.model_from_checkpoint`.

A checkpoint is a dict with ``model`` (a state dict with the official DETR key names) and, for
resuming a training, ``optimizer``, ``lr_scheduler``, ``epoch``, ``rng``, ``params`` and
``label_map``. Files are read with ``torch.load(weights_only=True)``: a file that needs
arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detr import downloads


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is not a state dict, or does not fit the model."""


def load_file(source: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint dict from a path or an http(s) URL (downloads are hash-checked)."""
    text = str(source)
    try:
        if text.startswith(("http://", "https://")):
            return _download(text, map_location)
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{text}: refused: the file needs arbitrary code to unpickle (only tensors and plain "
            f"containers are loaded, weights_only=True). Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{text}: not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{text}: expected a dict, got {type(obj).__name__}")
    return obj


def _download(url: str, map_location) -> dict:
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location=map_location, check_hash=True, weights_only=True)
    except OSError as exc:
        if downloads.is_download_error(exc):
            raise CheckpointError(downloads.unavailable(url, exc)) from exc
        raise


def load_state_dict_file(source: str | Path) -> dict[str, Tensor]:
    """The model state dict of a checkpoint: its ``model`` entry, or the file itself."""
    obj = load_file(source)
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source}: no state dict (expected a 'model' entry of tensors)")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict: entry {bad[0]!r} is not a tensor")
    return state


def save_file(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over ``path``. A failure leaves any previous file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class LoadReport:
    """What :func:`load_weights` did: keys loaded and keys skipped (with the reason)."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        lines += [f"skipped {k}: {why}" for k, why in self.skipped.items()]
        return "\n".join(lines)


def load_weights(model: nn.Module, state: dict[str, Tensor], *,
                 finetune: bool = False) -> LoadReport:
    """Load ``state`` into ``model``, strictly except for training-only parts.

    Training-only tensors (the keys under ``model.training_only_prefixes()``: the training
    aids' ``group_query_embed.*``, ``denoiser.*``, ``dense_embed.*`` ...) that the checkpoint
    lacks keep the model's fresh initialisation, and those the model lacks are dropped; both
    are reported as skipped. So an official checkpoint loads into a model trained with aids,
    and such a model's checkpoint into a plain one.
    With ``finetune``, class-sized tensors (``model.class_sized_prefixes()``: ``class_embed.*``
    ...) and training-only ones whose shape differs (another number of classes or queries)
    keep the fresh initialisation too. Every other key must match in name and shape. A model
    without these methods has no such keys.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (another architecture).
    """
    own = model.state_dict()
    training_only = _prefixes(model, "training_only_prefixes")
    report = LoadReport()
    for key in sorted(set(own) - set(state)):
        if key.startswith(training_only):
            report.skipped[key] = "not in checkpoint (training-only part, starts fresh)"
    for key in sorted(set(state) - set(own)):
        if key.startswith(training_only):
            report.skipped[key] = "not in model (training-only part not configured), dropped"
    if finetune:
        for key in sorted(set(state) & set(own)):
            if (key.startswith(_prefixes(model, "class_sized_prefixes") + training_only)
                    and own[key].shape != state[key].shape):
                report.skipped[key] = (f"shape {tuple(state[key].shape)} in checkpoint, "
                                       f"{tuple(own[key].shape)} in model (starts fresh)")
    state = {k: v for k, v in state.items() if k not in report.skipped}
    check_compatible(own, state, set(report.skipped))
    model.load_state_dict(state, strict=not report.skipped)
    report.loaded = sorted(state)
    return report


def _prefixes(model: nn.Module, method: str) -> tuple[str, ...]:
    """``model.<method>()`` (a tuple of state-dict prefixes), () when it has none."""
    return tuple(getattr(model, method)()) if hasattr(model, method) else ()


def check_compatible(own: dict[str, Tensor], state: dict[str, Tensor],
                     allowed: set[str] = frozenset()) -> None:
    """Raise CheckpointError unless ``state`` has exactly ``own``'s keys and shapes (keys in
    ``allowed`` may be missing)."""
    missing = sorted(set(own) - set(state) - allowed)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise CheckpointError("checkpoint does not fit this model (another architecture?): "
                              + "; ".join(parts))
