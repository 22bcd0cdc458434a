"""Peak host memory per rank when FSDP2 loads a model: every rank loading it (the default) against
``model.memory.sharded_init`` (rank 0 loads, the others start on the meta device and receive their
shards). Not part of pytest.

    python benchmarks/fsdp2_load_memory.py                 # ~270M-parameter Llama, fp32, 2 CPU processes
    python benchmarks/fsdp2_load_memory.py --layers 8      # smaller

The driver saves a random-init Llama once (safetensors), then runs one DPO step under
``ModelParallelStrategy(data_parallel_size=2)`` on CPU (gloo) twice, sharded_init off and on, each in
its own pair of processes; every rank reports its peak resident set size (``ru_maxrss``) when training
starts (the policy and the reference loaded and sharded) and at the end. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def save_model(folder: Path, layers: int) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_rank(args: argparse.Namespace) -> None:
    """One run (Lightning re-executes this for rank 1)."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from dpo_lightning import DPOModule
    from dpo_lightning.stages.options import MemoryOptions

    torch.set_num_threads(1)
    at_start: dict[str, float] = {}

    class Measure(L.Callback):
        def on_train_start(self, trainer, pl_module):
            at_start["mib"] = peak_mib()

    module = DPOModule(
        model=str(args.folder), dtype="float32",
        memory=MemoryOptions(fsdp_mixed_precision=False, sharded_init=args.sharded_init),
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[Measure()],
    )
    trainer.fit(module, DataLoader([batch, batch], batch_size=None))
    result = {"rank": trainer.global_rank, "at_train_start_mib": at_start["mib"], "peak_mib": peak_mib()}
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("runs/fsdp2_load_memory"))
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharded-init", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        run_rank(args)
        return
    folder = args.workdir / f"llama_{args.layers}l"
    if not (folder / "config.json").exists():
        params = save_model(folder, args.layers)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(folder)
        h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        params = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    print(f"model: Llama, {params / 1e6:.0f}M parameters, fp32 ({params * 4 / 2**20:.0f} MiB); policy + reference")
    rows = []
    for sharded in (False, True):
        out = args.workdir / ("sharded_init" if sharded else "every_rank")
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--rank-run", "--folder", str(folder), "--out", str(out)]
        subprocess.run([*command, *(["--sharded-init"] if sharded else [])], check=True)
        for rank in (0, 1):
            r = json.loads((out / f"rank{rank}.json").read_text())
            rows.append((sharded, rank, r["at_train_start_mib"], r["peak_mib"]))
    print("| memory.sharded_init | rank | peak RSS when training starts (MiB) | peak RSS, whole run (MiB) |")
    print("|---|---|---|---|")
    for sharded, rank, start, peak in rows:
        print(f"| {str(sharded).lower()} | {rank} | {start:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
