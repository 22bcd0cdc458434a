"""One side of the benchmark in its own process: ``python benchmarks/bench_sides.py SPEC.json OUT.json``.

A fresh process per side keeps peak RSS honest (nothing the other library allocated or imported).
Each side loads the same saved model and the same ``pairs.jsonl``, computes the step-0 loss and
per-sequence log-probs on the first batch (no update), then trains ``warmup + steps`` optimizer
steps in the same order (no shuffling) and records the wall time between consecutive step ends.

Sides: ``ours`` (DPOModule + Lightning Trainer, ``collator`` pad/pack/share/auto, ``lean`` on/off) and
``trl`` (TRL's DPOTrainer, right padding, its fused LM head).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _device_peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _rows(spec: dict) -> list[dict[str, str]]:
    with open(Path(spec["folder"]) / "pairs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][: spec["batch_size"] * (spec["warmup"] + spec["steps"])]


def run_ours(spec: dict) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from dpo_lightning import DPOModule
    from dpo_lightning.data import PreferenceExample, TokenizeConfig, build_collator, render, tokenize_pairs
    from dpo_lightning.data.collate import COLLATORS
    from dpo_lightning.data.prefix_sharing import PrefixSharingCollator, attention_cost, layout_costs
    from dpo_lightning.stages.options import MemoryOptions

    model_dir = str(Path(spec["folder"]) / "model")
    module = DPOModule(
        model=model_dir,
        tokenizer=model_dir,
        max_length=spec["max_length"],
        loss_type=spec["loss"],
        beta=spec["beta"],
        memory=MemoryOptions(lean_logprobs=spec["lean"], activation_checkpointing=spec.get("checkpointing", False)),
        attn_implementation="sdpa",
        optimizer=lambda params: torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = module.tokenizer
    rows = _rows(spec)
    cfg = TokenizeConfig(max_length=spec["max_length"], max_prompt_length=None)
    rendered = [render(PreferenceExample(r["prompt"], r["chosen"], r["rejected"]), tokenizer, None) for r in rows]
    features = [
        {
            "chosen_input_ids": c.input_ids,
            "chosen_response_start": c.response_start,
            "rejected_input_ids": r.input_ids,
            "rejected_response_start": r.response_start,
        }
        for c, r in tokenize_pairs(rendered, tokenizer, cfg)
    ]
    cost = attention_cost(module.model.config)
    if spec["collator"] == "auto":  # the library's default for pairs: share where it saves compute
        collator = PrefixSharingCollator(
            pad_token_id=tokenizer.pad_token_id, max_tokens_per_row=spec.get("pack_budget"), attention_cost=cost
        )
    elif spec["collator"] in ("pack", "share"):
        collator = COLLATORS[spec["collator"]](
            pad_token_id=tokenizer.pad_token_id, max_tokens_per_row=spec.get("pack_budget")
        )
    else:
        collator = build_collator("pad", pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(features, batch_size=spec["batch_size"], shuffle=False, collate_fn=collator)

    module.to(device)
    first = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(iter(loader)).items()}
    with torch.no_grad():
        out, policy, _ = module(first)
    step0 = {"loss": out.losses.mean().item(), "logps": policy.logps.tolist()}

    ends: list[float] = []

    class _Clock(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    rss_before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=spec.get("precision", "32-true"),
        max_steps=spec["warmup"] + spec["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[_Clock()],
    )
    trainer.fit(module, train_dataloaders=loader)
    # Real (non-padding) tokens of each batch, the same for both sides: they see the same ids.
    batch_tokens = [
        sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in features[i : i + spec["batch_size"]])
        for i in range(0, len(features), spec["batch_size"])
    ]
    # The cost model's figure for each batch laid out shared and packed (prefix_sharing.layout_costs).
    size = spec["batch_size"]
    costs = [layout_costs(features[i : i + size], cost) for i in range(0, len(features), size)]
    return {"step0": step0, "step_ends": ends, "rss_before_mib": rss_before, "batch_tokens": batch_tokens,
            "layout_costs": costs}


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model_dir = str(Path(spec["folder"]) / "model")
    args = DPOConfig(
        output_dir=str(Path(spec["folder"]) / "trl_out"),
        per_device_train_batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        truncation_mode="keep_start",  # = ours: cut the end of the response
        loss_type=[spec["loss"]],
        beta=spec["beta"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # Lightning does not clip by default
        max_steps=spec["warmup"] + spec["steps"],
        train_sampling_strategy="sequential",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_dropout=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        # TRL 1.x defaults to bf16 autocast (on CPU too); both sides run the spec's precision (default fp32):
        # its bf16 is autocast, ours "bf16-mixed".
        bf16=spec.get("precision", "32-true").startswith("bf16"),
        # TRL 1.x defaults to gradient checkpointing; both sides use the same setting.
        gradient_checkpointing=spec.get("checkpointing", True),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs={"attn_implementation": "sdpa"},
    )
    ends: list[float] = []
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(_rows(spec)), callbacks=[_Clock()])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        fused = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
        )
    step0 = {"loss": loss.item(), "logps": fused.log_probs.sum(dim=1).tolist()}
    rss_before = _rss_mib()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"step0": step0, "step_ends": ends, "rss_before_mib": rss_before}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    result = run_trl(spec) if spec["side"] == "trl" else run_ours(spec)
    result.update(
        peak_rss_mib=_peak_rss_mib(),
        device_peak_mib=_device_peak_mib(),
        wall_s=time.perf_counter() - start,
    )
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
