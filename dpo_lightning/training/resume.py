"""What an exact resume needs that Lightning does not save itself: the RNG streams of every rank (dropout) and the
training metrics' running window (sums since the last log), so a resumed run logs and trains as if never stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torchmetrics import Metric

from dpo_lightning.training.metrics import RunningMeans

RESUME_KEY = "dpo_resume"


def resume_state(metrics: RunningMeans) -> dict[str, Any]:
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


def restore_resume_state(rank: int, metrics: RunningMeans, state: dict[str, Any]) -> dict[str, Any]:
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
        # Ranks that do not keep the window start empty: the metric's default (0 for sums, inf for a min).
        value = value if keep else torch.as_tensor(metric._defaults[name]).expand_as(value).clone()
        setattr(metric, name, value.to(current.device, current.dtype))
    # Same count on every rank: ``has_updates`` decides whether all ranks enter the synced compute.
    metric._update_count = saved["update_count"]
    metric._computed = None
