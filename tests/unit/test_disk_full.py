"""A disk that fills up (or any I/O error) while training writes its checkpoint: the error
surfaces, the previous epoch's checkpoint stays intact and loadable, no temporary file is left
behind, and the next run resumes from it."""

from __future__ import annotations

import errno

import pytest
import torch

from detr.checkpoint import load_file
from detr.train import fit
from tests.conftest import tiny_training


@pytest.mark.slow
def test_disk_full_at_epoch_1_keeps_epoch_0_and_the_next_run_resumes(tiny_dataset, tmp_path,
                                                                    monkeypatch, capsys):
    model, loss, data, train = tiny_training(epochs=2)
    kwargs = {"model_cfg": model, "loss_cfg": loss, "data_cfg": data, "train_cfg": train,
              "data_root": tiny_dataset, "out_dir": tmp_path, "progress": False,
              "evaluate_at_end": False}
    real_save, saves = torch.save, []

    def disk_fills_on_the_second_save(obj, f, *args, **kw):
        saves.append(obj["epoch"])
        if len(saves) == 2:
            f.write(b"\0" * 4096)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", disk_fills_on_the_second_save)
    with pytest.raises(OSError, match="No space left on device"):
        fit(**kwargs)
    assert saves == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary file
    kept = load_file(tmp_path / "checkpoint.pth")
    assert kept["epoch"] == 0 and len(kept["history"]) == 1

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    result = fit(**kwargs)
    assert "resuming after epoch 0" in capsys.readouterr().err
    assert result.start_epoch == 1 and load_file(result.checkpoint)["epoch"] == 1
