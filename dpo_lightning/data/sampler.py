"""A seeded, epoch-aware, rank-sharded training sampler that can resume mid-epoch.

Lightning restores weights, optimizer, scheduler and loop counters from a checkpoint, but a
plain DataLoader restarts its epoch from the first batch. :class:`ResumableSampler` yields
the same order as ``DistributedSampler`` (same seed -> same permutation per epoch, same
shard per rank), and after :meth:`ResumableSampler.resume` skips the batches the
interrupted run had already trained on. It subclasses ``DistributedSampler`` so Lightning
leaves it in place instead of wrapping it (``use_distributed_sampler`` can stay on).

:class:`ResumableTrainData` is the ``LightningDataModule`` mixin that saves the position in
every checkpoint (``state_dict``) and hands it to the next sampler it builds.

Evaluation on several ranks: :class:`PaddedEvalSampler` shards like ``DistributedSampler(shuffle=
False)``, padding included (under FSDP2 every forward is a collective, so every rank must run the
same number of batches), but marks the padded positions; :class:`MarkPadding` turns the marks into
a ``padding`` field of each example, and the collators into a ``weight`` of 0 that keeps the
repeated pairs out of the metrics. `WithField` is that mechanism for any per-position value a
sampler yields next to the index (``window.WindowSampler`` uses it too).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` order, with an optional start ``(epoch, batches already done)``.

    ``__len__`` stays the full shard length even when resuming, so Lightning's step count
    (and the LR schedule built from it) is the same as in the uninterrupted run.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self._resume_epoch: int | None = None
        self._resume_batches = 0

    def resume(self, epoch: int, batches: int) -> None:
        """In ``epoch`` (only), skip the first ``batches`` batches of this rank's shard."""
        self._resume_epoch, self._resume_batches = epoch, batches

    def epoch_order(self) -> list[int]:
        """This rank's indices for the current epoch, in order, none skipped."""
        return list(super().__iter__())  # seeded by (seed, epoch): identical in every run

    def skip_done(self, items: list[Any]) -> list[Any]:
        """`items` (one per position of `epoch_order`) without those of the batches already trained on."""
        if self.epoch == self._resume_epoch:
            return items[self._resume_batches * self.batch_size :]
        return items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.skip_done(self.epoch_order()))


class ResumableTrainData:
    """Mixin for a ``LightningDataModule``: build the train sampler with :meth:`train_sampler`;
    the checkpoint then records how far into which epoch training got, and a resumed fit
    starts the sampler there.

    The position comes from Lightning's own loop counters (batches *processed* in the current
    epoch), not from the sampler: DataLoaders prefetch, so what a sampler has yielded runs
    ahead of what the model has trained on.
    """

    _train_position: dict[str, int] | None = None

    def train_sampler(
        self,
        dataset: Sized,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        kind: type[ResumableSampler] = ResumableSampler,
        **options: Any,
    ) -> ResumableSampler:
        """A `kind` sampler (a `ResumableSampler` subclass, built with `options`) sharded for this rank,
        starting where a restored checkpoint left off."""
        trainer = getattr(self, "trainer", None)
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = kind(
            dataset,
            batch_size,
            num_replicas=shard.get("num_replicas", 1),
            rank=shard.get("rank", 0),
            shuffle=shuffle,
            seed=seed,
            **options,
        )
        if self._train_position is not None:
            sampler.resume(**self._train_position)
            self._train_position = None  # only the first loader after a restore starts mid-epoch
        return sampler

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_position": {"epoch": trainer.current_epoch, "batches": batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_position = state_dict.get("train_position")
        if self._train_position is not None:
            # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader itself is
            # stateful; this data module's sampler starts at the saved position instead (exact).
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


class PaddedEvalSampler(DistributedSampler):
    """This rank's shard of an unshuffled evaluation set, as ``(index, is_padding)`` pairs.

    The indices and their order are those of ``DistributedSampler(shuffle=False)``: position ``p``
    of the padded list ``0 .. total_size - 1`` is example ``p % len(dataset)`` and goes to rank
    ``p % num_replicas``, so every rank gets ``num_samples`` examples. Positions past the dataset
    are the padding: repeats of the first examples, flagged True so they can be weighted 0.

    Example, 5 examples on 2 ranks: rank 0 yields ``(0, False), (2, False), (4, False)``,
    rank 1 ``(1, False), (3, False), (0, True)``. Read the dataset through :class:`MarkPadding`.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        n = len(self.dataset)
        positions = range(self.rank, self.total_size, self.num_replicas)
        return iter((p % n, p >= n) for p in positions)


class WithField(Dataset):
    """A map-style view of ``dataset`` indexed by ``(index, value)`` keys, as a sampler yields them:
    each example comes back with ``{field: value}`` added. Subclasses name the field."""

    field: ClassVar[str]

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, Any]) -> dict[str, Any]:
        index, value = key
        return {**self.dataset[index], self.field: value}

    def __getitems__(self, keys: Sequence[tuple[int, Any]]) -> list[dict[str, Any]]:
        # The DataLoader fetches a whole batch at once when the dataset can (Hugging Face datasets do).
        indices = [index for index, _ in keys]
        if hasattr(self.dataset, "__getitems__"):
            rows = self.dataset.__getitems__(indices)
        else:
            rows = [self.dataset[i] for i in indices]
        return [{**row, self.field: value} for row, (_, value) in zip(rows, keys)]


class MarkPadding(WithField):
    """A map-style view of ``dataset`` indexed by :class:`PaddedEvalSampler`'s ``(index, is_padding)``:
    each example comes back with ``"padding": is_padding`` added (see :func:`padding_weights`)."""

    field = "padding"


def padding_weights(features: Sequence[Mapping[str, Any]]) -> Tensor:
    """``(B,)`` float32 metric weights of examples carrying ``padding``: 0 for padding, 1 otherwise."""
    return torch.tensor([0.0 if f["padding"] else 1.0 for f in features], dtype=torch.float32)
