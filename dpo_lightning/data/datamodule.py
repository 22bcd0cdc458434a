"""`PreferenceDataModule`: a preference data source -> the padded batches `DPOModule` consumes."""

from __future__ import annotations

from typing import Any, Literal

import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from .collate import COLLATORS, build_collator
from .columns import check_column_options, select_columns
from .errors import DataError, warn
from .holdout import count_in, hold_out
from .preprocess import preprocess_split
from .sampler import MarkPadding, PaddedEvalSampler, ResumableTrainData
from .sources import describe, load_source
from .tokenize import TRUNCATION_MODES, TokenizeConfig
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


class PreferenceDataModule(ResumableTrainData, LightningDataModule):
    """Preference pairs from the Hub, local files or a built-in task, tokenized once, batched as
    2B rows (chosen first) with ``input_ids`` / ``attention_mask`` / ``labels`` (docs/data.md)."""

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
        collator: str = "pad",
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
            collator: Batch collator by name (``pad``; packing collators join later).
            trust_remote_code: Let the tokenizer run code from its repository.
            cache_dir: Cache folder for ``datasets``; its default when None.
            unpaired: Produce unpaired examples for KTO (the CLI sets it from the loss): prompt/completion/label
                rows as they are, pairs as chosen -> desirable and rejected -> undesirable; batch_size then
                counts examples, and the default ``pad`` collator becomes ``kto`` (docs/data.md).
            columns: Our field names -> the dataset's columns, e.g. ``{prompt: question, chosen: good, rejected: bad}``.
            drop_columns: Dataset columns to leave out without the warning that names unread columns.
        """
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be positive or None, got {max_prompt_length}")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if collator not in COLLATORS:
            raise ValueError(f"unknown collator {collator!r}; choose one of {sorted(COLLATORS)}")
        if unpaired and collator not in ("pad", "kto"):
            raise ValueError(f"unpaired (KTO) data is batched by the 'kto' collator, got collator={collator!r}")
        if unpaired and min(batch_size, eval_batch_size or batch_size) < 2:
            # KTO's KL rows pair each prompt with another example's completion in the same batch.
            raise ValueError(
                f"KTO (unpaired data) needs batches of 2 or more examples for its KL estimate, got "
                f"batch_size={batch_size}, eval_batch_size={eval_batch_size}"
            )
        if collator == "kto" and not unpaired:
            raise ValueError("collator 'kto' batches unpaired examples; set unpaired=True (KTO)")
        check_column_options(columns, drop_columns)
        if max_prompt_length is None and truncation_mode != "keep_end":
            warn(f"truncation_mode={truncation_mode!r} is ignored: with max_prompt_length=None no prompt is cut")
        # Objects are not hyperparameters: they neither serialise nor print well.
        objects = [
            name
            for name, value in (("tokenizer", tokenizer), ("dataset", dataset))
            if not isinstance(value, str)
        ]
        self.save_hyperparameters(ignore=objects)
        self._tokenizer_spec = tokenizer
        self._dataset_spec = dataset
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._splits: dict[str, Dataset | None] | None = None

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
        config = TokenizeConfig(hp.max_length, hp.max_prompt_length, hp.truncation_mode)
        for split in (hp.train_split, hp.test_split):
            if split is not None and split not in raw:
                raise DataError(f"{source}: no split {split!r} (available: {sorted(raw)})")
        # The splits read below: renamed, cut to their layout's columns, the rest named once for all.
        validation = hp.val_split if hp.val_fraction is None else None
        used = [s for s in dict.fromkeys((hp.train_split, validation, hp.test_split)) if s is not None and s in raw]
        raw = select_columns(raw, used, source, hp.get("columns"), hp.get("drop_columns"))

        def prepare(split: str) -> Dataset:
            return preprocess_split(
                raw[split],
                self.tokenizer,
                config,
                source=source,
                split=split,
                drop_identical=hp.drop_identical,
                num_proc=hp.num_proc,
                unpaired=hp.get("unpaired", False),
            )

        train = prepare(hp.train_split)
        val = None
        if hp.val_fraction is not None:
            train, val = self._hold_out(train, raw)
        elif hp.val_split is not None and hp.val_split in raw:
            val = prepare(hp.val_split)
        elif hp.val_split is not None:
            warn(
                f"{source} has no {hp.val_split!r} split (it has {sorted(raw)}): no validation data, so no "
                "validation metrics; checkpoints come from the periodic checkpoint setting. Set val_fraction "
                "to hold out part of the train split, or val_split to another split"
            )
        test = prepare(hp.test_split) if hp.test_split is not None else None
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

    @property
    def _unit(self) -> str:
        return "examples" if self.hparams.get("unpaired", False) else "pairs"

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

    def label_counts(self, split: str = "train") -> tuple[int, int]:
        """(desirable, undesirable) examples of an unpaired split, for ``losses.kto_weight_warning``."""
        dataset = self.splits[split]
        if dataset is None or "desirable" not in dataset.column_names:
            raise ValueError(f"split {split!r} holds no unpaired examples (set unpaired=True)")
        # Through the format, not `dataset.data`: a held-out split is an index mapping over the table.
        desirable = int(dataset.with_format("numpy")["desirable"][:].sum())
        return desirable, len(dataset) - desirable

    # -- loaders ---------------------------------------------------------------------------------

    @property
    def collate_fn(self):
        # Unpaired data has one batch layout, so the default collator name stands for it.
        name = "kto" if self.hparams.get("unpaired", False) else self.hparams.collator
        return build_collator(
            name,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.hparams.pad_to_multiple_of,
        )

    def _loader(
        self, dataset: Dataset | MarkPadding, batch_size: int, shuffle: bool, sampler: Sampler | None = None
    ) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # Training order: seeded, sharded per rank, and resumable mid-epoch from a checkpoint.
            sampler=self.train_sampler(dataset, batch_size, seed=self.hparams.seed) if shuffle else sampler,
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

    def _splits_or_build(self) -> dict[str, Dataset | None]:
        self.splits  # noqa: B018 - builds them on first use
        return self._splits

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
        # collective), so shards are padded as DistributedSampler pads them; the padded pairs
        # carry weight 0, so val/test metrics count every pair exactly once.
        sampler = PaddedEvalSampler(dataset, num_replicas=shard["num_replicas"], rank=shard["rank"])
        return self._loader(MarkPadding(dataset), batch_size, shuffle=False, sampler=sampler)

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

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")
