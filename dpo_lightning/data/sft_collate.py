"""SFT collators: tokenized rows (``input_ids``, ``labels``) -> the batch dict an SFT module consumes.

Chosen by name through `SFT_COLLATORS` (``pad`` | ``pack``). Both pass through what the loaders
attach to the examples: ``window_tokens`` (training: the loss tokens of this rank's
gradient-accumulation window, `window.py`) as a 0-dim long tensor, and ``padding`` (an eval shard's
padding, `sampler.MarkPadding`) as a float ``weight`` (N,), 0 on padded rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .collate import IGNORE_INDEX, padded_width, right_pad
from .packing import Packer
from .sampler import padding_weights


def sft_extras(features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """``window_tokens`` (0-dim long) and ``weight`` ``(N,)`` float, when the examples carry them."""
    extras: dict[str, Tensor] = {}
    if "window_tokens" in features[0]:
        counts = {int(f["window_tokens"]) for f in features}
        if len(counts) != 1:  # batches never straddle windows; if they do, the sampler is wrong
            raise ValueError(f"one batch holds examples of several accumulation windows: {sorted(counts)}")
        extras["window_tokens"] = torch.tensor(counts.pop(), dtype=torch.long)
    if "padding" in features[0]:
        extras["weight"] = padding_weights(features)
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
        rows = [f["input_ids"] for f in features]
        lengths = torch.tensor([len(r) for r in rows])  # (N,)
        width = padded_width(lengths.tolist(), self.pad_to_multiple_of)
        attention_mask = torch.arange(width) < lengths[:, None]  # (N, T)
        batch = {
            "input_ids": right_pad(rows, self.pad_token_id, width),  # (N, T)
            "attention_mask": attention_mask.long(),
            "labels": right_pad([f["labels"] for f in features], IGNORE_INDEX, width),  # (N, T)
        }
        return {**batch, **sft_extras(features)}


@dataclass(frozen=True)
class SFTPackingCollator(Packer):
    """Pack N rows into rows of at most ``max_tokens_per_row`` tokens, first-fit-decreasing, exactly as
    pairs are packed (`packing.Packer`): ``position_ids`` restart per sequence, ``sequence_ids`` say
    which row each position belongs to (-1 on padding), the attention mask is block-causal.

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
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.pack([f["input_ids"] for f in features], [f["labels"] for f in features])
        return {**batch, **sft_extras(features)}


# Collator name -> factory taking (pad_token_id, pad_to_multiple_of).
SFT_COLLATORS: dict[str, Callable[..., Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]]] = {
    "pad": SFTPaddingCollator,
    "pack": SFTPackingCollator,
}
