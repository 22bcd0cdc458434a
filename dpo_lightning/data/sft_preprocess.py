"""Raw SFT split -> tokenized split: validation, rendering, tokenization and labels in the one cached
``datasets.map`` pass pairs go through (`preprocess.map_rows`).

Rows that cannot be used raise `DataError` naming the row. Rows left with no token to train on
(truncation cut away every label) are dropped and counted in one warning; prompts and sequences cut
by truncation are counted in another. The result holds `SFT_FIELDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import DataError, RowRef, warn
from .preprocess import OUTPUT_VERSION, kept_rows, map_rows, warn_ignored_columns
from .render import render_completion, render_conversation
from .sft_formats import SFT_LAYOUT_COLUMNS, Conversation, SFTLayout, detect_sft_layout, to_sft_example
from .sft_tokenize import LabelledIds, tokenize_completion_rows, tokenize_conversations
from .tokenize import TokenizeConfig

# Per-row fields of tokenized SFT data: ids, labels (-100 off the loss, unshifted, always -100 at
# position 0) and the number of loss tokens (labels != -100), which the training sampler sums per
# gradient-accumulation window (`window.py`).
SFT_FIELDS = ("input_ids", "labels", "loss_tokens")


class SFTDrop(IntEnum):
    """Why a row leaves the dataset (0: it stays)."""

    KEEP = 0
    NO_LOSS_TOKENS = 1  # every label cut away by truncation (or a one-token text)


class SFTCut(IntEnum):
    """Bits of the per-row ``cut`` column: what truncation shortened (counted, then removed)."""

    PROMPT = 1
    END = 2


@dataclass(frozen=True)
class SFTPreprocessor:
    """The ``datasets.map`` function: a batch of raw SFT rows -> `SFT_FIELDS` + ``drop`` + ``cut``.
    A frozen dataclass so it pickles into ``num_proc`` workers and hashes into a stable fingerprint."""

    tokenizer: PreTrainedTokenizerBase
    layout: SFTLayout
    config: TokenizeConfig
    source: str
    split: str
    completion_only_loss: bool = True
    version: int = OUTPUT_VERSION

    def tokenize(self, batch: dict[str, list[Any]], indices: list[int]) -> list[LabelledIds]:
        columns = SFT_LAYOUT_COLUMNS[self.layout]
        rendered = []
        for offset, index in enumerate(indices):
            ref = RowRef(self.source, self.split, index)
            example = to_sft_example({c: batch[c][offset] for c in columns}, self.layout, ref)
            if isinstance(example, Conversation):
                rendered.append(render_conversation(example.messages, self.tokenizer, ref, self.completion_only_loss))
            else:
                rendered.append(render_completion(example.prompt, example.completion, self.tokenizer, ref))
        if self.layout is SFTLayout.MESSAGES:
            return tokenize_conversations(rendered, self.tokenizer, self.config, self.completion_only_loss)
        return tokenize_completion_rows(rendered, self.tokenizer, self.config, self.completion_only_loss)

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {field: [] for field in (*SFT_FIELDS, "drop", "cut")}
        for row in self.tokenize(batch, indices):
            loss_tokens = row.loss_tokens
            keep = loss_tokens > 0
            out["input_ids"].append(row.input_ids if keep else [])
            out["labels"].append(row.labels if keep else [])
            out["loss_tokens"].append(loss_tokens)
            out["drop"].append(int(SFTDrop.KEEP if keep else SFTDrop.NO_LOSS_TOKENS))
            out["cut"].append(int(SFTCut.PROMPT) * (row.prompt_cut > 0) | int(SFTCut.END) * (row.end_cut > 0))
        return out


def _report(mapped: Dataset, config: TokenizeConfig, layout: SFTLayout, where: str) -> int:
    """Warn once per split about the rows dropped and what truncation cut; the number of rows kept."""
    drop = mapped.data.column("drop").to_numpy()
    total, kept = len(mapped), int(np.count_nonzero(drop == SFTDrop.KEEP))
    limits = f"max_length={config.max_length}, max_prompt_length={config.max_prompt_length}"
    if n := total - kept:
        warn(f"{where}: dropped {n} of {total} rows left with no token to train on (every label cut by truncation, "
             f"{limits}, or a text of one token)")
    cut = mapped.data.column("cut").to_numpy()[drop == SFTDrop.KEEP]
    prompts, ends = int(np.count_nonzero(cut & SFTCut.PROMPT)), int(np.count_nonzero(cut & SFTCut.END))
    if prompts or ends:
        prompt_part = ""
        if layout is SFTLayout.PROMPT_COMPLETION and config.max_prompt_length is not None:
            prompt_part = (
                f"the prompt of {prompts} of {kept} rows to max_prompt_length={config.max_prompt_length} tokens "
                f"(truncation_mode={config.truncation_mode}) and "
            )
        warn(f"{where}: truncation cut {prompt_part}{ends} of {kept} rows to fit max_length={config.max_length} tokens")
    return kept


def preprocess_sft_split(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    *,
    source: str,
    split: str,
    completion_only_loss: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Validate, render, tokenize and label one SFT split; the result holds only `SFT_FIELDS`."""
    where = f"{source} (split {split!r})"
    layout = detect_sft_layout(dataset.column_names, where)
    if len(dataset) == 0:
        raise DataError(f"{where}: the split has no rows")
    needed = SFT_LAYOUT_COLUMNS[layout]
    warn_ignored_columns(dataset.column_names, layout, needed, needed, where)
    if config.max_prompt_length is not None and layout is not SFTLayout.PROMPT_COMPLETION:
        warn(
            f"{where}: max_prompt_length={config.max_prompt_length} is ignored: the {layout.value} layout has no "
            "separate prompt (only prompt/completion rows have one); max_length still applies"
        )
    function = SFTPreprocessor(tokenizer, layout, config, source, split, completion_only_loss)
    mapped = map_rows(dataset, function, where, split, num_proc)
    if _report(mapped, config, layout, where) == 0:
        raise DataError(
            f"{where}: no rows left: all {len(mapped)} have no token to train on after truncation to "
            f"max_length={config.max_length} (max_prompt_length={config.max_prompt_length})"
        )
    return kept_rows(mapped)
