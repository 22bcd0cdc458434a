"""PreferenceMetrics: TRL names, exact means over several batches (not a mean of batch means)."""

import torch

from dpo_lightning.metrics import METRIC_NAMES, KTOMetrics, PreferenceMetrics


def _update(m, chosen_r, rejected_r, losses, logits_sum=(0.0,), tokens=(1.0,)):
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    b = len(chosen_r)
    m.update(
        losses=t(losses),
        chosen_rewards=t(chosen_r),
        rejected_rewards=t(rejected_r),
        chosen_logps=t(chosen_r) * 10,
        rejected_logps=t(rejected_r) * 10,
        chosen_logits_sum=t(list(logits_sum) * b if len(logits_sum) == 1 else logits_sum),
        rejected_logits_sum=t([0.0] * b),
        chosen_tokens=t(list(tokens) * b if len(tokens) == 1 else tokens),
        rejected_tokens=t([1.0] * b),
    )


def test_names_and_prefix():
    m = PreferenceMetrics("val")
    _update(m, [1.0], [0.0], [0.5])
    assert list(m.compute()) == [f"val/{n}" for n in METRIC_NAMES]


def test_exact_over_several_batches():
    """Batch 1: 3 pairs, batch 2: 1 pair.

    accuracies: batch 1 has 2/3 right (the tie 0.2 vs 0.2 counts as wrong), batch 2 has 0/1;
    over the window 2/4 = 0.5, whereas the mean of batch means would be (2/3 + 0) / 2 = 1/3.
    margins: (0.5 + 0 + 1.0 - 1.0) / 4 = 0.125; loss: (1 + 2 + 3 + 6) / 4 = 3.
    """
    m = PreferenceMetrics("train")
    _update(m, [0.5, 0.2, 1.0], [0.0, 0.2, 0.0], [1.0, 2.0, 3.0])
    _update(m, [0.0], [1.0], [6.0])
    v = m.compute()
    assert v["train/rewards/accuracies"].item() == 0.5
    assert abs(v["train/rewards/margins"].item() - 0.125) < 1e-7
    assert v["train/loss"].item() == 3.0
    assert abs(v["train/rewards/chosen"].item() - (0.5 + 0.2 + 1.0 + 0.0) / 4) < 1e-7
    assert abs(v["train/logps/rejected"].item() - (0 + 2 + 0 + 10) / 4) < 1e-6
    m.reset()
    _update(m, [2.0], [1.0], [0.25])
    assert m.compute()["train/loss"].item() == 0.25


def test_logits_are_token_weighted():
    """Sequence 1: 3 tokens with logit sum 3 (mean 1); sequence 2: 1 token with logit sum 5.

    TRL's logits/chosen is the mean over all 4 response tokens: (3 + 5) / 4 = 2, not (1 + 5) / 2.
    """
    m = PreferenceMetrics("train")
    _update(m, [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], logits_sum=(3.0, 5.0), tokens=(3.0, 1.0))
    assert m.compute()["train/logits/chosen"].item() == 2.0


def test_weight_zero_leaves_a_pair_out():
    """Pairs 0 and 1 real, pair 2 a padded repeat (weight 0): every mean is that of pairs 0 and 1.

    loss (1 + 2) / 2 = 1.5; accuracies 1/2; logits/chosen (3 + 5) / (3 + 1) = 2, the padded pair's
    10 tokens of logit 10 weigh nothing.
    """
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    m = PreferenceMetrics("val")
    m.update(
        losses=t([1.0, 2.0, 100.0]), chosen_rewards=t([1.0, 0.0, 9.0]), rejected_rewards=t([0.0, 1.0, 0.0]),
        chosen_logps=t([-1.0, -2.0, -50.0]), rejected_logps=t([-3.0, -4.0, -50.0]),
        chosen_logits_sum=t([3.0, 5.0, 100.0]), rejected_logits_sum=t([0.0, 0.0, 0.0]),
        chosen_tokens=t([3.0, 1.0, 10.0]), rejected_tokens=t([1.0, 1.0, 1.0]), weight=t([1.0, 1.0, 0.0]),
    )
    v = m.compute()
    assert v["val/loss"].item() == 1.5 and v["val/rewards/accuracies"].item() == 0.5
    assert v["val/rewards/chosen"].item() == 0.5 and v["val/logps/rejected"].item() == -3.5
    assert v["val/logits/chosen"].item() == 2.0


def test_kto_weight_zero_leaves_an_example_out():
    """Examples 0 (desirable) and 1 (undesirable) real, example 2 (desirable) padding: loss (1 + 3) / 2,
    rewards/chosen = example 0's 0.5; kl is the step's z0 whatever the weights."""
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    m = KTOMetrics("val")
    m.update(losses=t([1.0, 3.0, 50.0]), rewards=t([0.5, -1.0, 9.0]), logps=t([-2.0, -3.0, -9.0]),
             desirable=torch.tensor([True, False, True]), kl=torch.tensor(0.25), weight=t([1.0, 1.0, 0.0]))
    v = m.compute()
    assert v["val/loss"].item() == 2.0 and v["val/kl"].item() == 0.25
    assert v["val/rewards/chosen"].item() == 0.5 and v["val/rewards/margins"].item() == 1.5
    assert v["val/logps/chosen"].item() == -2.0
