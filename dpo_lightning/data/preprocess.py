"""Raw split -> tokenized split: formats, rendering and tokenization in one ``datasets.map`` pass.

The pass is batched, can run with ``num_proc`` workers and is cached by the datasets
fingerprint (the hash of the source, the tokenizer and these settings), so it runs once and not
per epoch. Rows that cannot be used raise `DataError` naming the row; pairs that are dropped
(identical sides, responses emptied by truncation) are counted and reported in one log line each.
With ``unpaired=True`` (KTO) the pass yields one example per labelled completion instead: unpaired
rows as they are, each pair as two examples (chosen desirable, rejected undesirable).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import DataError, RowRef
from .formats import LAYOUT_COLUMNS, Layout, PreferenceExample, detect_layout, to_example, unpair
from .render import render, render_unpaired
from .tokenize import TokenizeConfig, tokenize_completions, tokenize_pairs

log = logging.getLogger(__name__)

# The per-example fields every collator can rely on (padding and, later, packing).
TOKENIZED_FIELDS = (
    "chosen_input_ids",
    "chosen_response_start",
    "rejected_input_ids",
    "rejected_response_start",
)

# The per-example fields of unpaired data (KTO): prompt + completion ids, where the completion
# starts, and the label. The KTO collator slices prompt and completion apart to build its KL rows.
UNPAIRED_FIELDS = ("input_ids", "response_start", "desirable")


class Drop(IntEnum):
    """Why a pair leaves the dataset (0: it stays)."""

    KEEP = 0
    IDENTICAL = 1
    EMPTY_RESPONSE = 2


@dataclass(frozen=True)
class _Preprocessor:
    """What both ``datasets.map`` functions need. A frozen dataclass (not a closure) so it pickles
    into ``num_proc`` workers and hashes into a stable cache fingerprint."""

    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    config: TokenizeConfig
    source: str
    split: str
    drop_identical: bool = True

    def examples(self, batch: dict[str, list[Any]], indices: list[int]) -> Iterator[tuple[RowRef, Any]]:
        """Each raw row of the batch, validated into its example, with its reference for errors."""
        columns = LAYOUT_COLUMNS[self.layout]
        for offset, index in enumerate(indices):
            ref = RowRef(self.source, self.split, index)
            yield ref, to_example({c: batch[c][offset] for c in columns}, self.layout, ref)


@dataclass(frozen=True)
class PairPreprocessor(_Preprocessor):
    """The ``datasets.map`` function: a batch of raw rows -> `TOKENIZED_FIELDS` + a ``drop`` code."""

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        drop, rendered, kept = [], [], []
        for offset, (ref, example) in enumerate(self.examples(batch, indices)):
            if self.drop_identical and example.identical:
                drop.append(Drop.IDENTICAL)
                continue
            drop.append(Drop.KEEP)
            rendered.append(render(example, self.tokenizer, ref))
            kept.append(offset)
        out: dict[str, list[Any]] = {
            f: [[] if f.endswith("ids") else 0] * len(indices) for f in TOKENIZED_FIELDS
        }
        out["drop"] = [int(d) for d in drop]
        for offset, (chosen, rejected) in zip(kept, tokenize_pairs(rendered, self.tokenizer, self.config)):
            if chosen.response_length == 0 or rejected.response_length == 0:
                out["drop"][offset] = int(Drop.EMPTY_RESPONSE)
                continue
            out["chosen_input_ids"][offset], out["chosen_response_start"][offset] = chosen
            out["rejected_input_ids"][offset], out["rejected_response_start"][offset] = rejected
        return out


@dataclass(frozen=True)
class UnpairedPreprocessor(_Preprocessor):
    """The ``datasets.map`` function for unpaired data: raw rows -> `UNPAIRED_FIELDS` + ``drop``.

    Unpaired rows give one example each; pairs give two (chosen desirable, rejected undesirable),
    so the output may have more rows than the input. A dropped pair leaves one placeholder row.
    """

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        drop, desirable, rendered, kept = [], [], [], []
        for ref, example in self.examples(batch, indices):
            if isinstance(example, PreferenceExample):
                if self.drop_identical and example.identical:
                    drop.append(Drop.IDENTICAL)
                    desirable.append(False)
                    continue
                examples = unpair(example)
            else:
                examples = (example,)
            for unpaired in examples:
                kept.append(len(drop))
                drop.append(Drop.KEEP)
                desirable.append(unpaired.desirable)
                rendered.append(render_unpaired(unpaired, self.tokenizer, ref))
        out: dict[str, list[Any]] = {"input_ids": [[]] * len(drop), "response_start": [0] * len(drop)}
        out["desirable"], out["drop"] = desirable, [int(d) for d in drop]
        for row, side in zip(kept, tokenize_completions(rendered, self.tokenizer, self.config)):
            if side.response_length == 0:
                out["drop"][row] = int(Drop.EMPTY_RESPONSE)
                continue
            out["input_ids"][row], out["response_start"][row] = side
        return out


def _keep(drop: list[int]) -> list[bool]:
    return [d == Drop.KEEP for d in drop]


def preprocess_split(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    *,
    source: str,
    split: str,
    drop_identical: bool = True,
    num_proc: int | None = None,
    unpaired: bool = False,
) -> Dataset:
    """Validate, render and tokenize one split; the result holds only `TOKENIZED_FIELDS`, or
    `UNPAIRED_FIELDS` with ``unpaired=True`` (from unpaired rows, or from pairs split in two)."""
    layout = detect_layout(dataset.column_names, f"{source} (split {split!r})")
    if len(dataset) == 0:
        raise DataError(f"{source} (split {split!r}): the split has no rows")
    if layout is Layout.UNPAIRED and not unpaired:
        raise DataError(
            f"{source}: unpaired prompt/completion/label rows (KTO format) need an unpaired loss (KTO, "
            "`unpaired=True`); pairwise losses need prompt/chosen/rejected (or chosen/rejected) columns"
        )
    preprocessor = UnpairedPreprocessor if unpaired else PairPreprocessor
    function = preprocessor(tokenizer, layout, config, source, split, drop_identical)
    mapped = dataset.map(
        function,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc=f"Tokenizing {split}",
    )
    counts = np.bincount(mapped.data.column("drop").to_numpy(), minlength=len(Drop))
    if counts[Drop.IDENTICAL]:
        log.warning(
            "%s (split %r): dropped %d of %d pairs whose chosen equals rejected",
            source,
            split,
            counts[Drop.IDENTICAL],
            len(dataset),
        )
    if counts[Drop.EMPTY_RESPONSE]:
        log.warning(
            "%s (split %r): dropped %d of %d %s whose response is empty after truncation "
            "(max_length=%d, max_prompt_length=%s)",
            source,
            split,
            counts[Drop.EMPTY_RESPONSE],
            len(mapped),
            "examples" if unpaired else "pairs",
            config.max_length,
            config.max_prompt_length,
        )
    kept = mapped.filter(_keep, input_columns="drop", batched=True, num_proc=None).remove_columns("drop")
    if len(kept) == 0:
        raise DataError(
            f"{source} (split {split!r}): no {'examples' if unpaired else 'pairs'} left after filtering "
            f"{len(dataset)} rows "
            f"({counts[Drop.IDENTICAL]} with chosen == rejected, {counts[Drop.EMPTY_RESPONSE]} with an empty "
            f"response after truncation to max_length={config.max_length})"
        )
    return kept
