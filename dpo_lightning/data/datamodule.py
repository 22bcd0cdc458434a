"""`PreferenceDataModule`: a preference data source -> the pair batches `DPOModule` and `RewardModule` consume."""

from __future__ import annotations

from typing import Any, Literal

import torch
from datasets import Dataset

from .base import LiveSplit, TokenizedDataModule
from .collate import COLLATORS, build_collator
from .columns import PAIR_LAYOUTS, Layouts
from .preprocess import preprocess_split

__all__ = ["LiveSplit", "PreferenceDataModule"]


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs from the Hub, local files or a built-in task, tokenized once, batched as
    2B rows (chosen first) with ``input_ids`` / ``attention_mask`` / ``labels`` (docs/data.md).
    Unpaired (KTO) examples are `KTODataModule`'s. The settings it shares with every data module
    are `TokenizedDataModule`'s (``*args, **kwargs``)."""

    collators = COLLATORS
    fast_collator = "share"  # measured 1.4x faster than "pack" on HH (docs/benchmarks.md)
    batch_formats = ("pairs",)

    def __init__(
        self,
        *args: Any,
        drop_identical: bool = True,
        collator: Literal["auto", "share", "pack", "pad", "kto"] = "auto",
        unpaired: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            drop_identical: Drop pairs whose chosen equals rejected (with a warning) instead of keeping them.
            collator: ``auto`` (default): ``share`` (each prompt computed once for both responses, pairs packed
                into rows) when the stage and its model take packed rows, else ``pad`` (right-padded rows); the
                run logs which and why. ``pack`` packs the 2B sequences without sharing prompts. (``kto`` is
                `KTODataModule`'s; accepted here only so that configs written before it still parse.)
            unpaired: Deprecated: unpaired (KTO) data is `KTODataModule` (``data.class_path:
                dpo_lightning.KTODataModule``); the CLI maps a config saying ``unpaired: true`` to it, with a
                warning. Accepted here only so that configs written before it still parse.
        """
        if unpaired or collator == "kto":
            given = "unpaired=True" if unpaired else "collator='kto'"
            raise ValueError(f"{given}: unpaired (KTO) data is KTODataModule now (dpo_lightning.KTODataModule, for a "
                             "KTO stage); pairs take collator auto, share, pack or pad")
        super().__init__(*args, collator=collator, **kwargs)

    # -- the hooks of TokenizedDataModule -------------------------------------------------------

    @property
    def _layouts(self) -> Layouts:
        return PAIR_LAYOUTS

    @property
    def _unit(self) -> str:
        return "pairs"

    def _preprocess(self, dataset: Dataset, split: str) -> Dataset:
        return self._tokenize_split(preprocess_split, dataset, split, drop_identical=self.hparams.drop_identical)

    @property
    def collate_fn(self):
        name = self.collator_name
        extra = {}
        if name == "share" and self.hparams.collator == "auto":  # auto: share where it saves compute
            extra["attention_cost"] = getattr(self, "_attention_cost", None)
        return build_collator(
            name,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.hparams.pad_to_multiple_of,
            **extra,
        )

    # -- precomputed reference log-probs (DPOModule(reference="precomputed")) ----------------------

    def reference_splits(self) -> dict[str, Dataset]:
        """The splits whose reference log-probs training needs (train, and validation if any)."""
        return {k: v for k, v in self.splits.items() if k in ("train", "validation") and v is not None}

    def tokenization_settings(self) -> dict[str, Any]:
        """What, besides the data and the reference weights, decides the reference log-probs."""
        hp = self.hparams
        return {
            "tokenizer": str(getattr(self.tokenizer, "name_or_path", "")),
            "vocab": len(self.tokenizer),
            "max_length": hp.max_length,
            "max_prompt_length": hp.max_prompt_length,
            "truncation_mode": hp.truncation_mode,
        }

    def set_reference_logps(self, split: str, table: torch.Tensor) -> None:
        """Attach ``(N, 2)`` reference log-probs (chosen, rejected) to ``split``; batches then carry ``ref_logps``."""
        dataset = self.splits[split]
        if table.shape != (len(dataset), 2) or torch.isnan(table).any():
            raise ValueError(f"reference log-probs for {split!r} must be ({len(dataset)}, 2) with no NaN")
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
        dataset = dataset.add_column("ref_chosen_logps", table[:, 0].tolist())
        self._splits[split] = dataset.add_column("ref_rejected_logps", table[:, 1].tolist())
