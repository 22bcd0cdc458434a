"""The default warmup + decay schedule, checked at hand-picked steps."""

import math

import pytest
import torch

from dpo_lightning.optim import warmup_decay_factor, warmup_decay_schedule


def test_warmup_then_cosine():
    """10 steps, 2 of warmup: factors 1/3, 2/3, then cosine from 1 at step 2 to 0 at step 10."""
    f = lambda s: warmup_decay_factor(s, warmup_steps=2, total_steps=10, decay="cosine")  # noqa: E731
    assert f(0) == pytest.approx(1 / 3)
    assert f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.0)


def test_linear_and_constant():
    assert warmup_decay_factor(5, warmup_steps=0, total_steps=10, decay="linear") == pytest.approx(0.5)
    assert warmup_decay_factor(9, warmup_steps=0, total_steps=10, decay="constant") == 1.0


def test_schedule_steps_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_decay_schedule(opt, total_steps=4, warmup_ratio=0.5, decay="linear")
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5])
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_decay_schedule(opt, total_steps=4, warmup_ratio=1.5)
