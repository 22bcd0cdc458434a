"""PreferenceMetrics and KTOMetrics: TRL names, exact means over several batches (not a mean of batch
means), weight-0 rows left out; every logged value checked against hand numbers."""

import pytest
import torch

from dpo_lightning.training.metrics import KTO_METRIC_NAMES, METRIC_NAMES, KTOMetrics, PreferenceMetrics


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
    """Every name in TRL's order; entropy and mean_token_accuracy when the caller gives them (DPOModule does)."""
    m = PreferenceMetrics("val")
    _update(m, [1.0], [0.0], [0.5])
    optional = ("entropy", "mean_token_accuracy")
    assert list(m.compute()) == [f"val/{n}" for n in METRIC_NAMES if n not in optional]
    m.update(**_pairs([(1.0, 0.0, 0.5, -1.0, -2.0, 1.0, 1.0, 1.0, 1.0)]), entropy_sum=torch.tensor([1.0, 1.0]),
             chosen_correct=torch.tensor([1.0]))
    assert list(m.compute()) == [f"val/{n}" for n in METRIC_NAMES]


def test_entropy_over_both_sides_and_token_accuracy_over_the_chosen_side_are_token_weighted():
    """TRL's DPO entropy: the mean per-token entropy over every response token, both sides; its
    mean_token_accuracy: the share of the *chosen* response tokens whose label is the argmax.

        pair  chosen tokens  rejected tokens  entropy sums (c, r)  chosen hits
         1         3               2              3.0, 4.0              2
         2         1               0 (empty)      2.0, 0.0              1
         3         5               5            100.0, 100.0            0     <- weight 0: left out

      entropy             = (3 + 4 + 2 + 0) / (3 + 2 + 1 + 0) = 9 / 6 = 1.5   (per-sequence means: 1.5, 2.0, 2.0)
      mean_token_accuracy = (2 + 1) / (3 + 1)                 = 0.75          (per-sequence means: 0.83)
    """
    m = PreferenceMetrics("train")
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    zeros = t([0.0, 0.0, 0.0])
    m.update(losses=zeros, chosen_rewards=zeros, rejected_rewards=zeros, chosen_logps=zeros, rejected_logps=zeros,
             chosen_logits_sum=zeros, rejected_logits_sum=zeros, chosen_tokens=t([3, 1, 5]),
             rejected_tokens=t([2, 0, 5]), entropy_sum=t([3.0, 2.0, 100.0, 4.0, 0.0, 100.0]),
             chosen_correct=t([2, 1, 0]), weight=t([1, 1, 0]))
    v = m.compute()
    assert v["train/entropy"].item() == pytest.approx(1.5)
    assert v["train/mean_token_accuracy"].item() == pytest.approx(0.75)


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


def _t(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def _pairs(rows, weight=None) -> dict:
    """PreferenceMetrics.update arguments from rows of
    (chosen reward, rejected reward, loss, chosen logp, rejected logp,
     chosen logit sum, chosen tokens, rejected logit sum, rejected tokens)."""
    cols = list(zip(*rows))
    names = ("chosen_rewards", "rejected_rewards", "losses", "chosen_logps", "rejected_logps",
             "chosen_logits_sum", "chosen_tokens", "rejected_logits_sum", "rejected_tokens")
    return {**{n: _t(c) for n, c in zip(names, cols)}, "weight": None if weight is None else _t(weight)}


def test_every_preference_metric_over_a_weighted_window_of_three_updates():
    """Three updates, one window; every side of every pair has its own non-zero numbers, so a metric
    read from the wrong side, or a weight-0 pair counted, gives a different value.

        pair  c_rew   r_rew  loss  c_logp r_logp  c_logit_sum/tokens  r_logit_sum/tokens
      update 1 (no weight)
         1     0.5    0.25   1.0    -4     -9         6 / 3               -2 / 2
         2    -0.25   0.5    2.0    -6    -11         2 / 1               12 / 4
         3     1.0    1.0    0.5    -2     -5         4 / 4               -3 / 1
      update 2 (weight 1, 0)
         4     0.75  -0.5    0.25   -3     -7        10 / 2                5 / 5
         5   100   -100   1000   -1000  -2000       999 / 9              777 / 7   <- weight 0: left out
      update 3 (no weight)
         6    -1.0   -0.5    3.0    -8      0         9 / 3                0 / 0   <- empty rejected response

    Over the 5 counted pairs (1, 2, 3, 4, 6):
      loss             = (1 + 2 + 0.5 + 0.25 + 3) / 5            = 6.75 / 5 = 1.35
      rewards/chosen   = (0.5 - 0.25 + 1 + 0.75 - 1) / 5         = 1.0 / 5  = 0.2
      rewards/rejected = (0.25 + 0.5 + 1 - 0.5 - 0.5) / 5        = 0.75 / 5 = 0.15
      rewards/margins  = (0.25 - 0.75 + 0 + 1.25 - 0.5) / 5      = 0.25 / 5 = 0.05
      rewards/accuracies: pairs 1 and 4 right, 2 and 6 wrong, 3 a tie (wrong) = 2 / 5 = 0.4
      logps/chosen     = (-4 - 6 - 2 - 3 - 8) / 5                = -23 / 5  = -4.6
      logps/rejected   = (-9 - 11 - 5 - 7 + 0) / 5               = -32 / 5  = -6.4
      logits/chosen    = (6 + 2 + 4 + 10 + 9) / (3 + 1 + 4 + 2 + 3)  = 31 / 13   (token-weighted)
      logits/rejected  = (-2 + 12 - 3 + 5 + 0) / (2 + 4 + 1 + 5 + 0) = 12 / 12 = 1.0
    (The mean of per-sequence means would give 2.6 and 0.) After reset, a window of the single pair
    (0.125, -0.375, 0.75, -1.5, -2.5, 3 / 2, -4 / 8) reports exactly that pair: margins 0.5, accuracy 1,
    logits/chosen 1.5, logits/rejected -0.5.
    """
    m = PreferenceMetrics("train")
    m.update(**_pairs([
        (0.5, 0.25, 1.0, -4.0, -9.0, 6.0, 3.0, -2.0, 2.0),
        (-0.25, 0.5, 2.0, -6.0, -11.0, 2.0, 1.0, 12.0, 4.0),
        (1.0, 1.0, 0.5, -2.0, -5.0, 4.0, 4.0, -3.0, 1.0),
    ]))
    m.update(**_pairs([
        (0.75, -0.5, 0.25, -3.0, -7.0, 10.0, 2.0, 5.0, 5.0),
        (100.0, -100.0, 1000.0, -1000.0, -2000.0, 999.0, 9.0, 777.0, 7.0),
    ], weight=[1.0, 0.0]))
    m.update(**_pairs([(-1.0, -0.5, 3.0, -8.0, 0.0, 9.0, 3.0, 0.0, 0.0)]))
    expected = {
        "train/loss": 1.35,
        "train/rewards/chosen": 0.2,
        "train/rewards/rejected": 0.15,
        "train/rewards/accuracies": 0.4,
        "train/rewards/margins": 0.05,
        "train/logps/chosen": -4.6,
        "train/logps/rejected": -6.4,
        "train/logits/chosen": 31 / 13,
        "train/logits/rejected": 1.0,
    }
    v = {k: x.item() for k, x in m.compute().items()}
    assert list(v) == list(expected)  # every name, in TRL's order, and nothing else
    assert v == pytest.approx(expected, rel=1e-6, abs=1e-7)

    m.reset()
    m.update(**_pairs([(0.125, -0.375, 0.75, -1.5, -2.5, 3.0, 2.0, -4.0, 8.0)]))
    assert {k: x.item() for k, x in m.compute().items()} == {
        "train/loss": 0.75,
        "train/rewards/chosen": 0.125,
        "train/rewards/rejected": -0.375,
        "train/rewards/accuracies": 1.0,
        "train/rewards/margins": 0.5,
        "train/logps/chosen": -1.5,
        "train/logps/rejected": -2.5,
        "train/logits/chosen": 1.5,
        "train/logits/rejected": -0.5,
    }


# The rejected side's MeanMetric is computed with no update in the last window: torchmetrics warns.
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric MeanMetric was called before:UserWarning")
def test_every_kto_metric_over_a_weighted_window_of_three_updates():
    """Three updates (D = desirable, counted as chosen; U = undesirable, counted as rejected):

        update 1 (no weight), kl 0.5:    D(loss 0.5, reward 0.75, logp -3)   U(1.5, -0.5, -5)
                                         D(0.25, 0.25, -4)                   U(2.0, -1.25, -6)
        update 2 (weight 1, 1, 0), kl 0.125: U(1.0, -0.25, -7)  D(0.75, 1.5, -2)  D(40, 9, -90) <- weight 0
        update 3 (no weight), kl 0.375:  D(0.125, 0.5, -1)  D(0.375, 1.0, -2)   (no undesirable example)

    Over the 8 counted examples (5 D, 3 U) and the 3 steps:
      loss             = (0.5 + 1.5 + 0.25 + 2 + 1 + 0.75 + 0.125 + 0.375) / 8 = 6.5 / 8 = 0.8125
      kl               = (0.5 + 0.125 + 0.375) / 3                           = 1 / 3
      rewards/chosen   = (0.75 + 0.25 + 1.5 + 0.5 + 1.0) / 5                 = 4 / 5 = 0.8
      rewards/rejected = (-0.5 - 1.25 - 0.25) / 3                            = -2 / 3
      rewards/margins  = 0.8 - (-2 / 3)                                      = 22 / 15
      logps/chosen     = (-3 - 4 - 2 - 1 - 2) / 5                            = -12 / 5 = -2.4
      logps/rejected   = (-5 - 6 - 7) / 3                                    = -6
    After reset, a window with only desirable examples D(0.5, 0.25, -1), D(1.5, 0.75, -3), kl 0.25 has
    no rejected side: rewards/rejected, logps/rejected and margins are left out, and
    loss = 1, rewards/chosen = 0.5, logps/chosen = -2, kl = 0.25.
    """
    m = KTOMetrics("train")
    m.update(losses=_t([0.5, 1.5, 0.25, 2.0]), rewards=_t([0.75, -0.5, 0.25, -1.25]),
             logps=_t([-3.0, -5.0, -4.0, -6.0]), desirable=torch.tensor([True, False, True, False]),
             kl=torch.tensor(0.5))
    m.update(losses=_t([1.0, 0.75, 40.0]), rewards=_t([-0.25, 1.5, 9.0]), logps=_t([-7.0, -2.0, -90.0]),
             desirable=torch.tensor([False, True, True]), kl=torch.tensor(0.125), weight=_t([1.0, 1.0, 0.0]))
    m.update(losses=_t([0.125, 0.375]), rewards=_t([0.5, 1.0]), logps=_t([-1.0, -2.0]),
             desirable=torch.tensor([True, True]), kl=torch.tensor(0.375))
    expected = {
        "train/loss": 0.8125,
        "train/kl": 1 / 3,
        "train/rewards/chosen": 0.8,
        "train/rewards/rejected": -2 / 3,
        "train/rewards/margins": 22 / 15,
        "train/logps/chosen": -2.4,
        "train/logps/rejected": -6.0,
    }
    v = {k: x.item() for k, x in m.compute().items()}
    assert list(v) == [f"train/{n}" for n in KTO_METRIC_NAMES] == list(expected)
    assert v == pytest.approx(expected, rel=1e-6, abs=1e-7)

    m.reset()
    m.update(losses=_t([0.5, 1.5]), rewards=_t([0.25, 0.75]), logps=_t([-1.0, -3.0]),
             desirable=torch.tensor([True, True]), kl=torch.tensor(0.25))
    assert {k: x.item() for k, x in m.compute().items()} == {
        "train/loss": 1.0, "train/kl": 0.25, "train/rewards/chosen": 0.5, "train/logps/chosen": -2.0,
    }
