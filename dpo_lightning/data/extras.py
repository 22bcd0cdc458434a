"""Optional per-pair fields that every pair collator (padding, packing) passes through."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .sampler import padding_weights


def pair_extras(features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Optional per-pair fields every pair collator passes through.

    ``index`` ``(B,)``: the pairs' positions in their split (for precomputing reference log-probs);
    ``ref_logps`` ``(2B,)``: precomputed reference log-probs, chosen first like the rows;
    ``weight`` ``(B,)`` float: the pairs' metric weights, 0 for the padding of an uneven eval shard
    (examples carry ``padding`` only when read through ``sampler.MarkPadding``);
    ``margin`` ``(B,)`` float32: the pairs' reward margins, when the data has a ``margin`` column.
    """
    extras: dict[str, Tensor] = {}
    if "padding" in features[0]:
        extras["weight"] = padding_weights(features)
    if "index" in features[0]:
        extras["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    if "ref_chosen_logps" in features[0]:
        extras["ref_logps"] = torch.tensor(
            [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features],
            dtype=torch.float32,
        )
    if "margin" in features[0]:
        extras["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
    return extras
