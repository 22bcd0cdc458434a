"""PaddedEvalSampler, MarkPadding and the collators' ``weight``: eval shards padded like
DistributedSampler's, with the padding marked so the metrics can leave it out.

The 2-process check against one process is tests/test_distributed.py::
test_two_process_validation_counts_every_pair_once.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DistributedSampler, SequentialSampler

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.collate import PaddingCollator
from dpo_lightning.data.kto import KTOCollator
from dpo_lightning.data.packing import PackingCollator
from dpo_lightning.data.sampler import MarkPadding, PaddedEvalSampler
from dpo_lightning.data.synthetic import generate_pairs

PAIRS = [
    {"chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
     "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2},
    {"chosen_input_ids": [3, 4], "chosen_response_start": 1,
     "rejected_input_ids": [3, 4, 4, 2], "rejected_response_start": 1},
]
UNPAIRED = [
    {"input_ids": [1, 2, 3, 4, 5], "response_start": 3, "desirable": True},
    {"input_ids": [7, 8, 9], "response_start": 2, "desirable": False},
]


def test_five_examples_on_two_ranks():
    """The docstring's example: rank 1's third example is example 0 again, flagged as padding."""
    data = list(range(5))
    assert list(PaddedEvalSampler(data, num_replicas=2, rank=0)) == [(0, False), (2, False), (4, False)]
    assert list(PaddedEvalSampler(data, num_replicas=2, rank=1)) == [(1, False), (3, False), (0, True)]


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_like_distributed_sampler_and_marks_each_repeat(n, world):
    data = list(range(n))
    shards = [list(PaddedEvalSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    for rank, shard in enumerate(shards):
        plain = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        assert [i for i, _ in shard] == list(plain)  # same indices, same order
        assert len(shard) == len(plain) == -(-n // world)  # every rank the same count
    real = sorted(i for shard in shards for i, padding in shard if not padding)
    assert real == data  # every example exactly once outside the padding
    padded = sum(padding for shard in shards for _, padding in shard)
    assert padded == world * -(-n // world) - n


def test_mark_padding_reads_rows_one_by_one_and_batched():
    rows = Dataset.from_list([{"x": i} for i in range(3)])
    view = MarkPadding(rows)
    assert len(view) == 3
    assert view[(2, False)] == {"x": 2, "padding": False}
    assert view.__getitems__([(1, False), (0, True)]) == [{"x": 1, "padding": False}, {"x": 0, "padding": True}]
    plain = MarkPadding([{"x": i} for i in range(3)])  # a dataset without __getitems__
    assert plain.__getitems__([(2, True)]) == [{"x": 2, "padding": True}]


@pytest.mark.parametrize(
    "collator, features",
    [(PaddingCollator(pad_token_id=0), PAIRS), (PackingCollator(pad_token_id=0), PAIRS),
     (KTOCollator(pad_token_id=0), UNPAIRED)],
    ids=["pad", "pack", "kto"],
)
def test_collators_weight_padding_zero(collator, features):
    """One weight per pair (per example for KTO): 1 real, 0 padding; no ``weight`` without marks."""
    assert "weight" not in collator(features)
    marked = [{**features[0], "padding": False}, {**features[1], "padding": True}]
    batch = collator(marked)
    assert batch["weight"].dtype == torch.float32
    assert batch["weight"].tolist() == [1.0, 0.0]
    plain = collator(features)
    assert batch.keys() - {"weight"} == plain.keys()
    for key, value in plain.items():  # the marks change nothing else
        assert torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else batch[key] == value


def test_eval_loader_pads_and_weights_only_on_several_ranks():
    """One process: the loader is as before (no wrapper, sequential). Two ranks: rank 1 of 5 pairs
    gets pairs 1, 3 and a weight-0 repeat of pair 0, in batches of 2."""
    rows = generate_pairs(13, seed=5)
    splits = DatasetDict({"train": Dataset.from_list(rows[:8]), "validation": Dataset.from_list(rows[8:])})
    data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=splits, max_length=32, batch_size=2)
    single = data.val_dataloader()
    assert single.dataset is data.splits["validation"] and isinstance(single.sampler, SequentialSampler)
    assert all("weight" not in batch for batch in single)

    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    loader = data.val_dataloader()
    assert isinstance(loader.sampler, PaddedEvalSampler)  # a DistributedSampler: Lightning keeps it
    batches = list(loader)
    assert [b["weight"].tolist() for b in batches] == [[1.0, 1.0], [0.0]]
    first = data.splits["validation"][0]["chosen_input_ids"]
    assert batches[1]["input_ids"][0, : len(first)].tolist() == first  # the repeat is pair 0
