"""What the benchmarks share: the model configs they compare at, and the official DETR code.

The official code (facebookresearch/detr) is never a dependency: a benchmark takes
``--official PATH`` (a checkout, e.g. ``git archive`` of the mirror into /work/official-detr)
and skips the official rows without it. :func:`import_official` puts the checkout on
``sys.path`` (its top-level packages are ``models``, ``datasets``, ``util``, ``engine``) and
stops its backbone from downloading ImageNet weights; :func:`official_args` is the
``argparse.Namespace`` its ``main.py`` would parse, with our config's values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr.config import LossConfig, ModelConfig  # noqa: E402

# The official architecture (frozen BN, frozen stem) so that comparisons are at equal config.
MODEL_CONFIGS = {
    "tiny": ModelConfig(num_classes=5, backbone="resnet18", hidden_dim=64, nheads=4,
                        enc_layers=2, dec_layers=2, dim_feedforward=256, num_queries=20),
    "r50": ModelConfig(),
}


def device_name(device: torch.device) -> str:
    """A line naming the device and the torch version, for the top of a table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU x{torch.get_num_threads()} threads")
    return f"device: {name}; torch {torch.__version__}"


def import_official(repo: Path) -> None:
    """Make the official checkout at ``repo`` importable, without weight downloads.

    Raises:
        FileNotFoundError: ``repo`` is not a facebookresearch/detr checkout (no main.py).
    """
    import torchvision

    if not (Path(repo) / "main.py").is_file() or not (Path(repo) / "models").is_dir():
        raise FileNotFoundError(f"--official {repo}: not a facebookresearch/detr checkout "
                                f"(no main.py / models/ there)")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):  # ignore pretrained=True
        original = getattr(torchvision.models, name)
        if getattr(original, "_no_download", False):
            continue

        def patched(*a, _f=original, pretrained=None, **k):
            return _f(*a, **k)

        patched._no_download = True
        setattr(torchvision.models, name, patched)


def official_args(cfg: ModelConfig, device: torch.device, **extra) -> argparse.Namespace:
    """The official ``main.py`` arguments for model ``cfg`` (``dataset_file="coco"``: 91
    classes) with the paper's loss and optimiser values; ``extra`` adds or overrides keys."""
    loss = LossConfig()
    args = argparse.Namespace(
        dataset_file="coco", device=str(device), backbone=cfg.backbone, lr_backbone=1e-5,
        masks=False, dilation=cfg.dilation, position_embedding=cfg.position_embedding,
        hidden_dim=cfg.hidden_dim, dropout=cfg.dropout, nheads=cfg.nheads,
        dim_feedforward=cfg.dim_feedforward, enc_layers=cfg.enc_layers,
        dec_layers=cfg.dec_layers, pre_norm=cfg.pre_norm, num_queries=cfg.num_queries,
        aux_loss=cfg.aux_loss, frozen_weights=None, set_cost_class=loss.set_cost_class,
        set_cost_bbox=loss.set_cost_bbox, set_cost_giou=loss.set_cost_giou,
        bbox_loss_coef=loss.bbox_loss_coef, giou_loss_coef=loss.giou_loss_coef,
        eos_coef=loss.eos_coef, mask_loss_coef=1, dice_loss_coef=1, lr=1e-4,
        weight_decay=1e-4, clip_max_norm=0.1, batch_size=2, num_workers=2)
    vars(args).update(extra)
    return args
