"""Padding-free packing: the 2B sequences of a batch concatenated into rows up to a token budget.

Right padding wastes the compute of every pad token; preference data (HH: responses from a few
tokens to hundreds) pads a lot. Packing puts several whole sequences in a row, restarts
``position_ids`` at each sequence, and isolates the sequences' attention.

Isolation. transformers 5.x on CPU does *not* isolate packed sequences from restarting
``position_ids`` alone (sdpa and eager both let a sequence attend to the previous one), so this
collator builds a 4D additive float mask ``(R, 1, L, L)``: 0 where query ``i`` may attend to key
``j`` (same sequence, ``j <= i``), ``-inf`` elsewhere. transformers passes a 4D mask through
unchanged, and with ``sdpa`` (or ``eager``) the result equals the padded path. The mask costs
``4 * L * L`` bytes per row, hence the row budget. On GPU, ``attention="position_ids"`` leaves
the mask out so that ``flash_attention_2``/``3`` take their varlen path, which finds the
sequence boundaries where ``position_ids`` restart at 0 (what TRL's ``padding_free`` relies on);
that path is not tested here (no GPU in CI), and with sdpa/eager it would leak attention.

Log-probs. ``sequence_ids`` (which sequence each position belongs to, -1 on padding) and
``num_sequences`` (= 2B) go to ``logprobs.sequence_logps``, which sums response tokens per
sequence. Sequence ``k < B`` is the chosen side of pair ``k`` and ``B + k`` its rejected side,
wherever they land in the rows, so ``DPOModule``'s split ``[:B]`` / ``[B:]`` still holds.

`Packer` is the packing itself, for any list of sequences with their labels; `PackingCollator`
(pairs) and ``sft_collate.SFTPackingCollator`` (SFT rows) are its two users.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dpo_lightning.data.extras import pair_extras
from dpo_lightning.models.logprobs import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins whose sums stay <= ``capacity`` (longest first)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def pack_rows(
    lengths: Sequence[int],
    max_tokens_per_row: int | None,
    pad_to_multiple_of: int | None,
    rows: Sequence[Sequence[int]] | None = None,
) -> tuple[Sequence[Sequence[int]], int]:
    """Units of ``lengths`` packed into rows (first-fit-decreasing; a row holds at least the longest unit) and
    the rows' width, rounded up to a multiple of ``pad_to_multiple_of``; with ``rows`` (packed in advance) only
    their width. The one rule of `Packer` and `prefix_sharing.PrefixSharingCollator`, so that the latter's
    cost comparison with plain packing sees the rows packing would make."""
    if rows is None:
        rows = first_fit_decreasing(lengths, max(max(lengths), max_tokens_per_row or 0))
    width = max(sum(lengths[k] for k in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return rows, width


def block_causal_mask(
    sequence_ids: Tensor, dtype: torch.dtype = torch.float32, *, branch_ids: Tensor | None = None
) -> Tensor:
    """``(R, L)`` sequence ids (-1 on padding) -> additive mask ``(R, 1, L, L)``: 0 allowed, -inf not.

    Query ``i`` sees key ``j <= i`` of its own sequence. A padding position sees only itself: a
    query row with no allowed key would make softmax return NaN, which backward spreads into the
    weight gradients even though no loss depends on padding.

    ``branch_ids`` ``(R, L)`` (prefix sharing, ``data/prefix_sharing.py``): within a block (the ids
    above), key ``j`` on branch 0 (the shared prefix) is seen by every later query of the block, and a
    key on another branch only by queries on its own branch.
    """
    length = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]  # (R, L, L)
    if branch_ids is not None:
        same &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
    allowed = (same & causal & (sequence_ids[:, :, None] >= 0)) | torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return mask[:, None]  # (R, 1, L, L)


@dataclass(frozen=True)
class Packer:
    """Sequences with their labels -> rows of at most ``max_tokens_per_row`` tokens (first-fit-decreasing).

    A row is never shorter than the longest sequence (sequences are not split);
    ``max_tokens_per_row=None`` uses the longest sequence of the batch: rows no wider than the padded
    batch, so attention never costs more than there. ``labels`` come back ``-100`` also at each
    sequence's first position: that token is never predicted in the padded path (nothing precedes it
    in its row), and here the position before it belongs to another sequence.

    Args:
        pad_token_id: Id written into the unused tail of a row.
        pad_to_multiple_of: Round the row length up to a multiple of this.
        max_tokens_per_row: Token budget per row; the dense mask grows with its square.
        attention: ``"dense4d"`` (a 4D block-causal mask; exact with sdpa/eager) or ``"position_ids"``
            (no mask; only for flash-attention's varlen path, which reads boundaries from
            ``position_ids``).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_tokens_per_row: int | None = None
    attention: Literal["dense4d", "position_ids"] = "dense4d"

    def __post_init__(self) -> None:
        if self.attention not in ("dense4d", "position_ids"):
            raise ValueError(f"attention must be 'dense4d' or 'position_ids', got {self.attention!r}")
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be positive, got {self.max_tokens_per_row}")

    def pack(
        self,
        seqs: Sequence[Sequence[int]],
        seq_labels: Sequence[Sequence[int]],
        rows: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, Any]:
        """``input_ids``, ``position_ids``, ``labels``, ``sequence_ids`` (R, L), ``num_sequences`` and,
        with ``attention="dense4d"``, ``attention_mask`` (R, 1, L, L); sequence k keeps id k. ``rows``
        (the sequences of each row, in order) skips the bin packing: rows packed in advance."""
        lengths = [len(s) for s in seqs]
        rows, width = pack_rows(lengths, self.max_tokens_per_row, self.pad_to_multiple_of, rows)

        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (R, L)
        position_ids = torch.zeros(shape, dtype=torch.long)  # (R, L)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (R, L)
        sequence_ids = torch.full(shape, -1, dtype=torch.long)  # (R, L)
        for r, row in enumerate(rows):
            offset = 0
            for k in row:
                n, span = lengths[k], slice(offset, offset + lengths[k])
                input_ids[r, span] = torch.as_tensor(seqs[k], dtype=torch.long)
                position_ids[r, span] = torch.arange(n)
                sequence_ids[r, span] = k
                # never the sequence's first token (see the docstring)
                labels[r, offset + 1 : offset + n] = torch.as_tensor(seq_labels[k][1:], dtype=torch.long)
                offset += n

        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "sequence_ids": sequence_ids,
            "num_sequences": len(seqs),
        }
        if self.attention == "dense4d":
            batch["attention_mask"] = block_causal_mask(sequence_ids)  # (R, 1, L, L)
        return batch


@dataclass(frozen=True)
class PackingCollator(Packer):
    """Pack the 2B sequences of B pairs into rows of at most ``max_tokens_per_row`` tokens.

    Reads the same per-example fields as ``PaddingCollator`` (``chosen_input_ids``,
    ``chosen_response_start``, ``rejected_input_ids``, ``rejected_response_start``). Rows are
    filled first-fit-decreasing; a row is never shorter than the longest sequence (sequences are
    not split). ``max_tokens_per_row=None`` uses the longest sequence of the batch: rows no wider
    than the padded batch, so attention never costs more than there.

    ``labels`` are ``-100`` off the response and also at each sequence's first position: that
    token is never predicted in the padded path (nothing precedes it in its row), and here the
    position before it belongs to another sequence.

    Worked example, ``pad_token_id=0``, B=2 (sequences 0, 1 chosen; 2, 3 rejected), budget 7::

        features = [
            {"chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
             "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2},
            {"chosen_input_ids": [3, 4], "chosen_response_start": 1,
             "rejected_input_ids": [3, 4, 4, 2], "rejected_response_start": 1},
        ]
        PackingCollator(pad_token_id=0, max_tokens_per_row=7)(features) == {
            "input_ids":    tensor([[5, 6, 7, 8, 5, 6, 9],       # seq 0 (chosen 0) + seq 2 (rejected 0)
                                    [3, 4, 4, 2, 3, 4, 0]]),     # seq 3 (rejected 1) + seq 1 (chosen 1) + pad
            "position_ids": tensor([[0, 1, 2, 3, 0, 1, 2],
                                    [0, 1, 2, 3, 0, 1, 0]]),
            "labels":       tensor([[-100, -100, 7, 8, -100, -100, 9],
                                    [-100, 4, 4, 2, -100, 4, -100]]),
            "sequence_ids": tensor([[0, 0, 0, 0, 2, 2, 2],
                                    [3, 3, 3, 3, 1, 1, -1]]),
            "attention_mask": (2, 1, 7, 7) float: block-diagonal causal, 0 / -inf,
            "num_sequences": 4,
        }

    Args: those of `Packer` (``pad_token_id``, ``pad_to_multiple_of``, ``max_tokens_per_row``,
    ``attention``).
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        starts = [f["chosen_response_start"] for f in features] + [f["rejected_response_start"] for f in features]
        # response tokens only
        seq_labels = [[IGNORE_INDEX] * start + list(seq[start:]) for seq, start in zip(seqs, starts)]
        batch = self.pack(seqs, seq_labels)
        # index, precomputed ref_logps, margin, and the metric weight of an eval shard's padding
        return {**batch, **pair_extras(features)}
