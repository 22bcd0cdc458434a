"""SFT collators: tokenized rows (``input_ids``, ``labels``) -> the batch dict an SFT module consumes.

Chosen by name through `SFT_COLLATORS` (``pad`` | ``pack``). Both pass through what the loaders
attach to the examples: ``window_tokens`` (training: the loss tokens of this rank's
gradient-accumulation window, `window.py`) as a 0-dim long tensor, and ``padding`` (an eval shard's
padding, `sampler.MarkPadding`) as a float ``weight`` (N,), 0 on padded rows.

With ``data.packing`` (TRL's ``packing=True``, `sft_packing`) an example is a row of several
sequences (``seq_lengths``): ``pack`` lays each such row out as one row, its sequences isolated as
``pack`` isolates them; ``pad`` gives each of its sequences a padded row. Both count N sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .collate import IGNORE_INDEX, padded_width, right_pad
from .packing import Packer
from .sampler import padding_weights


class Sequences(NamedTuple):
    """The sequences a batch's examples hold, in order: one per example, or several per packed row."""

    input_ids: list[Sequence[int]]
    labels: list[Sequence[int]]
    counts: list[int]  # how many sequences each example holds

    @property
    def rows(self) -> list[list[int]]:
        """The indices of each example's sequences."""
        ends = list(accumulate(self.counts))
        return [list(range(end - n, end)) for n, end in zip(self.counts, ends)]


def sequences(features: Sequence[Mapping[str, Any]]) -> Sequences:
    """Each example's sequences: the example itself, or, for a row packed by ``data.packing``
    (`sft_packing`), the pieces of its ``input_ids`` and ``labels`` that ``seq_lengths`` delimits."""
    if "seq_lengths" not in features[0]:
        return Sequences([f["input_ids"] for f in features], [f["labels"] for f in features], [1] * len(features))
    out = Sequences([], [], [])
    for f in features:
        for start, end in pairwise([0, *accumulate(f["seq_lengths"])]):
            out.input_ids.append(f["input_ids"][start:end])
            out.labels.append(f["labels"][start:end])
        out.counts.append(len(f["seq_lengths"]))
    return out


def sft_extras(features: Sequence[Mapping[str, Any]], counts: Sequence[int]) -> dict[str, Tensor]:
    """``window_tokens`` (0-dim long) and ``weight`` ``(N,)`` float (one per sequence: ``counts[i]`` for
    example i), when the examples carry them."""
    extras: dict[str, Tensor] = {}
    if "window_tokens" in features[0]:
        windows = {int(f["window_tokens"]) for f in features}
        if len(windows) != 1:  # batches never straddle windows; if they do, the sampler is wrong
            raise ValueError(f"one batch holds examples of several accumulation windows: {sorted(windows)}")
        extras["window_tokens"] = torch.tensor(windows.pop(), dtype=torch.long)
    if "padding" in features[0]:
        extras["weight"] = padding_weights(features).repeat_interleave(torch.tensor(counts))
    return extras


@dataclass(frozen=True)
class SFTPaddingCollator:
    """Right-pad N rows to the longest (rounded up to ``pad_to_multiple_of``), labels -100 on padding.

    Each example holds ``input_ids`` and ``labels`` (-100 off the loss, unshifted: position t is
    predicted from the logits at t - 1, so position 0 is always -100).

    Worked example, ``pad_token_id=0``, N=2, both in a window of 4 loss tokens::

        features = [
            {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "window_tokens": 4},
            {"input_ids": [3, 4, 9], "labels": [-100, 4, 9], "window_tokens": 4},
        ]
        SFTPaddingCollator(pad_token_id=0)(features) == {
            "input_ids": tensor([[5, 6, 7, 8],
                                 [3, 4, 9, 0]]),
            "attention_mask": tensor([[1, 1, 1, 1],
                                      [1, 1, 1, 0]]),
            "labels": tensor([[-100, -100,    7,    8],
                              [-100,    4,    9, -100]]),
            "window_tokens": tensor(4),
        }
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        seqs = sequences(features)
        lengths = torch.tensor([len(r) for r in seqs.input_ids])  # (N,)
        width = padded_width(lengths.tolist(), self.pad_to_multiple_of)
        attention_mask = torch.arange(width) < lengths[:, None]  # (N, T)
        batch = {
            "input_ids": right_pad(seqs.input_ids, self.pad_token_id, width),  # (N, T)
            "attention_mask": attention_mask.long(),
            "labels": right_pad(seqs.labels, IGNORE_INDEX, width),  # (N, T)
        }
        return {**batch, **sft_extras(features, seqs.counts)}


@dataclass(frozen=True)
class SFTPackingCollator(Packer):
    """Pack N rows into rows of at most ``max_tokens_per_row`` tokens, first-fit-decreasing (TRL's
    ``padding_free``: the batch still counts N rows), exactly as pairs are packed (`packing.Packer`):
    ``position_ids`` restart per sequence, ``sequence_ids`` say which row each position belongs to
    (-1 on padding), the attention mask is block-causal.

    Worked example, the features of `SFTPaddingCollator`'s, budget 7::

        SFTPackingCollator(pad_token_id=0, max_tokens_per_row=7)(features) == {
            "input_ids":    tensor([[5, 6, 7, 8, 3, 4, 9]]),
            "position_ids": tensor([[0, 1, 2, 3, 0, 1, 2]]),
            "labels":       tensor([[-100, -100, 7, 8, -100, 4, 9]]),
            "sequence_ids": tensor([[0, 0, 0, 0, 1, 1, 1]]),
            "num_sequences": 2,
            "attention_mask": (1, 1, 7, 7) float: block-diagonal causal, 0 / -inf,
            "window_tokens": tensor(4),
        }

    The labels hold the same tokens as the padded batch's, so the loss tokens per sequence (and
    ``window_tokens``) are the same under both collators.

    Rows packed in advance (``data.packing``): each example is one row, its sequences delimited by
    ``seq_lengths``; no bin packing here, and ``SFTPaddingCollator`` would give the 3 sequences 3 rows::

        packed = [
            {"input_ids": [5, 6, 7, 8, 3, 4, 9], "labels": [-100, -100, 7, 8, -100, 4, 9], "seq_lengths": [4, 3]},
            {"input_ids": [2, 6, 6], "labels": [-100, 6, 6], "seq_lengths": [3]},
        ]
        SFTPackingCollator(pad_token_id=0)(packed) == {
            "input_ids":    tensor([[5, 6, 7, 8, 3, 4, 9],
                                    [2, 6, 6, 0, 0, 0, 0]]),
            "position_ids": tensor([[0, 1, 2, 3, 0, 1, 2],
                                    [0, 1, 2, 0, 0, 0, 0]]),
            "labels":       tensor([[-100, -100, 7, 8, -100, 4, 9],
                                    [-100, 6, 6, -100, -100, -100, -100]]),
            "sequence_ids": tensor([[0, 0, 0, 0, 1, 1, 1],
                                    [2, 2, 2, -1, -1, -1, -1]]),
            "num_sequences": 3,
            "attention_mask": (2, 1, 7, 7) float: block-diagonal causal, 0 / -inf,
        }
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        seqs = sequences(features)
        rows = seqs.rows if "seq_lengths" in features[0] else None  # packed in advance: one row each
        batch = self.pack(seqs.input_ids, seqs.labels, rows)
        return {**batch, **sft_extras(features, seqs.counts)}


# Collator name -> factory taking (pad_token_id, pad_to_multiple_of).
SFT_COLLATORS: dict[str, Callable[..., Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]]] = {
    "pad": SFTPaddingCollator,
    "pack": SFTPackingCollator,
}
