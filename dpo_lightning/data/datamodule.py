"""`PreferenceDataModule`: a preference data source -> the padded batches `DPOModule` consumes."""

from __future__ import annotations

from typing import Any, Literal

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .base import LiveSplit, TokenizedDataModule, check_settings, object_arguments
from .collate import COLLATORS, build_collator
from .columns import PAIR_LAYOUTS, UNPAIRED_LAYOUTS, Layouts
from .preprocess import preprocess_split

__all__ = ["LiveSplit", "PreferenceDataModule"]


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs from the Hub, local files or a built-in task, tokenized once, batched as
    2B rows (chosen first) with ``input_ids`` / ``attention_mask`` / ``labels`` (docs/data.md)."""

    collators = COLLATORS
    fast_collator = "share"  # measured 1.4x faster than "pack" on HH (docs/benchmarks.md)
    batch_formats = ("pairs", "unpaired")

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        dataset: str | Dataset | DatasetDict | list[dict[str, Any]],
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        val_fraction: float | None = None,
        test_split: str | None = None,
        max_length: int = 1024,
        max_prompt_length: int | None = 512,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        pad_to_multiple_of: int | None = None,
        drop_identical: bool = True,
        num_proc: int | None = None,
        collator: Literal["auto", "share", "pack", "pad", "kto"] = "auto",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        unpaired: bool = False,
        columns: dict[str, str] | None = None,
        drop_columns: list[str] | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Hub id or local path of the tokenizer, ``synthetic:<name>``, or a tokenizer object.
            dataset: Hub dataset name, local file (.jsonl/.json/.parquet/.csv, optionally .gz) or folder
                (``save_to_disk`` or data files), ``synthetic:<name>``, or a Dataset/DatasetDict/list of rows.
            dataset_config: Configuration name of a Hub dataset.
            train_split: Split to train on.
            val_split: Split to validate on; skipped (with a warning) when the source has no such split.
            val_fraction: Fraction of the train split held out for validation (seeded); overrides val_split.
                Pairs of the held-out part that also occur in train (duplicated data) are counted in a warning.
            test_split: Split for ``trainer.test``; None for no test data.
            max_length: Longest prompt + response in tokens; longer responses lose their end.
            max_prompt_length: Longest prompt in tokens, applied before max_length; None for no limit.
            truncation_mode: Which end of a long prompt to keep: ``keep_end`` (next to the response) or
                ``keep_start``.
            batch_size: Pairs per training batch (the model sees 2 x batch_size rows).
            eval_batch_size: Pairs per validation/test batch; batch_size when None.
            num_workers: DataLoader worker processes.
            seed: Seed for shuffling, the held-out split and synthetic data.
            pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for tensor cores).
            drop_identical: Drop pairs whose chosen equals rejected (with a warning) instead of keeping them.
            num_proc: Processes for the one-off tokenization pass (``datasets.map``).
            collator: ``auto`` (default): ``share`` (each prompt computed once for both responses, pairs packed
                into rows) when the stage and its model take packed rows, else ``pad`` (right-padded rows); the
                run logs which and why. ``pack`` packs the 2B sequences without sharing prompts.
            trust_remote_code: Let the tokenizer run code from its repository.
            cache_dir: Cache folder for ``datasets``; its default when None.
            unpaired: Produce unpaired examples for KTO (the CLI sets it from the loss): prompt/completion/label
                rows as they are, pairs as chosen -> desirable and rejected -> undesirable; batch_size then
                counts examples, and the collator is ``kto`` (docs/data.md).
            columns: Our field names -> the dataset's columns, e.g. ``{prompt: question, chosen: good, rejected: bad}``.
            drop_columns: Dataset columns to leave out without the warning that names unread columns.
        """
        super().__init__(tokenizer, dataset)
        check_settings(
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
            val_fraction=val_fraction,
            collator=collator,
            collators=COLLATORS,
            columns=columns,
            drop_columns=drop_columns,
            fields=PAIR_LAYOUTS.fields,
        )
        if unpaired and collator not in ("pad", "kto", "auto"):
            raise ValueError(f"unpaired (KTO) data is batched by the 'kto' collator, got collator={collator!r}")
        if unpaired and min(batch_size, eval_batch_size or batch_size) < 2:
            # KTO's KL rows pair each prompt with another example's completion in the same batch.
            raise ValueError(
                f"KTO (unpaired data) needs batches of 2 or more examples for its KL estimate, got "
                f"batch_size={batch_size}, eval_batch_size={eval_batch_size}"
            )
        if collator == "kto" and not unpaired:
            raise ValueError("collator 'kto' batches unpaired examples; set unpaired=True (KTO)")
        self.save_hyperparameters(ignore=object_arguments(tokenizer, dataset))

    @property
    def batch_format(self) -> str:
        return "unpaired" if self.hparams.get("unpaired", False) else "pairs"

    # -- the hooks of TokenizedDataModule -------------------------------------------------------

    @property
    def _layouts(self) -> Layouts:
        # KTO reads no margin: a margin column is then named among the ignored columns.
        return UNPAIRED_LAYOUTS if self.hparams.get("unpaired", False) else PAIR_LAYOUTS

    @property
    def _unit(self) -> str:
        return "examples" if self.hparams.get("unpaired", False) else "pairs"

    def _preprocess(self, dataset: Dataset, split: str) -> Dataset:
        hp = self.hparams
        return preprocess_split(
            dataset,
            self.tokenizer,
            self.tokenize_config,
            source=self.source_name,
            split=split,
            drop_identical=hp.drop_identical,
            num_proc=hp.num_proc,
            unpaired=hp.get("unpaired", False),
        )

    @property
    def collate_fn(self):
        # Unpaired data has one batch layout, so the default collator name stands for it.
        name = "kto" if self.hparams.get("unpaired", False) else self.collator_name
        extra = {}
        if name == "share" and self.hparams.collator == "auto":  # auto: share where it saves compute
            extra["attention_cost"] = getattr(self, "_attention_cost", None)
        return build_collator(
            name,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.hparams.pad_to_multiple_of,
            **extra,
        )

    def choose_collator(self, packing_unsupported: str | None, attention_cost: float | None = None) -> tuple[str, str]:
        if self.hparams.get("unpaired", False):
            return "kto", "unpaired examples"
        return super().choose_collator(packing_unsupported, attention_cost)

    def label_counts(self, split: str = "train") -> tuple[int, int]:
        """(desirable, undesirable) examples of an unpaired split, for ``losses.kto_weight_warning``."""
        dataset = self.splits[split]
        if dataset is None or "desirable" not in dataset.column_names:
            raise ValueError(f"split {split!r} holds no unpaired examples (set unpaired=True)")
        # Through the format, not `dataset.data`: a held-out split is an index mapping over the table.
        desirable = int(dataset.with_format("numpy")["desirable"][:].sum())
        return desirable, len(dataset) - desirable

    # -- precomputed reference log-probs (DPOModule(reference="precomputed")) ----------------------

    def reference_splits(self) -> dict[str, Dataset]:
        """The splits whose reference log-probs training needs (train, and validation if any)."""
        return {k: v for k, v in self.splits.items() if k in ("train", "validation") and v is not None}

    def ordered_dataloader(self, split: str) -> DataLoader:
        """An unshuffled loader over ``split`` whose batches carry ``index`` (positions in the split)."""
        dataset = self.splits[split]
        if "index" not in dataset.column_names:
            dataset = dataset.add_column("index", list(range(len(dataset))))
        return self._loader(dataset, self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

    def add_index(self, split: str) -> None:
        """Give ``split`` an ``index`` column, so its batches say which pairs they hold (``index``, ``(B,)``)."""
        dataset = self.splits[split]
        if "index" not in dataset.column_names:
            self._splits[split] = dataset.add_column("index", list(range(len(dataset))))

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
