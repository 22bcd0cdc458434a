"""TRL's "save every N steps, keep the latest k" as a recipe setting, and the end-of-fit line that says
which optimizer step each checkpoint file holds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dpo_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_save_every_n_steps_keep_the_latest_k_and_say_which_step_each_file_holds(tmp_path, caplog):
    """TRL's save_steps=2, save_total_limit=2 on an 8-step run: steps 6 and 8 kept (2, 4 rotated out),
    last.ckpt holds step 8, and the closing summary names each file's step."""
    with caplog.at_level(logging.INFO):
        cli = cli_main([
            "fit", "--config", str(ROOT / "recipes/tiny.yaml"), "--trainer.max_steps", "8",
            "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--checkpoint.monitor", "step", "--checkpoint.mode", "max", "--checkpoint.save_top_k", "2",
            "--checkpoint.every_n_train_steps", "2", "--checkpoint.filename", "step{step}",
        ])
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step6.ckpt", "step8.ckpt"]
    for name, step in (("last.ckpt", 8), ("step6.ckpt", 6), ("step8.ckpt", 8)):
        assert torch.load(folder / name, weights_only=True, mmap=True)["global_step"] == step
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoints in"))
    assert "last.ckpt: optimizer step 8" in summary and "step6.ckpt: optimizer step 6" in summary
    assert "step8.ckpt: optimizer step 8; best step" in summary
