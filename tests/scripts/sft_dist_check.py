"""One SFT optimizer step through SFTDataModule on 1 or 2 processes; saves the updated weights.

    python tests/scripts/sft_dist_check.py --devices {1,2} --batch-size B --accumulate K --out result.pt

The train sampler's order does not depend on the number of ranks (one seeded permutation; rank r
takes every world-th index), so 1 process with batch 4 and 2 processes with batch 2, both
accumulating 2 micro-batches, see the same 8 examples in the first optimizer step, split
differently into micro-batches and ranks. With the loss normalised by the step's loss tokens on
every rank (``window_tokens``), the update is the same; a per-micro-batch mean would differ.
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

from dpo_lightning import SFTDataModule, SFTModule  # noqa: E402
from dpo_lightning.data.synthetic import generate_pairs  # noqa: E402

from tiny import tiny_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--no-window", action="store_true", help="drop window_tokens (per-micro-batch means)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # Prompts of 3..8 digits: completions of very different lengths in every micro-batch.
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in generate_pairs(16, seed=3)]
    data = SFTDataModule(tokenizer="synthetic:sort", dataset=rows, val_split=None, max_length=32,
                         batch_size=args.batch_size, seed=1)
    torch.manual_seed(0)
    module = SFTModule(
        model_config=tiny_config("llama", vocab_size=data.vocab_size), tokenizer=data.tokenizer,
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
    )
    if args.no_window:
        step = module.step
        module.step = lambda batch, metrics: step({k: v for k, v in batch.items() if k != "window_tokens"}, metrics)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=1, accumulate_grad_batches=args.accumulate, gradient_clip_val=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    if trainer.global_rank == 0:
        torch.save({n: p.detach().clone() for n, p in module.model.named_parameters()}, args.out)


if __name__ == "__main__":
    main()
