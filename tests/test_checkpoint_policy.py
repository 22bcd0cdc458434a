"""What checkpoints cost and how they reach the disk at scale (issue #18): the best checkpoint and
``last.ckpt`` of one step are one set of files (hard links), sharded saves are atomic, LoRA
checkpoints hold adapters only, and an export reads the policy alone, in the training dtype."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_lightning import DPOModule
from dpo_lightning.stages.export import HFExport, export_checkpoint
from dpo_lightning.stages.options import LoraOptions, MemoryOptions
from dpo_lightning.training.callbacks import LatestModelCheckpoint
from dpo_lightning.training.checkpoint import remove_orphaned_temporaries, replace_atomically, temporary_path
from dpo_lightning.training.distributed import consolidate_checkpoint
from dpo_lightning.training.integrity import check_checkpoint
from dpo_lightning.training.runs import read_checkpoint_header

from tiny import random_batch, tiny_config

BATCHES = [random_batch(seed=i) for i in range(6)]


@pytest.fixture(autouse=True)
def no_process_group_left():
    """A one-process ModelParallelStrategy run opens a process group (a TCP store on MASTER_PORT) in this
    process and sets MASTER_PORT & co.: close it and restore the environment, or later 2-process tests
    inherit a port that is taken."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _fit(module, folder: Path, *, steps: int, sharded: bool = False, val_every: int | None = None,
         precision: str = "32-true", ckpt_path: str | None = None, **checkpoint):
    callback = LatestModelCheckpoint(
        dirpath=folder, save_last=True, monitor="val/loss" if val_every else None, filename="step{step}",
        **{"save_every_n_steps": 1, **checkpoint},
    )
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if sharded else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, val_check_interval=val_every,
        precision=precision, logger=False, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the batches in list order under every strategy (no epoch shuffling)
    )
    val = DataLoader(BATCHES[:2], batch_size=None) if val_every else None
    trainer.fit(module, DataLoader(BATCHES, batch_size=None), val, ckpt_path=ckpt_path)
    return trainer, callback


def _files(path: Path) -> dict[str, os.stat_result]:
    if path.is_file():
        return {"": path.stat()}
    return {str(p.relative_to(path)): p.stat() for p in sorted(path.rglob("*")) if p.is_file()}


def _module(**kwargs) -> DPOModule:
    return DPOModule(model_config=tiny_config(), memory=MemoryOptions(fsdp_mixed_precision=False), **kwargs)


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
def test_best_and_last_of_one_step_are_hard_links_and_part_when_last_moves_on(tmp_path, sharded):
    """Validation at step 3 writes the best checkpoint and last.ckpt: one write, two names (same inodes).
    Steps 4 and 5 replace last.ckpt with new files; the best keeps its own, intact."""
    trainer, callback = _fit(_module(), tmp_path, steps=5, sharded=sharded, val_every=3, save_every_n_steps=None,
                             save_every_minutes=None)
    best, last = Path(callback.best_model_path), tmp_path / "last.ckpt"
    assert best.name == "stepstep=3.ckpt"
    assert read_checkpoint_header(best)["global_step"] == 3
    assert read_checkpoint_header(last)["global_step"] == 5  # the end of training, written on its own
    check_checkpoint(best)
    check_checkpoint(last)
    assert not set(s.st_ino for s in _files(best).values()) & set(s.st_ino for s in _files(last).values())


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
def test_a_validation_step_writes_one_copy(tmp_path, sharded):
    _, callback = _fit(_module(), tmp_path, steps=3, sharded=sharded, val_every=3, save_every_n_steps=None,
                       save_every_minutes=None)
    best, last = _files(Path(callback.best_model_path)), _files(tmp_path / "last.ckpt")
    assert best.keys() == last.keys() and best
    assert all(best[k].st_ino == last[k].st_ino and best[k].st_nlink == 2 for k in best)
    # Resuming from the linked last.ckpt continues the run (its state is the step's, whole).
    trainer, _ = _fit(_module(), tmp_path / "more", steps=4, sharded=sharded, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 4


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
def test_a_run_resumed_from_a_last_ckpt_linked_to_the_best_keeps_writing_last_ckpt(tmp_path, sharded):
    """last.ckpt linked to the best checkpoint of its step holds the state written under the best's name, before
    last.ckpt existed: it names no last file. Resumed in its folder, the run must still write last.ckpt, not
    last-v1.ckpt beside a last.ckpt left at the old step (which `--ckpt_path last`, an export or a requeued job
    would then read: a requeue loop from the old step), and a second resume to the same step trains nothing."""
    _fit(_module(), tmp_path, steps=3, sharded=sharded, val_every=3, save_every_n_steps=None, save_every_minutes=None)
    assert _files(tmp_path / "last.ckpt")[next(iter(_files(tmp_path / "last.ckpt")))].st_nlink == 2  # linked
    for _ in range(2):
        trainer, _ = _fit(_module(), tmp_path, steps=5, sharded=sharded, val_every=3, save_every_n_steps=None,
                          save_every_minutes=None, ckpt_path=str(tmp_path / "last.ckpt"))
        assert trainer.global_step == 5
        assert read_checkpoint_header(tmp_path / "last.ckpt")["global_step"] == 5
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("last")) == ["last.ckpt"]


def test_a_sharded_save_that_fails_leaves_the_previous_checkpoint_and_no_debris(tmp_path, monkeypatch):
    import lightning.pytorch.strategies.model_parallel as mp

    real = mp._distributed_checkpoint_save
    calls = []

    def dies_on_second_save(state, path):
        calls.append(path)
        if len(calls) == 2:
            (Path(path) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        real(state, path)

    monkeypatch.setattr(mp, "_distributed_checkpoint_save", dies_on_second_save)
    with pytest.raises(OSError, match="No space"):
        _fit(_module(), tmp_path, steps=3, sharded=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    check_checkpoint(tmp_path / "last.ckpt")
    assert read_checkpoint_header(tmp_path / "last.ckpt")["global_step"] == 1
    assert Path(calls[1]).name.startswith(".last.ckpt.") and Path(calls[1]).name.endswith(".tmp")


def test_a_killed_sharded_save_is_cleaned_up_by_the_next_one(tmp_path):
    """A writer killed mid-save (its pid gone) left a temporary folder: the next save removes it."""
    from dpo_lightning.training.checkpoint import _HOST

    left = tmp_path / f".last.ckpt.{_HOST}-999999.abcd1234.tmp"  # no process has pid 999999 here
    left.mkdir()
    (left / "__0_0.distcp").write_bytes(b"x")
    _fit(_module(), tmp_path, steps=1, sharded=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_replacing_a_folder_without_an_atomic_exchange_can_be_recovered(tmp_path, monkeypatch):
    """Where renameat2 exchange is unavailable, the old checkpoint goes aside first; a crash before the new one
    is renamed in leaves it aside, and the next cleanup puts it back under its name."""
    import dpo_lightning.training.checkpoint as ck

    old = tmp_path / "last.ckpt"
    old.mkdir()
    (old / "meta.pt").write_bytes(b"old")
    new = temporary_path(old)
    new.mkdir()
    (new / "meta.pt").write_bytes(b"new")
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    replace_atomically(new, old)
    assert (old / "meta.pt").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    newer = temporary_path(old)
    newer.mkdir()
    real_rename = Path.rename

    def crash_on_the_second_rename(self, target):
        if self == newer:
            raise KeyboardInterrupt("killed between the two renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_atomically(newer, old)
    monkeypatch.undo()
    assert not old.exists()  # the crash window: only the aside copy holds it
    remove_orphaned_temporaries(tmp_path)
    assert (old / "meta.pt").read_bytes() == b"new"


def test_atomic_exchange_swaps_folders_on_this_machine(tmp_path):
    from dpo_lightning.training.checkpoint import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not _exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here (the fallback is tested above)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ---------------------------------------------------------------------------- LoRA


@pytest.fixture
def base_folder(tmp_path) -> Path:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    return folder


def _lora(base: Path) -> DPOModule:
    return DPOModule(model=str(base), reference="adapter", lora=LoraOptions(r=4, alpha=8, target_modules="all-linear"))


def test_lora_checkpoint_holds_adapters_only_and_loads_back_whole(tmp_path, base_folder):
    trainer, _ = _fit(_lora(base_folder), tmp_path / "ck", steps=2)
    trained = trainer.lightning_module.state_dict()
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    policy = [k for k in ckpt["state_dict"] if k.startswith("model.")]
    assert policy and all("lora_" in k for k in policy), policy
    trainable = {f"model.{n}" for n, p in trainer.lightning_module.model.named_parameters() if p.requires_grad}
    assert set(policy) == trainable
    loaded = DPOModule.load_from_checkpoint(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A resumed run continues from it.
    resumed, _ = _fit(_lora(base_folder), tmp_path / "ck2", steps=3, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.global_step == 3


def test_lora_checkpoint_refuses_a_base_that_changed(tmp_path, base_folder):
    _fit(_lora(base_folder), tmp_path / "ck", steps=1)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    model.save_pretrained(base_folder)
    with pytest.raises(ValueError, match="different weights"):
        DPOModule.load_from_checkpoint(tmp_path / "ck" / "last.ckpt", weights_only=True)


def test_lora_checkpoint_exports_merged_like_the_trained_module(tmp_path, base_folder):
    trainer, _ = _fit(_lora(base_folder), tmp_path / "ck", steps=2)
    out = export_checkpoint(tmp_path / "ck" / "last.ckpt", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    merged = trainer.lightning_module.model.merge_and_unload()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapter", ["merged", "adapter"])
def test_the_end_of_fit_export_of_a_lora_policy_under_fsdp2_equals_its_checkpoints(tmp_path, base_folder, adapter):
    """The end-of-fit export of LoRA under FSDP2 failed ("FSDP does not support deepcopy"), exit 1 after training;
    it writes what `export` makes of the run's sharded checkpoint."""
    from peft import PeftModel

    module = DPOModule(model=str(base_folder), reference="adapter", memory=MemoryOptions(fsdp_mixed_precision=False),
                       lora=LoraOptions(r=4, alpha=8, target_modules="all-linear"))
    callback = LatestModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        max_steps=2, logger=False, default_root_dir=tmp_path / "run", enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback, HFExport(adapter=adapter)], use_distributed_sampler=False,
    )
    trainer.fit(module, DataLoader(BATCHES, batch_size=None))
    assert (tmp_path / "ck" / "last.ckpt").is_dir()  # sharded
    reference = export_checkpoint(tmp_path / "ck" / "last.ckpt", tmp_path / "from_ckpt", adapter=adapter)
    if adapter == "merged":
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_export").state_dict()
        expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    else:
        base = AutoModelForCausalLM.from_pretrained(base_folder)
        exported = PeftModel.from_pretrained(base, tmp_path / "run" / "hf_export").state_dict()
        base = AutoModelForCausalLM.from_pretrained(base_folder)
        expected = PeftModel.from_pretrained(base, reference).state_dict()
        assert any("lora_" in k for k in exported)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    changed = AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
    assert adapter == "adapter" or any(not torch.equal(changed[k], exported[k]) for k in changed)


# ---------------------------------------------------------------------------- export


def test_export_of_a_sharded_checkpoint_reads_the_policy_alone(tmp_path, monkeypatch):
    """No optimizer state and no reference are loaded, and no model is built but on the meta device."""
    import dpo_lightning.models.loading as models

    _fit(_module(), tmp_path / "ck", steps=2, sharded=True)
    last = tmp_path / "ck" / "last.ckpt"
    policy = consolidate_checkpoint(last, only="state_dict.model.")
    assert "optimizer_states" not in policy and policy["state_dict"]
    assert all(k.startswith("model.") for k in policy["state_dict"])

    def no_loading(*args, **kwargs):
        raise AssertionError("the export loaded a model")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    out = export_checkpoint(last, tmp_path / "export")
    monkeypatch.undo()
    exported = AutoModelForCausalLM.from_pretrained(out)
    for key, value in policy["state_dict"].items():
        assert torch.equal(exported.state_dict()[key.removeprefix("model.")], value), key


def test_export_dtype_follows_training_unless_told(tmp_path):
    _fit(_module(), tmp_path / "ck", steps=1, precision="bf16-mixed")
    last = tmp_path / "ck" / "last.ckpt"
    auto = export_checkpoint(last, tmp_path / "auto")
    assert json.loads((auto / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(auto).dtype == torch.bfloat16
    kept = export_checkpoint(last, tmp_path / "keep", dtype="keep")
    assert AutoModelForCausalLM.from_pretrained(kept).dtype == torch.float32
    weights = torch.load(last, weights_only=True)["state_dict"]
    exported = AutoModelForCausalLM.from_pretrained(auto).state_dict()
    for key, value in weights.items():
        if key.startswith("model."):
            assert torch.equal(exported[key.removeprefix("model.")], value.to(torch.bfloat16)), key

    _fit(_module(), tmp_path / "ck32", steps=1)
    fp32 = export_checkpoint(tmp_path / "ck32" / "last.ckpt", tmp_path / "fp32")
    assert AutoModelForCausalLM.from_pretrained(fp32).dtype == torch.float32


def test_fsdp2_checkpoint_leaves_a_rebuildable_reference_out_and_resumes_exactly(tmp_path, base_folder):
    """A reference loaded from its source is not saved in sharded (FSDP2) checkpoints (FSDP2 loads strictly:
    the module's state dict leaves it out and puts the rebuilt one back); a resume from such a checkpoint ends
    where the uninterrupted run does, bitwise. (A config-built random policy's copy is kept: not rebuildable.)"""
    from dpo_lightning.training.distributed import full_state_dict

    def module():
        return DPOModule(model=str(base_folder), memory=MemoryOptions(fsdp_mixed_precision=False),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), warmup_ratio=0.0, lr_decay="constant")

    whole, _ = _fit(module(), tmp_path / "whole", steps=8, sharded=True, save_every_n_steps=None)
    _fit(module(), tmp_path / "first", steps=6, sharded=True)  # one epoch of the 6 batches
    saved = consolidate_checkpoint(tmp_path / "first" / "last.ckpt")
    assert saved["global_step"] == 6 and saved["state_dict"]
    assert not any(k.startswith("reference.model.") for k in saved["state_dict"])
    resumed, _ = _fit(module(), tmp_path / "second", steps=8, sharded=True,
                      ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    a, b = full_state_dict(whole.lightning_module.model), full_state_dict(resumed.lightning_module.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    reference = full_state_dict(resumed.lightning_module.ref_model)
    initial = AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
    for key in reference:
        assert torch.equal(reference[key], initial[key]), key


# ---------------------------------------------------------------------------- float32 buffers


def _inv_freqs(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}


def test_bf16_true_keeps_rope_buffers_in_float32(tmp_path, base_folder):
    """``bf16-true`` casts the whole module; RoPE's inv_freq in bf16 shifts the rotary phase with the position.
    The weights train in bf16, the buffers are put back in float32 (equal to the model's own)."""
    original = _inv_freqs(AutoModelForCausalLM.from_pretrained(base_folder))
    trainer, _ = _fit(DPOModule(model=str(base_folder)), tmp_path / "ck", steps=1, precision="bf16-true")
    module = trainer.lightning_module
    assert next(module.model.parameters()).dtype == torch.bfloat16
    for name, value in _inv_freqs(module.model).items():
        assert value.dtype == torch.float32 and torch.equal(value, original[name]), name
    assert _inv_freqs(module.ref_model) and all(v.dtype == torch.float32 for v in _inv_freqs(module.ref_model).values())


def test_fsdp2_bf16_reference_keeps_rope_buffers_in_float32(tmp_path, base_folder):
    """FSDP2 stores the frozen reference's shards in bf16 (its compute dtype); its buffers stay float32."""
    trainer, _ = _fit(DPOModule(model=str(base_folder)), tmp_path / "ck", steps=1, sharded=True)
    reference = trainer.lightning_module.ref_model
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert _inv_freqs(reference) and all(v.dtype == torch.float32 for v in _inv_freqs(reference).values())


def test_a_save_holds_at_most_three_checkpoints_at_once_as_the_disk_budget_says(tmp_path, monkeypatch):
    """The peak disk of a run's checkpoints (issue #30 item 6): while ``last.ckpt`` is replaced, the best
    (an earlier step), the previous ``last.ckpt`` and the new one being put in place exist at once: 3
    copies, counted as distinct files (hard links count once) at the moment of each atomic swap. Best at
    step 3 (validation, linked to last), last at 4, then the save of step 5. docs/recipes.md budgets
    that many copies (a 7B DPO run: 3 x 80.9 + 13.5 GB), not the 2 it said before."""
    import dpo_lightning.training.callbacks as callbacks
    import dpo_lightning.training.checkpoint as checkpoint

    real, peaks = checkpoint.replace_atomically, []

    def counting(tmp, path):
        inodes = {}
        for p in Path(path).parent.rglob("*"):
            if p.is_file():
                inodes[p.stat().st_ino] = p.stat().st_size
        peaks.append(sum(inodes.values()))
        real(tmp, path)

    monkeypatch.setattr(checkpoint, "replace_atomically", counting)
    monkeypatch.setattr(callbacks, "replace_atomically", counting)
    _, callback = _fit(_module(), tmp_path, steps=5, sharded=True, val_every=3, save_every_n_steps=1,
                       save_every_minutes=None)
    one = sum(s.st_size for s in _files(tmp_path / "last.ckpt").values())
    copies = [round(p / one, 2) for p in peaks]
    assert max(copies) == 3.0 and copies[-1] == 3.0, copies  # the last swap: best (3) + last (4) + new (5)
    assert Path(callback.best_model_path).name == "stepstep=3.ckpt"
    recipes = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    assert "3 x 80.9 + 13.5 = 256 GB" in recipes
