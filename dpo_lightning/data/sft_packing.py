"""SFT rows bin-packed into rows of at most ``max_length`` tokens, as TRL's ``packing=True`` packs them.

TRL 1.16 (``SFTConfig(packing=True)``) packs the tokenized dataset once, before training
(``trl.pack_dataset``): each packed row holds several whole conversations, ``seq_lengths`` says where
each ends, and ``per_device_train_batch_size`` then counts packed rows. `pack_split` does the same, with
the same best-fit-decreasing bins in the same order (`best_fit_decreasing`, tested against TRL's own
``pack_dataset``), so an epoch has as many batches and optimizer steps as TRL's on the same data. The
collators (`sft_collate`) lay a packed row out as one row with block-causal attention, or its
conversations as padded rows; either way each conversation attends only to itself and its position
ids start at 0, so the loss equals that of the same conversations padded.

Strategies (TRL's names; the map pass runs over ``datasets.map`` batches of 1000 rows, as TRL's
does, so bins are drawn within each batch of 1000 in dataset order):

- ``bfd``: best fit decreasing over whole sequences, each already cut to ``max_length`` by tokenization
  (TRL's default; it cuts to ``max_length`` keeping the start, as the tokenization here does).
- ``bfd_split``: a sequence longer than ``max_length`` is split into pieces of ``max_length`` tokens
  (the last shorter), packed as separate sequences: each piece after the first starts without the
  tokens before it (its first token is not a label, as TRL's collator makes it), and pieces are kept
  even without a label, as TRL keeps them. The number split is reported.

TRL's third strategy, ``wrapped``, cuts rows at fixed offsets and lets conversations attend to each
other; it is not offered.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from .errors import warn
from .sft_tokenize import IGNORE_INDEX

PACKING_STRATEGIES = ("bfd", "bfd_split")
# The rows of one bin-packing pass: datasets' default ``map`` batch size, which TRL's pass uses.
PACK_BATCH_ROWS = 1000


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` (each <= ``capacity``) grouped into bins whose sums stay <= ``capacity``.

    Longest first (ties in index order), each into the bin with the least free room that fits it,
    the oldest such bin on ties, else a new bin: TRL's ``_pack_bfd``, bins in the order they were
    opened and sequences in the order they went in. TRL's docstring example, capacity 4: lengths 4, 2,
    3, 1 -> 4 opens bin 0 (full), 3 opens bin 1 (room 1), 2 does not fit room 1 and opens bin 2, 1 fits
    bin 1 exactly::

        best_fit_decreasing([4, 2, 3, 1], 4) == [[0], [2, 3], [1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep index order
    bins: list[list[int]] = []
    by_room: dict[int, deque[int]] = defaultdict(deque)  # free room -> the bins with exactly that room, oldest first
    rooms: list[int] = []  # the distinct free rooms (0 < room < capacity) some bin has, ascending
    for i in order:
        length = lengths[i]
        if not 0 < length <= capacity:
            raise ValueError(f"sequence {i} has {length} tokens; packing takes 1 to {capacity}")
        k = bisect_left(rooms, length)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].popleft()
            if not by_room[room]:
                del rooms[k]
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - length
        if left > 0:
            if not by_room[left]:
                insort(rooms, left)
            by_room[left].append(b)
    return bins


def split_long(ids: list[int], labels: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """``bfd_split``'s pieces of one sequence: ``max_length`` tokens each, the last shorter (TRL's split);
    the first label of every piece is -100 (nothing before it in its piece predicts it)."""
    n = len(ids)
    cuts = [*range(0, n, max_length), n] if n else [0]
    pieces = []
    for start, end in zip(cuts, cuts[1:]):
        piece = list(labels[start:end])
        piece[0] = IGNORE_INDEX
        pieces.append((list(ids[start:end]), piece))
    return pieces


@dataclass(frozen=True)
class PackRows:
    """The ``datasets.map`` function: a batch of tokenized SFT rows -> their packed rows, each with
    ``seq_lengths`` (its sequences' lengths, in order) and ``loss_tokens`` (its labels other than -100).
    A frozen dataclass so the pass is cached by its fingerprint."""

    max_length: int
    strategy: str = "bfd"

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        seqs: list[tuple[list[int], list[int]]] = []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if self.strategy == "bfd_split":
                seqs.extend(split_long(ids, labels, self.max_length))
            else:  # bfd: already cut to max_length by tokenization, keeping the start (as TRL cuts here)
                seqs.append((list(ids[: self.max_length]), list(labels[: self.max_length])))
        bins = best_fit_decreasing([len(ids) for ids, _ in seqs], self.max_length)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lengths": [], "loss_tokens": []}
        for members in bins:
            labels = [x for i in members for x in seqs[i][1]]
            out["input_ids"].append([x for i in members for x in seqs[i][0]])
            out["labels"].append(labels)
            out["seq_lengths"].append([len(seqs[i][0]) for i in members])
            out["loss_tokens"].append(sum(x != IGNORE_INDEX for x in labels))
        return out


def pack_split(
    dataset: Dataset, max_length: int, strategy: str, *, where: str, num_proc: int | None = None
) -> Dataset:
    """A tokenized SFT split (`sft_preprocess.SFT_FIELDS`) -> its packed rows, with ``seq_lengths``.
    Under ``bfd_split`` one warning counts the sequences split and the pieces left without a label."""
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}")
    if strategy == "bfd_split":
        _report_split(dataset, max_length, where)
    return dataset.map(
        PackRows(max_length, strategy),
        batched=True,
        batch_size=PACK_BATCH_ROWS,
        remove_columns=dataset.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc="Packing",
    )


def _report_split(dataset: Dataset, max_length: int, where: str) -> None:
    lengths = np.asarray([len(ids) for ids in dataset.with_format(None)["input_ids"]])
    long = np.flatnonzero(lengths > max_length)
    if not len(long):
        return
    pieces = empty = 0
    for ids, labels in zip(dataset.select(long)["input_ids"], dataset.select(long)["labels"]):
        for _, piece in split_long(ids, labels, max_length):
            pieces += 1
            empty += all(x == IGNORE_INDEX for x in piece)
    unlabelled = f"; {empty} pieces hold no token to train on (kept, as TRL keeps them)" if empty else ""
    warn(
        f"{where}: packing_strategy=bfd_split split {len(long)} of {len(dataset)} sequences longer than "
        f"max_length={max_length} into {pieces} pieces, each after the first trained without the tokens "
        f"before it{unlabelled}"
    )


def packing_summary(rows: int, packed: Dataset, max_length: int) -> str:
    """One line: how many rows (and sequences, once split) went into how many packed rows, how full."""
    lengths = packed.with_format(None)["seq_lengths"]
    sequences, tokens = sum(len(x) for x in lengths), sum(sum(x) for x in lengths)
    pieces = f" ({sequences} sequences once split)" if sequences != rows else ""
    fill = tokens / max(len(packed) * max_length, 1)
    return f"{rows} rows{pieces} -> {len(packed)} packed rows of at most {max_length} tokens ({fill:.0%} filled)"
