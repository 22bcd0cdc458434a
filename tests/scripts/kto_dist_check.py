"""KTO validation over an uneven shard on 2 CPU processes (DDP, gloo), and the same examples on 1 process.

Run as a script (Lightning's ``ddp`` launcher re-executes ``sys.argv``, which pytest's is not):

    python tests/scripts/kto_dist_check.py --devices {1,2} --out result.pt

Both modes build the same seeded ``KTOModule`` (its reference moved off the policy, so the KL estimate z0
is > 0 and never clamped) and the same 5 held-out unpaired examples, batched by ``KTODataModule(
eval_batch_size=3)``. KTO's z0 is a statistic of the step's batch, and the collator builds
each batch's mismatched KL rows from that batch alone, so the two modes are set up to see the same rows:

``--devices 2`` validates through the data module: each rank gets one batch of 3 (``PaddedEvalSampler``),
rank 0 examples 0, 2, 4, rank 1 examples 1, 3 and example 0 again as padding (weight 0). Each rank saves
the batch it saw; rank 0 saves the ``val/*`` metrics.

``--devices 1`` builds those two rank batches itself (the data module's collator, the shards above) and
validates one batch made of both without the padding row: the same 5 examples with the same 5 KL rows. So
the 2-process run's z0 (KL statistics summed over ranks, padding weighted 0) must equal this run's. It also
saves both rank batches and the per-row KL log-ratios of each, from which the test says what z0 a run
without the cross-rank sum, or counting the padding, would get.
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
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import dpo_lightning  # noqa: E402
from dpo_lightning import KTOModule  # noqa: E402
from dpo_lightning.data import KTODataModule  # noqa: E402
from dpo_lightning.data.synthetic import generate_pairs  # noqa: E402
from dpo_lightning.models.logprobs import IGNORE_INDEX  # noqa: E402

from tiny import tiny_config  # noqa: E402

EVAL_EXAMPLES, EVAL_BATCH = 5, 3  # 2 ranks: 3 examples each, one of them padding; one batch per rank
# PaddedEvalSampler's shards of 5 examples on 2 ranks: (index, is_padding).
SHARDS = [[(0, False), (2, False), (4, False)], [(1, False), (3, False), (0, True)]]
SETTINGS = dict(beta=0.37, desirable_weight=1.5, undesirable_weight=0.6)


def datamodule() -> KTODataModule:
    pairs = generate_pairs(8 + EVAL_EXAMPLES, seed=5)
    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(pairs)]
    splits = DatasetDict({"train": Dataset.from_list(rows[:8]), "validation": Dataset.from_list(rows[8:])})
    return KTODataModule(tokenizer="synthetic:sort", dataset=splits, max_length=48, batch_size=EVAL_BATCH)


def build_module(vocab_size: int) -> KTOModule:
    torch.manual_seed(0)
    module = KTOModule(model_config=tiny_config("llama", vocab_size=vocab_size), **SETTINGS)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a near-uniform random policy scores the KL rows above a perturbed reference
        for p in module.ref_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def rank_batches(data: KTODataModule) -> list[dict[str, Tensor]]:
    """The batch each of the 2 ranks validates, collated by the data module's own collator."""
    dataset = data.splits["validation"]
    return [data.collate_fn([{**dataset[i], "padding": pad} for i, pad in shard]) for shard in SHARDS]


def merge_real_rows(batches: list[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """One batch of every row with weight 1, each (N, T) key right-padded to the widest; no ``weight``."""
    pad_values = {"input_ids": pad_token_id, "kl_input_ids": pad_token_id, "labels": IGNORE_INDEX,
                  "kl_labels": IGNORE_INDEX, "attention_mask": 0, "kl_attention_mask": 0}
    merged = {}
    for key in [*pad_values, "desirable"]:
        parts = [b[key][b["weight"] > 0] for b in batches]
        if key in pad_values:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_values[key]) for p in parts]
        merged[key] = torch.cat(parts)
    return merged


class CaptureBatch(L.Callback):
    """Each rank saves the validation batch it gets to ``{out}.rank{r}``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        torch.save({k: v.cpu() for k, v in batch.items()}, f"{self.out}.rank{trainer.global_rank}")


def kl_ratios(module: KTOModule, batch: dict[str, Tensor]) -> Tensor:
    """Policy - reference log-prob of each KL row of ``batch`` (N,)."""
    rows = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
            "labels": batch["kl_labels"]}
    with torch.no_grad():
        return module.sequence_logps(module.model, rows).logps - module.sequence_logps(module.ref_model, rows).logps


def trainer(devices: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, choices=[1, 2], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.devices, args.out)


def run(devices: int, out: str) -> dict:
    """Validate as described above; returns (and saves to ``out``, rank 0) what the test compares."""
    data = datamodule()
    module = build_module(data.vocab_size)
    result = {"package": os.path.realpath(dpo_lightning.__file__)}
    if devices == 2:
        t = trainer(2, callbacks=[CaptureBatch(out)])
        val = t.validate(module, datamodule=data, verbose=False)[0]
        result.update(val={k: float(v) for k, v in val.items() if k.startswith("val/")}, batches=t.num_val_batches)
        if not t.is_global_zero:
            return result
    else:
        batches = rank_batches(data)
        merged = merge_real_rows(batches, data.pad_token_id)
        val = trainer(1).validate(module, DataLoader([merged], batch_size=None), verbose=False)[0]
        result.update(
            val={k: float(v) for k, v in val.items() if k.startswith("val/")},
            rank_batches=batches,
            kl_ratios=[kl_ratios(module, b) for b in batches],
        )
    torch.save(result, out)
    return result


if __name__ == "__main__":
    main()
