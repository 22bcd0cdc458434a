"""A run killed without a final save (``kill -9``, a node failure, Ctrl-C twice) and resumed with
``--ckpt_path last`` through the real CLI (in process), in its folder or in a copy of it (a run moved from scratch
to persistent storage): the resumed run keeps writing the run's own ``last.ckpt`` (not ``last-v1.ckpt`` beside a
stale one), and TensorBoard reads the run's scalars once per step although the killed run had logged steps past
its last checkpoint that the resumed run logs again (``purge_step``)."""

import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dpo_lightning.cli import cli_main

from tiny import Crash

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVED, KILLED = 6, 2, 3  # last.ckpt at step 2 (validation: best and last linked), killed after step 3


def fit(save_dir: Path, *args: str) -> Path:
    argv = [
        "fit", "--config", str(ROOT / "recipes" / "tiny.yaml"),
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(SAVED),
        "--trainer.log_every_n_steps", "1", "--data.batch_size", "4", "--data.eval_batch_size", "16",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--checkpoint.save_every_minutes", "null", *args,
    ]
    return Path(cli_main(argv).trainer.log_dir)


def raw_steps(run: Path, tag: str) -> list[int]:
    """Every step ``tag`` was written at, over all event files of the run, as written (no purge applied)."""
    steps = []
    for path in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_a_hard_killed_run_resumes_into_its_own_last_ckpt_and_its_logs_read_once_per_step(tmp_path):
    crash = f'{{"class_path": "tiny.CrashAfterStep", "init_args": {{"step": {KILLED}}}}}'
    with pytest.raises(Crash):
        fit(tmp_path / "runs", "--trainer.callbacks+", crash)
    run = tmp_path / "runs" / "tiny" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == SAVED
    assert last.stat().st_nlink == 2  # linked to the best checkpoint of step 2
    shutil.copytree(tmp_path / "runs" / "tiny", tmp_path / "runs" / "moved")  # as `cp -r` would

    resumed = fit(tmp_path / "runs", "--ckpt_path", "last")
    assert resumed == run  # the same run folder
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == STEPS
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert fit(tmp_path / "runs", "--ckpt_path", "last") == run  # run again: nothing left to train
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]

    written = raw_steps(run, "train/loss")
    assert sorted(set(written)) == list(range(1, STEPS + 1))
    assert len(written) > len(set(written))  # the killed run's step 3 was written twice: once by each run
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    read = [e.step for e in events.Scalars("train/loss")]
    assert sorted(read) == sorted(set(written)), read  # TensorBoard reads each step once

    moved = fit(tmp_path / "runs", "--trainer.logger.init_args.name", "moved", "--ckpt_path", "last")
    assert moved == tmp_path / "runs" / "moved" / "version_0"
    moved_last = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert moved_last["global_step"] == STEPS
    assert sorted(p.name for p in (moved / "checkpoints").glob("last*")) == ["last.ckpt"]
