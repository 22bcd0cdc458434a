"""Prefix sharing: a pair's prompt computed once, both responses branching from it, packed into rows.

The padded and packed paths forward each prompt twice, once before the chosen response and once
before the rejected one (on HH harmless-base, prompts are 36% of the tokens). Here a pair is one
block ``[prompt | chosen branch | rejected branch]``: the rejected branch's ``position_ids``
continue from the prompt's end, as the chosen branch's do, and the attention mask lets each branch
see the shared prompt and itself, never the other branch (Wang and Hegde 2024, arXiv:2410.20305).
Blocks are then packed several to a row, first-fit-decreasing, as `packing.Packer` packs sequences.

One token is not shared. The first response token of each side is predicted from the prompt's last
position, and a position holds one next-token target. So the shared part is the prompt minus its
last token, and each branch starts with its own copy of that token (same id, same position): both
copies see exactly what the padded path's last prompt token sees, so every target is still
predicted by the position just before it, and `logprobs.sequence_logps` (full logits or the lean
path, under FSDP2 too) scores the rows with no change. The shared part is the longest common token
prefix of the two sides, up to their prompts: sides whose prompts tokenize differently (a BPE merge
across the prompt/response join) share what they have in common, and a pair with nothing in common
gets two independent branches, as packing gives.

When it pays. A block is longer than either of its sequences, so rows are wider, and a dense mask
makes attention cost every query-key pair of a row, masked or not. With long prompts the prompt saved
wins (HH harmless-base on a 4 x 256 Llama: 0.65 of packing's token positions, 1.4x the pairs/s); with
short prompts, long responses and a small model the wider rows lose (12% slower at prompts up to 32
and responses up to 480 on that model; at hidden 1024 the two even out). So with ``attention_cost``
set (``collator: auto`` sets the model's, `attention_cost`) each batch is laid out both ways and the cheaper one by
`layout_cost` is used: a batch that would lose is packed plainly (`packing.PackingCollator`, every
sequence whole). The cost model predicts the measured time ratios within 0.06 (docs/benchmarks.md).

Exact with ``sdpa`` and ``eager`` (a 4D additive float mask); flash-attention kernels cannot take the
mask. ``sequence_ids`` say which sequence each position scores for (``k`` chosen, ``B + k`` rejected;
the shared part is filed under ``k``, it holds no target), ``num_tokens`` the tokens the pairs hold
with the prompt counted on both sides (what the padded and packed paths count as input tokens, so
``train/num_tokens`` does not depend on the collator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.models.loading import text_config
from dpo_lightning.models.logprobs import IGNORE_INDEX

from .extras import pair_extras
from .packing import PackingCollator, block_causal_mask, pack_rows
from .tokenize import common_prefix_length

SHARED, CHOSEN, REJECTED = 0, 1, 2  # branch of a position in its block


def shared_length(chosen: Sequence[int], chosen_start: int, rejected: Sequence[int], rejected_start: int) -> int:
    """Tokens of a pair computed once: the common prefix of both sides within both prompts, less one."""
    common = min(common_prefix_length(chosen, rejected), chosen_start, rejected_start)
    return max(common - 1, 0)


@dataclass(frozen=True)
class PrefixSharingCollator:
    """B pairs -> rows of ``[shared prompt | chosen branch | rejected branch]`` blocks, packed.

    Reads the fields ``PaddingCollator`` reads. A row holds whole blocks, at most
    ``max_tokens_per_row`` tokens (never fewer than the longest block); ``None`` uses the longest block.
    ``labels`` are ``-100`` off the responses and at each branch's first position (its copy of the
    prompt's last token, or, with nothing shared, a first token that nothing predicts).

    Worked example, ``pad_token_id=0``, B=2, one row (``max_tokens_per_row=16``); pair 0 shares
    ``[5]`` and branches ``[6, 7, 8]`` / ``[6, 9]``; pair 1 shares nothing (prompt ``[3]``)::

        features = [
            {"chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
             "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2},
            {"chosen_input_ids": [3, 4], "chosen_response_start": 1,
             "rejected_input_ids": [3, 4, 4, 2], "rejected_response_start": 1},
        ]
        PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=16)(features) == {
            #                  pair 0: shared, chosen, rejected | pair 1: chosen, rejected
            "input_ids":    tensor([[5,  6,  7,  8,  6,  9,    3, 4,    3, 4, 4, 2]]),
            "position_ids": tensor([[0,  1,  2,  3,  1,  2,    0, 1,    0, 1, 2, 3]]),
            "labels":       tensor([[-100, -100, 7, 8, -100, 9,
                                     -100, 4,   -100, 4, 4, 2]]),
            "sequence_ids": tensor([[0,  0,  0,  0,  2,  2,    1, 1,    3, 3, 3, 3]]),
            "attention_mask": (1, 1, 12, 12) float, 0 / -inf: the rejected ``6`` at column 4 sees the
                              shared ``5`` and itself, not the chosen ``6, 7, 8``,
            "num_sequences": 4,
            "num_tokens": 13,   # 4 + 3 + 2 + 4: the prompt counted on both sides
        }

    Args:
        pad_token_id: Id written into the unused tail of a row.
        pad_to_multiple_of: Round the row length up to a multiple of this.
        max_tokens_per_row: Token budget per row; the dense mask grows with its square.
        attention_cost: The model's `attention_cost`: a batch whose shared layout would cost more (by
            `layout_cost`) than plain packing is packed plainly. None: always share.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_tokens_per_row: int | None = None
    attention_cost: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be positive, got {self.max_tokens_per_row}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        b = len(features)
        chosen = [list(f["chosen_input_ids"]) for f in features]
        rejected = [list(f["rejected_input_ids"]) for f in features]
        c_start = [int(f["chosen_response_start"]) for f in features]
        r_start = [int(f["rejected_response_start"]) for f in features]
        shared, lengths = _blocks(features)  # tokens shared and block length, per pair
        num_tokens = sum(len(s) for s in chosen) + sum(len(s) for s in rejected)
        rows, width = self._rows(lengths)
        if self.attention_cost is not None:
            seq_rows, seq_width = self._rows([len(s) for s in chosen + rejected])
            if layout_cost(len(seq_rows), seq_width, self.attention_cost) < layout_cost(
                len(rows), width, self.attention_cost
            ):  # the wider rows' attention would cost more than the prompts save
                packer = PackingCollator(self.pad_token_id, self.pad_to_multiple_of, self.max_tokens_per_row)
                return {**packer(features), "num_tokens": num_tokens}

        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (R, L)
        position_ids = torch.zeros(shape, dtype=torch.long)  # (R, L)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (R, L)
        sequence_ids = torch.full(shape, -1, dtype=torch.long)  # (R, L)
        block_ids = torch.full(shape, -1, dtype=torch.long)  # (R, L) pair of each position
        branch_ids = torch.full(shape, SHARED, dtype=torch.long)  # (R, L)
        for r, row in enumerate(rows):
            offset = 0
            for k in row:
                p = shared[k]
                block_ids[r, offset : offset + lengths[k]] = k
                input_ids[r, offset : offset + p] = torch.as_tensor(chosen[k][:p], dtype=torch.long)
                position_ids[r, offset : offset + p] = torch.arange(p)
                sequence_ids[r, offset : offset + p] = k
                offset += p
                for ids, start, seq, branch in ((chosen[k], c_start[k], k, CHOSEN),
                                                (rejected[k], r_start[k], b + k, REJECTED)):
                    n = len(ids) - p  # this branch's tokens: ids[p:]
                    span = slice(offset, offset + n)
                    input_ids[r, span] = torch.as_tensor(ids[p:], dtype=torch.long)
                    position_ids[r, span] = torch.arange(p, len(ids))
                    sequence_ids[r, span] = seq
                    branch_ids[r, span] = branch
                    first = max(start, p + 1)  # response tokens, never the branch's first position
                    labels[r, offset + first - p : offset + n] = torch.as_tensor(ids[first:], dtype=torch.long)
                    offset += n

        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "sequence_ids": sequence_ids,
            "num_sequences": 2 * b,
            "num_tokens": num_tokens,
            "attention_mask": block_causal_mask(block_ids, branch_ids=branch_ids),  # (R, 1, L, L)
        }
        return {**batch, **pair_extras(features)}

    def _rows(self, lengths: list[int]) -> tuple[Sequence[Sequence[int]], int]:
        """Units of ``lengths`` packed into rows (first-fit-decreasing) and the rows' width (`packing.pack_rows`)."""
        return pack_rows(lengths, self.max_tokens_per_row, self.pad_to_multiple_of)


    def costs(self, features: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
        """`layout_cost` of a batch laid out shared (as here) and packed (`PackingCollator`), at `attention_cost`."""
        sequences = [len(f[k]) for f in features for k in ("chosen_input_ids", "rejected_input_ids")]
        (rows, width), (seq_rows, seq_width) = self._rows(_blocks(features)[1]), self._rows(sequences)
        cost = self.attention_cost or 0.0
        return layout_cost(len(rows), width, cost), layout_cost(len(seq_rows), seq_width, cost)


def _blocks(features: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """Per pair: the tokens its two sides share (`shared_length`) and its block's length."""
    shared, lengths = [], []
    for f in features:
        c, r = f["chosen_input_ids"], f["rejected_input_ids"]
        shared.append(shared_length(c, f["chosen_response_start"], r, f["rejected_response_start"]))
        lengths.append(len(c) + len(r) - shared[-1])
    return shared, lengths


def layout_costs(features: Sequence[Mapping[str, Any]], attention_cost: float, **collator: Any) -> tuple[float, float]:
    """`layout_cost` of a batch of pairs laid out shared and packed; ``collator``: ``max_tokens_per_row``,
    ``pad_to_multiple_of``."""
    return PrefixSharingCollator(pad_token_id=0, attention_cost=attention_cost, **collator).costs(features)


def layout_cost(rows: int, width: int, attention_cost: float) -> float:
    """Relative compute of a forward over ``rows`` rows of ``width`` positions with a dense mask: every
    position's projections and MLP (1 each), and ``attention_cost`` per query-key pair (all ``width**2`` of
    a row: a dense mask skips nothing)."""
    return rows * width * (1.0 + attention_cost * width)


def attention_cost(config: Any) -> float | None:
    """A model's compute per query-key pair of attention over its compute per position elsewhere in a
    layer, from its config: ``4 q / (2 P)`` for query width ``q`` and ``P`` weights per layer (each weight
    costs 2 FLOPs per position; scores and values 2 x 2q per pair). None when the config does not say.

    Llama-2-7B: q 4096, P 202M -> 1 / 24,700 (attention is cheap until rows of ~10k positions); the 4 x 256
    Llama of the CPU benchmarks: 1 / 2,048.
    """
    text = text_config(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    if not hidden or not heads:
        return None
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    gated = getattr(text, "model_type", "") not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi")
    q = heads * head_dim
    per_layer = hidden * (2 * q + 2 * kv_heads * head_dim) + (3 if gated else 2) * hidden * inner
    return 4 * q / (2 * per_layer)
