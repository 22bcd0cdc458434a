"""The default learning-rate schedule: linear warmup, then cosine, linear or no decay, step for step the
schedule TRL 1.16 (transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``) runs."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Decay = Literal["cosine", "linear", "constant"]


def warmup_decay_factor(step: int, *, warmup_steps: int, total_steps: int, decay: Decay) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    Rises linearly from 0 (the first step's) by ``1 / warmup_steps`` a step, as transformers' schedules
    do, then follows ``decay`` down to 0 at ``total_steps`` (``constant`` stays at 1).
    """
    if step < warmup_steps:
        return step / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}; use 'cosine', 'linear' or 'constant'")


def warmup_decay_schedule(
    optimizer: Optimizer, *, total_steps: int, warmup_ratio: float = 0.1, decay: Decay = "cosine"
) -> LambdaLR:
    """A ``LambdaLR`` over ``total_steps`` optimizer steps, stepped once per optimizer step; its warmup is
    ``ceil(total_steps * warmup_ratio)`` steps, TRL's (``TrainingArguments.get_warmup_steps``)."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup_steps = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        return warmup_decay_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, decay=decay)

    return LambdaLR(optimizer, factor)
