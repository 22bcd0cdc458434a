"""Export a trained policy in Hugging Face format (safetensors, config, tokenizer, generation config).

At the end of ``fit`` the :class:`HFExport` callback writes ``<run dir>/hf_export``; any Lightning
checkpoint can be exported later with ``python -m dpo_lightning export CKPT OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

AdapterExport = Literal["merged", "adapter"]


def export_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | Path,
    state_dict: dict[str, Any] | None = None,
    adapter: AdapterExport = "merged",
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``output_dir``, atomically.

    ``state_dict`` replaces the model's own weights, e.g. the full weights gathered from an
    FSDP2-sharded model (:func:`dpo_lightning.distributed.full_state_dict`).

    A PEFT (LoRA) policy is exported ``merged`` (adapters folded into a copy of the base weights:
    a plain model for ``AutoModelForCausalLM``) or as the ``adapter`` alone (for
    ``PeftModel.from_pretrained`` on top of the base model).

    Everything is written to a sibling temporary folder first and renamed into place, so a
    crash mid-export never leaves a half-written model where a finished one is expected.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        if tokenizer is not None:
            _fill_special_token_ids(model, tokenizer)
        if _is_peft(model) and adapter == "merged":
            # Merge into a copy: the trained module keeps its adapters.
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists() and not _is_peft(model):
            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _is_peft(model: Any) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def _fill_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a config-built model the tokenizer's special ids, so ``generate`` stops at EOS."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is None:
            continue
        if getattr(model.config, name, None) is None:
            setattr(model.config, name, value)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, name, None) is None:
            setattr(gen, name, value)


class HFExport(L.Callback):
    """At the end of ``fit``, export the policy to ``<run dir>/<dirname>`` on rank 0."""

    def __init__(self, dirname: str = "hf_export", adapter: AdapterExport = "merged") -> None:
        """
        Args:
            dirname: Folder name of the export inside the run directory (the logger's log_dir).
            adapter: For a LoRA policy: export the merged model, or the adapter weights alone.
        """
        self.dirname = dirname
        self.adapter = adapter

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        from dpo_lightning.distributed import full_state_dict, is_sharded

        # Under FSDP2 gathering the full weights is a collective: every rank takes part.
        state = full_state_dict(pl_module.model) if is_sharded(pl_module.model) else None
        # Trainer.log_dir broadcasts from rank 0, a collective too: read it on every rank.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None)
            out = export_hf(pl_module.model, tokenizer, run_dir / self.dirname, state, adapter=self.adapter)
            rank_zero_info(f"Hugging Face export of the policy: {out}")
            final = {k: f"{v.item():.4f}" for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if final:
                rank_zero_info(f"Last validation: {final}")
            if trainer.logger is not None:
                rank_zero_info(f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {run_dir})")
        trainer.strategy.barrier("hf_export")


def export_checkpoint(ckpt_path: str | Path, output_dir: str | Path, adapter: AdapterExport = "merged") -> Path:
    """Export the policy of a ``DPOModule`` checkpoint (a file, or a sharded FSDP2 folder) in HF format."""
    from dpo_lightning.distributed import consolidate_checkpoint
    from dpo_lightning.module import DPOModule

    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():  # sharded: gather the shards into one file first
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(consolidate_checkpoint(ckpt_path), Path(tmp) / "full.ckpt")
            return export_checkpoint(Path(tmp) / "full.ckpt", output_dir, adapter)
    module = DPOModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return export_hf(module.model, module.tokenizer, output_dir, adapter=adapter)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_lightning export",
        description="Export the policy of a DPOModule checkpoint in Hugging Face format (safetensors).",
    )
    parser.add_argument("ckpt_path", help="Lightning checkpoint written by `fit`")
    parser.add_argument("output_dir", help="folder to write; loadable with AutoModelForCausalLM.from_pretrained")
    parser.add_argument(
        "--adapter", choices=["merged", "adapter"], default="merged",
        help="for a LoRA policy: the merged model (default) or the adapter weights alone",
    )
    args = parser.parse_args(argv)
    print(f"Exported to {export_checkpoint(args.ckpt_path, args.output_dir, args.adapter)}")
