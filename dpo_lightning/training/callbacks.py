"""Callbacks that keep a run's work safe: when checkpoints are written, and when a run must stop.

This file holds the checkpoint saving policy; the preemption signal handling is ``training/preemption.py``, the
non-finite guard ``training/guards.py``, the progress bar ``training/progress.py``, validation on optimizer-step
boundaries ``training/step_aligned_validation.py`` (their names are importable from here too).

* :class:`LatestModelCheckpoint` is ``ModelCheckpoint`` whose ``last.ckpt`` always holds the
  latest state: written at each validation, every N optimizer steps and every M minutes (with or
  without validation data), at the end of training, and when the job is preempted (SIGTERM, or
  SIGUSR1 outside SLURM's auto-requeue), after which ``fit`` raises :class:`Preempted`.
* :class:`NonFiniteGuard` stops training at the first optimizer step whose loss or gradients
  are not finite, before that step is applied: no NaN reaches the weights, a checkpoint or an
  export, and the last checkpoint stays the last good state.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from dpo_lightning.training.checkpoint import (
    link_checkpoint,
    remove_orphaned_temporaries,
    replace_atomically,
    temporary_path,
)
from dpo_lightning.training.guards import NonFiniteError, NonFiniteGuard, any_rank, finite_weights, likely_causes
from dpo_lightning.training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch, preemption_signal
from dpo_lightning.training.progress import StepProgressBar
from dpo_lightning.training.runs import read_checkpoint_header
from dpo_lightning.training.step_aligned_validation import StepAlignedEpochLoop, check_validation_interval

log = logging.getLogger(__name__)

def _saves_sharded(trainer: pl.Trainer) -> bool:
    """Whether the strategy writes checkpoints as folders of shards (FSDP2's default), not through CheckpointIO."""
    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and bool(getattr(strategy, "_save_distributed_checkpoint", True))


def _between_optimizer_steps(trainer: pl.Trainer) -> bool:
    """True in ``on_train_batch_end`` when this batch completed an optimizer step (not mid-accumulation)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def _validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs validation right after this training batch."""
    loop = trainer.fit_loop
    if not trainer.enable_validation or loop._data_fetcher is None:
        return False
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def checkpoint_summary(folder: Path, best: str | None = None, monitor: str | None = None) -> str:
    """One line per checkpoint in ``folder``: which optimizer step it holds (read from its header, no
    tensors loaded), and which one is the best by ``monitor``; "" when there is none."""
    lines = []
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name)):
        if path.name.startswith("."):
            continue  # a temporary of an atomic write
        header = read_checkpoint_header(path)
        step = f"optimizer step {header['global_step']}" if "global_step" in header else "unreadable"
        step += ", sharded" if path.is_dir() else ""
        tag = f"; best {monitor}" if best and Path(best).name == path.name and monitor else ""
        lines.append(f"  {path.name}: {step}{tag}")
    return f"checkpoints in {folder}:\n" + "\n".join(lines) if lines else ""


class StepAlignedSaves(ModelCheckpoint):
    """``ModelCheckpoint`` that saves at optimizer-step boundaries only.

    Under ``accumulate_grad_batches`` k > 1, Lightning's ``train_time_interval`` saves when the time is
    due, which can be between the micro-batches of one optimizer step: the checkpoint cannot hold their
    partial gradients, so a resume from it is not exact. Here a save due there waits for the step's last
    micro-batch (at most k - 1 batches later). Step-, validation- and epoch-based saves are on boundaries
    already. :func:`align_checkpoint_saves` gives every ``ModelCheckpoint`` of a fit this behaviour.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _between_optimizer_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@functools.cache
def _step_aligned(cls: type[ModelCheckpoint]) -> type[ModelCheckpoint]:
    # The same name: the callback's state key in checkpoints (qualname + settings) stays what it was.
    return type(cls.__name__, (StepAlignedSaves, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def align_checkpoint_saves(trainer: pl.Trainer) -> None:
    """Make every ``ModelCheckpoint`` of ``trainer`` (a user's own too) save at optimizer-step boundaries only
    (:class:`StepAlignedSaves`) when gradients are accumulated; the callbacks keep their settings and state."""
    if trainer.accumulate_grad_batches == 1:
        return
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and not isinstance(callback, StepAlignedSaves):
            callback.__class__ = _step_aligned(type(callback))  # same state, one hook changed


class LatestModelCheckpoint(StepAlignedSaves):
    """``ModelCheckpoint`` whose ``save_last=True`` keeps ``last.ckpt`` current, also without validation.

    Lightning's own ``save_last=True`` rewrites ``last.ckpt`` only when a top-k checkpoint is
    written at the same step, and defers saves that monitor a validation metric until a
    validation runs: with no validation data a run was written once, at its end, so a kill lost
    everything. Here ``last.ckpt`` is also written every ``save_every_n_steps`` optimizer steps,
    every ``save_every_minutes`` minutes, at each validation, at the end of training, and on
    preemption. Periodic saves (``train_time_interval`` too) happen between optimizer steps only (never
    mid-accumulation), so a run resumed from any of its checkpoints continues exactly.
    """

    def __init__(
        self,
        *args: Any,
        save_every_n_steps: int | None = None,
        save_every_minutes: float | None = 10.0,
        save_on_preemption: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            save_every_n_steps: Write ``last.ckpt`` every this many optimizer steps (None: off).
            save_every_minutes: Write ``last.ckpt`` when this many minutes passed since the last write (None: off).
            save_on_preemption: On SIGTERM (or SIGUSR1 outside SLURM auto-requeue) write ``last.ckpt``
                at the next optimizer-step boundary, then stop with ``Preempted`` (CLI exit code 143).
        """
        super().__init__(*args, **kwargs)
        if save_every_n_steps is not None and save_every_n_steps < 1:
            raise ValueError(f"checkpoint.save_every_n_steps must be >= 1 or null, got {save_every_n_steps}")
        if save_every_minutes is not None and not save_every_minutes > 0:
            raise ValueError(f"checkpoint.save_every_minutes must be > 0 or null, got {save_every_minutes}")
        self.save_every_n_steps = save_every_n_steps
        self.save_every_minutes = save_every_minutes
        self.save_on_preemption = save_on_preemption
        self._last_write = time.monotonic()
        self._stop: Preempted | None = None  # raised at the next hook once saved (see on_train_batch_end)
        self._watch = PreemptionWatch("saving a checkpoint at the next optimizer step, then stopping")

    # ------------------------------------------------------------------ last.ckpt at every save point

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_preempted()
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The final state of a fit is in last.ckpt, whatever the validation schedule.
        self._save_last_if_behind(trainer)
        self._restore_signal_handlers()
        self._stop_if_preempted()  # preempted at the last step: saved, and not exported
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath is not None:
            summary = checkpoint_summary(Path(self.dirpath), self.best_model_path, self.monitor)
            if summary:
                rank_zero_info(summary)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _between_optimizer_steps(trainer):
            return  # (Lightning's own time-based save too: StepAlignedSaves)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        by_steps = self.save_every_n_steps is not None and step % self.save_every_n_steps == 0
        minutes = self.save_every_minutes
        by_time = minutes is not None and time.monotonic() - self._last_write >= 60 * minutes
        received = preemption_signal() if self.save_on_preemption else None
        flags = torch.tensor([float(received is not None), float(by_time)], device=pl_module.device)
        preempted, by_time = (bool(v) for v in any_rank(trainer, flags).tolist())
        if preempted or ((by_steps or by_time) and not _validates_after_this_batch(trainer)):
            # (a validation right after this batch writes last.ckpt itself, with its metrics)
            self._save_last_if_behind(trainer)
        if preempted:
            signal_name = received or "a preemption signal (on another rank)"
            # Raised at the next hook, once the stage has logged this step (callbacks see the batch end
            # first): the resumed run starts after it, so its logs would otherwise miss this step.
            status = f"received {signal_name}: saved {self.last_model_path} at step {step}"
            self._stop = Preempted(f"{status}; resume with --ckpt_path last (or the path)", status)

    def _stop_if_preempted(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            raise stop

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stop_if_preempted()
        super().on_train_batch_start(trainer, pl_module, *args)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_preempted()  # before a validation that would delay the exit
        super().on_validation_start(trainer, pl_module)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` unless it already holds this step (or we are not fitting)."""
        if self.save_last is not True or self._should_skip_saving_checkpoint(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._link_to_same_step(trainer, filepath):  # this step's state, already checked and written
            self._last_write = time.monotonic()
            return
        # An update can turn finite gradients into inf weights (a huge learning rate): such a state
        # is never written, so last.ckpt and the best checkpoint stay the last good ones.
        if not finite_weights(trainer, trainer.lightning_module):
            lr = trainer.optimizers[0].param_groups[0].get("lr", float("nan")) if trainer.optimizers else float("nan")
            raise NonFiniteError(
                f"the weights hold NaN or inf after optimizer step {trainer.global_step}: not saving {filepath}; "
                f"the previous checkpoint is the last good state. {likely_causes(trainer, lr)}"
            )
        if _saves_sharded(trainer):
            self._save_sharded(trainer, filepath)
        else:
            super()._save_checkpoint(trainer, filepath)
        self._last_write = time.monotonic()

    def _link_to_same_step(self, trainer: pl.Trainer, filepath: str) -> bool:
        """When the checkpoint of this very step was just written under another name (the best, then
        ``last.ckpt`` at a validation), hard-link it instead of writing a second copy: same state, no
        extra time or space. A later write of either name replaces it atomically and leaves the other."""
        source = self._last_checkpoint_saved
        if not source or source == filepath or self._last_global_step_saved != trainer.global_step:
            return False
        linked = None
        if trainer.is_global_zero:

            linked = Path(source).exists() and link_checkpoint(source, filepath)
        if not trainer.strategy.broadcast(linked, src=0):
            return False
        self._bookkeep(trainer, filepath)
        return True

    def _save_sharded(self, trainer: pl.Trainer, filepath: str) -> None:
        """A sharded (FSDP2) checkpoint written to a temporary folder, then put in place atomically: a
        crash mid-save leaves the previous checkpoint under its name, never a half-written folder."""
        tmp = None
        if trainer.is_global_zero:
            folder = Path(filepath).parent
            folder.mkdir(parents=True, exist_ok=True)
            remove_orphaned_temporaries(folder)
            tmp = str(temporary_path(filepath))
        tmp = trainer.strategy.broadcast(tmp, src=0)
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank writes its shards
        except BaseException:
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if trainer.is_global_zero:
            replace_atomically(tmp, filepath)
        trainer.strategy.barrier("sharded_checkpoint_in_place")
        self._bookkeep(trainer, filepath)

    def _bookkeep(self, trainer: pl.Trainer, filepath: str) -> None:
        """What ``ModelCheckpoint._save_checkpoint`` records after a save."""
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    # ------------------------------------------------------------------ preemption

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._own_the_resumed_last(trainer)
        self._stop = None
        self._last_write = time.monotonic()
        if self.save_on_preemption:
            # Replaces Lightning's SIGTERM handler for the training loop: Lightning's raises
            # SIGTERMException after any batch (mid-accumulation too) and exits with status 0.
            # A signal received before (under `iterate`'s watch, while this stage loaded) counts.
            self._watch.start()

    def _own_the_resumed_last(self, trainer: pl.Trainer) -> None:
        """A run resumed from a checkpoint of this callback's folder keeps writing the folder's ``last.ckpt``.

        Lightning takes a ``last.ckpt`` it finds for another run's and writes ``last-v1.ckpt`` beside it unless the
        restored state names it: a ``last.ckpt`` linked to the best checkpoint of its step (`_link_to_same_step`)
        holds the state written under the best's name, before ``last.ckpt`` existed, and a run folder that was
        moved or copied restores no paths at all. ``last.ckpt`` would stay at the old step for ``--ckpt_path
        last``, an export or a requeued job to read (a requeue loop).
        """
        resumed = trainer.ckpt_path
        if self.save_last is not True or self.last_model_path or not resumed or self.dirpath is None:
            return
        if Path(resumed).resolve().parent == Path(self.dirpath).resolve():
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # One folder, written relative (the logger's save_dir) or absolute (a dirpath given: Lightning resolves
        # it), is the same folder: restore its state rather than warn "The dirpath has changed".
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and Path(saved).resolve() == Path(self.dirpath).resolve():
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)

    def _restore_signal_handlers(self) -> None:
        self._watch.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()
        super().on_exception(trainer, pl_module, exception)


__all__ = [
    "LatestModelCheckpoint",
    "NonFiniteError",
    "NonFiniteGuard",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "PreemptionWatch",
    "StepAlignedEpochLoop",
    "StepAlignedSaves",
    "align_checkpoint_saves",
    "preemption_signal",
    "StepProgressBar",
    "check_validation_interval",
    "finite_weights",
]
