"""Resumes through the real CLI (``fit --config recipes/tiny*.yaml``, in process): a run resumed from a
checkpoint ends with the same weights and writes the same TensorBoard scalars, every tag at every step
after the checkpoint, as the run never stopped.

The layouts of issue #25: a precomputed reference with validation; checkpoints every N steps at a
logging step; checkpoints of epoch 2 under accumulation with an odd number of batches per epoch;
LoRA with a TR-DPO reference. Each checkpoint is copied out of its run folder before the resume, so
the resumed run writes its event files into a folder of its own.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_lightning.cli import cli_main
from dpo_lightning.data.synthetic import generate_pairs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # two or more CLI fits each


def write_pairs(folder: Path, train: int, val: int) -> Path:
    rows = generate_pairs(train + val, seed=5)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:train]), ("validation", rows[train:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def fit(tmp_path: Path, name: str, *args: str, recipe: str = "tiny.yaml", ckpt: Path | None = None) -> Path:
    """One ``fit`` of the recipe with ``args``; its run folder (events, checkpoints/)."""
    argv = [
        "fit", "--config", str(ROOT / "recipes" / recipe),
        "--trainer.logger.init_args.save_dir", str(tmp_path / name),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--checkpoint.save_every_minutes", "null", *args,
    ]
    if ckpt is not None:
        argv += ["--ckpt_path", str(ckpt)]
    return Path(cli_main(argv).trainer.log_dir)


def scalars(run: Path) -> dict[tuple[str, int], float]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_resumes_exactly(tmp_path: Path, straight: Path, checkpoint: Path, *args: str, recipe: str = "tiny.yaml"):
    """Resume from (a copy of) ``checkpoint`` of the run ``straight``: same final weights, bitwise, and the
    same scalars at every step after the checkpoint's (whose own logs the run wrote before it stopped)."""
    copy = tmp_path / "saved" / checkpoint.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(checkpoint, copy)
    step = torch.load(copy, weights_only=True)["global_step"]
    resumed = fit(tmp_path, f"resumed_{checkpoint.stem}", *args, recipe=recipe, ckpt=copy)
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), (checkpoint.name, key)
    after = {k: v for k, v in scalars(straight).items() if k[1] > step and k[0] != "hp_metric"}
    logged = {k: v for k, v in scalars(resumed).items() if k[0] != "hp_metric"}
    assert any(tag == "train/loss" for tag, _ in after) and any(tag.startswith("val/") for tag, _ in after)
    assert logged == after, checkpoint.name


@pytest.mark.parametrize("stage", ["copy", "precomputed", "sft"])
def test_checkpoint_every_n_steps_resumes_metrics_and_weights(tmp_path, monkeypatch, stage):
    """Accumulation 2, a log every 2 steps, ``last.ckpt`` every 4 steps (TRL's save_steps) and a kept
    checkpoint every 4 (``every_n_train_steps``): resumed from step 8, a logging step. The resumed run's
    train/loss at step 9 used to average the window of steps 7-8, already logged, with its own."""
    data = write_pairs(tmp_path / "data", 40, 8)
    args = ["--data.dataset", str(data), "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2",
            "--trainer.max_steps", "12", "--trainer.val_check_interval", "12", "--trainer.log_every_n_steps", "2",
            "--checkpoint.save_every_n_steps", "4", "--checkpoint.every_n_train_steps", "4",
            "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "step", "--checkpoint.mode", "max"]
    recipe = "tiny_sft.yaml" if stage == "sft" else "tiny.yaml"
    if stage == "precomputed":
        monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
        args += ["--model.reference", "precomputed"]
    straight = fit(tmp_path, "straight", *args, recipe=recipe)
    step8 = [p for p in (straight / "checkpoints").glob("*.ckpt") if p.name.startswith("step8")]
    assert len(step8) == 1, sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert_resumes_exactly(tmp_path, straight, step8[0], *args, recipe=recipe)


def test_precomputed_reference_with_validation_resumes_exactly(tmp_path, monkeypatch):
    """#25 item 1, the issue's command with a small dataset: validation every 4 batches after the precompute
    pass used to crash ("`ref_model` is not an nn.Module"); resumed from the step-4 validation checkpoint."""
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "data", 32, 8)
    args = ["--data.dataset", str(data), "--data.batch_size", "4", "--model.reference", "precomputed",
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "2",
            "--checkpoint.save_top_k", "-1"]
    straight = fit(tmp_path, "straight", *args)
    step4 = [p for p in (straight / "checkpoints").glob("step4-*.ckpt")]
    assert len(step4) == 1
    assert_resumes_exactly(tmp_path, straight, step4[0], *args)


def test_epoch_2_checkpoints_under_accumulation_resume_exactly(tmp_path):
    """#25 item 2: 36 training pairs in batches of 4 (9 per epoch, odd), accumulation 2, validation every 4
    batches, 2 epochs, every validation checkpoint kept. Lightning's batches 12 and 16 are the 3rd and 7th of
    epoch 2, mid-accumulation: resuming from their checkpoints ended off by the lost micro-batch. Validation
    now runs every 2 optimizer steps (steps 2, 4, ... 10), and every checkpoint of epoch 2 resumes exactly."""
    data = write_pairs(tmp_path / "data", 36, 8)
    args = ["--data.dataset", str(data), "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2",
            "--trainer.val_check_interval", "4", "--trainer.max_epochs", "2", "--trainer.max_steps", "-1",
            "--trainer.log_every_n_steps", "2", "--checkpoint.save_top_k", "-1"]
    straight = fit(tmp_path, "straight", *args)
    steps = sorted(int(p.name.split("-")[0].removeprefix("step")) for p in (straight / "checkpoints").glob("step*"))
    assert steps == [2, 4, 6, 8, 10]  # (5 optimizer steps per epoch: the 9th batch steps alone)
    for step in (6, 8):  # epoch 2 (the last one, step 10, has nothing left to train)
        (checkpoint,) = (straight / "checkpoints").glob(f"step{step}-*.ckpt")
        assert_resumes_exactly(tmp_path, straight, checkpoint, *args)


def test_lora_with_tr_dpo_trains_and_resumes_exactly(tmp_path):
    """#25 item 3: LoRA with a TR-DPO reference (sync every 2 steps, alpha 0.5) used to fail after the first
    sync; resumed from step 3 (between syncs, the reference kept in the checkpoint)."""
    data = write_pairs(tmp_path / "data", 32, 8)
    args = ["--data.dataset", str(data), "--data.batch_size", "4", "--model.lora.r", "4", "--model.lora.alpha", "8",
            "--model.reference", "dpo_lightning.CopyReference", "--model.reference.init_args.sync_steps", "2",
            "--model.reference.init_args.sync_alpha", "0.5", "--trainer.max_steps", "6",
            "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1", "--checkpoint.save_top_k", "-1"]
    straight = fit(tmp_path, "straight", *args)
    step3 = [p for p in (straight / "checkpoints").glob("step3-*.ckpt")]
    assert len(step3) == 1
    assert any(k.startswith("reference.model.") for k in torch.load(step3[0], weights_only=True)["state_dict"])
    assert_resumes_exactly(tmp_path, straight, step3[0], *args)


class BatchClock:
    """The time the checkpoint callbacks read (``time.monotonic``): one second per training batch started."""

    now = 0.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


def test_time_based_checkpoints_land_on_optimizer_steps_and_resume_exactly(tmp_path, monkeypatch):
    """Accumulation 2, and three time-based savers due every 3 s on a clock that reads one second per batch:
    a ``lightning.pytorch.callbacks.ModelCheckpoint(train_time_interval=3s)`` added to the recipe's
    callbacks, the CLI's own ``--checkpoint.train_time_interval`` and ``--checkpoint.save_every_minutes``.
    Lightning's saver used to write when due, at batch 3, the first micro-batch of step 2 (named step 1),
    and at batch 9: a resume from there lost the micro-batch's gradient. Every checkpoint the run writes now
    holds 2 x its step batches, and the run resumed from each continues bitwise, its logs too."""
    import lightning.pytorch.callbacks.model_checkpoint as lightning_checkpoint

    import dpo_lightning.training.callbacks as our_callbacks
    from dpo_lightning.stages.base import CausalLMModule
    from dpo_lightning.training.checkpoint import AtomicCheckpointIO

    monkeypatch.setattr(lightning_checkpoint, "time", BatchClock)
    monkeypatch.setattr(our_callbacks, "time", BatchClock)
    start = CausalLMModule.on_train_batch_start

    def tick(self, batch, batch_idx):
        BatchClock.now += 1
        return start(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMModule, "on_train_batch_start", tick)
    written = []  # (file, optimizer steps, micro-batches done) of every checkpoint written
    save = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        done = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        written.append((Path(path).name, checkpoint["global_step"], done))
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)

    data = write_pairs(tmp_path / "data", 48, 8)  # 12 batches of 4: one epoch of 6 optimizer steps
    args = ["--data.dataset", str(data), "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2",
            "--trainer.max_steps", "6", "--trainer.val_check_interval", "12", "--trainer.log_every_n_steps", "1",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.filename", "user-{step}", "--trainer.callbacks.save_top_k", "-1",
            "--trainer.callbacks.train_time_interval", "0:00:03",
            "--checkpoint.monitor", "null", "--checkpoint.filename", "ours-{step}", "--checkpoint.save_top_k", "-1",
            "--checkpoint.train_time_interval", "0:00:03"]
    BatchClock.now = 0.0
    straight = fit(tmp_path, "straight", *args, "--checkpoint.save_every_minutes", "0.05")
    assert written and all(done == 2 * step for _, step, done in written), written
    saved = sorted(p for p in (straight / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    assert {p.name.split("-")[0] for p in saved} == {"user", "ours"}
    for checkpoint in saved:
        if torch.load(checkpoint, weights_only=True)["global_step"] < 6:  # (step 6 has nothing left to train)
            BatchClock.now = 0.0
            assert_resumes_exactly(tmp_path, straight, checkpoint, *args)
