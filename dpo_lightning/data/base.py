"""`TokenizedDataModule`: what every data module shares (its settings, declared once in ``__init__``; sources,
column selection, splits, hold-out, loaders, resumable sampling); `PreferenceDataModule`, `KTODataModule`,
`SFTDataModule` and `PromptDataModule` fill its hooks.

The hooks, each small:

- ``_layouts``: which layouts and fields column selection knows (`columns.Layouts`);
- ``_preprocess(dataset, split)``: one raw split (columns selected) -> its tokenized split (most call their
  ``preprocess_*_split`` through `TokenizedDataModule._tokenize_split`);
- ``collators``: the collator table (name -> factory), and ``collate_fn`` when the choice depends on more;
- ``_unit``: what a row of the tokenized data is called in messages ("pairs", "examples", "rows");
- ``_train_data(dataset, batch_size)``: the training dataset view and its sampler (the default is the
  resumable seeded sampler over the dataset itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from .columns import Layouts, select_columns
from .errors import DataError, warn
from .holdout import count_in, hold_out
from .sampler import MarkPadding, PaddedEvalSampler, ResumableTrainData
from .settings import AUTO, check_settings, object_arguments
from .sources import DatasetSpec, describe, load_source
from .tokenize import TokenizeConfig
from .tokenizer import load_tokenizer


class LiveSplit(TorchDataset):
    """``splits[name]`` read at access time, so a split replaced later (new columns) is what loaders see."""

    def __init__(self, splits: dict[str, Dataset | None], name: str) -> None:
        self.splits, self.name = splits, name

    def __len__(self) -> int:
        return len(self.splits[self.name])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.splits[self.name][index]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return self.splits[self.name].__getitems__(indices)  # one columnar read (datasets' fast path)


# What ``auto`` says when it picks each fast collator.
FAST_COLLATOR_REASONS = {
    "pack": "no padding; data.collator: pad for padded rows",
    "share": "each prompt computed once for both responses, pairs packed without padding; a batch whose longer "
             "rows would cost more attention than its prompts save is packed plainly; data.collator: pack or pad for "
             "the other layouts",
}


class TokenizedDataModule(ResumableTrainData, LightningDataModule):
    """A data source tokenized once into ``train`` / ``validation`` / ``test`` splits, with seeded,
    resumable training loaders and evaluation loaders sharded evenly over ranks (docs/data.md).

    Its ``__init__`` declares the settings every data module shares (the config surface: jsonargparse
    documents them in ``--help`` of each subclass, which passes them on as ``*args, **kwargs``), checks
    them and saves them, with the subclass's own, as hyper-parameters. A subclass declares only its own
    settings (and ``collator``, whose choices are its own), then fills the hooks.
    """

    collators: ClassVar[Mapping[str, Callable[..., Callable]]]  # name -> factory(pad_token_id=, pad_to_multiple_of=)
    # What ``collator: auto`` picks when the stage takes packed rows (a 4D block mask): the fastest exact layout.
    fast_collator: ClassVar[str] = "pack"
    # The batches this class can make (a stage's ``batch_format`` must be one; the CLI checks it).
    batch_formats: ClassVar[tuple[str, ...]] = ()

    @property
    def batch_format(self) -> str:
        """The batches this instance makes: ``pairs``, ``unpaired`` or ``sft``."""
        return self.batch_formats[0]

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        dataset: DatasetSpec,
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
        num_proc: int | None = None,
        collator: str = AUTO,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        columns: dict[str, str] | None = None,
        drop_columns: list[str] | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Hub id or local path of the tokenizer (the policy's), ``synthetic:<name>``, or a tokenizer
                object.
            dataset: Hub dataset name, local file (.jsonl/.json/.parquet/.csv, optionally .gz) or folder
                (``save_to_disk`` or data files), ``synthetic:<name>``, or a Dataset/DatasetDict/list of rows.
            dataset_config: Configuration name of a Hub dataset.
            train_split: Split to train on.
            val_split: Split to validate on; skipped (with a warning) when the source has no such split.
            val_fraction: Fraction of the train split held out for validation (seeded); overrides val_split.
                Rows of the held-out part that also occur in train (duplicated data) are counted in a warning.
            test_split: Split for ``trainer.test``; None for no test data.
            max_length: Longest sequence (prompt + response) in tokens; longer responses lose their end (and rows
                left with nothing to train on are dropped, with a warning).
            max_prompt_length: Longest prompt in tokens, applied before max_length; None for no limit.
            truncation_mode: Which end of a long prompt to keep: ``keep_end`` (next to the response) or
                ``keep_start``.
            batch_size: Training examples per batch: pairs (the model sees 2 x batch_size rows), unpaired
                examples (KTO), SFT rows (with ``packing``, packed rows), or prompts (generation).
            eval_batch_size: Examples per validation/test batch; batch_size when None.
            num_workers: DataLoader worker processes.
            seed: Seed for shuffling, the held-out split and synthetic data.
            pad_to_multiple_of: Round the padded (or packed) length up to a multiple of this (e.g. 8 for tensor
                cores).
            num_proc: Processes for the one-off tokenization pass (``datasets.map``).
            collator: How a batch is laid out; each data module lists its choices.
            trust_remote_code: Let the tokenizer run code from its repository.
            cache_dir: Cache folder for ``datasets``; its default when None.
            columns: Our field names -> the dataset's columns, e.g. ``{prompt: question, chosen: good, rejected:
                bad}``, ``{messages: conversation}``.
            drop_columns: Dataset columns to leave out without the warning that names unread columns.
        """
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__", "tokenizer", "dataset")}
        super().__init__()
        check_settings(
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
            val_fraction=val_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            collator=collator,
            collators=self.collators,
            columns=columns,
            drop_columns=drop_columns,
            fields=self._layouts.fields,
        )
        # Every __init__ argument of the class chain (Lightning collects the subclasses' too; under LightningCLI,
        # the config's), and the shared settings a subclass set itself (PromptDataModule's train_split, say).
        self.save_hyperparameters(ignore=object_arguments(tokenizer, dataset))
        for name, value in settings.items():
            self.hparams.setdefault(name, value)
        self._tokenizer_spec = tokenizer
        self._dataset_spec = dataset
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._splits: dict[str, Dataset | None] | None = None

    # -- hooks -----------------------------------------------------------------------------------

    @property
    def _layouts(self) -> Layouts:
        """The layouts column selection knows, and the columns each reads."""
        raise NotImplementedError

    @property
    def _unit(self) -> str:
        """What one row of the tokenized data is called in messages."""
        raise NotImplementedError

    def _preprocess(self, dataset: Dataset, split: str) -> Dataset:
        """One raw split, its columns selected -> the tokenized split."""
        raise NotImplementedError

    @property
    def collator_name(self) -> str:
        """The collator the loaders use: ``data.collator``, or what ``auto`` resolved to (``pad`` until a stage
        chose)."""
        if self.hparams.collator != AUTO:
            return self.hparams.collator
        return getattr(self, "_chosen_collator", None) or "pad"

    def choose_collator(self, packing_unsupported: str | None, attention_cost: float | None = None) -> tuple[str, str]:
        """Resolve ``collator: auto`` for the stage about to train (called from its ``setup``, before any
        loader exists): `fast_collator` (``share`` for pairs, ``pack`` for SFT rows) unless the stage gives a
        reason it cannot take packed rows (``packing_unsupported``). ``attention_cost`` (the model's, from
        ``prefix_sharing.attention_cost``) lets ``share`` pack a batch plainly where sharing would cost more.
        Returns the collator and why; an explicit ``data.collator`` stands."""
        self._attention_cost = attention_cost
        if self.hparams.collator != AUTO:
            return self.hparams.collator, "data.collator"
        fast = self.fast_collator
        if fast not in self.collators:
            self._chosen_collator, why = "pad", "this data module does not pack"
        elif packing_unsupported:
            self._chosen_collator, why = "pad", packing_unsupported
        else:
            self._chosen_collator, why = fast, FAST_COLLATOR_REASONS[fast]
        return self._chosen_collator, f"data.collator auto: {why}"

    @property
    def collate_fn(self) -> Callable:
        return self.collators[self.collator_name](
            pad_token_id=self.pad_token_id, pad_to_multiple_of=self.hparams.pad_to_multiple_of
        )

    def _train_data(self, dataset: TorchDataset, batch_size: int) -> tuple[TorchDataset, Sampler]:
        """The training loader's dataset and sampler: seeded, sharded per rank, resumable mid-epoch."""
        return dataset, self.train_sampler(dataset, batch_size, seed=self.hparams.seed)

    # -- what the CLI links to the model --------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (with a pad token)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self._tokenizer_spec, trust_remote_code=self.hparams.trust_remote_code
            )
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed (added tokens included)."""
        return len(self.tokenizer)

    # -- preprocessing -------------------------------------------------------------------------

    @property
    def source_name(self) -> str:
        return describe(self._dataset_spec)

    @property
    def tokenize_config(self) -> TokenizeConfig:
        hp = self.hparams
        return TokenizeConfig(hp.max_length, hp.max_prompt_length, hp.truncation_mode)

    def _tokenize_split(self, preprocess: Callable[..., Dataset], dataset: Dataset, split: str, **kw: Any) -> Dataset:
        """``preprocess(dataset, tokenizer, tokenize_config, source=, split=, num_proc=, **kw)``: the call a
        `_preprocess` hook makes to its ``preprocess_*_split`` function with this module's settings."""
        return preprocess(dataset, self.tokenizer, self.tokenize_config, source=self.source_name, split=split,
                          num_proc=self.hparams.num_proc, **kw)

    def _build(self) -> dict[str, Dataset | None]:
        hp = self.hparams
        source = self.source_name
        raw = load_source(
            self._dataset_spec,
            hp.dataset_config,
            default_split=hp.train_split,
            seed=hp.seed,
            cache_dir=hp.cache_dir,
        )
        for split in (hp.train_split, hp.test_split):
            if split is not None and split not in raw:
                raise DataError(f"{source}: no split {split!r} (available: {sorted(raw)})")
        # The splits read below: renamed, cut to their layout's columns, the rest named once for all.
        validation = hp.val_split if hp.val_fraction is None else None
        used = [s for s in dict.fromkeys((hp.train_split, validation, hp.test_split)) if s is not None and s in raw]
        raw = select_columns(raw, used, source, hp.get("columns"), hp.get("drop_columns"), self._layouts)

        train = self._preprocess(raw[hp.train_split], hp.train_split)
        val = None
        if hp.val_fraction is not None:
            train, val = self._hold_out(train, raw)
        elif hp.val_split is not None and hp.val_split in raw:
            val = self._preprocess(raw[hp.val_split], hp.val_split)
        elif hp.val_split is not None:
            warn(
                f"{source} has no {hp.val_split!r} split (it has {sorted(raw)}): no validation data, so no "
                "validation metrics; checkpoints come from the periodic checkpoint setting. Set val_fraction "
                "to hold out part of the train split, or val_split to another split"
            )
        test = self._preprocess(raw[hp.test_split], hp.test_split) if hp.test_split is not None else None
        return {"train": train, "validation": val, "test": test}

    def _hold_out(self, train: Dataset, raw: DatasetDict) -> tuple[Dataset, Dataset]:
        """Split the tokenized train split by val_fraction; say what that leaves unused or duplicated."""
        hp, source = self.hparams, self.source_name
        if hp.val_split is not None and hp.val_split in raw:
            warn(
                f"{source}: its {hp.val_split!r} split ({len(raw[hp.val_split])} rows) is not used: "
                f"val_fraction={hp.val_fraction} holds out part of {hp.train_split!r} for validation instead"
            )
        train, val = hold_out(train, hp.val_fraction, hp.seed)
        if leaked := count_in(val, train):
            warn(
                f"{source}: {leaked} of {len(val)} validation {self._unit} held out by val_fraction="
                f"{hp.val_fraction} also occur in the train split (same token ids after truncation), so "
                "their validation metrics measure memorisation; deduplicate the data to avoid it"
            )
        return train, val

    def prepare_data(self) -> None:
        # Runs on one process per node: the datasets cache it fills makes setup() on the other ranks
        # a cache hit; this process keeps the result so setup() does not redo in-memory work.
        self._splits = self._build()

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = self._build()

    @property
    def splits(self) -> dict[str, Dataset | None]:
        """The tokenized ``train`` / ``validation`` / ``test`` datasets (None where absent)."""
        if self._splits is None:
            self.setup()
        return self._splits

    def _splits_or_build(self) -> dict[str, Dataset | None]:
        self.splits  # noqa: B018 - builds them on first use
        return self._splits

    # -- loaders ---------------------------------------------------------------------------------

    def _loader(
        self, dataset: TorchDataset, batch_size: int, shuffle: bool, sampler: Sampler | None = None
    ) -> DataLoader:
        """A loader over `dataset`; ``shuffle=True`` means the training sampler (and view) of `_train_data`."""
        workers = self.hparams.num_workers
        if shuffle:
            dataset, sampler = self._train_data(dataset, batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            # Its own generator: a loader without one draws its workers' base seed from the global
            # RNG each time it is iterated, which a resume at an epoch boundary cannot replay
            # (the restored RNG would be one draw behind: different dropout from there on).
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        # A live view, not the dataset itself: Lightning may build this loader before fit starts
        # (to size the LR schedule under max_epochs), and the precomputed reference adds its
        # columns to the split at fit start; the loader must see them.
        return self._loader(LiveSplit(self._splits_or_build(), "train"), self.hparams.batch_size, shuffle=True)

    def _eval_loader(self, split: str) -> DataLoader | list:
        dataset = self.splits[split]
        if dataset is None:
            return []  # Lightning skips the loop
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        trainer = getattr(self, "trainer", None)
        shard = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not shard or shard["num_replicas"] <= 1:
            return self._loader(dataset, batch_size, shuffle=False)
        # Several ranks: each runs the same number of batches (under FSDP2 every forward is a
        # collective), so shards are padded as DistributedSampler pads them; the padded rows
        # carry weight 0, so val/test metrics count every row exactly once.
        sampler = PaddedEvalSampler(dataset, num_replicas=shard["num_replicas"], rank=shard["rank"])
        return self._loader(MarkPadding(dataset), batch_size, shuffle=False, sampler=sampler)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """An unshuffled loader over ``split`` whose batches carry ``index`` (positions in the split)."""
        dataset = self.splits[split]
        if "index" not in dataset.column_names:
            dataset = dataset.add_column("index", list(range(len(dataset))))
        return self._loader(dataset, self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

    def add_index(self, split: str) -> None:
        """Give ``split`` an ``index`` column, so its batches say which rows they hold (``index``, ``(B,)``)."""
        dataset = self.splits[split]
        if "index" not in dataset.column_names:
            self._splits[split] = dataset.add_column("index", list(range(len(dataset))))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")
