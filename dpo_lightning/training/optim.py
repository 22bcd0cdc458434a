"""The default learning-rate schedule: linear warmup, then cosine, linear or no decay, step for step the
schedule TRL 1.16 (transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``) runs; and the
optimizer and scheduler factories described as data for checkpoints."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from dpo_lightning._moved import import_module

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


def describe_factory(factory: Any) -> Any:
    """An optimizer or scheduler factory as plain data, recorded in checkpoints so a resume can list what
    changed: ``{"class_path": "torch.optim.adamw.AdamW", "init_args": {"lr": 0.0001, ...}}`` for a class with
    its arguments (LightningCLI's ``OptimizerCallable`` and ``LRSchedulerCallable`` are such ``functools.partial``
    objects), None for None, its name otherwise."""
    if factory is None:
        return None
    if isinstance(factory, functools.partial):
        target = next((a for a in reversed(factory.args) if isinstance(a, type)), factory.func)
        if isinstance(target, type):
            return {"class_path": f"{target.__module__}.{target.__qualname__}", "init_args": _plain(factory.keywords)}
    if isinstance(factory, type):
        return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": {}}
    return f"<{getattr(factory, '__qualname__', type(factory).__name__)}>"


def describe_config(value: Any) -> Any:
    """A config's ``optimizer``/``scheduler`` value (``{"class_path": ..., "init_args": ...}``, a class name, or
    None) in `describe_factory`'s form, to compare with a checkpoint's."""
    if value is None:
        return None
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, str):
        value = {"class_path": value, "init_args": {}}
    if not isinstance(value, dict) or "class_path" not in value:
        return f"<{type(value).__name__}>"

    module, _, name = value["class_path"].rpartition(".")
    try:
        target = getattr(import_module(module), name)
        class_path = f"{target.__module__}.{target.__qualname__}"
    except (ImportError, AttributeError, ValueError):
        class_path = value["class_path"]
    return {"class_path": class_path, "init_args": _plain(value.get("init_args") or {})}


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
