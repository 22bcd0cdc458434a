"""The real CLI (`python -m dpo_lightning fit --config recipes/tiny.yaml`) with options a user
tries: other losses, the checkpoints it leaves, several processes. A few steps each."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path: Path, *args: str, steps: int = 4, every: int = 2):
    """`fit` of the tiny recipe for `steps` optimizer steps, validating every `every`."""
    return cli_main(
        [
            "fit", "--config", str(ROOT / "recipes/tiny.yaml"),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(every),
            "--trainer.log_every_n_steps", "2",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.batch_size", "8", "--data.eval_batch_size", "50",
            *args,
        ]
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--model.loss_type", "ipo"],
        ["--model.loss_type", "robust", "--model.label_smoothing", "0.1"],
        ["--model.loss_type", "simpo"],  # reference switches to none
        ["--model.loss_type", "[sigmoid, sft]", "--model.loss_weights", "[1.0, 0.5]"],
        ["--model.loss_type", "discopop", "--model.loss_kwargs", "{discopop_tau: 0.05}"],
    ],
    ids=["ipo", "robust", "simpo", "rpo", "discopop"],
)
def test_losses_train_through_the_cli_with_finite_trl_named_metrics(tmp_path, options):
    cli = fit(tmp_path, *options)
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen"):
        assert name in metrics and math.isfinite(float(metrics[name])), (name, dict(metrics))


def test_kto_through_the_cli_keeps_its_best_checkpoint_by_val_loss(tmp_path):
    """KTO logs no pairwise accuracy (as TRL), so the default monitor val/rewards/accuracies used
    to stop the run at its first validation; with KTO the CLI monitors val/loss."""
    cli = fit(tmp_path, "--model", "dpo_lightning.KTOModule")
    assert "val/rewards/accuracies" not in cli.trainer.callback_metrics
    saver = cli.trainer.checkpoint_callback
    assert saver.monitor == "val/loss" and saver.mode == "min"
    assert Path(saver.best_model_path).name.startswith("step") and "loss" in Path(saver.best_model_path).name
    # A monitor the user chose is kept.
    cli = fit(tmp_path / "own", "--model", "dpo_lightning.KTOModule", "--checkpoint.monitor", "val/kl", steps=2)
    assert cli.trainer.checkpoint_callback.monitor == "val/kl"


def test_last_ckpt_is_the_final_state_when_it_is_not_the_best(tmp_path):
    """Lightning rewrites last.ckpt only when a top-k file is saved at the same step: once the
    monitored metric stopped improving, last.ckpt (what resume and export read) lagged behind."""
    # val/loss falls while training: with mode max the best checkpoint stays the first one.
    cli = fit(tmp_path, "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "max",
              "--checkpoint.filename", "best-step{step}")
    saver = cli.trainer.checkpoint_callback
    assert Path(saver.best_model_path).name == "best-step2.ckpt"  # the scenario: the last step is not the best
    last = torch.load(Path(saver.dirpath) / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    for name, value in cli.model.model.state_dict().items():
        torch.testing.assert_close(last["state_dict"]["model." + name], value, rtol=0, atol=0)


def test_ddp_on_two_cpu_processes_finishes_and_exports(tmp_path):
    """HFExport read trainer.log_dir (a broadcast) on rank 0 only: every multi-process fit hung at its end."""
    # Run from a temp folder: only PYTHONPATH makes the subprocess import this checkout, not an installed copy.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('dpo_lightning').origin)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert Path(where.stdout.strip()) == ROOT / "dpo_lightning" / "__init__.py", where.stdout + where.stderr
    args = [
        "fit", "--config", str(ROOT / "recipes/tiny.yaml"), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.batch_size", "4",
        "--data.eval_batch_size", "100", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_lightning", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "version_0" / "hf_export" / "model.safetensors").exists()
