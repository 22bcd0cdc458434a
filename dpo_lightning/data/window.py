"""Loss tokens per gradient-accumulation window: what SFT normalises its summed NLL by.

With gradient accumulation, averaging each micro-batch's loss over its own tokens and then over
the micro-batches weights a token of a short micro-batch more than one of a long micro-batch; the
loss of the whole window is the summed NLL of all its tokens over their number (TRL's
``num_items_in_batch``). That number is known before the window runs only if the data says it:
each training batch carries ``window_tokens``, the loss tokens of every micro-batch in its window
on this rank (the module all-reduces it across ranks).

Windows follow Lightning's accumulation: consecutive groups of ``accumulate_grad_batches`` batches
counted from the start of each epoch (Lightning steps after batch ``i`` when ``(i + 1) % accumulate
== 0`` and after the epoch's last batch, so the last window may be shorter). They are computed on
the whole epoch's order before a resumed epoch skips the batches already done, so a resumed run
sees the same counts as an uninterrupted one.

:class:`WindowSampler` yields ``(index, window_tokens)``; :class:`WithWindowTokens` adds the count
to each example; the SFT collators emit it as a 0-dim tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np

from .sampler import ResumableSampler, WithField


def window_tokens(order: Sequence[int], loss_tokens: np.ndarray, batch_size: int, accumulate: int) -> list[int]:
    """For each position of `order` (example indices, batched ``batch_size`` at a time), the loss tokens
    of all examples in its window of ``accumulate`` consecutive batches.

    Example: ``order=[3, 0, 2, 1, 4]``, ``loss_tokens=[1, 2, 3, 4, 5]``, ``batch_size=2``,
    ``accumulate=2``: batches ``[3, 0] [2, 1] [4]``, windows ``{[3, 0] [2, 1]}`` (4+1+3+2 = 10 tokens)
    and ``{[4]}`` (5): ``[10, 10, 10, 10, 5]``.
    """
    counts = np.asarray(loss_tokens, dtype=np.int64)[np.asarray(order, dtype=np.int64)]  # (n,)
    window = np.arange(len(counts)) // (batch_size * accumulate)  # (n,) window of each position
    sums = np.bincount(window, weights=counts, minlength=int(window[-1]) + 1 if len(window) else 0)
    return [int(x) for x in sums.astype(np.int64)[window]]


class WindowSampler(ResumableSampler):
    """`ResumableSampler` order (so a ``DistributedSampler`` that Lightning leaves in place), yielding
    ``(index, window_tokens)``; read the dataset through :class:`WithWindowTokens`.

    ``loss_tokens[i]`` is example i's number of loss tokens; ``accumulate`` Lightning's
    ``accumulate_grad_batches``.
    """

    def __init__(
        self, dataset: Sized, batch_size: int, *, loss_tokens: Sequence[int], accumulate: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size, **kwargs)
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.loss_tokens = np.asarray(loss_tokens, dtype=np.int64)
        self.accumulate = accumulate

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        windows = window_tokens(order, self.loss_tokens, self.batch_size, self.accumulate)
        return iter(self.skip_done(list(zip(order, windows))))


class WithWindowTokens(WithField):
    """A map-style view indexed by :class:`WindowSampler`'s ``(index, window_tokens)``: each example
    comes back with ``"window_tokens"`` added."""

    field = "window_tokens"
