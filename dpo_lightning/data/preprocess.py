"""Raw split -> tokenized split: formats, rendering and tokenization in one ``datasets.map`` pass.

The pass is batched, can run with ``num_proc`` workers and is cached by the datasets
fingerprint (the hash of the source, the tokenizer and these settings), so it runs once and not
per epoch. Rows that cannot be used raise `DataError` naming the row; pairs that are dropped
(identical sides, responses emptied by truncation, sides made identical by truncation) are counted
and reported in one warning each, as are prompts and responses cut by truncation and ignored columns.
Pairs with a ``margin`` column keep it (checked, as a float), for reward-model training. Unpaired (KTO)
examples go through the same pass with their own preprocessor (`kto_preprocess`).

`map_rows` and `kept_rows` are the map and filter every kind of data (pairs, KTO examples, SFT rows) goes
through; `detect_rows` and `tokenize_rows` the steps pairs and KTO examples share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import DataError, RowRef, warn
from .formats import (
    LAYOUT_COLUMNS,
    OPTIONAL_COLUMNS,
    Layout,
    check_margin,
    detect_layout,
    to_example,
)
from .render import render
from .tokenize import TokenizeConfig, TokenizedSide, tokenize_pairs

# The per-example fields every collator can rely on (padding and, later, packing).
TOKENIZED_FIELDS = (
    "chosen_input_ids",
    "chosen_response_start",
    "rejected_input_ids",
    "rejected_response_start",
)
# Kept next to them when the raw pairs have it (not for unpaired data): a float per pair.
MARGIN = "margin"


class Drop(IntEnum):
    """Why a pair leaves the dataset (0: it stays)."""

    KEEP = 0
    IDENTICAL = 1
    EMPTY_RESPONSE = 2
    IDENTICAL_AFTER_TRUNCATION = 3  # the responses differ only past max_length: no training signal


class Cut(IntEnum):
    """Bits of the per-row ``cut`` column: what truncation shortened (counted, then removed)."""

    PROMPT = 1
    CHOSEN = 2  # the response of an unpaired example counts here too
    REJECTED = 4


# Bumped whenever the map output changes: it is part of the cache fingerprint, so a cache file
# written by an older version (without today's columns) is never reused.
OUTPUT_VERSION = 3


def cut_bits(*sides: TokenizedSide) -> int:
    """`Cut` bits of one pair's sides (chosen, rejected) or of one unpaired example."""
    bits = int(any(side.prompt_cut for side in sides)) * Cut.PROMPT
    for bit, side in zip((Cut.CHOSEN, Cut.REJECTED), sides):
        bits |= bit if side.response_cut else 0
    return int(bits)


@dataclass(frozen=True)
class RowPreprocessor:
    """What the ``datasets.map`` functions of pairs and KTO examples need. A frozen dataclass (not a
    closure) so it pickles into ``num_proc`` workers and hashes into a stable cache fingerprint."""

    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    config: TokenizeConfig
    source: str
    split: str
    drop_identical: bool = True
    version: int = OUTPUT_VERSION

    def examples(self, batch: dict[str, list[Any]], indices: list[int]) -> Iterator[tuple[RowRef, Any]]:
        """Each raw row of the batch, validated into its example, with its reference for errors."""
        columns = LAYOUT_COLUMNS[self.layout]
        for offset, index in enumerate(indices):
            ref = RowRef(self.source, self.split, index)
            yield ref, to_example({c: batch[c][offset] for c in columns}, self.layout, ref)


@dataclass(frozen=True)
class PairPreprocessor(RowPreprocessor):
    """The ``datasets.map`` function: a batch of raw rows -> `TOKENIZED_FIELDS` (+ ``margin`` when the
    rows have one) + a ``drop`` code."""

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        drop, rendered, kept = [], [], []
        raw_margins = batch[MARGIN] if MARGIN in batch else None
        margins = []
        for offset, (ref, example) in enumerate(self.examples(batch, indices)):
            if raw_margins is not None:  # every row's, dropped or not: a bad value is bad data
                margins.append(check_margin(raw_margins[offset], ref))
            if self.drop_identical and example.identical:
                drop.append(Drop.IDENTICAL)
                continue
            drop.append(Drop.KEEP)
            rendered.append(render(example, self.tokenizer, ref))
            kept.append(offset)
        out: dict[str, list[Any]] = {f: [[] if f.endswith("ids") else 0] * len(indices) for f in TOKENIZED_FIELDS}
        out["drop"], out["cut"] = [int(d) for d in drop], [0] * len(indices)
        if raw_margins is not None:
            out[MARGIN] = margins
        for offset, (chosen, rejected) in zip(kept, tokenize_pairs(rendered, self.tokenizer, self.config)):
            if chosen.response_length == 0 or rejected.response_length == 0:
                out["drop"][offset] = int(Drop.EMPTY_RESPONSE)
                continue
            if self.drop_identical and chosen.input_ids == rejected.input_ids:
                out["drop"][offset] = int(Drop.IDENTICAL_AFTER_TRUNCATION)
                continue
            out["chosen_input_ids"][offset], out["chosen_response_start"][offset] = chosen[:2]
            out["rejected_input_ids"][offset], out["rejected_response_start"][offset] = rejected[:2]
            out["cut"][offset] = cut_bits(chosen, rejected)
        return out


def _keep(drop: list[int]) -> list[bool]:
    return [d == Drop.KEEP for d in drop]


def _report(mapped: Dataset, rows: int, config: TokenizeConfig, where: str, unit: str) -> tuple[np.ndarray, int]:
    """Warn once per split about what was dropped and what truncation cut; (drop counts, kept)."""
    drop = mapped.data.column("drop").to_numpy()
    counts = np.bincount(drop, minlength=len(Drop))
    total = len(mapped)
    limits = f"max_length={config.max_length}, max_prompt_length={config.max_prompt_length}"
    if n := counts[Drop.IDENTICAL]:
        warn(f"{where}: dropped {n} of {rows} pairs whose chosen equals rejected")
    if n := counts[Drop.EMPTY_RESPONSE]:
        warn(f"{where}: dropped {n} of {total} {unit} whose response is empty after truncation ({limits})")
    if n := counts[Drop.IDENTICAL_AFTER_TRUNCATION]:
        warn(
            f"{where}: dropped {n} of {total} {unit} whose chosen and rejected are the same tokens after "
            f"truncation ({limits}): they differ only past the limits, so they carry no training signal"
        )
    kept = int(counts[Drop.KEEP])
    cut = mapped.data.column("cut").to_numpy()[drop == Drop.KEEP]
    prompts = int(np.count_nonzero(cut & Cut.PROMPT))
    responses = int(np.count_nonzero(cut & Cut.CHOSEN) + np.count_nonzero(cut & Cut.REJECTED))
    if prompts or responses:
        sides = kept if unit == "examples" else 2 * kept
        warn(
            f"{where}: truncation cut the prompt of {prompts} of {kept} {unit} to max_prompt_length="
            f"{config.max_prompt_length} tokens (truncation_mode={config.truncation_mode}) and {responses} "
            f"of {sides} responses to fit max_length={config.max_length} tokens"
        )
    return counts, kept


def warn_ignored_columns(
    columns: Sequence[str], layout: Enum, needed: Sequence[str], reads: Sequence[str], where: str
) -> None:
    """Name the columns the layout does not read (`reads`: `needed` and the optional ones present): a
    ``system`` column, say, is not in the prompt."""
    if extra := [c for c in columns if c not in reads]:
        warn(f"{where}: ignoring column(s) {extra}; the {layout.value} layout reads only {', '.join(needed)}")


def map_rows(
    dataset: Dataset, function: Callable[..., dict[str, list[Any]]], where: str, split: str, num_proc: int | None
) -> Dataset:
    """The one cached ``datasets.map(batched=True, with_indices=True)`` pass over a raw split."""
    try:
        return dataset.map(
            function,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            desc=f"Tokenizing {split}",
        )
    except UnicodeDecodeError as err:  # bytes that are not UTF-8 in a source not checked on loading
        raise DataError(f"{where}: text that is not UTF-8 ({err}); re-encode the data as UTF-8") from err


def kept_rows(mapped: Dataset) -> Dataset:
    """The mapped rows whose ``drop`` code is 0, without the bookkeeping columns ``drop`` and ``cut``."""
    keep = mapped.filter(_keep, input_columns="drop", batched=True, num_proc=None)
    return keep.remove_columns(["drop", "cut"])


def detect_rows(dataset: Dataset, where: str) -> Layout:
    """The layout of a raw split (`formats.detect_layout`); `DataError` when it has no rows."""
    layout = detect_layout(dataset.column_names, where)
    if len(dataset) == 0:
        raise DataError(f"{where}: the split has no rows")
    return layout


def tokenize_rows(
    dataset: Dataset,
    function: RowPreprocessor,
    where: str,
    *,
    unit: str,
    optional: Sequence[str] = (),
    num_proc: int | None = None,
) -> Dataset:
    """Run one preprocessor over a raw split: name the columns it does not read, map, report what was
    dropped and cut (one warning each), refuse a split left empty; the kept rows."""
    needed = LAYOUT_COLUMNS[function.layout]
    reads = [*needed, *(c for c in optional if c in dataset.column_names)]
    warn_ignored_columns(dataset.column_names, function.layout, needed, reads, where)
    mapped = map_rows(dataset, function, where, function.split, num_proc)
    counts, kept = _report(mapped, len(dataset), function.config, where, unit)
    if kept == 0:
        raise DataError(
            f"{where}: no {unit} left after filtering {len(dataset)} rows "
            f"({counts[Drop.IDENTICAL]} with chosen == rejected, {counts[Drop.EMPTY_RESPONSE]} with an empty "
            f"response after truncation to max_length={function.config.max_length}, "
            f"{counts[Drop.IDENTICAL_AFTER_TRUNCATION]} with chosen == rejected after truncation)"
        )
    return kept_rows(mapped)


def preprocess_split(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    *,
    source: str,
    split: str,
    drop_identical: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Validate, render and tokenize one split of pairs; the result holds only `TOKENIZED_FIELDS` (and
    ``margin`` when the pairs have one). Unpaired (KTO) examples: `kto_preprocess.preprocess_unpaired_split`."""
    where = f"{source} (split {split!r})"
    layout = detect_rows(dataset, where)
    if layout is Layout.UNPAIRED:
        raise DataError(
            f"{source}: unpaired prompt/completion/label rows (KTO format) need KTO (KTOModule with "
            "KTODataModule); pairwise losses need prompt/chosen/rejected (or chosen/rejected) columns"
        )
    function = PairPreprocessor(tokenizer, layout, config, source, split, drop_identical)  # reads a margin if any
    tokenized = tokenize_rows(
        dataset, function, where, unit="pairs", optional=OPTIONAL_COLUMNS.get(layout, ()), num_proc=num_proc
    )
    if MARGIN in tokenized.column_names:  # the map keeps an overwritten column in its place: put it last
        tokenized = tokenized.select_columns([*TOKENIZED_FIELDS, MARGIN])
    return tokenized
