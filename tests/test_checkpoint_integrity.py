"""check_checkpoint: a damaged checkpoint fails with an error naming the file and the damage, where
torch.load fails with an unpickling error or, worse, returns wrong weights. Also: AtomicCheckpointIO
removes the temporary files a killed save left, and writes files as the umask says."""

import logging
import os
import stat
import struct
import time
import warnings
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from dpo_lightning import DPOModule
from dpo_lightning.training.checkpoint import AtomicCheckpointIO, remove_orphaned_temporaries
from dpo_lightning.training.integrity import CheckpointError, CheckpointNotFoundError, check_checkpoint

from tiny import random_batch, tiny_config

WEIGHT = torch.arange(1000.0)


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": WEIGHT}, "global_step": 3}, path)
    return path


def flip_byte_in_tensor_data(path: Path, at: int = 400) -> None:
    """Invert one byte inside the stored bytes of the first tensor (a bad disk block, a bit flip in transit)."""
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    # A zip local header is 30 bytes, then the record's name and extra field, then its data.
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_good_checkpoint_passes_and_loads(saved):
    check_checkpoint(saved)
    assert AtomicCheckpointIO().load_checkpoint(saved)["global_step"] == 3


def test_a_flipped_byte_in_tensor_data_is_caught_where_torch_load_returns_wrong_weights(saved):
    flip_byte_in_tensor_data(saved)
    # The bug: torch.load reads the damaged file without a word, and one weight is silently different.
    damaged = torch.load(saved, weights_only=True)["state_dict"]["w"]
    assert not torch.equal(damaged, WEIGHT) and int((damaged != WEIGHT).sum()) == 1
    with pytest.raises(CheckpointError, match=r"record .*/data/0 fails its CRC check: the file is corrupt") as err:
        check_checkpoint(saved)
    assert str(saved) in str(err.value)
    with pytest.raises(CheckpointError, match="fails its CRC check"):  # and so does the Lightning load path
        AtomicCheckpointIO().load_checkpoint(saved)


def test_structure_only_check_skips_the_data(saved):
    """verify_crc=False reads the zip directory alone: cheap, catches a cut-off file, not a flipped byte."""
    flip_byte_in_tensor_data(saved)
    check_checkpoint(saved, verify_crc=False)
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a complete zip archive"):
        check_checkpoint(saved, verify_crc=False)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file or folder") as err:
        check_checkpoint(tmp_path / "nope.ckpt")
    assert isinstance(err.value, FileNotFoundError)  # what Lightning's own load raises there
    assert str(tmp_path / "nope.ckpt") in str(err.value)


def test_empty_file(tmp_path):
    (tmp_path / "last.ckpt").touch()
    with pytest.raises(CheckpointError, match=r"last.ckpt: empty: an interrupted save\?"):
        check_checkpoint(tmp_path / "last.ckpt")


def test_truncated_file(saved):
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged, not a complete zip archive"):
        AtomicCheckpointIO().load_checkpoint(saved)


def test_not_a_zip_archive(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        check_checkpoint(tmp_path / "notes.ckpt")


@pytest.mark.parametrize("name", ["model.safetensors", "renamed.ckpt"])
def test_safetensors_weights_are_told_apart(tmp_path, name):
    save_file({"w": WEIGHT}, tmp_path / name)
    with pytest.raises(CheckpointError, match="a safetensors weights file, not a training checkpoint: give it as"):
        check_checkpoint(tmp_path / name)


def test_hugging_face_model_folder_is_told_apart(tmp_path):
    save_file({"w": WEIGHT}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="a Hugging Face model folder, not a training checkpoint"):
        check_checkpoint(tmp_path)


def test_checkpoint_saved_without_crc_passes_with_a_warning(tmp_path, caplog):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": WEIGHT}, tmp_path / "nocrc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    with caplog.at_level(logging.WARNING, logger="dpo_lightning.training.checkpoint"):
        check_checkpoint(tmp_path / "nocrc.ckpt")
    assert "saved without CRC32 checksums" in caplog.text


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A sharded checkpoint folder as ModelParallelStrategy writes it: DCP shards + .metadata, then meta.pt."""
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "step2.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": {"w": WEIGHT}, "optimizer_0": {"m": torch.ones(3)}}, checkpoint_id=path)
    torch.save({"global_step": 2}, path / "meta.pt")
    return path


def test_sharded_checkpoint_folder(sharded):
    check_checkpoint(sharded)
    shard = next(sharded.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is truncated"):
        check_checkpoint(sharded)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} named in .metadata is missing"):
        check_checkpoint(sharded)


def test_sharded_checkpoint_without_metadata_or_meta_pt(sharded):
    (sharded / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="no meta.pt: the save was interrupted"):
        check_checkpoint(sharded)
    (sharded / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="a folder without .metadata"):
        check_checkpoint(sharded)


# ---------------------------------------------------------------------------- orphans


def make_orphan(folder: Path, name: str, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"\x80" * 100)  # what a save killed mid-write leaves
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_first_save_into_a_folder_removes_orphans_of_killed_saves(tmp_path, caplog):
    old = make_orphan(tmp_path, ".last.ckpt.k3x_9a2b.tmp", age_s=3600)  # from a run killed an hour ago
    running = make_orphan(tmp_path, ".last.ckpt.zz11yy22.tmp", age_s=0)  # another process saving right now
    foreign = make_orphan(tmp_path, ".notes.txt.abcdefgh.tmp", age_s=3600)  # not our naming pattern
    io = AtomicCheckpointIO()
    with caplog.at_level(logging.WARNING, logger="dpo_lightning.training.checkpoint"):
        io.save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert not old.exists() and running.exists() and foreign.exists()
    assert "Removed 1 temporary file(s)" in caplog.text and old.name in caplog.text
    # Once per folder: later saves do not list the folder again.
    later = make_orphan(tmp_path, ".last.ckpt.aaaabbbb.tmp", age_s=3600)
    io.save_checkpoint({"global_step": 2}, tmp_path / "last.ckpt")
    assert later.exists()
    assert remove_orphaned_temporaries(tmp_path) == [later.name]


def test_a_dead_writers_temporary_is_removed_at_once_and_a_live_ones_kept(tmp_path):
    """A resume that starts right after a kill (40 ms later in the kill -9 trials) removes the killed
    save's file: its name says which process wrote it, and that process is gone. Age does not matter."""
    import subprocess
    import sys

    from dpo_lightning.training.checkpoint import _HOST

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = make_orphan(tmp_path, f".last.ckpt.{_HOST}-{int(finished.stdout)}.abcdefgh.tmp", age_s=0)
    live = make_orphan(tmp_path, f".last.ckpt.{_HOST}-{os.getppid()}.zzzzzzzz.tmp", age_s=3600)
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert not dead.exists() and live.exists()
    assert [p.name for p in tmp_path.glob(".last.ckpt.*.tmp")] == [live.name]  # the new save left none


# ---------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_saved_checkpoint_honours_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o666 & ~umask


def test_resuming_fit_from_a_corrupt_checkpoint_fails_naming_it(saved, tmp_path):
    """The Lightning path: Trainer(plugins=[AtomicCheckpointIO()]).fit(ckpt_path=...) loads through it."""
    flip_byte_in_tensor_data(saved)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(CheckpointError, match=f"checkpoint {saved}: record .* fails its CRC check"):
        trainer.fit(DPOModule(model_config=tiny_config("llama")), DataLoader([random_batch()], batch_size=None),
                    ckpt_path=saved)
    assert trainer.global_step == 0
