"""Tests for dpo_lightning.losses.

Three kinds of checks:
1. hand-derived numbers: small inputs, the arithmetic in the docstring, the expectation computed with
   ``math`` (never through the code under test);
2. agreement with a straightforward re-implementation of TRL's ``loss_type`` branches written here in
   TRL's own shape (sorting in place for aot, 2B concatenation for kto_pair, cross-entropy on logits for sft);
3. invariants: ln 2 at policy == reference, hinge past the margin, detached rewards, gradients reach the
   policy only, weighted lists, cross-rank statistics, clear errors.

Unless stated otherwise the single pair used is

    c = -1.0, rc = -1.5  ->  hc = 0.5        r = -2.0, rr = -1.5  ->  hr = -0.5
    D = hc - hr = 1.0,   beta = 0.1  ->  beta * D = 0.1,   Lc = 2, Lr = 4
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_lightning.losses import (
    LOSS_HPARAMS,
    LOSSES,
    REFERENCE_FREE,
    LossOutput,
    PairLogps,
    bco_batch_reward_mean,
    compute_loss,
    get_loss_fn,
    hparam_names,
    kto_pair_batch_kl,
    rank_matched,
    statistic_names,
)

BETA = 0.1


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair(c=-1.0, r=-2.0, rc=-1.5, rr=-1.5, lc=2, lr=4, requires_grad=False) -> PairLogps:
    """A batch built from equal-length lists (or scalars for a single pair)."""

    def t(x, dtype=torch.float64, grad=False):
        x = torch.tensor(x if isinstance(x, list) else [x], dtype=dtype)
        return x.requires_grad_(grad)

    return PairLogps(
        chosen=t(c, grad=requires_grad),
        rejected=t(r, grad=requires_grad),
        ref_chosen=t(rc, grad=requires_grad),
        ref_rejected=t(rr, grad=requires_grad),
        chosen_tokens=t(lc, dtype=torch.long),
        rejected_tokens=t(lr, dtype=torch.long),
    )


def value(out: LossOutput) -> list[float]:
    return out.losses.tolist()


def used(name: str, **hparams: float) -> dict[str, float]:
    """The ``hparams`` that loss ``name`` declares: passing one it does not use is an error."""
    return {k: v for k, v in hparams.items() if k in LOSS_HPARAMS[name]}


# ---------------------------------------------------------------------------------------------------------
# 1. hand-derived numbers


def test_sigmoid_hand():
    """-log sigmoid(0.1) = log(1 + e^-0.1)."""
    assert value(compute_loss("sigmoid", pair(), beta=BETA)) == pytest.approx([softplus(-0.1)])


def test_sigmoid_label_smoothing_hand():
    """cDPO, eps = 0.1: 0.9 * log(1 + e^-0.1) + 0.1 * log(1 + e^0.1)."""
    expected = 0.9 * softplus(-0.1) + 0.1 * softplus(0.1)
    out = compute_loss("sigmoid", pair(), beta=BETA, label_smoothing=0.1)
    assert value(out) == pytest.approx([expected])


def test_hinge_hand():
    """max(0, 1 - 0.1 * 1) = 0.9."""
    assert value(compute_loss("hinge", pair(), beta=BETA)) == pytest.approx([0.9])


def test_ipo_hand():
    """hc / Lc = 0.5 / 2 = 0.25, hr / Lr = -0.5 / 4 = -0.125, margin 0.375; 1 / (2 * 0.1) = 5.

    (0.375 - 5)^2 = 4.625^2 = 21.390625. Without length normalisation it would be (1 - 5)^2 = 16.
    """
    assert value(compute_loss("ipo", pair(), beta=BETA)) == pytest.approx([21.390625])


def test_robust_hand():
    """eps = 0.1: (0.9 * log(1 + e^-0.1) - 0.1 * log(1 + e^0.1)) / (1 - 0.2)."""
    expected = (0.9 * softplus(-0.1) - 0.1 * softplus(0.1)) / 0.8
    out = compute_loss("robust", pair(), beta=BETA, label_smoothing=0.1)
    assert value(out) == pytest.approx([expected])


def test_exo_pair_hand():
    """q = sigmoid(0.1); eps = 1e-3: q * (log q - log 0.999) + (1 - q) * (log(1 - q) - log 0.001)."""
    q = sig(0.1)
    expected = q * (math.log(q) - math.log(0.999)) + (1 - q) * (math.log(1 - q) - math.log(1e-3))
    out = compute_loss("exo_pair", pair(), beta=BETA, label_smoothing=1e-3)
    assert value(out) == pytest.approx([expected])


def test_nca_pair_hand():
    """beta * hc = 0.05, beta * hr = -0.05.

    -ls(0.05) - 0.5 * ls(-0.05) - 0.5 * ls(0.05) = 1.5 * log(1 + e^-0.05) + 0.5 * log(1 + e^0.05).
    """
    expected = 1.5 * softplus(-0.05) + 0.5 * softplus(0.05)
    assert value(compute_loss("nca_pair", pair(), beta=BETA)) == pytest.approx([expected])


def test_bco_pair_hand():
    """delta = 0: -ls(0.05) - ls(0.05) = 2 * log(1 + e^-0.05).

    delta = 0.02: -ls(0.05 - 0.02) - ls(-(-0.05 - 0.02)) = log(1 + e^-0.03) + log(1 + e^-0.07).
    """
    assert value(compute_loss("bco_pair", pair(), beta=BETA)) == pytest.approx([2 * softplus(-0.05)])
    out = compute_loss("bco_pair", pair(), beta=BETA, bco_delta=torch.tensor(0.02))
    assert value(out) == pytest.approx([softplus(-0.03) + softplus(-0.07)])


def test_sppo_hard_hand():
    """1 / (2 * 0.1) = 5: (0.5 - 5)^2 + (-0.5 + 5)^2 = 20.25 + 20.25 = 40.5."""
    assert value(compute_loss("sppo_hard", pair(), beta=BETA)) == pytest.approx([40.5])


def test_apo_zero_hand():
    """(1 - sigmoid(0.05)) + sigmoid(-0.05) = 2 * (1 - sigmoid(0.05))."""
    assert value(compute_loss("apo_zero", pair(), beta=BETA)) == pytest.approx([2 * (1 - sig(0.05))])


def test_apo_down_hand():
    """sigmoid(0.05) + (1 - sigmoid(0.1))."""
    expected = sig(0.05) + 1 - sig(0.1)
    assert value(compute_loss("apo_down", pair(), beta=BETA)) == pytest.approx([expected])


def test_discopop_hand():
    """m = 0.1, tau = 0.05, w = sigmoid(0.1 / 0.05) = sigmoid(2): (1 - w) * log(1 + e^-0.1) + w * e^-0.1."""
    w = sig(2.0)
    expected = (1 - w) * softplus(-0.1) + w * math.exp(-0.1)
    out = compute_loss("discopop", pair(), beta=BETA, discopop_tau=0.05)
    assert value(out) == pytest.approx([expected])
    # tau defaults to 0.05, as in TRL
    assert value(compute_loss("discopop", pair(), beta=BETA)) == pytest.approx([expected])


def test_sigmoid_norm_hand():
    """hc / Lc - hr / Lr = 0.25 + 0.125 = 0.375: -ls(0.1 * 0.375) = log(1 + e^-0.0375)."""
    assert value(compute_loss("sigmoid_norm", pair(), beta=BETA)) == pytest.approx([softplus(-0.0375)])


def test_sft_hand():
    """Two pairs, c = [-1, -2], Lc = [2, 4]: -(-1 - 2) / (2 + 4) = 0.5 for both pairs.

    Not the per-pair mean of 1/2 and 2/4 by accident: with Lc = [1, 4] it is 3 / 5 = 0.6, whereas the mean of
    per-sequence token means would be (1 + 0.5) / 2 = 0.75.
    """
    logps = pair(c=[-1.0, -2.0], r=[-3.0, -3.0], rc=[-1.0, -1.0], rr=[-1.0, -1.0], lc=[2, 4], lr=[5, 5])
    assert value(compute_loss("sft", logps, beta=BETA)) == pytest.approx([0.5, 0.5])
    logps = logps._replace(chosen_tokens=torch.tensor([1, 4]))
    assert value(compute_loss("sft", logps, beta=BETA)) == pytest.approx([0.6, 0.6])


def test_kto_pair_hand():
    """One pair: KLc = max(0, mean(hc)) = 0.5, KLr = max(0, mean(hr)) = max(0, -0.5) = 0.

    chosen term   = 1 - sigmoid(0.1 * (0.5 - KLr)) = 1 - sigmoid(0.05)
    rejected term = 1 - sigmoid(0.1 * (KLc - (-0.5))) = 1 - sigmoid(0.1)
    per pair = average of the two (TRL 0.x returned both; same mean).
    """
    expected = 0.5 * ((1 - sig(0.05)) + (1 - sig(0.1)))
    assert value(compute_loss("kto_pair", pair(), beta=BETA)) == pytest.approx([expected])


def test_kto_pair_given_kl_hand():
    """Passed in: chosen_kl = 1.0, rejected_kl = -2.0 -> clamped to 0.

    chosen term = 1 - sigmoid(0.1 * (0.5 - 0)), rejected term = 1 - sigmoid(0.1 * (1.0 + 0.5)).
    """
    expected = 0.5 * ((1 - sig(0.05)) + (1 - sig(0.15)))
    out = compute_loss("kto_pair", pair(), beta=BETA, chosen_kl=torch.tensor(1.0), rejected_kl=-2.0)
    assert value(out) == pytest.approx([expected])


def test_aot_hand():
    """Policy margins x = c - r = [1, 3], reference margins y = rc - rr = [2.5, 0].

    Sorted: x = [1, 3], y = [0, 2.5], so pair 0 (x = 1) is matched with 0 and pair 1 (x = 3) with 2.5:
    pair 0: -ls(0.1 * (1 - 0)) = log(1 + e^-0.1);  pair 1: -ls(0.1 * (3 - 2.5)) = log(1 + e^-0.05).
    (Plain DPO would use 1 - 2.5 and 3 - 0 instead.)
    """
    logps = pair(c=[-1.0, -1.0], r=[-2.0, -4.0], rc=[-1.0, -1.0], rr=[-3.5, -1.0], lc=[1, 1], lr=[1, 1])
    assert value(compute_loss("aot", logps, beta=BETA)) == pytest.approx([softplus(-0.1), softplus(-0.05)])


def test_aot_unpaired_hand_values_and_gradients():
    """hc = [0.5, 2.0], hr = [1.0, -1.0]; sorted hc = [0.5, 2.0], sorted hr = [-1.0, 1.0].

    Values: pair 0's chosen (0.5, rank 0) meets -1.0: -ls(0.1 * 1.5) = log(1 + e^-0.15);
            pair 1's chosen (2.0, rank 1) meets 1.0:  -ls(0.1 * 1.0) = log(1 + e^-0.1).
    Gradient of the sum wrt r (d/dx of -ls(beta * (a - x)) = beta * sigmoid(-beta * (a - x))):
            pair 0's rejected (1.0, rank 1) meets hc 2.0: 0.1 * sigmoid(-0.1)
            pair 1's rejected (-1.0, rank 0) meets hc 0.5: 0.1 * sigmoid(-0.15)
    """
    logps = pair(c=[0.5, 2.0], r=[1.0, -1.0], rc=[0.0, 0.0], rr=[0.0, 0.0], lc=[1, 1], lr=[1, 1])
    logps = logps._replace(rejected=logps.rejected.clone().requires_grad_(True))
    out = compute_loss("aot_unpaired", logps, beta=BETA)
    assert value(out) == pytest.approx([softplus(-0.15), softplus(-0.1)])
    (grad,) = torch.autograd.grad(out.losses.sum(), logps.rejected)
    assert grad.tolist() == pytest.approx([0.1 * sig(-0.1), 0.1 * sig(-0.15)])


def test_sigmoid_gradient_hand():
    """d/dc of -ls(beta * D) = -beta * sigmoid(-beta * D) = -0.1 * sigmoid(-0.1); d/dr is its negative."""
    logps = pair(requires_grad=True)
    out = compute_loss("sigmoid", logps, beta=BETA)
    gc, gr = torch.autograd.grad(out.losses.sum(), [logps.chosen, logps.rejected])
    assert gc.item() == pytest.approx(-0.1 * sig(-0.1))
    assert gr.item() == pytest.approx(0.1 * sig(-0.1))


def test_rewards_hand():
    """Rewards are beta * summed log-ratios for every loss that uses the reference (TRL 1.x), ipo and
    sigmoid_norm included: 0.1 * 0.5 = 0.05 and 0.1 * -0.5 = -0.05. (Reference-free losses: test_losses_ref_free.)"""
    for name in sorted(set(LOSSES) - REFERENCE_FREE):
        out = compute_loss(name, pair(), beta=BETA, **used(name, label_smoothing=1e-3))
        assert out.chosen_rewards.tolist() == pytest.approx([0.05]), name
        assert out.rejected_rewards.tolist() == pytest.approx([-0.05]), name


def test_reference_free_hand():
    """ref None: hc = c = -1, hr = r = -2, D = 1 -> the same sigmoid value; rewards 0.1 * (-1), 0.1 * (-2)."""
    logps = pair()._replace(ref_chosen=None, ref_rejected=None)
    out = compute_loss("sigmoid", logps, beta=BETA)
    assert value(out) == pytest.approx([softplus(-0.1)])
    assert out.chosen_rewards.tolist() == pytest.approx([-0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.2])


# ---------------------------------------------------------------------------------------------------------
# 2. agreement with TRL's formulas, re-implemented here the way TRL writes them


def trl_per_sequence_loss(loss_type, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
                          beta, label_smoothing=0.0, discopop_tau=0.05):  # fmt: skip
    """TRL 1.x ``DPOTrainer._compute_loss`` branches (reverse KL, no weighting), on summed log-probs."""
    chosen_scores = chosen - ref_chosen
    rejected_scores = rejected - ref_rejected
    delta = chosen_scores - rejected_scores
    ls = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        avg = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
        return (avg - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = torch.tensor(ls, dtype=delta.dtype)
        qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return qw * (log_qw - torch.log1p(-eps)) + ql * (log_ql - torch.log(eps))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_scores, beta * rejected_scores
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if loss_type == "robust":
        clean = -(1 - ls) * F.logsigmoid(beta * delta)
        flipped = -ls * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_scores) - F.logsigmoid(-beta * rejected_scores)
    if loss_type == "sppo_hard":
        return (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
    if loss_type == "aot":
        d = torch.sort(chosen - rejected, dim=0)[0] - torch.sort(ref_chosen - ref_rejected, dim=0)[0]
        return -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
    if loss_type == "aot_unpaired":
        d = torch.sort(chosen_scores, dim=0)[0] - torch.sort(rejected_scores, dim=0)[0]
        return -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_scores)) + torch.sigmoid(beta * rejected_scores)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_scores) + (1 - torch.sigmoid(beta * delta))
    if loss_type == "discopop":
        logits = delta * beta
        mod = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod
    if loss_type == "sigmoid_norm":
        avg = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
        return -F.logsigmoid(beta * avg)
    raise KeyError(loss_type)


TRL_1X = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
]  # fmt: skip
SORTING = {"aot", "aot_unpaired"}


def random_logps(batch=8, seed=0, requires_grad=True) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 40, (batch,), generator=g)
    lr = torch.randint(1, 40, (batch,), generator=g)
    ref_c = -lc * (0.5 + torch.rand(batch, generator=g, dtype=torch.float64))
    ref_r = -lr * (0.5 + torch.rand(batch, generator=g, dtype=torch.float64))
    c = ref_c + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
    r = ref_r + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
    return PairLogps(c.requires_grad_(requires_grad), r.requires_grad_(requires_grad), ref_c, ref_r, lc, lr)


@pytest.mark.parametrize("name", TRL_1X)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_formula(name, seed):
    # TRL 1.x ignores label_smoothing for sigmoid (we apply cDPO, as TRL 0.x did): compare at eps = 0 there
    beta, tau = 0.3, 0.07
    ls = {"sigmoid": 0.0, "exo_pair": 1e-3}.get(name, 0.05)
    logps = random_logps(seed=seed)
    ours = compute_loss(name, logps, beta=beta, **used(name, label_smoothing=ls, discopop_tau=tau))
    theirs = trl_per_sequence_loss(
        name, logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected,
        logps.chosen_tokens.double(), logps.rejected_tokens.double(), beta, ls, tau,
    )  # fmt: skip
    if name in SORTING:  # ours is in pair order, TRL's in sorted order: same multiset
        torch.testing.assert_close(ours.losses.sort().values, theirs.sort().values)
    else:
        torch.testing.assert_close(ours.losses, theirs)
    # same mean => same logged loss; and same gradients
    g_ours = torch.autograd.grad(ours.losses.mean(), [logps.chosen, logps.rejected], allow_unused=True)
    g_trl = torch.autograd.grad(theirs.mean(), [logps.chosen, logps.rejected], allow_unused=True)
    for a, b in zip(g_ours, g_trl):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.chosen_rewards, beta * (logps.chosen - logps.ref_chosen).detach())


def test_sigmoid_label_smoothing_matches_trl_0x():
    """TRL 0.x: -ls(beta*D) * (1 - eps) - ls(-beta*D) * eps."""
    logps, beta, eps = random_logps(), 0.2, 0.15
    d = (logps.chosen - logps.rejected) - (logps.ref_chosen - logps.ref_rejected)
    theirs = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    torch.testing.assert_close(compute_loss("sigmoid", logps, beta=beta, label_smoothing=eps).losses, theirs)


def test_ipo_matches_trl_0x_normalised_logps():
    """TRL 0.x divided all four log-probs by the completion length, then (logits - 1/(2 beta))^2."""
    logps, beta = random_logps(), 0.5
    c, r = logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens
    rc, rr = logps.ref_chosen / logps.chosen_tokens, logps.ref_rejected / logps.rejected_tokens
    theirs = ((c - r) - (rc - rr) - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(compute_loss("ipo", logps, beta=beta).losses, theirs)


def test_kto_pair_matches_trl_0x_mean():
    """TRL 0.x returned cat(1 - s(beta(hc - KLr)), 1 - s(beta(KLc - hr))) of length 2B; the means agree."""
    logps, beta = random_logps(), 0.1
    hc, hr = logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected
    kl_c, kl_r = hc.mean().clamp(min=0), hr.mean().clamp(min=0)
    theirs = torch.cat((1 - torch.sigmoid(beta * (hc - kl_r)), 1 - torch.sigmoid(beta * (kl_c - hr))), 0)
    ours = compute_loss("kto_pair", logps, beta=beta)
    assert ours.losses.shape == (8,)
    torch.testing.assert_close(ours.losses.mean(), theirs.mean())


def test_kto_pair_kl_is_detached():
    """Pair 0's loss must not depend on other pairs' log-probs (the KL means are constants)."""
    logps = random_logps()
    out = compute_loss("kto_pair", logps, beta=0.1)
    (grad,) = torch.autograd.grad(out.losses[0], logps.chosen)
    assert grad[0] != 0
    assert torch.all(grad[1:] == 0)


def test_bco_pair_with_running_mean_matches_trl_0x_first_step():
    """TRL 0.x's first step: delta = running mean after one update = mean(cat(beta*hc, beta*hr))."""
    logps, beta = random_logps(), 0.1
    hc, hr = logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected
    delta = torch.cat((beta * hc, beta * hr), 0).mean().detach()
    theirs = -F.logsigmoid(beta * hc - delta) - F.logsigmoid(-(beta * hr - delta))
    ours = compute_loss("bco_pair", logps, beta=beta, bco_delta=bco_batch_reward_mean(logps, beta=beta))
    torch.testing.assert_close(ours.losses, theirs)


def test_sft_matches_trl_cross_entropy_on_logits():
    """TRL: F.cross_entropy over the chosen completion tokens of the batch, expanded to (B,).

    Here the chosen sums come from the same logits, so this checks the token-mean (not sequence-mean).
    """
    g = torch.Generator().manual_seed(0)
    batch, seq, vocab = 4, 9, 11
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    lengths = torch.tensor([1, 3, 9, 5])
    mask = torch.arange(seq)[None, :] < lengths[:, None]  # (B, T)
    token_logps = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)  # (B, T)
    chosen = (token_logps * mask).sum(-1)
    logps = PairLogps(chosen, chosen - 1, chosen, chosen - 1, lengths, lengths)
    expected = F.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(compute_loss("sft", logps, beta=BETA).losses, expected.expand(batch))


def test_rpo_is_sigmoid_plus_alpha_nll():
    """TRL loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha] (RPO)."""
    logps, alpha = random_logps(), 0.7
    d = (logps.chosen - logps.rejected) - (logps.ref_chosen - logps.ref_rejected)
    nll = -logps.chosen.sum() / logps.chosen_tokens.sum()
    expected = -F.logsigmoid(BETA * d) + alpha * nll
    out = compute_loss(["sigmoid", "sft"], logps, beta=BETA, loss_weights=[1.0, alpha])
    torch.testing.assert_close(out.losses, expected)


# ---------------------------------------------------------------------------------------------------------
# 3. invariants


def test_sigmoid_is_ln2_at_reference():
    logps = random_logps(requires_grad=False)
    logps = logps._replace(ref_chosen=logps.chosen.clone(), ref_rejected=logps.rejected.clone())
    out = compute_loss("sigmoid", logps, beta=0.37)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_hinge_zero_past_margin():
    """D = 20 >= 1 / beta = 10: loss 0 and no gradient; D = 5 < 10: loss 0.5."""
    logps = pair(c=[19.0, 4.0], r=[-1.0, -1.0], rc=[0.0, 0.0], rr=[0.0, 0.0], lc=[1, 1], lr=[1, 1])
    logps = logps._replace(chosen=logps.chosen.requires_grad_(True))
    out = compute_loss("hinge", logps, beta=BETA)
    assert value(out) == pytest.approx([0.0, 0.5])
    (grad,) = torch.autograd.grad(out.losses.sum(), logps.chosen)
    assert grad.tolist() == pytest.approx([0.0, -0.1])


def test_robust_without_smoothing_equals_sigmoid():
    logps = random_logps(seed=3)
    a = compute_loss("robust", logps, beta=0.25, label_smoothing=0.0)
    b = compute_loss("sigmoid", logps, beta=0.25)
    torch.testing.assert_close(a.losses, b.losses)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rewards_detached_and_grads_reach_policy_only(name):
    logps = random_logps()
    logps = logps._replace(
        ref_chosen=logps.ref_chosen.clone().requires_grad_(True),
        ref_rejected=logps.ref_rejected.clone().requires_grad_(True),
    )
    out = compute_loss(name, logps, beta=0.1, **used(name, label_smoothing=1e-3))
    assert out.losses.shape == (8,)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    inputs = [logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected]
    grads = torch.autograd.grad(out.losses.sum(), inputs, allow_unused=True)
    if name != "npo":  # npo only trains on the rejected response
        assert grads[0] is not None and grads[0].abs().sum() > 0
    if name != "sft":  # sft only trains on the chosen response
        assert grads[1] is not None and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None


def test_weighted_list_is_weighted_sum():
    logps = random_logps(seed=5)
    kw = {"label_smoothing": 0.1, "discopop_tau": 0.1}
    names, weights = ["ipo", "robust", "discopop"], [0.8, 0.2, 1.5]
    out = compute_loss(names, logps, beta=0.2, loss_weights=weights, **kw)
    parts = [compute_loss(n, logps, beta=0.2, **used(n, **kw)).losses for n in names]
    torch.testing.assert_close(out.losses, sum(w * p for w, p in zip(weights, parts)))
    # default weights are 1.0; rewards are those of the first loss
    torch.testing.assert_close(compute_loss(names, logps, beta=0.2, **kw).losses, sum(parts))
    first = compute_loss("ipo", logps, beta=0.2)
    torch.testing.assert_close(out.chosen_rewards, first.chosen_rewards)


def test_token_counts_long_or_float():
    logps = random_logps()
    as_float = logps._replace(
        chosen_tokens=logps.chosen_tokens.float(), rejected_tokens=logps.rejected_tokens.float()
    )
    for name in ("ipo", "sigmoid_norm", "sft"):
        expected = compute_loss(name, logps, beta=0.1).losses
        torch.testing.assert_close(compute_loss(name, as_float, beta=0.1).losses, expected)


# cross-rank statistics: split a batch of 8 into 2 "ranks" of 4 and check the global value is recovered


def _split(logps: PairLogps, k: int, world: int) -> PairLogps:
    return PairLogps(*(t.chunk(world)[k] for t in logps))


def test_aot_cross_rank_matches_global_sort():
    # independent policy and reference margins, so that local and global sorting pair them differently
    g = torch.Generator().manual_seed(7)
    c, r, rc, rr = torch.randn(4, 8, generator=g, dtype=torch.float64)
    logps, world = PairLogps(c.requires_grad_(True), r, rc, rr, torch.ones(8), torch.ones(8)), 2
    x = (logps.chosen - logps.rejected).detach()
    y = logps.ref_chosen - logps.ref_rejected
    matched = rank_matched(x, y).chunk(world)
    per_rank = [
        compute_loss("aot", _split(logps, k, world), beta=0.3, aot_ref_matched=matched[k]).losses
        for k in range(world)
    ]
    global_trl = trl_per_sequence_loss("aot", *logps[:4], None, None, 0.3)
    torch.testing.assert_close(torch.cat(per_rank).mean(), global_trl.mean())
    # and the local default differs from the global sort on this data (the argument matters)
    local = torch.cat([compute_loss("aot", _split(logps, k, world), beta=0.3).losses for k in range(world)])
    assert not torch.allclose(local.mean(), global_trl.mean())


def test_aot_unpaired_cross_rank_matches_global_sort():
    logps, world = random_logps(seed=8), 2
    hc = (logps.chosen - logps.ref_chosen).detach()
    hr = (logps.rejected - logps.ref_rejected).detach()
    rej_m, cho_m = rank_matched(hc, hr).chunk(world), rank_matched(hr, hc).chunk(world)
    losses = torch.cat([
        compute_loss(
            "aot_unpaired", _split(logps, k, world), beta=0.3,
            aot_chosen_matched=cho_m[k], aot_rejected_matched=rej_m[k],
        ).losses
        for k in range(world)
    ])  # fmt: skip
    global_trl = trl_per_sequence_loss("aot_unpaired", *logps[:4], None, None, 0.3)
    torch.testing.assert_close(losses.mean(), global_trl.mean())
    g_ours = torch.autograd.grad(losses.mean(), [logps.chosen, logps.rejected])
    g_trl = torch.autograd.grad(global_trl.mean(), [logps.chosen, logps.rejected])
    for a, b in zip(g_ours, g_trl):
        torch.testing.assert_close(a, b)


def test_sft_cross_rank_token_mean():
    """Each rank passes sft_num_tokens = N_global / world; the mean over ranks is the global token mean."""
    logps, world = random_logps(seed=9), 2
    n_global = logps.chosen_tokens.sum().double()
    per_rank = [
        compute_loss("sft", _split(logps, k, world), beta=0.1, sft_num_tokens=n_global / world).losses.mean()
        for k in range(world)
    ]
    expected = -logps.chosen.sum() / n_global
    torch.testing.assert_close(torch.stack(per_rank).mean(), expected)
    local = [compute_loss("sft", _split(logps, k, world), beta=0.1).losses.mean() for k in range(world)]
    assert not torch.allclose(torch.stack(local).mean(), expected)


def test_kto_pair_cross_rank_kl():
    """Averaging the per-rank helper values (equal batch sizes) gives the global KL; losses match global."""
    logps, world = random_logps(seed=10), 2
    stats = [kto_pair_batch_kl(_split(logps, k, world)) for k in range(world)]
    chosen_kl = torch.stack([s[0] for s in stats]).mean()
    rejected_kl = torch.stack([s[1] for s in stats]).mean()
    kl = {"chosen_kl": chosen_kl, "rejected_kl": rejected_kl}
    split = [_split(logps, k, world) for k in range(world)]
    per_rank = torch.cat([compute_loss("kto_pair", part, beta=0.1, **kl).losses for part in split])
    torch.testing.assert_close(per_rank, compute_loss("kto_pair", logps, beta=0.1).losses)
    # on this data the per-rank estimates differ from the global one, so the arguments matter
    local = torch.cat([compute_loss("kto_pair", part, beta=0.1).losses for part in split])
    assert not torch.allclose(local, per_rank)


def test_rank_matched():
    """values [3, 1, 2] have ranks [2, 0, 1]; sorted targets [10, 20, 30] -> [30, 10, 20]."""
    out = rank_matched(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([20.0, 30.0, 10.0]))
    assert out.tolist() == [30.0, 10.0, 20.0]


# errors


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown loss_type 'dpo'.*sigmoid"):
        get_loss_fn("dpo")
    with pytest.raises(ValueError, match="aot_unpaired"):
        compute_loss("aot_pair", pair(), beta=BETA)
    with pytest.raises(ValueError, match="Unknown loss_type"):
        compute_loss(["sigmoid", "simpo_typo"], pair(), beta=BETA)


def test_typoed_hparam_is_reported():
    with pytest.raises(ValueError, match="label_smothing"):
        compute_loss("robust", pair(), beta=BETA, label_smothing=0.1)
    # a known hparam of another loss is an error too: nothing would read it (more in test_loss_config.py)
    with pytest.raises(ValueError, match=r"discopop_tau.*not used by loss_type \['hinge'\]"):
        compute_loss("hinge", pair(), beta=BETA, discopop_tau=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing.*not used by loss_type \['hinge'\]"):
        compute_loss("hinge", pair(), beta=BETA, label_smoothing=0.1)
    # calling a function directly with a foreign hparam is a TypeError
    with pytest.raises(TypeError):
        get_loss_fn("hinge")(pair(), beta=BETA, label_smoothing=0.1)


def test_hparam_names():
    assert hparam_names(get_loss_fn("discopop")) == {"discopop_tau"}
    assert hparam_names(get_loss_fn("robust")) == {"label_smoothing"}
    # kto_pair's KL estimates are batch statistics the module may pass, not hyper-parameters
    assert hparam_names(get_loss_fn("kto_pair")) == frozenset()
    assert statistic_names(get_loss_fn("kto_pair")) == {"chosen_kl", "rejected_kl"}


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("sigmoid", {"beta": 0.0}, "beta"),
        ("hinge", {"beta": -1.0}, "beta"),
        ("ipo", {"beta": float("nan")}, "beta"),
        ("robust", {"beta": 0.1, "label_smoothing": 0.5}, r"robust.*\[0.0, 0.5\)"),
        ("robust", {"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
        ("sigmoid", {"beta": 0.1, "label_smoothing": 0.6}, "label_smoothing"),
        ("exo_pair", {"beta": 0.1}, "1e-3"),
        ("exo_pair", {"beta": 0.1, "label_smoothing": 1.0}, "exo_pair"),
        ("discopop", {"beta": 0.1, "discopop_tau": 0.0}, "discopop_tau"),
    ],
)
def test_bad_hparams(name, kw, match):
    with pytest.raises(ValueError, match=match):
        compute_loss(name, pair(), **kw)


def test_bad_inputs():
    with pytest.raises(ValueError, match="loss_weights"):
        compute_loss(["sigmoid", "sft"], pair(), beta=BETA, loss_weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        compute_loss([], pair(), beta=BETA)
    with pytest.raises(ValueError, match="both"):
        compute_loss("sigmoid", pair()._replace(ref_rejected=None), beta=BETA)
    with pytest.raises(ValueError, match="shape"):
        compute_loss("sigmoid", pair()._replace(rejected=torch.zeros(2, dtype=torch.float64)), beta=BETA)
    with pytest.raises(ValueError, match="both"):
        compute_loss("kto_pair", pair(), beta=BETA, chosen_kl=0.1)
    with pytest.raises(ValueError, match="both"):
        compute_loss("aot_unpaired", pair(), beta=BETA, aot_chosen_matched=torch.zeros(1))
