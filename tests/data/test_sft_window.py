"""``window_tokens``: each SFT training batch carries the loss tokens of all micro-batches of its
gradient-accumulation window on this rank, windows as Lightning accumulates (groups of
``accumulate_grad_batches`` batches from the start of each epoch, the last one possibly shorter),
the same after a mid-epoch resume as in the uninterrupted run."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from dpo_lightning.data import SFTDataModule
from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.data.window import WindowSampler, window_tokens

SORT = build_tokenizer()
# 13 rows of 1..8 digits: texts of 5..12 tokens (<s> sort: digits = </s>), 4..11 loss tokens each.
ROWS = [{"text": "sort: " + " ".join(str((i * 3 + j) % 10) for j in range(1 + i % 8)) + " ="} for i in range(13)]
BATCH = 2  # 13 rows: 7 batches, the last of 1 row


def data_module(**kwargs) -> SFTDataModule:
    dm = SFTDataModule(SORT, ROWS, val_split=None, batch_size=BATCH, **kwargs)
    dm.setup("fit")
    return dm


def attach(dm: SFTDataModule, accumulate: int, num_replicas: int = 1, rank: int = 0) -> None:
    shard = {"num_replicas": num_replicas, "rank": rank} if num_replicas > 1 else None
    dm.trainer = SimpleNamespace(accumulate_grad_batches=accumulate, distributed_sampler_kwargs=shard)


def brute_force(batches: list[dict], accumulate: int) -> list[int]:
    """Count each batch's label tokens past position 0 (what the shifted loss sees), sum per group of
    `accumulate` consecutive batches, give every batch its group's sum."""
    own = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    return [sum(own[(i // accumulate) * accumulate : (i // accumulate + 1) * accumulate]) for i in range(len(own))]


def test_window_tokens_docstring_example():
    """Batches [3, 0] [2, 1] [4] with loss tokens 4+1, 3+2, 5; windows of 2 batches: 10, 10, 10, 10, 5."""
    assert window_tokens([3, 0, 2, 1, 4], [1, 2, 3, 4, 5], batch_size=2, accumulate=2) == [10, 10, 10, 10, 5]
    assert window_tokens([3, 0, 2, 1, 4], [1, 2, 3, 4, 5], batch_size=2, accumulate=1) == [5, 5, 5, 5, 5]
    assert window_tokens([], [1], batch_size=2, accumulate=2) == []


def test_sampler_order_is_the_resumable_samplers():
    sampler = WindowSampler(list(range(13)), BATCH, loss_tokens=[1] * 13, accumulate=3, seed=7)
    assert isinstance(sampler, DistributedSampler)  # Lightning leaves it in place
    plain = DistributedSampler(list(range(13)), num_replicas=1, rank=0, shuffle=True, seed=7)
    assert [i for i, _ in sampler] == list(plain)
    with pytest.raises(ValueError, match="accumulate must be at least 1"):
        WindowSampler(list(range(3)), BATCH, loss_tokens=[1] * 3, accumulate=0)


@pytest.mark.parametrize("collator", ["pad", "pack"])
@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_window_tokens_over_an_epoch_with_a_partial_last_window(accumulate, collator):
    """7 batches: accumulate 2 gives windows of 2, 2, 2, 1 batches; 3 gives 3, 3, 1."""
    dm = data_module(collator=collator)
    attach(dm, accumulate)
    batches = list(dm.train_dataloader())
    assert len(batches) == 7
    got = [int(b["window_tokens"]) for b in batches]
    assert got == brute_force(batches, accumulate)
    starts = range(0, 7, accumulate)  # each window's first batch
    assert sum(got[i] for i in starts) == sum(dm.splits["train"]["loss_tokens"])  # every row in one window
    assert all(b["window_tokens"].dim() == 0 and b["window_tokens"].dtype == torch.long for b in batches)
    if accumulate == 3:  # the last window is its own batch: 1 row
        assert got[-1] == int((batches[-1]["labels"] != -100).sum())


def test_no_trainer_means_no_accumulation():
    batches = list(data_module().train_dataloader())
    assert [int(b["window_tokens"]) for b in batches] == brute_force(batches, 1)


@pytest.mark.parametrize("accumulate", [2, 3])
@pytest.mark.parametrize("done", [1, 2, 4])
def test_resume_mid_epoch_gives_the_same_windows(accumulate, done):
    """Windows are counted on the whole epoch's order before the resumed epoch skips the batches done,
    so the remaining batches carry the counts of the uninterrupted run, also mid-window (done=1)."""
    full = data_module()
    attach(full, accumulate)
    uninterrupted = list(full.train_dataloader())
    resumed = data_module()
    attach(resumed, accumulate)
    resumed.load_state_dict({"train_position": {"epoch": 0, "batches": done}})
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(uninterrupted) - done
    for a, b in zip(rest, uninterrupted[done:]):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert int(a["window_tokens"]) == int(b["window_tokens"])


def test_each_epoch_has_its_own_order_and_windows():
    dm = data_module()
    attach(dm, 3)
    loader = dm.train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert [int(b["window_tokens"]) for b in batches] == brute_force(batches, 3)
        orders.append([index for index, _ in loader.sampler])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(13))


def test_each_rank_counts_its_own_shard():
    """2 ranks, 13 rows: 7 each (rank 1's last is DistributedSampler's repeat of a row), 4 batches;
    accumulate 3: windows of 3 and 1 batches, each rank counting only its own batches."""
    seen = []
    for rank in (0, 1):
        dm = data_module()
        attach(dm, 3, num_replicas=2, rank=rank)
        batches = list(dm.train_dataloader())
        assert len(batches) == 4
        assert [int(b["window_tokens"]) for b in batches] == brute_force(batches, 3)
        seen.append([int(b["window_tokens"]) for b in batches])
    assert seen[0] != seen[1]


class _Recorder(L.LightningModule):
    """Records, per training batch, the optimizer steps taken so far, its window_tokens and its own tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, int, int]] = []

    def training_step(self, batch, batch_idx):
        own = int((batch["labels"][:, 1:] != -100).sum())
        self.seen.append((self.current_epoch, self.global_step, int(batch["window_tokens"]), own))
        return (self.weight * 0.0).sum() + self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate", [2, 3])
def test_windows_are_lightnings_accumulation_windows(accumulate):
    """Under a real Trainer, the batches between two optimizer steps (same epoch and global_step in
    training_step) are one window: each carries the sum of their tokens. Two epochs: windows restart."""
    module = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data_module())
    assert len(module.seen) == 14
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for epoch, step, window, own in module.seen:
        groups.setdefault((epoch, step), []).append((window, own))
    assert [len(g) for g in groups.values()] == ([2, 2, 2, 1] if accumulate == 2 else [3, 3, 1]) * 2
    for group in groups.values():
        assert all(window == sum(own for _, own in group) for window, _ in group)
