"""Shared fixtures: tiny model configs that run in milliseconds on a CPU."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from detr.config import (
    AidsConfig,
    DenoisingConfig,
    DenseConfig,
    ModelConfig,
    QueryGroupsConfig,
)

TINY = ModelConfig(num_classes=5, backbone="resnet18", norm="bn", freeze_stem=False,
                   hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
                   dropout=0.0, num_queries=8)


def with_aids(cfg: ModelConfig, *, dense: dict | None = None, query_groups: int | None = None,
              denoising: dict | None = None) -> ModelConfig:
    """``cfg`` with the given training aids (``dense``/``denoising``: their section's keys;
    ``query_groups``: the number of groups); the others off."""
    return dataclasses.replace(cfg, aids=AidsConfig(
        dense=None if dense is None else DenseConfig(**dense),
        query_groups=None if query_groups is None else QueryGroupsConfig(groups=query_groups),
        denoising=None if denoising is None else DenoisingConfig(**denoising)))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_official_cfg() -> ModelConfig:
    """Tiny, but with the official (frozen BN, frozen stem) backbone."""
    return dataclasses.replace(TINY, norm="frozen_bn", freeze_stem=True)


def pytest_collection_modifyitems(items):
    """Tests marked ``last`` go to the end of their module, after pytest-randomly's shuffle
    (it keeps each module together): they end what the module's fixtures share (e.g.
    test_servers' `make stop`). Everything else keeps the shuffled order."""
    first = {}
    for index, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], index)
    items.sort(key=lambda item: (first[item.nodeid.split("::")[0]],
                                 item.get_closest_marker("last") is not None))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _mlflow_settings():
    """Snapshot ``MLFLOW_*`` of the environment; calling the result puts it back and clears
    MLflow's process-wide URIs. ``mlflow.set_tracking_uri`` (``tracking.configure``) writes
    ``MLFLOW_TRACKING_URI`` into ``os.environ``, where a monkeypatch that only deleted it
    does not undo it: the next module (and the subprocesses its stages start) would log into
    this one's store."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}

    def restore() -> None:
        for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
            del os.environ[key]
        os.environ.update(saved)
        if "mlflow" in sys.modules:
            mlflow = sys.modules["mlflow"]
            mlflow.set_tracking_uri(saved.get("MLFLOW_TRACKING_URI"))
            mlflow.set_registry_uri(saved.get("MLFLOW_REGISTRY_URI"))
            os.environ.update(saved)  # set_*_uri(None) does not touch what was saved

    return restore


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_mlflow_settings():
    """Module fixtures that configure MLflow leave nothing for the next module."""
    restore = _mlflow_settings()
    yield
    restore()


@pytest.fixture(autouse=True)
def _test_leaves_mlflow_settings():
    """Nor does a test leave them to the next one (in whatever order they run)."""
    restore = _mlflow_settings()
    yield
    restore()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A canonical COCO dataset of 8 train and 4 val synthetic 64 px images."""
    from detr.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_dataset")
    generate(root, num_train=8, num_val=4, image_size=64, max_objects=3, seed=0, num_workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    """A training checkpoint of a tiny model after one epoch on the tiny dataset (read-only:
    tests that change a checkpoint copy it first)."""
    from detr.train import fit

    model, loss, data, train = tiny_training(epochs=1)
    return fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
               data_root=tiny_dataset, out_dir=tmp_path_factory.mktemp("tiny_checkpoint"),
               progress=False, evaluate_at_end=False).checkpoint


def tiny_training(**train_overrides):
    """(model, loss, data, train) configs that train a step in well under a second."""
    from detr.config import DataConfig, LossConfig, TrainConfig

    data = DataConfig(scales=(64,), max_size=64, crop_scales=(64,), crop_size=(48, 64),
                      num_workers=0)
    train = TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3,
                           "lr_drop": 1, "precision": "fp32", "channels_last": False,
                           "device": "cpu", **train_overrides})
    return TINY, LossConfig(), data, train


@pytest.fixture(scope="module")
def prefect_server():
    """A throwaway Prefect server and database for tests that run flows for real. Module
    scope: while it is up, stages run as flows, so it must not leak into other modules."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
