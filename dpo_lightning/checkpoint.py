"""What a checkpoint holds beyond weights and optimizer state, and how it reaches the disk.

* :class:`AtomicCheckpointIO` writes each checkpoint file to a temporary file in the same
  folder, flushes it to disk and renames it over the final name, so a crash mid-save leaves
  either the old checkpoint or the new one under that name, never a truncated file.
* :func:`resume_state` / :func:`restore_resume_state` carry what Lightning does not save itself
  and an exact resume needs: the RNG streams of every rank (dropout) and the training metrics'
  running window (sums since the last log), so a resumed run logs and trains as if never stopped.
  Data order is the sampler's job (``dpo_lightning/data/sampler.py``).
* :class:`LatestModelCheckpoint` is ``ModelCheckpoint`` whose ``last.ckpt`` always holds the
  latest state, also when that state did not make the top k.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchmetrics import Metric

from dpo_lightning.metrics import PreferenceMetrics

RESUME_KEY = "dpo_resume"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing on local filesystems.

    Use it with ``Trainer(plugins=[AtomicCheckpointIO()])`` (or the YAML ``trainer.plugins``).
    Remote paths (``s3://`` ...) fall back to the parent's write: object stores already make
    an upload visible only once complete. Sharded checkpoints of ``ModelParallelStrategy``
    (folders) do not go through ``CheckpointIO`` at all.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same folder as the target: os.replace is only atomic within one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # and the rename itself survives a power cut


class LatestModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last=True`` writes ``last.ckpt`` at every save point.

    Lightning's own ``save_last=True`` rewrites ``last.ckpt`` only when a top-k checkpoint is
    written at the same step, so once the monitored metric stops improving ``last.ckpt`` falls
    behind the run: resuming from it silently repeats steps, and exporting it is not the final
    policy. Here ``last.ckpt`` is also rewritten at each validation (or train-epoch end, where
    Lightning saves there) that did not produce a top-k file, as its name promises.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        # Skipped when anything (top-k and last) was already saved at this step, or outside fit.
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- resume state


def resume_state(metrics: PreferenceMetrics) -> dict[str, Any]:
    """RNG states and ``metrics``' window of every rank, and the window synced across ranks.

    Runs on every rank (``on_save_checkpoint`` does): it uses collectives.
    """
    rng = _collect_rng_states(include_cuda=torch.cuda.is_available())
    # NumPy's key array would need weights_only=False to load: store it as a list of ints.
    rng["numpy"] = tuple(v.tolist() if isinstance(v, np.ndarray) else v for v in rng["numpy"])
    own = {"rng": rng, "metrics": {k: _local_states(m) for k, m in metrics.means.items()}}
    if _world_size() > 1:
        gathered: list[Any] = [None] * _world_size()
        dist.all_gather_object(gathered, own)
        per_rank = gathered
    else:
        per_rank = [own]
    return {
        "rng_per_rank": [r["rng"] for r in per_rank],
        "metrics_per_rank": [r["metrics"] for r in per_rank],
        # For a resume on another number of ranks, which cannot split the window back per rank.
        "metrics": {k: _synced_states(m) for k, m in metrics.means.items()},
    }


def restore_resume_state(rank: int, metrics: PreferenceMetrics, state: dict[str, Any]) -> dict[str, Any]:
    """Put the metric window back; return the RNG states this rank must restore.

    The RNG is returned, not set: Lightning draws from the global RNG between loading the
    checkpoint and the first batch (the DataLoader's base seed), so the caller sets it at the
    first ``on_train_batch_start``, the same point in the stream the saving run was at.
    """
    per_rank = state["rng_per_rank"]
    window = state.get("metrics_per_rank")
    if window is not None and len(window) == _world_size():
        # Same ranks: each takes its own window back, so the next cross-rank sum adds the same
        # numbers in the same order as the uninterrupted run's (bitwise equal logs).
        for key, saved in window[rank].items():
            _load_states(metrics.means[key], saved, keep=True)
    else:
        # Another number of ranks (or an older checkpoint): the window saved as sums over all
        # ranks goes to rank 0, the others hold zeros; the next cross-rank sum is the same value
        # up to float rounding of the changed summation order.
        for key, saved in state["metrics"].items():
            _load_states(metrics.means[key], saved, keep=rank == 0)
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`resume_state` collected for this rank."""
    name, keys, *rest = states["numpy"]
    _set_rng_states({**states, "numpy": (name, np.asarray(keys, dtype=np.uint32), *rest)})


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local_states(metric: Metric) -> dict[str, Any]:
    states = {name: getattr(metric, name).detach().clone().cpu() for name in metric._defaults}
    return {"states": states, "update_count": metric._update_count}


def _synced_states(metric: Metric) -> dict[str, Any]:
    names = list(metric._defaults)
    with metric.sync_context(should_sync=_world_size() > 1):
        states = {name: getattr(metric, name).detach().clone().cpu() for name in names}
    return {"states": states, "update_count": metric._update_count}


def _load_states(metric: Metric, saved: dict[str, Any], *, keep: bool) -> None:
    for name, value in saved["states"].items():
        current = getattr(metric, name)
        setattr(metric, name, (value if keep else torch.zeros_like(value)).to(current.device, current.dtype))
    # Same count on every rank: ``has_updates`` decides whether all ranks enter the synced compute.
    metric._update_count = saved["update_count"]
    metric._computed = None
