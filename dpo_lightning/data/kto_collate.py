"""KTO batches: unpaired examples -> padded rows, plus the mismatched rows of KTO's KL reference point.

KTO compares each completion's implicit reward with z0, an estimate of KL(policy || reference) on the
batch. The paper estimates it on *mismatched* pairs: prompt i with another example's completion, so
that the estimate is not the rewards themselves. TRL builds them once, in the dataset (completions
rotated within each block of ``per_device_train_batch_size`` rows), which only holds if batches are
exactly those blocks, so TRL forces sequential sampling. Here the collator builds them from whatever
micro-batch it gets: shuffling (and resuming mid-epoch) stays correct.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_lightning.data.sampler import padding_weights
from dpo_lightning.models.logprobs import IGNORE_INDEX


def pad_rows(
    rows: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_token_id: int,
    width: int,
    label_pad_token_id: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad ``rows`` to ``width``: (input_ids, attention_mask, labels), each (R, width).

    ``labels`` equal the ids from ``starts[i]`` (the first response token) to the end of row i and
    ``label_pad_token_id`` on the prompt and the padding; not shifted.
    """
    lengths = torch.tensor([len(r) for r in rows])  # (R,)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (R, T)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    positions = torch.arange(width)  # (T,)
    attention_mask = positions < lengths[:, None]  # (R, T)
    is_response = attention_mask & (positions >= torch.tensor(starts)[:, None])  # (R, T)
    labels = input_ids.masked_fill(~is_response, label_pad_token_id)
    return input_ids, attention_mask.long(), labels


@dataclass(frozen=True)
class KTOCollator:
    """Pad N unpaired examples into N rows, and build N mismatched KL rows: prompt i + completion (i+1) mod N.

    Each example holds ``input_ids`` (prompt + completion), ``response_start`` (index of the first
    completion token) and ``desirable`` (bool). The KL row of example i is its prompt ids followed by
    the completion ids of example (i + 1) mod N, the concatenation TRL uses. (TRL rotates the other
    way, i - 1; either is a derangement of the same completions, so both estimate the same KL.) A
    KL row is cut at the end of its completion to the width of the longest example row, so the KL
    forward never costs more than the main one; since every prompt is shorter than its own row,
    each KL row keeps at least one completion token. With N = 1 the KL row is the example itself
    (TRL refuses a per-device batch of 1 for this reason): use batches of 2 or more.

    Worked example, ``pad_token_id=0``, N=2::

        features = [
            {"input_ids": [1, 2, 3, 4, 5], "response_start": 3, "desirable": True},   # prompt 1 2 3, completion 4 5
            {"input_ids": [7, 8, 9], "response_start": 2, "desirable": False},        # prompt 7 8, completion 9
        ]
        KTOCollator(pad_token_id=0)(features) == {
            "input_ids": tensor([[1, 2, 3, 4, 5],
                                 [7, 8, 9, 0, 0]]),
            "attention_mask": tensor([[1, 1, 1, 1, 1],
                                      [1, 1, 1, 0, 0]]),
            "labels": tensor([[-100, -100, -100,    4,    5],
                              [-100, -100,    9, -100, -100]]),
            "kl_input_ids": tensor([[1, 2, 3, 9],          # prompt 0 + completion 1
                                    [7, 8, 4, 5]]),        # prompt 1 + completion 0
            "kl_attention_mask": tensor([[1, 1, 1, 1],
                                         [1, 1, 1, 1]]),
            "kl_labels": tensor([[-100, -100, -100,    9],
                                 [-100, -100,    4,    5]]),
            "desirable": tensor([True, False]),
        }

    ``pad_to_multiple_of`` rounds both widths up. Examples carrying ``index`` or ``ref_logps``
    (precomputed reference log-probs of the example rows) pass them through as (N,) tensors;
    examples carrying ``padding`` (an eval shard's padding, see ``sampler.MarkPadding``) give a
    float ``weight`` (N,), 0 on padding, for the metrics.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def _round(self, width: int) -> int:
        if self.pad_to_multiple_of:
            return -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        rows = [list(f["input_ids"]) for f in features]
        starts = [int(f["response_start"]) for f in features]
        longest = max(len(r) for r in rows)
        input_ids, attention_mask, labels = pad_rows(
            rows, starts, self.pad_token_id, self._round(longest), self.label_pad_token_id
        )

        n = len(rows)
        completions = [row[start:] for row, start in zip(rows, starts)]
        kl_rows = [(rows[i][: starts[i]] + completions[(i + 1) % n])[:longest] for i in range(n)]
        kl_input_ids, kl_attention_mask, kl_labels = pad_rows(
            kl_rows, starts, self.pad_token_id, self._round(max(len(r) for r in kl_rows)), self.label_pad_token_id
        )

        batch = {
            "input_ids": input_ids,  # (N, T)
            "attention_mask": attention_mask,
            "labels": labels,
            "kl_input_ids": kl_input_ids,  # (N, T_kl), T_kl <= T
            "kl_attention_mask": kl_attention_mask,
            "kl_labels": kl_labels,
            "desirable": torch.tensor([bool(f["desirable"]) for f in features], dtype=torch.bool),  # (N,)
        }
        if "index" in features[0]:
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        if "ref_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
        if "padding" in features[0]:  # an eval shard's padding: weight 0 in the metrics
            batch["weight"] = padding_weights(features)  # (N,)
        return batch
