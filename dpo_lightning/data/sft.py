"""`SFTDataModule`: an SFT data source -> the batches an SFT module consumes (docs/data.md, "SFT data").

Sources, column selection, hold-out, loaders and resumable sampling are `TokenizedDataModule`'s, as
for preference data; this file adds the SFT layouts (`sft_formats`), their labels (`sft_tokenize`,
`sft_preprocess`), TRL's ``packing`` (`sft_packing`), the collators (`sft_collate`) and the training
batches' ``window_tokens`` (`window`).
"""

from __future__ import annotations

from typing import Any, Literal

from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from .base import TokenizedDataModule, check_settings, object_arguments
from .columns import Layouts
from .errors import warn
from .sft_collate import SFT_COLLATORS
from .sft_formats import SFT_LAYOUTS
from .sft_packing import PACKING_STRATEGIES, pack_split, packing_summary
from .sft_preprocess import preprocess_sft_split
from .tokenize import TokenizeConfig
from .window import WindowSampler, WithWindowTokens

NO_LENGTH_LIMIT = 1 << 30  # the tokenization's max_length under bfd_split, which splits what is longer


class SFTDataModule(TokenizedDataModule):
    """SFT rows (conversations, prompt/completion or plain text) from the Hub, local files or a built-in
    task, tokenized once, batched with ``labels`` on the completion or the assistant turns; training
    batches also carry ``window_tokens``, the loss tokens of their gradient-accumulation window (docs/data.md)."""

    collators = SFT_COLLATORS
    batch_formats = ("sft",)

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
        max_prompt_length: int | None = None,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        pad_to_multiple_of: int | None = None,
        num_proc: int | None = None,
        collator: Literal["auto", "pad", "pack"] = "auto",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        columns: dict[str, str] | None = None,
        drop_columns: list[str] | None = None,
        completion_only_loss: bool = True,
        packing: bool = False,
        packing_strategy: Literal["bfd", "bfd_split"] = "bfd",
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
                Rows of the held-out part that also occur in train (duplicated data) are counted in a warning.
            test_split: Split for ``trainer.test``; None for no test data.
            max_length: Longest sequence in tokens; longer ones lose their end (rows left with nothing to
                train on are dropped, with a warning).
            max_prompt_length: Longest prompt of prompt/completion rows in tokens, applied before max_length;
                None for no limit.
            truncation_mode: Which end of a long prompt to keep: ``keep_end`` (next to the completion) or
                ``keep_start``.
            batch_size: Rows per training batch (with ``packing``, packed rows of several conversations).
            eval_batch_size: Rows per validation/test batch; batch_size when None.
            num_workers: DataLoader worker processes.
            seed: Seed for shuffling, the held-out split and synthetic data.
            pad_to_multiple_of: Round the padded (or packed) length up to a multiple of this.
            num_proc: Processes for the one-off tokenization pass (``datasets.map``).
            collator: How a batch is laid out: ``auto`` (default: ``pack`` when the stage's model takes packed
                rows, else ``pad``), ``pad`` (each sequence its own right-padded row) or ``pack`` (the batch's
                sequences packed into fewer rows, block-causal attention: TRL's ``padding_free``). Which
                sequences form a batch is ``packing``'s.
            trust_remote_code: Let the tokenizer run code from its repository.
            cache_dir: Cache folder for ``datasets``; its default when None.
            columns: Our field names -> the dataset's columns, e.g. ``{messages: conversation}``, or
                ``{completion: chosen}`` (with ``drop_columns: [rejected]``) to train on preference pairs'
                chosen side.
            drop_columns: Dataset columns to leave out without the warning that names unread columns.
            completion_only_loss: Train on the completion (prompt/completion rows) or the assistant turns
                (conversations) only; False trains on every token.
            packing: TRL's ``packing=True``: the rows of each split are bin-packed once into rows of at most
                max_length tokens, and ``batch_size`` counts those (so an epoch has TRL's number of steps);
                each sequence still attends only to itself, so the loss is that of the same rows padded.
            packing_strategy: TRL's ``packing_strategy``: ``bfd`` (best fit decreasing; sequences longer than
                max_length lose their end) or ``bfd_split`` (such sequences are split into max_length pieces).
        """
        super().__init__(tokenizer, dataset)
        check_settings(
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
            val_fraction=val_fraction,
            collator=collator,
            collators=SFT_COLLATORS,
            columns=columns,
            drop_columns=drop_columns,
            fields=SFT_LAYOUTS.fields,
        )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(
                f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}"
            )
        if not isinstance(completion_only_loss, bool):
            raise ValueError(f"completion_only_loss must be a bool, got {completion_only_loss!r}")
        if not isinstance(packing, bool):
            raise ValueError(f"packing must be a bool, got {packing!r}")
        if packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(
                f"packing_strategy must be one of {PACKING_STRATEGIES}, got {packing_strategy!r}"
                + (" (TRL's 'wrapped' cuts conversations at row ends and lets them attend to each other; "
                   "bfd is TRL's default)" if packing_strategy == "wrapped" else "")
            )
        if packing_strategy != "bfd" and not packing:
            warn(f"packing_strategy={packing_strategy!r} is ignored: packing is off (data.packing: true packs)")
        self.save_hyperparameters(ignore=object_arguments(tokenizer, dataset))

    # -- the hooks of TokenizedDataModule -------------------------------------------------------

    @property
    def _layouts(self) -> Layouts:
        return SFT_LAYOUTS

    @property
    def _unit(self) -> str:
        return "rows"

    @property
    def tokenize_config(self) -> TokenizeConfig:
        config = super().tokenize_config
        if self.hparams.packing and self.hparams.packing_strategy == "bfd_split":
            return config._replace(max_length=NO_LENGTH_LIMIT)  # long sequences are split, not cut
        return config

    def _preprocess(self, dataset: Dataset, split: str) -> Dataset:
        hp = self.hparams
        return preprocess_sft_split(
            dataset,
            self.tokenizer,
            self.tokenize_config,
            source=self.source_name,
            split=split,
            completion_only_loss=hp.completion_only_loss,
            num_proc=hp.num_proc,
        )

    def _build(self) -> dict[str, Dataset | None]:
        """The tokenized splits (held out by val_fraction first); with ``packing``, each packed into rows."""
        splits = super()._build()
        hp = self.hparams
        if not hp.packing:
            return splits
        lines = []
        for name, split in splits.items():
            if split is not None:
                where = f"{self.source_name} ({name})"
                splits[name] = pack_split(split, hp.max_length, hp.packing_strategy, where=where, num_proc=hp.num_proc)
                lines.append(f"{name}: {packing_summary(len(split), splits[name], hp.max_length)}")
        rank_zero_info(f"{self.source_name}: packing ({hp.packing_strategy}): " + "; ".join(lines))
        return splits

    def _train_data(self, dataset: TorchDataset, batch_size: int) -> tuple[TorchDataset, Sampler]:
        """The resumable seeded sampler, yielding each index with its accumulation window's loss tokens."""
        trainer = getattr(self, "trainer", None)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
        loss_tokens = self.splits["train"].with_format("numpy")["loss_tokens"][:]
        sampler = self.train_sampler(
            dataset, batch_size, seed=self.hparams.seed, kind=WindowSampler, loss_tokens=loss_tokens,
            accumulate=accumulate,
        )
        return WithWindowTokens(dataset), sampler
