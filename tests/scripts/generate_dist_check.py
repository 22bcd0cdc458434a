"""Generate on 1 or 2 CPU processes (DDP, gloo) into an output folder: ``trainer.predict`` with the writer.

    python tests/scripts/generate_dist_check.py --policy FOLDER --out DIR [--devices 2] [--kill-after N]

With ``--kill-after N`` rank 0 raises after writing its N-th batch (a crash mid-run; the other rank
is stopped by the launcher). The test checks the merged samples: every prompt once, in source order.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402

from dpo_lightning.data.prompts import PromptDataModule  # noqa: E402
from dpo_lightning.generation.module import GenerationModule  # noqa: E402
from dpo_lightning.generation.writer import JudgedSamplesWriter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    data = PromptDataModule(tokenizer=args.policy, dataset="synthetic:sort", split="validation", limit=11,
                            batch_size=2)
    module = GenerationModule(model=args.policy, tokenizer=data.tokenizer, num_samples=3, max_new_tokens=8)
    writer = JudgedSamplesWriter(output_dir=args.out, judge="function:dpo_lightning.data.synthetic:sort_reward")
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    trainer.predict(module, datamodule=data, return_predictions=False)


if __name__ == "__main__":
    main()
