"""AtomicCheckpointIO: a checkpoint file is either the old one or the new one, never half of one."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import dpo_lightning.training.checkpoint as ckpt_mod
from dpo_lightning import DPOModule
from dpo_lightning.training.checkpoint import AtomicCheckpointIO

from tiny import random_batch, tiny_config


class DiskFull(RuntimeError):
    pass


def crash_mid_write(monkeypatch):
    """Make the next save write 100 bytes of the file and then fail, as a full disk or a kill would."""
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"\x80" * 100)
        raise DiskFull("injected failure mid-save")

    monkeypatch.setattr(ckpt_mod.torch, "save", partial_save)
    return real_save


def test_roundtrip_and_no_temporary_files_left(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(5.0)}, "global_step": 3}
    io.save_checkpoint(state, tmp_path / "sub" / "a.ckpt")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.ckpt"]
    loaded = io.load_checkpoint(tmp_path / "sub" / "a.ckpt")
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.arange(5.0))


def test_failure_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    crash_mid_write(monkeypatch)
    with pytest.raises(DiskFull):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the last good checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # and no debris


def test_failure_on_first_save_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    crash_mid_write(monkeypatch)
    with pytest.raises(DiskFull):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


class CrashSaveAtStep(L.Callback):
    """Before the checkpoint of step ``step`` is written, make writing fail mid-file."""

    def __init__(self, step: int, monkeypatch) -> None:
        self.step, self.monkeypatch = step, monkeypatch

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            crash_mid_write(self.monkeypatch)


def test_training_crash_while_saving_leaves_a_loadable_last_checkpoint(tmp_path, monkeypatch):
    """A fit saving after every step dies while writing step 3's checkpoint: last.ckpt still holds
    step 2, loads, and training resumes from it."""
    data = DataLoader([random_batch(b=2, seed=i) for i in range(4)], batch_size=None)

    def trainer(**kw):
        return L.Trainer(
            accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=[AtomicCheckpointIO()], **kw,
        )

    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises(DiskFull):
        trainer(callbacks=[CrashSaveAtStep(3, monkeypatch), saver]).fit(
            DPOModule(model_config=tiny_config("llama")), data
        )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # also: loads without pickled code
    assert checkpoint["global_step"] == 2
    module = DPOModule(model_config=tiny_config("llama"))
    resumed = trainer(enable_checkpointing=False)
    resumed.fit(module, data, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 4
