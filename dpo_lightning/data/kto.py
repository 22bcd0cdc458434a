"""`KTODataModule`: a preference or KTO data source -> the unpaired batches `KTOModule` consumes.

KTO (Ethayarajh et al. 2024) trains on single completions labelled desirable or undesirable.
Unpaired prompt/completion/label rows are read as they are; preference pairs of any layout are
unpaired (chosen -> desirable, rejected -> undesirable), so KTO runs on DPO's data too. The
examples are tokenized with the boundary, special tokens and truncation of a pair's side
(`kto_preprocess`) and batched with the mismatched rows of KTO's KL reference point
(`kto_collate.KTOCollator`). Sources, column selection, hold-out, loaders and resumable sampling
are `TokenizedDataModule`'s.
"""

from __future__ import annotations

from typing import Any, Literal

from datasets import Dataset

from .base import TokenizedDataModule
from .columns import UNPAIRED_LAYOUTS, Layouts
from .kto_collate import KTOCollator, pad_rows
from .kto_preprocess import preprocess_unpaired_split


class KTODataModule(TokenizedDataModule):
    """Unpaired examples (a prompt, one completion, a desirable/undesirable label) from the Hub, local
    files or a built-in task, from KTO rows or from preference pairs split in two; tokenized once and
    batched as N rows plus N mismatched KL rows (docs/data.md). The settings it shares with every data
    module are `TokenizedDataModule`'s (``*args, **kwargs``); ``batch_size`` counts examples."""

    # One batch layout: `auto` and `pad` (the name the pair modules give their padded layout, which a KTO run
    # configured before this class asked for) are it.
    collators = {"kto": KTOCollator, "pad": KTOCollator}
    fast_collator = "kto"
    batch_formats = ("unpaired",)

    def __init__(
        self, *args: Any, drop_identical: bool = True, collator: Literal["auto", "kto", "pad"] = "auto", **kwargs: Any
    ) -> None:
        """
        Args:
            drop_identical: Drop a pair whose chosen equals rejected (one completion labelled both ways) instead
                of keeping its two examples; counted in a warning.
            collator: ``kto`` (and ``auto`` and ``pad``, which are it): N padded example rows and N KL rows,
                prompt i with completion (i + 1) mod N.
        """
        super().__init__(*args, collator=collator, **kwargs)
        hp = self.hparams
        if min(hp.batch_size, hp.eval_batch_size or hp.batch_size) < 2:
            # KTO's KL rows pair each prompt with another example's completion in the same batch.
            raise ValueError(
                f"KTO needs batches of 2 or more examples for its KL estimate, got batch_size={hp.batch_size}, "
                f"eval_batch_size={hp.eval_batch_size}"
            )

    # -- the hooks of TokenizedDataModule -------------------------------------------------------

    @property
    def _layouts(self) -> Layouts:
        return UNPAIRED_LAYOUTS  # a margin column is named among the ignored ones: KTO reads none

    @property
    def _unit(self) -> str:
        return "examples"

    def _preprocess(self, dataset: Dataset, split: str) -> Dataset:
        return self._tokenize_split(
            preprocess_unpaired_split, dataset, split, drop_identical=self.hparams.drop_identical
        )

    @property
    def collator_name(self) -> str:
        return "kto"

    def choose_collator(self, packing_unsupported: str | None, attention_cost: float | None = None) -> tuple[str, str]:
        return "kto", "unpaired examples"

    def label_counts(self, split: str = "train") -> tuple[int, int]:
        """(desirable, undesirable) examples of a split, for ``losses.kto_weight_warning``."""
        dataset = self.splits[split]
        if dataset is None:
            raise ValueError(f"no {split!r} split")
        # Through the format, not `dataset.data`: a held-out split is an index mapping over the table.
        desirable = int(dataset.with_format("numpy")["desirable"][:].sum())
        return desirable, len(dataset) - desirable


__all__ = ["KTOCollator", "KTODataModule", "pad_rows"]
