"""Validation, and so checkpoints, at optimizer-step boundaries under gradient accumulation: a run resumed from
any of its checkpoints continues exactly (`check_validation_interval`, `StepAlignedEpochLoop`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop


def check_validation_interval(trainer: pl.Trainer) -> None:
    """Refuse validation (and so checkpoints) in the middle of a gradient accumulation, and keep it out of there.

    ``val_check_interval`` counts training batches; one that is not a multiple of
    ``accumulate_grad_batches`` validates and checkpoints between the micro-batches of one optimizer
    step, and a resume from such a checkpoint is not exact (its partial gradients are not saved):
    refused. A multiple is not enough on its own: Lightning restarts the accumulation at every epoch
    and ends an epoch with an optimizer step, so after an epoch whose batch count is not a multiple
    of the accumulation, its batch count falls mid-accumulation again (108 pairs in batches of 4,
    accumulation 2, validation every 10 batches: batch 30 is the third of epoch 2). The training
    loop is made to validate at optimizer-step boundaries instead (:class:`StepAlignedEpochLoop`).
    """
    interval, accumulate = trainer.val_check_interval, trainer.accumulate_grad_batches
    if isinstance(interval, int) and accumulate > 1 and interval % accumulate:
        lower, upper = interval // accumulate * accumulate, -(-interval // accumulate) * accumulate
        raise ValueError(
            f"trainer.val_check_interval={interval} is not a multiple of trainer.accumulate_grad_batches="
            f"{accumulate}: validation and checkpoints would fall mid-accumulation and a resume from them would "
            f"not be exact. val_check_interval counts training batches (optimizer steps x {accumulate}): use "
            f"{lower or upper} or {upper}"
        )
    loop = trainer.fit_loop.epoch_loop
    if type(loop) is _TrainingEpochLoop:  # (a loop of the user's own is left as it is)
        loop.__class__ = StepAlignedEpochLoop  # same state, one method changed


class StepAlignedEpochLoop(_TrainingEpochLoop):
    """Lightning's training epoch loop, validating at optimizer-step boundaries only.

    With ``accumulate_grad_batches`` k > 1, a validation that Lightning would run between two
    micro-batches (so would its checkpoint, which cannot hold the partial gradients) runs instead:

    * ``check_val_every_n_epoch: null`` (``val_check_interval`` counts batches across epochs): every
      ``val_check_interval / k`` optimizer steps, TRL's ``eval_steps``. The same batches as Lightning's
      while every epoch's batch count is a multiple of k; after an epoch that is not, Lightning's count
      falls mid-accumulation (27 batches, k 2, every 10: batch 30 is the 3rd of epoch 2), this one stays
      at step 15.
    * counted within each epoch (an int or a fraction of the epoch): right after the optimizer step whose
      micro-batches include the batch Lightning would validate after (a quarter of 27 batches is batch 6;
      with k 4 the step ends at batch 8).

    Time-based validation, k = 1 and an early stop keep Lightning's decision, mid-accumulation excepted.
    """

    def _should_check_val_fx(self, data_fetcher: Any) -> bool:
        due = super()._should_check_val_fx(data_fetcher)
        trainer, k = self.trainer, self.trainer.accumulate_grad_batches
        if k == 1 or not self._should_check_val_epoch():
            return due
        if trainer.should_stop and trainer.fit_loop._can_stop_early:
            return due  # the last validation of a run stopped early, as Lightning runs it
        if self._should_accumulate():
            return False  # between the micro-batches of one optimizer step
        interval = trainer.val_check_batch
        if not isinstance(interval, int) or trainer._val_check_time_interval is not None:
            return due  # time-based, or at the end of an epoch: on a step boundary already
        if trainer.check_val_every_n_epoch is None:
            # (check_validation_interval refused an interval that is not a multiple of k)
            return self.global_step % (interval // k) == 0
        # Counted within the epoch: this optimizer step's micro-batches are batches first..done of the epoch.
        done = self.batch_progress.current.ready
        first = (done - 1) // k * k + 1
        return any(b % interval == 0 for b in range(first, done + 1))
