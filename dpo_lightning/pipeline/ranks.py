"""The processes of a multi-process pipeline: which one this is before any Trainer exists, how they were started,
and the files of the global rank 0 process that the others wait for.

Every process of a multi-GPU ``iterate`` runs the whole command, started by a launcher outside it (torchrun, srun),
and each stage's Trainer joins them. Only the global rank 0 process takes the output folder's lock and writes the
pipeline's own files (the stages' ``stage.json`` records, a round's ``mixed_pairs.jsonl``, the report); the others
wait for the ones they read (`wait_for_rank_zero`) and decide from the same files what rank 0 decides (`stage_runs`).

Lightning's own launcher (plain ``python -m dpo_lightning iterate`` with a stage on several devices) cannot run the
pipeline: at the first Trainer on several devices it starts the other ranks by running the whole command line again,
and each later Trainer of rank 0 would start more. `check_launch` refuses that before anything runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.environments import (
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.utilities.rank_zero import _get_rank

from dpo_lightning import cli
from dpo_lightning.stages.preflight import ConfigError
from dpo_lightning.training.callbacks import Preempted, preemption_signal
from dpo_lightning.training.folders import FolderError

# How long a rank > 0 waits for a file of rank 0 (rank 0 writes each between two stages, in well under a second,
# except a round's mixed pairs: `mix_with` may be a hub dataset to read first).
RANK_ZERO_WAIT_S = 600.0
_POLL_S = 0.2


def global_rank() -> int:
    """This process's global rank, from the launcher's environment (torchrun's ``RANK``, srun's ``SLURM_PROCID``, ...):
    what each stage's Trainer will say; 0 for a single process."""
    return _get_rank() or 0


def launched_externally() -> bool:
    """Whether a launcher outside Lightning started this process (torchrun, srun, LSF, MPI, or one's own that sets
    ``LOCAL_RANK``): then Lightning starts no process itself. Asked as the Trainer asks: the cluster environments
    it chooses from, else ``LightningEnvironment.creates_processes_externally``."""
    environments = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)
    return any(env.detect() for env in environments) or "LOCAL_RANK" in os.environ


def _processes(trainer: Mapping[str, Any]) -> tuple[int, str]:
    """How many processes a stage's trainer settings ask for on each node, and the setting that says so."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        parts = [p for p in devices.split(",") if p.strip()]
        devices = int(parts[0]) if len(parts) == 1 and "," not in devices else [int(p) for p in parts]
    if isinstance(devices, list | tuple):
        count = len(devices)
    elif devices in ("auto", "-1", -1):  # every device of the accelerator
        accelerator = str(trainer.get("accelerator") or "auto")
        count = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 1
    else:
        count = int(devices)
    return max(count, 1), f"trainer.devices {devices}"


def check_launch(stages: Mapping[str, tuple[Literal["fit", "generate"], list[str]]]) -> None:
    """`ConfigError` when no launcher started this process and a stage (name -> (command, arguments)) asks for
    several processes: Lightning's launcher would start them by running the whole command again."""
    if launched_externally():
        return
    for name, (command, args) in stages.items():
        trainer = cli.trainer_settings(command, args)
        per_node, setting = _processes(trainer)
        nodes = int(trainer.get("num_nodes") or 1)
        if per_node > 1 or nodes > 1:
            asks = setting if nodes == 1 else f"{setting}, trainer.num_nodes {nodes}"
            raise ConfigError(
                f"iterate: the {name} stage runs on {per_node * nodes} processes ({asks}), which Lightning's own "
                "launcher would start by running this whole command again; start them all with the command instead: "
                f"`torchrun --nproc-per-node {per_node} -m dpo_lightning iterate <these arguments>` on one node, srun "
                "on several (recipes/slurm/*.sbatch, docs/scale_out.md)")


def wait_for_rank_zero(path: Path, what: str, ready: Callable[[], bool] | None = None) -> None:
    """On a rank > 0: return once the global rank 0 process has written ``path`` (and ``ready()`` holds); after
    `RANK_ZERO_WAIT_S`, `FolderError` naming the file; `Preempted` on SIGTERM (rank 0 stops between stages too)."""
    ready = ready or path.exists
    deadline = time.monotonic() + RANK_ZERO_WAIT_S
    while not ready():
        if received := preemption_signal():
            raise Preempted(f"received {received}: stopped waiting for {path} ({what}); run the same iterate command "
                            "again to continue")
        if time.monotonic() > deadline:
            raise FolderError(
                f"rank {global_rank()}: waited {RANK_ZERO_WAIT_S:.0f} s for {path} ({what}), which the global rank 0 "
                "process writes: it stopped (its output says why) or does not see this folder; every process must "
                "run iterate with the same arguments, on a folder all of them see (a shared file system across nodes)")
        time.sleep(_POLL_S)


__all__ = ["RANK_ZERO_WAIT_S", "check_launch", "global_rank", "launched_externally", "wait_for_rank_zero"]
