"""The progress bar the CLI uses: optimizer steps over the whole fit, as TRL counts them."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting optimizer steps as TRL's does.

    Lightning's training bar counts the micro-batches of each epoch: with gradient accumulation 8
    it reads 800/800 when 100 optimizer steps were taken, and it restarts every epoch. This one
    shows one bar for the whole fit, ``global_step / max_steps`` (or the estimated total from
    ``max_epochs``), starting at the resumed step, with the stage's loss and its chosen metrics
    (DPO: reward margin and accuracy) as of the last logged step. The CLI uses it by default.
    """

    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=self._total_steps(trainer))
        bar.initial = 0
        bar.n = trainer.global_step  # a resumed run starts where it left off
        bar.set_description("Training")
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step == bar.n:  # mid-accumulation: no optimizer step yet
            return
        if self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


__all__ = ["StepProgressBar"]
