"""How a stage's metrics reach the loggers (a mixin of ``CausalLMModule``): exact windows of training
metrics closed with each logged optimizer step, validation and test epochs, on TRL's axes (the step is the
count of optimizer steps done, ``epoch`` fractional), with TRL's companions (lr, grad_norm, num_tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from dpo_lightning.training.metrics import RunningMeans


class StepLogs:
    """The stage's logging hooks."""

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.reference is not None:
            # Lightning counts the step only once this hook returns: this is step global_step + 1.
            self.reference.after_optimizer_step(self, self.global_step + 1)
        if _logs_this_step(self.trainer) and self.train_metrics.has_updates:
            # The window closes with the step, before any callback sees the batch end: a checkpoint written
            # there (every_n_train_steps, save_every_n_steps) holds the next window, not this one, which
            # on_train_batch_end logs after it (a resume used to log this window again with the next).
            self._closed_window = self.train_metrics.compute()
            self.train_metrics.reset()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradient norm before clipping, as TRL logs it (gradients are already synced across ranks).
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # The learning rate this step applies (the scheduler moves it after the step), TRL's learning_rate.
        self._step_lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Log the window since the last log at exactly the steps Lightning writes logs, so each
        # logged value covers every example of the window on every rank (closed by optimizer_step).
        values, self._closed_window = self._closed_window, None
        if values is None:
            return
        # TRL's companions of the window: the learning rate and gradient norm of this step.
        lr = self._step_lr if self._step_lr is not None else self.trainer.optimizers[0].param_groups[0]["lr"]
        values["train/lr"] = torch.tensor(lr, dtype=torch.float64)  # a float32 would log 5.0000002e-4
        if self._grad_norm is not None:
            values["train/grad_norm"] = self._grad_norm
        # TRL's num_tokens: every input token trained on so far, on every rank (a collective: every
        # rank logs at the same steps).
        values["train/num_tokens"] = self._total_tokens()
        self._write_logs(values)
        self.log_dict(values, on_step=True, on_epoch=False, sync_dist=False, logger=False)
        self.log("loss", values["train/loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        for name, short in self.progress_bar_train:
            if f"train/{name}" in values:
                self.log(short, values[f"train/{name}"], prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def _log_epoch(self, metrics: RunningMeans) -> None:
        if not metrics.has_updates:
            return
        values = metrics.compute()  # already synced across ranks as sums
        # Reset outside inference mode: states cloned under it could not be updated by a later
        # validation inside fit (e.g. trainer.validate() before trainer.fit()).
        with torch.inference_mode(False):
            metrics.reset()
        # In fit, on TRL's axes (_write_logs); a `validate`/`test` of its own goes through Lightning, which
        # returns what is logged (trainer.validate(...)[0]) and has no optimizer step to count.
        in_fit = self.trainer.state.fn == "fit"
        if in_fit:
            self._write_logs(values)
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=False, logger=not in_fit)
        if self.progress_bar_metric is not None:
            name, short = self.progress_bar_metric
            if f"{metrics.prefix}/{name}" in values:
                self.log(f"{metrics.prefix}_{short}", values[f"{metrics.prefix}/{name}"], prog_bar=True, logger=False)

    def _write_logs(self, values: Mapping[str, Tensor]) -> None:
        """Write ``values`` to the trainer's loggers on TRL's axes (during ``fit``): the step is the number of
        optimizer steps done (Lightning's own axis is one behind, counting those before the current one), and
        ``epoch`` is fractional, epochs done plus the share of this epoch's batches trained, as TRL logs it.
        (``self.log`` then keeps the values for callbacks and the progress bar, not for the loggers: a logged
        ``step`` or ``epoch`` would replace the ones checkpoint names and monitors read.)"""
        if not self.loggers or self.trainer.sanity_checking:  # (Lightning logs nothing of the sanity check either)
            return
        row = {name: float(value) for name, value in values.items()}
        row["epoch"] = self._fractional_epoch()
        for logger in self.loggers:
            logger.log_metrics(row, step=self.global_step)
            logger.save()

    def _fractional_epoch(self) -> float:
        """TRL's ``epoch``: ``current_epoch + batches trained this epoch / batches per epoch``."""
        trainer = self.trainer
        per_epoch = trainer.num_training_batches
        if not (isinstance(per_epoch, int | float) and math.isfinite(per_epoch) and per_epoch > 0):
            return float(trainer.current_epoch)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch + done / per_epoch


def input_tokens(batch: Mapping[str, Any]) -> int:
    """Input tokens of a batch, padding excluded: prefix-shared rows say how many their pairs hold (each
    prompt counted on both sides, as the other layouts count it), packed rows count their sequences'
    positions, padded rows their attention mask (the KL rows of a KTO batch included: they are forwarded too)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    if "sequence_ids" in batch:
        return int((batch["sequence_ids"] >= 0).sum())
    count = 0
    for key in ("attention_mask", "kl_attention_mask"):
        mask = batch.get(key)
        if mask is not None and mask.dim() == 2:
            count += int(mask.sum())
    return count


def _logs_this_step(trainer: L.Trainer) -> bool:
    """True in ``on_train_batch_end`` when Lightning will write step logs after this batch."""
    if trainer.fit_loop.epoch_loop._should_accumulate():  # mid accumulation: no optimizer step, no log
        return False
    return trainer._logger_connector.should_update_logs


__all__ = ["StepLogs", "input_tokens"]
