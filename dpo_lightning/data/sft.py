"""`SFTDataModule`: an SFT data source -> the batches an SFT module consumes (docs/data.md, "SFT data").

Sources, column selection, hold-out, loaders and resumable sampling are `TokenizedDataModule`'s, as
for preference data; this file adds the SFT layouts (`sft_formats`), their labels (`sft_tokenize`,
`sft_preprocess`), TRL's ``packing`` (`sft_packing`), the collators (`sft_collate`) and the training
batches' ``window_tokens`` (`window`).
"""

from __future__ import annotations

from typing import Any, Literal

from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from .base import TokenizedDataModule
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
    batches also carry ``window_tokens``, the loss tokens of their gradient-accumulation window (docs/data.md).
    The settings it shares with every data module are `TokenizedDataModule`'s (``*args, **kwargs``)."""

    collators = SFT_COLLATORS
    batch_formats = ("sft",)

    def __init__(
        self,
        *args: Any,
        max_prompt_length: int | None = None,
        collator: Literal["auto", "pad", "pack"] = "auto",
        completion_only_loss: bool = True,
        packing: bool = False,
        packing_strategy: Literal["bfd", "bfd_split"] = "bfd",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            max_prompt_length: Longest prompt of prompt/completion rows in tokens, applied before max_length;
                None (the default for SFT) for no limit.
            collator: How a batch is laid out: ``auto`` (default: ``pack`` when the stage's model takes packed
                rows, else ``pad``), ``pad`` (each sequence its own right-padded row) or ``pack`` (the batch's
                sequences packed into fewer rows, block-causal attention: TRL's ``padding_free``). Which
                sequences form a batch is ``packing``'s.
            completion_only_loss: Train on the completion (prompt/completion rows) or the assistant turns
                (conversations) only; False trains on every token.
            packing: TRL's ``packing=True``: the rows of each split are bin-packed once into rows of at most
                max_length tokens, and ``batch_size`` counts those (so an epoch has TRL's number of steps);
                each sequence still attends only to itself, so the loss is that of the same rows padded.
            packing_strategy: TRL's ``packing_strategy``: ``bfd`` (best fit decreasing; sequences longer than
                max_length lose their end) or ``bfd_split`` (such sequences are split into max_length pieces).
        """
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
        super().__init__(*args, max_prompt_length=max_prompt_length, collator=collator, **kwargs)
        if packing_strategy != "bfd" and not packing:
            warn(f"packing_strategy={packing_strategy!r} is ignored: packing is off (data.packing: true packs)")

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
        return self._tokenize_split(
            preprocess_sft_split, dataset, split, completion_only_loss=self.hparams.completion_only_loss
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
