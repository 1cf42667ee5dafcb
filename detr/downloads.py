"""Weights fetched by URL (official DETR checkpoints, torchvision's ImageNet backbones): where
they are cached, and the error that says so when the download fails (offline machines)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch


class WeightsUnavailableError(RuntimeError):
    """Weights named by URL could not be downloaded (the message says where to put them)."""


def cache_path(url: str) -> Path:
    """Where ``torch.hub`` keeps (and first looks for) the file of ``url``:
    ``$TORCH_HOME/hub/checkpoints/<file name>`` (``~/.cache/torch`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def unavailable(url: str, exc: BaseException) -> str:
    """The message for a download of ``url`` that failed: the URL, why, and the file to drop
    in place (fetch it on a machine with internet; hash-checked names are kept)."""
    return (f"cannot download {url} ({type(exc).__name__}: {exc}). Offline? Copy the file to "
            f"{cache_path(url)} (it is read from there without a download), or point the "
            f"setting at a local file")


def is_download_error(exc: BaseException) -> bool:
    """A network failure (no route, DNS, refused, timeout, HTTP error) rather than a bad file."""
    from urllib.error import URLError

    return isinstance(exc, URLError | ConnectionError | TimeoutError)
