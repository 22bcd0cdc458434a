"""Collators: tokenized pairs -> the batch dict `DPOModule` consumes (see docs/architecture.md).

Collators are chosen by name through `COLLATORS`: ``pad`` (here), ``pack`` (data/packing.py: sequences
packed into rows) and ``share`` (data/prefix_sharing.py: each pair's prompt once, both responses
branching from it, pairs packed) read the same per-example fields. Unpaired (KTO) examples have their own
collator, `kto_collate.KTOCollator` (`KTODataModule`'s).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .extras import pair_extras
from .packing import PackingCollator
from .prefix_sharing import PrefixSharingCollator

IGNORE_INDEX = -100


def right_pad(rows: Sequence[Sequence[int]], value: int, width: int) -> Tensor:
    """``(R, width)`` long tensor: row i holds ``rows[i]``, then `value` to the right."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def padded_width(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    """The longest length, rounded up to a multiple of `pad_to_multiple_of` when set."""
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


@dataclass(frozen=True)
class PaddingCollator:
    """Stack chosen and rejected into 2B right-padded rows (chosen first) with response-only labels.

    Each example holds ``chosen_input_ids`` / ``rejected_input_ids`` (prompt + response) and
    ``chosen_response_start`` / ``rejected_response_start`` (index of the first response token).
    Rows are padded to the longest row of the batch, rounded up to ``pad_to_multiple_of``.
    ``labels`` equal ``input_ids`` on response tokens and -100 on prompt and padding; they are
    not shifted (position t is predicted from the logits at t - 1).

    Worked example, ``pad_token_id=0``, B=2::

        features = [
            {"chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
             "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2},
            {"chosen_input_ids": [3, 4], "chosen_response_start": 1,
             "rejected_input_ids": [3, 4, 4, 2], "rejected_response_start": 1},
        ]
        PaddingCollator(pad_token_id=0)(features) == {
            "input_ids": tensor([[5, 6, 7, 8],      # pair 0, chosen
                                 [3, 4, 0, 0],      # pair 1, chosen
                                 [5, 6, 9, 0],      # pair 0, rejected
                                 [3, 4, 4, 2]]),    # pair 1, rejected
            "attention_mask": tensor([[1, 1, 1, 1],
                                      [1, 1, 0, 0],
                                      [1, 1, 1, 0],
                                      [1, 1, 1, 1]]),
            "labels": tensor([[-100, -100,    7,    8],
                              [-100,    4, -100, -100],
                              [-100, -100,    9, -100],
                              [-100,    4,    4,    2]]),
        }

    With ``pad_to_multiple_of=8`` every tensor would have 8 columns, the extra ones padding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        starts = [f["chosen_response_start"] for f in features] + [
            f["rejected_response_start"] for f in features
        ]
        lengths = torch.tensor([len(r) for r in rows])  # (2B,)
        width = padded_width(lengths.tolist(), self.pad_to_multiple_of)
        input_ids = right_pad(rows, self.pad_token_id, width)  # (2B, T)
        positions = torch.arange(width)  # (T,)
        attention_mask = positions < lengths[:, None]  # (2B, T)
        is_response = attention_mask & (positions >= torch.tensor(starts)[:, None])  # (2B, T)
        labels = input_ids.masked_fill(~is_response, self.label_pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels}
        return {**batch, **pair_extras(features)}


# Collator name -> factory taking (pad_token_id, pad_to_multiple_of).
COLLATORS: dict[str, Callable[..., Callable[[Sequence[Mapping[str, Any]]], dict[str, Tensor]]]] = {
    "pad": PaddingCollator,
    "pack": PackingCollator,
    "share": PrefixSharingCollator,  # prompt once per pair, both responses branching from it, packed
}


def build_collator(name: str, *, pad_token_id: int, pad_to_multiple_of: int | None = None, **options: Any) -> Callable:
    """The collator registered under `name` in `COLLATORS` (``options``: that collator's own settings)."""
    if name not in COLLATORS:
        raise ValueError(f"unknown collator {name!r}; choose one of {sorted(COLLATORS)}")
    return COLLATORS[name](pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, **options)
