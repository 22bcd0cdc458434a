"""The default warmup + decay schedule: hand-picked steps, and step for step the schedule TRL 1.16 runs
(transformers' schedulers and ``TrainingArguments.get_warmup_steps``)."""

import math

import pytest
import torch

from dpo_lightning.training.optim import warmup_decay_factor, warmup_decay_schedule


def test_warmup_then_cosine():
    """10 steps, 2 of warmup: factors 0, 1/2, then cosine from 1 at step 2 to 0 at step 10."""
    f = lambda s: warmup_decay_factor(s, warmup_steps=2, total_steps=10, decay="cosine")  # noqa: E731
    assert f(0) == 0.0
    assert f(1) == pytest.approx(1 / 2)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.0)


def test_linear_and_constant():
    assert warmup_decay_factor(5, warmup_steps=0, total_steps=10, decay="linear") == pytest.approx(0.5)
    assert warmup_decay_factor(9, warmup_steps=0, total_steps=10, decay="constant") == 1.0


def test_schedule_steps_optimizer_lr():
    """4 steps at ratio 0.5: ceil(2.0) = 2 warmup steps (0, 1/2), then linear decay from 1."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_decay_schedule(opt, total_steps=4, warmup_ratio=0.5, decay="linear")
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_decay_schedule(opt, total_steps=4, warmup_ratio=1.5)


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    optimizer = scheduler.optimizer
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])  # what this step applies, TRL's logged learning_rate
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("total", "ratio"), [(300, 0.1), (20, 0.1), (7, 0.05), (150, 0.3), (12, 0.0), (1, 0.1)])
def test_every_steps_lr_equals_trls_schedule(decay, total, ratio):
    """TRL builds its schedule with transformers' ``get_scheduler(lr_scheduler_type, warmup, total)`` and
    ``warmup = TrainingArguments(warmup_steps=ratio).get_warmup_steps(total)`` (a ceiling: 0.1 x 20 -> 2,
    and 0.1 x 300 -> 31, float arithmetic included); ``constant`` is its ``constant_with_warmup``."""
    from transformers import TrainingArguments, get_scheduler

    args = TrainingArguments(output_dir="unused", warmup_steps=ratio, use_cpu=True, report_to=[])
    warmup = args.get_warmup_steps(total)
    name = "constant_with_warmup" if decay == "constant" else decay

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-6)

    theirs = _lrs(get_scheduler(name, optimizer(), num_warmup_steps=warmup, num_training_steps=total), total)
    ours = _lrs(warmup_decay_schedule(optimizer(), total_steps=total, warmup_ratio=ratio, decay=decay), total)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)
