"""Train a tiny policy for a few steps under one strategy and save what a test compares.

Run as a script (Lightning's ``ddp`` launcher re-executes ``sys.argv``, which pytest's is not):

    python tests/scripts/dist_check.py --strategy {single,ddp,fsdp2} --out result.pt [options]

Every run sees the same *global* batches of ``GLOBAL_PAIRS`` pairs per step; with 2 processes
rank ``r`` gets pairs ``[r*half, (r+1)*half)`` of each, so per-rank content (lengths, token
counts) is uneven while the global batch is identical. Rank 0 writes: the metrics Lightning
logged per step (train/* synced as sums), the validation metrics, the full gradients of the
first step and the full parameters after the last.

With ``--eval-odd`` it only validates, through ``PreferenceDataModule``, a held-out split whose
size (5 pairs, batches of 2) does not divide evenly over 2 ranks: once as the data module shards it
(padding weighted 0) and once with Lightning's plain ``DistributedSampler`` padding.
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
from datasets import Dataset, DatasetDict  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dpo_lightning import DPOModule  # noqa: E402
from dpo_lightning.data import COLLATORS, PreferenceDataModule  # noqa: E402
from dpo_lightning.data.synthetic import generate_pairs  # noqa: E402
from dpo_lightning.stages.options import MemoryOptions  # noqa: E402
from dpo_lightning.training.distributed import decoder_layers, full_state_dict  # noqa: E402

from tiny import random_batch, tiny_config  # noqa: E402

GLOBAL_PAIRS = 4
STEPS = 3
EVAL_PAIRS, EVAL_BATCH = 5, 2  # odd: 2 ranks get 3 pairs each, one of them a repeat


def global_batches(n: int, seed0: int) -> list[dict[str, torch.Tensor]]:
    # t varies per step; random_batch varies lengths and prompt sizes per row.
    return [random_batch(b=GLOBAL_PAIRS, t=9 + i, seed=seed0 + i) for i in range(n)]


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Pairs ``[rank*h, (rank+1)*h)`` of a ``(2B, T)`` batch, chosen rows first."""
    b = batch["input_ids"].shape[0] // 2
    h = b // world
    rows = list(range(rank * h, (rank + 1) * h)) + list(range(b + rank * h, b + (rank + 1) * h))
    return {k: v[rows] for k, v in batch.items()}


def pair_features(batch: dict[str, torch.Tensor]) -> list[dict]:
    """The pairs of a padded ``(2B, T)`` batch as collator features, the rejected side given the chosen
    side's prompt (so that a prefix-sharing collator has a prompt to share)."""
    b = batch["input_ids"].shape[0] // 2
    out = []
    for k in range(b):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        c_len, r_len = int(mask[k].sum()), int(mask[b + k].sum())
        c_start = int((labels[k] != -100).nonzero()[0])
        r_start = int((labels[b + k] != -100).nonzero()[0])
        chosen = ids[k, :c_len].tolist()
        out.append({
            "chosen_input_ids": chosen, "chosen_response_start": c_start,
            "rejected_input_ids": chosen[:c_start] + ids[b + k, r_start:r_len].tolist(),
            "rejected_response_start": c_start,
        })
    return out


class Data(L.LightningDataModule):
    """The global batches, each rank taking its pairs; with ``collator`` the pairs (prompts shared by both
    sides, `pair_features`) are batched by that collator of ours instead."""

    def __init__(self, collator: str | None = None, batches: int = STEPS) -> None:
        super().__init__()
        self.collator = collator
        self.train, self.val = global_batches(batches, 0), global_batches(2, 100)

    def _loader(self, batches):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.collator is None:
            return DataLoader([shard(b, rank, world) for b in batches], batch_size=None)
        collate = COLLATORS[self.collator](pad_token_id=0)
        mine = []
        for batch in batches:
            pairs = pair_features(batch)
            h = len(pairs) // world
            mine.append(collate(pairs[rank * h : (rank + 1) * h]))
        return DataLoader(mine, batch_size=None)

    def train_dataloader(self):
        return self._loader(self.train)

    def val_dataloader(self):
        return self._loader(self.val)


class Capture(L.Callback):
    """Full (unsharded) gradients of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {n: _full(p.grad) for n, p in pl_module.model.named_parameters() if p.grad is not None}


class SyncEveryMicroBatch(L.Callback):
    """Reduce-scatter the gradients of every micro-batch (FSDP2's behaviour before the stage synced once per
    optimizer step): the reference the once-per-step result is compared with."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        pl_module.model.set_requires_gradient_sync(True)


def count_reduce_scatters() -> list[int]:
    """Count FSDP2's gradient reduce-scatters (``dist.reduce_scatter_single``, what its default comm calls)."""
    import torch.distributed as dist

    calls = [0]
    original = dist.reduce_scatter_single

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counted
    return calls


class ListLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    name = "list"
    version = 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


class PlainEvalSharding(PreferenceDataModule):
    """The eval loader as it was: Lightning injects ``DistributedSampler``, whose padding counts twice."""

    def _eval_loader(self, split: str) -> DataLoader:
        return self._loader(self.splits[split], EVAL_BATCH, shuffle=False)


def validate_odd(strategy, devices: int, out: str) -> None:
    """Validate the same perturbed tiny policy on ``EVAL_PAIRS`` held-out pairs, fixed and plain."""
    rows = generate_pairs(8 + EVAL_PAIRS, seed=5)
    splits = DatasetDict({"train": Dataset.from_list(rows[:8]), "validation": Dataset.from_list(rows[8:])})

    def data(cls: type[PreferenceDataModule]) -> PreferenceDataModule:
        return cls(tokenizer="synthetic:sort", dataset=splits, max_length=32, batch_size=EVAL_BATCH)

    module = DPOModule(model_config=tiny_config("llama", vocab_size=data(PreferenceDataModule).vocab_size))
    with torch.no_grad():  # policy != reference, so losses and rewards differ from pair to pair
        for p in module.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    fixed = trainer.validate(module, datamodule=data(PreferenceDataModule), verbose=False)[0]
    plain = trainer.validate(module, datamodule=data(PlainEvalSharding), verbose=False)[0]
    if trainer.is_global_zero:
        torch.save({"val": fixed, "val_plain": plain, "batches": trainer.num_val_batches}, out)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", action="store_true", help="FSDP2 bf16 compute (default: fp32)")
    parser.add_argument("--save-dir", help="also save a sharded and a full checkpoint here (fsdp2)")
    parser.add_argument("--eval-odd", action="store_true", help="only validate an odd-sized split (see above)")
    parser.add_argument("--lean", choices=["auto", "on", "off"], default="auto", help="model.memory.lean_logprobs")
    parser.add_argument("--sharded-init", action="store_true", help="model.memory.sharded_init (fsdp2)")
    parser.add_argument("--collator", choices=sorted(COLLATORS), help="batch the pairs with this collator of ours")
    parser.add_argument("--accumulate", type=int, default=1, help="trainer.accumulate_grad_batches")
    parser.add_argument("--sync-every-micro-batch", action="store_true", help="FSDP2: reduce-scatter every micro-batch")
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if args.strategy == "single":
        strategy, devices = "auto", 1
    elif args.strategy == "ddp":
        strategy, devices = "ddp", 2
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, devices = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
    if args.eval_odd:
        return validate_odd(strategy, devices, args.out)
    module = DPOModule(
        model_config=tiny_config("llama"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        memory=MemoryOptions(
            activation_checkpointing=args.activation_checkpointing, fsdp_mixed_precision=args.mixed_precision,
            lean_logprobs={"auto": None, "on": True, "off": False}[args.lean], sharded_init=args.sharded_init,
        ),
    )
    capture, logger = Capture(), ListLogger()
    callbacks = [capture, *([SyncEveryMicroBatch()] if args.sync_every_micro_batch else [])]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=logger, log_every_n_steps=1,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, accumulate_grad_batches=args.accumulate,
    )
    reduce_scatters = count_reduce_scatters()
    trainer.fit(module, datamodule=Data(args.collator, batches=STEPS * args.accumulate))
    reduce_scatters = reduce_scatters[0]  # (validation runs no backward)
    params = {n: _full(p) for n, p in module.model.named_parameters()}  # collective under FSDP2
    export_state = full_state_dict(module.model)  # collective under FSDP2; what an HF export would save
    # The dtypes of what is stored (sharded parameters), not of a root left unsharded by validation.
    policy_dtype = trainer.optimizers[0].param_groups[0]["params"][0].dtype
    if hasattr(module.ref_model, "reshard"):
        module.ref_model.reshard()
    if args.save_dir:
        # Both formats of ModelParallelStrategy from one run: sharded (a folder), then full (a file).
        trainer.save_checkpoint(os.path.join(args.save_dir, "sharded.ckpt"))
        trainer.strategy._save_distributed_checkpoint = False
        trainer.save_checkpoint(os.path.join(args.save_dir, "full.ckpt"))
    if trainer.is_global_zero:
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        train = [r for r in logger.rows if "train/loss" in r]
        dtypes = {
            "policy": str(policy_dtype),
            "reference": str(next(module.ref_model.parameters()).dtype),
        }
        torch.save(
            {
                "train": train, "val": val, "grads": capture.grads, "params": params, "dtypes": dtypes,
                "export_state": {k: v.float() for k, v in export_state.items()},
                "gradient_checkpointing": module.model.is_gradient_checkpointing,
                "lean_logprobs": module.lean_logprobs,
                "reduce_scatters": reduce_scatters, "fsdp_units": len(decoder_layers(module.model)) + 1,
            },
            args.out,
        )


if __name__ == "__main__":
    main()
