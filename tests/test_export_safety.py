"""An export replaces its folder, so it refuses every folder whose loss would hurt: `export last.ckpt .`
emptied the current folder (checkpoint included), and `fit --export.dirname .` deleted the run's
checkpoints and logs with exit 0. Also: previous exports are replaced safely, NaN weights are never
exported, and an export honours the umask."""

import json
import os
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import dpo_lightning.stages.export as export_mod
from dpo_lightning import DPOModule
from dpo_lightning.cli import main
from dpo_lightning.stages.export import EXPORT_MARKER, ExportError, HFExport, check_export_destination, export_hf
from dpo_lightning.training.checkpoint import AtomicCheckpointIO
from dpo_lightning.training.integrity import CheckpointError

from tiny import random_batch, tiny_config


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A DPOModule checkpoint as Lightning writes it (the keys load_from_checkpoint reads), built once."""
    module = DPOModule(model_config=tiny_config("llama"))
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": L.__version__},
        path,
    )
    return path.read_bytes()


@pytest.fixture
def run(tmp_path, checkpoint_bytes) -> Path:
    """A run folder: a checkpoint and a log, the things a bad export deleted."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(checkpoint_bytes)
    (run / "events.out.tfevents.1").write_text("logs")
    return run


def contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def export_cli(*args: str, capsys) -> tuple[int, str]:
    """`python -m dpo_lightning export ARGS` in this process: exit code and stderr."""
    code = 0
    try:
        main(["export", *args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_refusal(code: int, err: str, *words: str) -> None:
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("python -m dpo_lightning export: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_export_into_the_current_folder_is_refused(run, monkeypatch, capsys):
    monkeypatch.chdir(run / "checkpoints")
    before = contents(run)
    code, err = export_cli("last.ckpt", ".", capsys=capsys)
    assert_one_line_refusal(code, err, "the current folder or one of its parents")
    code, err = export_cli("last.ckpt", "..", capsys=capsys)  # a parent of it
    assert_one_line_refusal(code, err, "the current folder or one of its parents")
    assert contents(run) == before


def test_export_into_the_folder_holding_the_checkpoint_is_refused(run, capsys):
    before = contents(run)
    code, err = export_cli(str(run / "checkpoints" / "last.ckpt"), str(run), capsys=capsys)
    assert_one_line_refusal(code, err, "holds", "last.ckpt", "which the export would delete")
    assert contents(run) == before


def test_a_folder_that_is_not_a_previous_export_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = export_cli(str(run / "checkpoints" / "last.ckpt"), str(other), capsys=capsys)
    assert_one_line_refusal(code, err, "not empty (holds notes.txt)", f"no {EXPORT_MARKER}")
    assert (other / "notes.txt").read_text() == "mine"
    (other / "b.ckpt").write_text("x")  # a folder of checkpoints says so
    code, err = export_cli(str(run / "checkpoints" / "last.ckpt"), str(other), capsys=capsys)
    assert_one_line_refusal(code, err, "holds checkpoints: b.ckpt")


def test_a_previous_export_holding_checkpoints_is_refused(tmp_path):
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / EXPORT_MARKER).write_text("{}")
    check_export_destination(export)  # a previous export: replaceable
    (export / "sub" / "step3.ckpt").mkdir()
    (export / "sub" / "step3.ckpt" / ".metadata").write_bytes(b"x")  # a sharded checkpoint put there since
    with pytest.raises(ExportError, match="holds a checkpoint"):
        check_export_destination(export)
    with pytest.raises(ExportError, match="exists and is not a folder"):
        check_export_destination(export / EXPORT_MARKER)


def test_new_or_empty_folder_is_used_and_a_previous_export_replaced(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "last.ckpt"
    (tmp_path / "empty").mkdir()
    assert export_cli(str(ckpt), str(tmp_path / "empty"), capsys=capsys)[0] == 0
    assert (tmp_path / "empty" / "model.safetensors").exists()
    marker = json.loads((tmp_path / "empty" / EXPORT_MARKER).read_text())
    assert marker["source"] == str(ckpt.resolve()) and marker["dpo_lightning"] and marker["created"]
    (tmp_path / "empty" / "stale.txt").write_text("from the previous export")
    assert export_cli(str(ckpt), str(tmp_path / "empty"), capsys=capsys)[0] == 0  # replaced
    assert not (tmp_path / "empty" / "stale.txt").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "empty") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]  # nothing left aside


def test_a_failure_while_replacing_keeps_the_previous_export(run, tmp_path, monkeypatch):
    """Fault: renaming the new export into place fails after the old one was moved aside."""
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    export_mod.export_checkpoint(ckpt, out)
    (out / "mine.txt").write_text("old export")
    real_rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == out and self.name.startswith(".export.") and ".old." not in self.name:
            raise OSError("injected failure renaming the new export into place")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        export_mod.export_checkpoint(ckpt, out)
    monkeypatch.undo()
    assert (out / "mine.txt").read_text() == "old export" and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # no temporary or aside folder


def test_corrupt_checkpoint_fails_the_export_command_in_one_line(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-1000])  # a copy that broke off
    code, err = export_cli(str(ckpt), str(tmp_path / "out"), capsys=capsys)
    assert_one_line_refusal(code, err, str(ckpt), "truncated or damaged, not a complete zip archive")
    assert not (tmp_path / "out").exists()
    code, err = export_cli(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), capsys=capsys)
    assert_one_line_refusal(code, err, "missing.ckpt: no such file or folder")
    with pytest.raises(CheckpointError):  # the Python API raises the same error
        export_mod.export_checkpoint(ckpt, tmp_path / "out")


def test_non_finite_weights_are_never_exported(tmp_path):
    model = DPOModule(model_config=tiny_config("llama")).model
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
        list(model.parameters())[-1][0] = float("inf")
    with pytest.raises(ExportError, match=r"the policy has 2 non-finite tensor\(s\)"):
        export_hf(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_export_honours_the_umask(tmp_path, umask):
    model = DPOModule(model_config=tiny_config("llama")).model
    previous = os.umask(umask)
    try:
        out = export_hf(model, None, tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes.pop("out") == 0o777 & ~umask
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


# ---------------------------------------------------------------------------- the end-of-fit callback


@pytest.mark.parametrize("dirname", [".", "..", "/tmp/x", "a/../..", "../sibling", ""])
def test_hfexport_dirname_must_stay_inside_the_run_folder(dirname):
    with pytest.raises(ExportError, match="must name a new folder inside the run directory"):
        HFExport(dirname=dirname)
    assert HFExport(dirname="exports/final").dirname == "exports/final"


class Steps(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


def fit(root: Path, *callbacks: L.Callback) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, callbacks=list(callbacks),
    )
    trainer.fit(DPOModule(model_config=tiny_config("llama")), DataLoader([random_batch(b=2)], batch_size=None))
    return trainer


def test_hfexport_refuses_a_bad_destination_before_any_training(tmp_path):
    # The checkpoint folder of the run (which does not exist yet)...
    steps = Steps()
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints")
    with pytest.raises(ExportError, match="checkpoints itself .a checkpoint, or the run's checkpoint folder"):
        fit(tmp_path, steps, saver, HFExport(dirname="checkpoints"))
    # ... or a folder holding something else.
    (tmp_path / "hf_export").mkdir()
    (tmp_path / "hf_export" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"not a previous export .no {EXPORT_MARKER}"):
        fit(tmp_path, steps, HFExport())
    assert steps.batches == 0 and (tmp_path / "hf_export" / "notes.txt").read_text() == "mine"


class PoisonAtEnd(L.Callback):
    """A NaN reaches the weights after the last step (what NonFiniteGuard exists to prevent)."""

    def on_train_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            next(pl_module.model.parameters()).fill_(float("nan"))


def test_hfexport_writes_a_marked_export_and_refuses_nan_weights(tmp_path):
    fit(tmp_path, HFExport())
    marker = json.loads((tmp_path / "hf_export" / EXPORT_MARKER).read_text())
    assert marker["source"] == "end of fit, step 1"
    with pytest.raises(ExportError, match=r"has 1 non-finite tensor\(s\)"):
        fit(tmp_path, PoisonAtEnd(), HFExport())
    # The previous export is still there, untouched.
    assert json.loads((tmp_path / "hf_export" / EXPORT_MARKER).read_text()) == marker


def test_a_killed_exports_leftovers_are_removed_by_the_next_export(tmp_path):
    """kill -9 during an export leaves `.hf_export.<host>-<pid>.<random>` beside it (seen in the kill -9
    trials): the next export removes it when its writer is dead, keeps a live writer's, removes an
    unfinished one of the older unnamed pattern older than this process, and removes a replaced
    export's `.old.` copy only once a complete export stands in place."""
    import subprocess
    import sys
    import time

    from dpo_lightning.training.checkpoint import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "hf_export"
        leftovers = {
            "dead": tmp_path / f".hf_export.{_HOST}-{dead.pid}.abcd1234",
            "live": tmp_path / f".hf_export.{_HOST}-{live.pid}.efgh5678",
            "legacy": tmp_path / ".hf_export.osv4is3m",
            "aside": tmp_path / ".hf_export.old.0123abcd",
        }
        for folder in leftovers.values():
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(leftovers["legacy"], (old, old))
        model = AutoModelForCausalLM.from_config(
            __import__("transformers").AutoConfig.for_model(**tiny_config())
        )
        export_hf(model, None, out)  # no export stood there yet: the aside may be the only copy, kept
        assert not leftovers["dead"].exists() and not leftovers["legacy"].exists()
        assert leftovers["live"].exists() and leftovers["aside"].exists()
        export_hf(model, None, out)  # a complete export stands now: the aside goes
        assert not leftovers["aside"].exists() and leftovers["live"].exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([leftovers["live"].name, "hf_export"])
    finally:
        live.kill()
        live.wait()
