"""Dry-run a GPU recipe on CPU: the recipe as written, with only what a CPU run needs overridden.

    python tests/scripts/recipe_dry_run.py recipes/llama7b.yaml --work DIR [--devices 2] [-- EXTRA CLI ARGS]

Overrides: ``accelerator cpu``, ``devices`` (2 by default, 1 for a one-GPU recipe), ``num_nodes 1``,
FSDP2's ``data_parallel_size`` = devices (gloo), a 2-layer random-init Llama (``model.model_config``)
instead of the hub id, a local word-level tokenizer with a chat template and local rows in the recipe's
data shape (UltraFeedback binarized pairs, or UltraChat conversations for SFT) saved with the recipe's
split names, ``max_steps 2``, ``max_length 64``, ``precision 32-true``, ``fsdp_mixed_precision false``,
no data workers or tokenization processes. Everything else (stage, loss, optimizer, schedule,
accumulation, clipping, activation checkpointing, collator, checkpoint and export settings) is the recipe's.

Run from the work folder (runs/ lands there). Lightning's launcher re-executes this script for rank 1,
which finds the inputs rank 0 wrote. Rank 0 writes ``DIR/result.json``: the optimizer steps done,
``last.ckpt`` and the export's files, and the gradient norm before and after every clipping.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ for chat_data

import torch  # noqa: E402
import yaml  # noqa: E402
from chat_data import save_tokenizer, ultrachat_rows, ultrafeedback_rows  # noqa: E402
from lightning.pytorch.plugins.precision import Precision  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False,
}
MAX_STEPS, EVAL_ROWS = 2, 6


def _init_args(section: dict | None) -> dict:
    section = section or {}
    return section.get("init_args", section) if "class_path" in section else section


def plan(recipe: Path, devices: int) -> tuple[dict, list[str]]:
    """(what the inputs must hold, the CLI overrides) for ``recipe`` on ``devices`` CPU processes."""
    config = yaml.safe_load(recipe.read_text())
    trainer, model, data = config["trainer"], _init_args(config.get("model")), _init_args(config.get("data"))
    sft = "SFTDataModule" in str((config.get("data") or {}).get("class_path", ""))
    # Enough rows for MAX_STEPS optimizer steps on every rank, so the epoch does not end first.
    rows = MAX_STEPS * trainer.get("accumulate_grad_batches", 1) * data.get("batch_size", 8) * devices
    inputs = {
        "sft": sft, "train_rows": rows + devices * 2,
        "splits": [data.get("train_split", "train"), data.get("val_split", "validation" if sft else "test")],
    }
    args = [
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.num_nodes", "1",
        "--trainer.precision", "32-true", "--trainer.max_steps", str(MAX_STEPS), "--trainer.enable_progress_bar",
        "false", "--model.model", "null", "--model.model_config", json.dumps(TINY_LLAMA),
        "--data.max_length", "64", "--data.num_workers", "0", "--data.num_proc", "null",
    ]
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and strategy.get("class_path", "").endswith("ModelParallelStrategy"):
        args += ["--trainer.strategy.init_args.data_parallel_size", str(devices)]
    if data.get("max_prompt_length"):
        args += ["--data.max_prompt_length", "32"]
    if (model.get("memory") or {}).get("fsdp_mixed_precision"):
        args += ["--model.memory.fsdp_mixed_precision", "false"]
    return inputs, args


def write_inputs(work: Path, inputs: dict) -> None:
    """The tokenizer (with a chat template) and the rows, saved with the recipe's split names."""
    from datasets import Dataset, DatasetDict

    save_tokenizer(work / "tokenizer")
    make = ultrachat_rows if inputs["sft"] else ultrafeedback_rows
    train, val = inputs["splits"]
    DatasetDict({
        train: Dataset.from_list(make(inputs["train_rows"], seed=0)),
        val: Dataset.from_list(make(EVAL_ROWS, seed=1)),
    }).save_to_disk(str(work / "data"))


NORMS: list[tuple[float, float, float]] = []  # (before, after, clip_val) per clipping


def _total_norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a collective under FSDP2


def _record_clipping() -> None:
    """Wrap Lightning's norm clipping to record the global gradient norm before and after it."""
    clip = Precision.clip_grad_by_norm

    def recorded(self: Precision, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        before = _total_norm(optimizer)
        clip(self, optimizer, clip_val)
        NORMS.append((before, _total_norm(optimizer), float(clip_val)))

    Precision.clip_grad_by_norm = recorded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more CLI arguments
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if extra else 0)])

    torch.set_num_threads(1)
    inputs, overrides = plan(args.recipe, args.devices)
    if "LOCAL_RANK" not in os.environ:  # the launching process; rank 1 re-runs this script later
        write_inputs(args.work, inputs)
    _record_clipping()
    from dpo_lightning.cli import cli_main

    cli = cli_main([
        "fit", "--config", str(args.recipe.resolve()), *overrides,
        "--data.tokenizer", str(args.work / "tokenizer"), "--data.dataset", str(args.work / "data"), *extra,
    ])
    run = Path(cli.trainer.log_dir)  # a broadcast: every rank asks
    if cli.trainer.is_global_zero:
        export = run / "hf_export"
        result = {
            "global_step": cli.trainer.global_step,
            "world_size": cli.trainer.world_size,
            "strategy": type(cli.trainer.strategy).__name__,
            "last_ckpt": (run / "checkpoints" / "last.ckpt").exists(),
            "export": sorted(p.name for p in export.iterdir()) if export.is_dir() else [],
            "norms": NORMS,
        }
        (args.work / "result.json").write_text(json.dumps(result))
    # Close the process group before the interpreter exits: gloo's threads torn down at exit have aborted
    # the process ("terminate called without an active exception") after a successful run.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
