"""The padding collator against the hand-written example of its docstring."""

from __future__ import annotations

import pickle

import pytest
import torch

from dpo_lightning.data import PaddingCollator, build_collator

FEATURES = [
    {
        "chosen_input_ids": [5, 6, 7, 8],
        "chosen_response_start": 2,
        "rejected_input_ids": [5, 6, 9],
        "rejected_response_start": 2,
    },
    {
        "chosen_input_ids": [3, 4],
        "chosen_response_start": 1,
        "rejected_input_ids": [3, 4, 4, 2],
        "rejected_response_start": 1,
    },
]


def test_worked_example():
    """Rows: chosen of pairs 0, 1 then rejected of pairs 0, 1; labels keep only response tokens."""
    batch = PaddingCollator(pad_token_id=0)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    expected_ids = [[5, 6, 7, 8], [3, 4, 0, 0], [5, 6, 9, 0], [3, 4, 4, 2]]
    expected_mask = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    expected_labels = [[-100, -100, 7, 8], [-100, 4, -100, -100], [-100, -100, 9, -100], [-100, 4, 4, 2]]
    assert torch.equal(batch["input_ids"], torch.tensor(expected_ids))
    assert torch.equal(batch["attention_mask"], torch.tensor(expected_mask))
    assert torch.equal(batch["labels"], torch.tensor(expected_labels))
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_id_equal_to_a_real_token():
    """Padding with an id that also occurs in the data (EOS as pad): the mask still tells them apart."""
    batch = PaddingCollator(pad_token_id=4)(FEATURES)
    assert batch["input_ids"][1].tolist() == [3, 4, 4, 4]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 4, -100, -100]
    assert batch["labels"][3].tolist() == [-100, 4, 4, 2]


@pytest.mark.parametrize(("multiple", "width"), [(None, 4), (1, 4), (3, 6), (8, 8)])
def test_pad_to_multiple_of(multiple, width):
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=multiple)(FEATURES)
    assert all(t.shape == (4, width) for t in batch.values())
    assert int(batch["attention_mask"].sum()) == 13
    assert (batch["labels"][:, 4:] == -100).all()


def test_registry_and_pickling():
    collator = build_collator("pad", pad_token_id=0, pad_to_multiple_of=8)
    assert collator == PaddingCollator(0, 8)
    assert pickle.loads(pickle.dumps(collator)) == collator  # DataLoader workers get a copy
    with pytest.raises(ValueError, match="unknown collator 'packed'"):
        build_collator("packed", pad_token_id=0)
