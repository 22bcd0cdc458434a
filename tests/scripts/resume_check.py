"""Exact resume on 2 processes: an interrupted-and-resumed run against an uninterrupted one.

Run as a script (Lightning's ``ddp`` launcher re-executes ``sys.argv``, which pytest's is not):

    python tests/scripts/resume_check.py --strategy {ddp,fsdp2} --ckpt-dir DIR --out result.pt

One launch runs, on 2 CPU processes (gloo), with dropout on in the policy:

* ``uninterrupted``: ``STEPS`` optimizer steps;
* a run that saves ``last.ckpt`` after every step and crashes after step ``CRASH_AT``, mid-epoch
  (under FSDP2 ``last.ckpt`` is a sharded folder: ``save_distributed_checkpoint=True``);
* ``resumed``: a fresh module and trainer, ``fit(ckpt_path=last.ckpt)`` up to ``STEPS``;
* controls that must *not* match, resumed from the same checkpoint with part of the restore
  broken: ``rng_rank0`` (every rank restores rank 0's RNG streams), ``rng_off`` (no RNG restore
  at all) and ``window_synced`` (the metric window restored the way a resume on another number
  of ranks must: summed over ranks onto rank 0, which changes the summation order).

Each rank draws from its own RNG stream (seeded ``100 + rank`` at train start), as dropout does
on any run whose ranks were seeded apart, so a rank restoring another rank's stream shows.
Rank 0 writes, per run: the full policy weights (gathered under FSDP2) and the logged metrics.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ for the tiny.py helpers

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import dpo_lightning.stages.checkpointing as dpo_module  # noqa: E402
from dpo_lightning import DPOModule  # noqa: E402
from dpo_lightning.data.sampler import ResumableTrainData  # noqa: E402
from dpo_lightning.stages.options import MemoryOptions
from dpo_lightning.training.distributed import full_state_dict  # noqa: E402

from tiny import Crash, CrashAfterStep, ListLogger, random_batch, tiny_config  # noqa: E402

# 20 pairs on 2 ranks, batches of 2 per rank: 5 steps per epoch. The crash is mid-epoch 0, the run ends in epoch 1.
PAIRS, BATCH, STEPS, CRASH_AT = 20, 2, 7, 3


def collate(pairs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """B pairs -> the (2B, T) contract: all chosen rows, then all rejected rows."""
    return {k: torch.cat([p[k][:1] for p in pairs] + [p[k][1:] for p in pairs]) for k in pairs[0]}


class PairData(ResumableTrainData, L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.pairs = [random_batch(b=1, t=10, seed=i) for i in range(PAIRS)]

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(self.pairs, BATCH, seed=7)  # sharded by rank
        return DataLoader(self.pairs, batch_size=BATCH, sampler=sampler, collate_fn=collate)


class SeedPerRank(L.Callback):
    """Give each rank its own RNG stream (dropout masks differ between ranks)."""

    def on_train_start(self, trainer, pl_module) -> None:
        torch.manual_seed(100 + trainer.global_rank)


def make_module() -> DPOModule:
    L.seed_everything(0, verbose=False)
    # Dropout on, so the result also depends on every rank's RNG stream being restored.
    config = {**tiny_config("gpt2"), "resid_pdrop": 0.1, "attn_pdrop": 0.1, "embd_pdrop": 0.1}
    return DPOModule(
        model_config=config, disable_dropout=False, memory=MemoryOptions(fsdp_mixed_precision=False),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )


def make_trainer(strategy: str, logger: Logger, callbacks: list, **kw) -> L.Trainer:
    if strategy == "ddp":
        strat = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=True)
    return L.Trainer(
        accelerator="cpu", devices=2, strategy=strat, max_steps=STEPS, logger=logger, log_every_n_steps=2,
        callbacks=[SeedPerRank(), *callbacks], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


def result(trainer: L.Trainer, module: DPOModule, logger: ListLogger) -> dict:
    state = full_state_dict(module.model)  # collective under FSDP2: rank 0 gets the tensors
    return {
        "global_step": trainer.global_step,
        "weights": {k: v.detach().float().cpu().clone() for k, v in state.items()},
        "logs": logger.rows,
    }


def resume(strategy: str, ckpt: str, rng: str) -> dict:
    """A fresh module and trainer continuing from ``ckpt``; ``rng`` breaks part of the restore."""
    restore, set_rng = dpo_module.restore_resume_state, dpo_module.set_rng_states
    if rng == "window-synced":  # as if the checkpoint held no per-rank window

        def synced_window(rank, metrics, state):
            return restore(rank, metrics, {k: v for k, v in state.items() if k != "metrics_per_rank"})

        dpo_module.restore_resume_state = synced_window
    elif rng == "rank0":  # every rank restores rank 0's streams

        def rank0_only(rank, metrics, state):
            restore(rank, metrics, state)
            return state["rng_per_rank"][0]

        dpo_module.restore_resume_state = rank0_only
    elif rng == "off":  # no RNG restore: the stream continues from wherever the process is
        dpo_module.set_rng_states = lambda states: None
    try:
        module, logger = make_module(), ListLogger()
        trainer = make_trainer(strategy, logger, [], enable_checkpointing=False)
        trainer.fit(module, datamodule=PairData(), ckpt_path=ckpt)
        return result(trainer, module, logger)
    finally:
        dpo_module.restore_resume_state, dpo_module.set_rng_states = restore, set_rng


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    runs: dict[str, dict] = {}
    module, logger = make_module(), ListLogger()
    trainer = make_trainer(args.strategy, logger, [], enable_checkpointing=False)
    trainer.fit(module, datamodule=PairData())
    runs["uninterrupted"] = result(trainer, module, logger)

    saver = ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = make_trainer(args.strategy, ListLogger(), [CrashAfterStep(CRASH_AT), saver])
    try:
        trainer.fit(make_module(), datamodule=PairData())
        raise AssertionError("the injected crash did not happen")
    except Crash:
        pass
    ckpt = os.path.join(args.ckpt_dir, "last.ckpt")
    runs["crashed_at"] = {"global_step": trainer.global_step, "is_dir": os.path.isdir(ckpt)}

    controls = (("rng_rank0", "rank0"), ("rng_off", "off"), ("window_synced", "window-synced"))
    for name, rng in (("resumed", "per-rank"), *controls):
        runs[name] = resume(args.strategy, ckpt, rng)
    if trainer.is_global_zero:
        torch.save(runs, args.out)


if __name__ == "__main__":
    main()
