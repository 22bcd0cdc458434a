"""`SFTDataModule(packing=True)`: TRL's ``packing=True``. Rows bin-packed once into rows of at most
``max_length`` tokens, the same rows as TRL 1.16's ``pack_dataset`` (which sequences go together, in
which order), ``batch_size`` counting packed rows, both collators on packed rows, and nothing lost.

Hand-derived ids use the synthetic sort tokenizer: ``<s>`` 1, ``</s>`` 2, ``sort:`` 4, ``=`` 5, digit d
is 6 + d; BOS is added, and EOS closes a text row.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

from dpo_lightning.data import SFTDataModule
from dpo_lightning.data.sft_collate import SFTPackingCollator, SFTPaddingCollator
from dpo_lightning.data.sft_packing import best_fit_decreasing

IGNORE = -100


def make(dataset, **kwargs) -> SFTDataModule:
    kwargs.setdefault("val_split", None)
    dm = SFTDataModule("synthetic:sort", dataset, **kwargs)
    dm.setup("fit")
    return dm


def digit_rows(n: int, seed: int = 0, longest: int = 20) -> list[dict[str, str]]:
    """``n`` text rows of 1..``longest`` digits: many equal lengths, so ties in the packing order matter."""
    rng = random.Random(seed)
    return [{"text": "sort: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, longest)))}
            for _ in range(n)]  # fmt: skip


def pieces(row: dict) -> list[list[int]]:
    """The sequences of a packed row, as token ids."""
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append(row["input_ids"][start : start + n])
        start += n
    return out


def test_best_fit_decreasing_worked_example():
    """TRL's docstring example (capacity 4; lengths 4, 2, 3, 1): 4 fills bin 0; 3 opens bin 1 (room 1);
    2 fits no room and opens bin 2; 1 fits bin 1's room exactly. Then 2, 2, 1 at capacity 4: ties go
    in index order, and 1 takes the fullest bin that fits (room 2 of bin 0, not a new bin)."""
    assert best_fit_decreasing([4, 2, 3, 1], 4) == [[0], [2, 3], [1]]
    assert best_fit_decreasing([2, 2, 1], 4) == [[0, 1], [2]]
    assert best_fit_decreasing([3, 1, 3, 1, 2], 4) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens; packing takes 1 to 4"):
        best_fit_decreasing([1, 5], 4)


@pytest.mark.trl
def test_bins_are_trls_on_random_lengths():
    """60 random length lists (many ties, capacities 4..40): the same bins, in the same order, with the
    same sequences in each, as TRL's ``pack_dataset(strategy="bfd")``."""
    trl = pytest.importorskip("trl")
    for trial in range(60):
        rng = random.Random(trial)
        capacity = rng.randint(4, 40)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
        data = Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
        theirs = [[seq[0] for seq in pieces(row)] for row in trl.pack_dataset(data, capacity, "bfd")]
        assert best_fit_decreasing(lengths, capacity) == theirs, trial


@pytest.mark.parametrize(("strategy", "max_length"), [("bfd", 24), ("bfd_split", 8)])
@pytest.mark.trl
def test_packed_split_is_trls_pack_dataset(strategy, max_length, caplog):
    """2500 rows (three of datasets' ``map`` batches of 1000, which TRL packs one at a time): the packed
    split holds TRL's rows exactly (ids, labels and sequence lengths, in order), every token of the
    unpacked split once, and ``loss_tokens`` per row. ``bfd_split`` splits the long rows as TRL does and
    says how many (it keeps the whole rows to split them: the unpacked reference is tokenized uncut)."""
    trl = pytest.importorskip("trl")
    rows = digit_rows(2500)
    plain = make(rows, max_length=max_length if strategy == "bfd" else 10**6).splits["train"]
    with caplog.at_level(logging.WARNING):
        packed = make(rows, max_length=max_length, packing=True, packing_strategy=strategy).splits["train"]
    theirs = trl.pack_dataset(plain.select_columns(["input_ids", "labels"]), max_length, strategy)
    assert packed["input_ids"] == theirs["input_ids"]
    assert packed["seq_lengths"] == theirs["seq_lengths"]
    assert max(len(ids) for ids in packed["input_ids"]) <= max_length
    assert [sum(x != IGNORE for x in labels) for labels in packed["labels"]] == packed["loss_tokens"]
    split = [m for m in (r.getMessage() for r in caplog.records) if "packing_strategy=bfd_split split" in m]
    if strategy == "bfd":
        assert len(packed) < len(plain) and packed["labels"] == theirs["labels"] and not split
        sequences = Counter(tuple(seq) for row in packed for seq in pieces(row))
        assert sequences == Counter(tuple(ids) for ids in plain["input_ids"])
    else:
        # TRL's collator drops the first label of every piece (position 0 of each); here the data already has.
        for ours, row in zip(packed["labels"], theirs):
            starts = {sum(row["seq_lengths"][:k]) for k in range(len(row["seq_lengths"]))}
            assert ours == [IGNORE if t in starts else x for t, x in enumerate(row["labels"])]
        long = sum(len(ids) > max_length for ids in plain["input_ids"])
        assert len(split) == 1 and f"split {long} of 2500 sequences longer than max_length=8" in split[0]


def test_batch_size_counts_packed_rows():
    """40 rows packed into R rows: an epoch is ceil(R / batch_size) batches, and each batch holds the
    sequences of its packed rows (``num_sequences``), not ``batch_size`` of them."""
    rows = digit_rows(40, seed=1, longest=6)
    dm = make(rows, max_length=32, batch_size=3, packing=True, collator="pack")
    packed = dm.splits["train"]
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == math.ceil(len(packed) / 3) < math.ceil(40 / 3)
    assert sum(b["num_sequences"] for b in batches) == 40
    assert max(b["input_ids"].shape[0] for b in batches) == 3 and batches[0]["input_ids"].shape[1] <= 32


PACKED = [
    {"input_ids": [5, 6, 7, 8, 3, 4, 9], "labels": [IGNORE, IGNORE, 7, 8, IGNORE, 4, 9], "seq_lengths": [4, 3]},
    {"input_ids": [2, 6, 6], "labels": [IGNORE, 6, 6], "seq_lengths": [3]},
]


def test_collators_on_packed_rows_worked_example():
    """`SFTPackingCollator`'s docstring example: a packed row stays one row (no re-packing), position ids
    restart per sequence; `SFTPaddingCollator` gives each of the 3 sequences its own row."""
    batch = SFTPackingCollator(pad_token_id=0)(PACKED)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 3, 4, 9], [2, 6, 6, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8, IGNORE, 4, 9], [IGNORE, 6, 6] + [IGNORE] * 4]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [2, 2, 2, -1, -1, -1, -1]]
    assert batch["num_sequences"] == 3 and batch["attention_mask"].shape == (2, 1, 7, 7)
    padded = SFTPaddingCollator(pad_token_id=0)(PACKED)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8], [3, 4, 9, 0], [2, 6, 6, 0]]
    assert padded["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 4, 9, IGNORE], [IGNORE, 6, 6, IGNORE]]


def test_pad_and_pack_on_packed_rows_train_on_the_same_tokens():
    """The same packed batch through both collators: the same labels per sequence and the same
    ``window_tokens``, the sum of the window's packed rows' ``loss_tokens``."""
    rows = digit_rows(30, seed=2, longest=8)
    batches = {c: list(make(rows, max_length=24, batch_size=2, packing=True, collator=c).train_dataloader())
               for c in ("pad", "pack")}  # fmt: skip
    for padded, packed in zip(batches["pad"], batches["pack"], strict=True):
        n = packed["num_sequences"]
        assert padded["input_ids"].shape[0] == n
        per_row = (padded["labels"] != IGNORE).sum(dim=1).tolist()
        assert per_row == [int(((packed["sequence_ids"] == k) & (packed["labels"] != IGNORE)).sum()) for k in range(n)]
        assert int(padded["window_tokens"]) == int(packed["window_tokens"]) == sum(per_row)


def test_eval_shards_weight_every_sequence_of_a_padding_row():
    """Validation packs too (TRL's ``eval_packing`` default). On 2 ranks the repeated packed row that
    pads rank 1's shard weighs 0 for each of its sequences."""
    rows = [{"text": f"sort: {d} = {d}"} for d in range(9)]  # <s> sort: d = d </s>: 6 tokens, 2 per row of 12
    splits = DatasetDict({"train": Dataset.from_list(rows[:3]), "validation": Dataset.from_list(rows[3:])})
    data = SFTDataModule("synthetic:sort", splits, batch_size=2, max_length=12, packing=True)
    assert [r["seq_lengths"] for r in data.splits["validation"]] == [[6, 6], [6, 6], [6, 6]]
    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    for collator in ("pad", "pack"):
        data.hparams.collator = collator
        batches = list(data.val_dataloader())  # rank 1: packed row 1, then a repeat of row 0
        assert [b["weight"].tolist() for b in batches] == [[1.0, 1.0, 0.0, 0.0]]


def test_packing_settings_are_checked():
    with pytest.raises(ValueError, match="packing_strategy must be one of .*'wrapped' cuts conversations"):
        SFTDataModule("synthetic:sort", [{"text": "sort: 1"}], packing=True, packing_strategy="wrapped")
    with pytest.raises(ValueError, match="packing must be a bool"):
        SFTDataModule("synthetic:sort", [{"text": "sort: 1"}], packing="yes")


def test_a_strategy_without_packing_is_named(caplog):
    with caplog.at_level(logging.WARNING):
        SFTDataModule("synthetic:sort", [{"text": "sort: 1"}], packing_strategy="bfd_split")
    assert any("packing_strategy='bfd_split' is ignored: packing is off" in r.getMessage() for r in caplog.records)
