"""Two gloo processes with one image each give the segmentation model the gradients of one
process with both: the lazy masks (computed in the criterion, after DDP's forward) reach
DDP's gradient reduction like the rest."""

import dataclasses
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr.config import LossConfig
from detr.models.criterion import build_criterion
from detr.models.detr import build_model
from tests.conftest import TINY
from tests.unit.test_segmentation_model import _targets

# frozen BatchNorm: per-process batch statistics would differ from one process's
CFG = dataclasses.replace(TINY, task="segmentation", norm="frozen_bn")


def _data():
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 64, generator=g)]
    return images, _targets([(64, 64), (48, 64)])


def _model():
    torch.manual_seed(0)
    return build_model(CFG).train()


def _grads(model, images, targets, wrapped=None) -> dict[str, torch.Tensor]:
    criterion = build_criterion(5, LossConfig(), model.aids)
    criterion.total(criterion((wrapped or model)(images), targets)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        images, targets = _data()
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        grads = _grads(model, [images[rank]], [targets[rank]], ddp)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2)
    ddp = torch.load(out)
    one = _grads(_model(), *_data())
    assert set(ddp) == set(one)
    assert any(n.startswith("mask_head.") for n in one)
    for name, grad in one.items():
        torch.testing.assert_close(ddp[name], grad, atol=1e-5, rtol=1e-4, msg=name)
