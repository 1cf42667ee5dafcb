"""Weights that cannot be downloaded (an offline machine) fail at once, naming the URL and the
file to drop in torch.hub's cache."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch

from detr.checkpoint import CheckpointError, load_file
from detr.downloads import WeightsUnavailableError, cache_path
from detr.hub import OFFICIAL_BASE_URL
from detr.models.backbone import Backbone


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (every download raises URLError) and an empty torch.hub cache."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return calls


def test_an_official_checkpoint_url_names_the_url_and_the_cache_file(offline, tmp_path):
    url = OFFICIAL_BASE_URL + "detr-r50-e632da11.pth"
    with pytest.raises(CheckpointError) as err:
        load_file(url)
    message = str(err.value)
    assert url in message and "Offline?" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "detr-r50-e632da11.pth") in message
    assert offline == [url]  # one attempt, no retries


def test_imagenet_backbone_weights_name_the_setting_the_url_and_the_cache_file(offline):
    with pytest.raises(WeightsUnavailableError) as err:
        Backbone("resnet18", weights="imagenet", norm="bn", last_stage="layer2")
    message = str(err.value)
    (url,) = offline
    assert message.startswith("model.backbone_weights: imagenet: cannot download " + url)
    assert str(cache_path(url)) in message and url.endswith("resnet18-f37072fd.pth")


def test_a_file_that_is_not_a_checkpoint_is_not_called_a_download_error(tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_file(bad)
    assert str(bad) in str(err.value) and "download" not in str(err.value)
