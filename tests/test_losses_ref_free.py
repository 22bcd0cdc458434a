"""Tests for the reference-free losses (simpo, cpo, orpo), npo, and KTO on unpaired data.

1. hand-derived numbers, the arithmetic in each docstring, the expectation computed with ``math``;
2. when TRL is installed: equality with TRL 1.x's own code, called unbound on a small stand-in for the trainer
   (CPOTrainer / ORPOTrainer from logits through their ``get_batch_loss_metrics``; KTOTrainer's ``_compute_loss``
   with a stand-in model whose fused-head output carries per-token log-probs we choose);
3. invariants: references ignored, NPO bounded, KTO's cross-rank reference point.

Unless stated otherwise the single pair used is

    c = -2.0, Lc = 2  ->  a = c/Lc = -1.0        r = -6.0, Lr = 3  ->  b = r/Lr = -2.0
    rc = rr = -1.0 (given, and ignored by the reference-free losses)
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_lightning.losses import (
    LOSS_HPARAMS,
    LOSSES,
    REFERENCE_FREE,
    PairLogps,
    compute_loss,
    hparam_names,
    kto_kl_estimate,
    kto_loss,
    kto_reference_point,
    kto_weight_warning,
    statistic_names,
)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(x, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(x if isinstance(x, list) else [x], dtype=dtype)


def pair(c=-2.0, r=-6.0, rc=-1.0, rr=-1.0, lc=2, lr=3) -> PairLogps:
    return PairLogps(t(c), t(r), t(rc), t(rr), t(lc, torch.long), t(lr, torch.long))


def values(out) -> list[float]:
    return out.losses.tolist()


# ---------------------------------------------------------------------------------------------------------
# 1. hand-derived numbers


def test_simpo_hand():
    """beta = 2, gamma = 0.5: beta * (a - b) - gamma = 2 * 1 - 0.5 = 1.5 -> loss = -ls(1.5) = log(1 + e^-1.5).

    eps = 0.1: 0.9 * log(1 + e^-1.5) + 0.1 * log(1 + e^1.5). Rewards 2 * a = -2, 2 * b = -4.
    """
    out = compute_loss("simpo", pair(), beta=2.0, simpo_gamma=0.5)
    assert values(out) == pytest.approx([softplus(-1.5)])
    assert out.chosen_rewards.tolist() == pytest.approx([-2.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-4.0])
    smoothed = compute_loss("simpo", pair(), beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    assert values(smoothed) == pytest.approx([0.9 * softplus(-1.5) + 0.1 * softplus(1.5)])


def test_cpo_hand():
    """beta = 0.1: beta * (c - r) = 0.4 -> preference term log(1 + e^-0.4).

    Two pairs, c = [-2, -3], r = [-6, -3], Lc = [2, 4]: NLL = (2 + 3) / (2 + 4) = 5/6 for both pairs;
    pair 1 has c - r = 0 -> ln 2. alpha = 0.5 -> loss = [log(1 + e^-0.4) + 5/12, ln 2 + 5/12].
    Rewards are beta * summed log-probs: [-0.2, -0.3] and [-0.6, -0.3].
    """
    logps = pair(c=[-2.0, -3.0], r=[-6.0, -3.0], rc=[0.0, 0.0], rr=[0.0, 0.0], lc=[2, 4], lr=[3, 3])
    out = compute_loss("cpo", logps, beta=0.1, cpo_alpha=0.5)
    assert values(out) == pytest.approx([softplus(-0.4) + 5 / 12, math.log(2) + 5 / 12])
    assert out.chosen_rewards.tolist() == pytest.approx([-0.2, -0.3])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.6, -0.3])
    # alpha = 0: the reference-free DPO term alone; the default alpha is TRL's 1.0
    assert values(compute_loss("cpo", logps, beta=0.1, cpo_alpha=0.0)) == pytest.approx(
        [softplus(-0.4), math.log(2)]
    )
    assert values(compute_loss("cpo", logps, beta=0.1)) == pytest.approx(
        [softplus(-0.4) + 5 / 6, math.log(2) + 5 / 6]
    )


def test_orpo_hand():
    """a = -1, b = -2; log(1 - e^-1) = log(0.632121) = -0.458675, log(1 - e^-2) = log(0.864665) = -0.145413.

    log_odds = (a - b) - (-0.458675 - -0.145413) = 1 + 0.313262 = 1.313262
    NLL = -c / Lc = 1.0;  beta (lambda) = 0.1:  loss = 1.0 - 0.1 * ls(1.313262) = 1.0 + 0.1 * log(1 + e^-1.313262)
    Rewards 0.1 * a = -0.1, 0.1 * b = -0.2.
    """
    log_odds = 1.0 - (math.log1p(-math.exp(-1.0)) - math.log1p(-math.exp(-2.0)))
    assert log_odds == pytest.approx(1.313262, abs=1e-6)
    out = compute_loss("orpo", pair(), beta=0.1)
    assert values(out) == pytest.approx([1.0 + 0.1 * softplus(-log_odds)])
    assert out.chosen_rewards.tolist() == pytest.approx([-0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.2])


def test_orpo_log1mexp_is_stable_near_zero():
    """An average log-prob of -1e-10 (probability ~1): log(1 - e^x) ~ log(-x) = log(1e-10), finite."""
    logps = pair(c=-2e-10, lc=2)
    out = compute_loss("orpo", logps, beta=0.1)
    assert torch.isfinite(out.losses).all()


def test_npo_hand():
    """beta = 0.5, hr = r - rr = -2 - -1 = -1: loss = (2 / 0.5) * log(1 + e^(0.5 * -1)) = 4 * log(1 + e^-0.5).

    Only the rejected side is read: chosen may be None (negative-only data) and then chosen_rewards = 0.
    """
    expected = 4 * softplus(-0.5)
    out = compute_loss("npo", pair(r=-2.0, rr=-1.0), beta=0.5)
    assert values(out) == pytest.approx([expected])
    assert out.chosen_rewards.tolist() == pytest.approx([0.5 * (-2.0 - -1.0)])  # beta * hc when chosen is given
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5])
    negative_only = PairLogps(None, t(-2.0), None, t(-1.0), None, None)
    out = compute_loss("npo", negative_only, beta=0.5)
    assert values(out) == pytest.approx([expected])
    assert out.chosen_rewards.tolist() == [0.0]


def test_kto_hand():
    """beta = 0.1, z0 = 0.5, w_D = 1, w_U = 1.5; policy [-1, -3, -2, -4], ref -2 -> h = [1, -1, 0, -2];
    desirable = [T, F, T, F]:

        0: 1 - s(0.1 * (1 - 0.5))         = 1 - s(0.05)
        1: 1.5 * (1 - s(0.1 * (0.5 + 1)))  = 1.5 * (1 - s(0.15))
        2: 1 - s(0.1 * (0 - 0.5))         = 1 - s(-0.05)
        3: 1.5 * (1 - s(0.1 * (0.5 + 2)))  = 1.5 * (1 - s(0.25))

    Rewards 0.1 * h = [0.1, -0.1, 0, -0.2].
    """
    policy = t([-1.0, -3.0, -2.0, -4.0])
    ref = torch.full((4,), -2.0, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    out = kto_loss(policy, ref, desirable, torch.tensor(0.5), beta=0.1, undesirable_weight=1.5)
    expected = [1 - sig(0.05), 1.5 * (1 - sig(0.15)), 1 - sig(-0.05), 1.5 * (1 - sig(0.25))]
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.1, 0.0, -0.2])
    # z0 is a constant, clamped at 0: -3 acts like 0
    clamped = kto_loss(policy, ref, desirable, -3.0, beta=0.1).losses
    zero = kto_loss(policy, ref, desirable, 0.0, beta=0.1).losses
    torch.testing.assert_close(clamped, zero)


def test_kto_reference_point_hand():
    """KL rows: policy [-1, -2.5, -3, -1.5], ref [-2, -2, -2, -2.5] -> diffs [1, -0.5, -1, 1]:
    sum 0.5, count 4 -> z0 = 0.125. Negated diffs sum to -0.5 -> mean -0.125 -> clamped to 0."""
    policy, ref = t([-1.0, -2.5, -3.0, -1.5]), t([-2.0, -2.0, -2.0, -2.5])
    stats = kto_kl_estimate(policy, ref)
    assert stats.tolist() == pytest.approx([0.5, 4.0])
    assert kto_reference_point(stats).item() == pytest.approx(0.125)
    assert kto_reference_point(kto_kl_estimate(ref, policy)).item() == 0.0
    # The last row is an eval shard's padding (weight 0): sum 1 - 0.5 - 1 = -0.5 over 3 -> clamped 0;
    # weighting the third row out instead: (1 - 0.5 + 1) / 3 = 0.5.
    assert kto_kl_estimate(policy, ref, t([1.0, 1.0, 1.0, 0.0])).tolist() == pytest.approx([-0.5, 3.0])
    assert kto_reference_point(kto_kl_estimate(policy, ref, t([1.0, 1.0, 0.0, 1.0]))).item() == pytest.approx(0.5)


def test_kto_reference_point_across_ranks():
    """Summing per-rank (sum, count) gives the global mean, even with unequal per-rank batch sizes."""
    g = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(2, 7, generator=g, dtype=torch.float64)
    policy = policy + 0.5
    parts = [(policy[:3], ref[:3]), (policy[3:], ref[3:])]  # ranks of 3 and 4 examples
    summed = sum(kto_kl_estimate(p, r) for p, r in parts)
    expected = max(0.0, (policy - ref).mean().item())
    assert kto_reference_point(summed).item() == pytest.approx(expected)


def test_kto_weight_warning():
    """n_D = 300, n_U = 100, weights 1: ratio 3 > 4/3 -> a warning recommending desirable_weight in
    [100/300, 4/3 * 100/300] = [0.333, 0.444] or undesirable_weight in [3/4 * 3, 3] = [2.25, 3]."""
    message = kto_weight_warning(300, 100)
    assert message is not None
    assert "[0.333, 0.444]" in message and "[2.25, 3]" in message
    assert kto_weight_warning(300, 100, undesirable_weight=2.5) is None  # ratio 1.2
    assert kto_weight_warning(100, 100) is None  # ratio 1
    assert kto_weight_warning(100, 75) is None  # ratio 4/3, the upper end
    assert kto_weight_warning(100, 100, desirable_weight=0.5) is not None  # ratio 0.5 < 1
    assert "all are desirable" in kto_weight_warning(10, 0)


# ---------------------------------------------------------------------------------------------------------
# 3. invariants and errors


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_ignore_the_reference(name):
    with_ref = compute_loss(name, pair(), beta=0.3)
    other_ref = compute_loss(name, pair(rc=-50.0, rr=3.0), beta=0.3)
    no_ref = compute_loss(name, pair()._replace(ref_chosen=None, ref_rejected=None), beta=0.3)
    for out in (other_ref, no_ref):
        torch.testing.assert_close(out.losses, with_ref.losses)
        torch.testing.assert_close(out.chosen_rewards, with_ref.chosen_rewards)


def test_npo_is_bounded_and_starts_as_gradient_ascent():
    """d loss / d r = 2 * s(beta * hr): 1 at hr = 0 (the gradient of gradient ascent on log pi(y)); towards 0 as
    hr -> -inf, where the loss tends to 0 from above. Gradient ascent's loss r would go to -inf with gradient 1."""
    r = t([0.0, -100.0]).requires_grad_(True)
    out = compute_loss("npo", PairLogps(None, r, None, t([0.0, 0.0]), None, None), beta=0.5)
    (grad,) = torch.autograd.grad(out.losses.sum(), r)
    assert grad.tolist() == pytest.approx([1.0, 2 * sig(-50.0)])
    assert out.losses.tolist() == pytest.approx([4 * math.log(2), 4 * softplus(-50.0)])
    assert (out.losses > 0).all()


def test_kto_gradients_reach_policy_only():
    policy = t([-1.0, -3.0]).requires_grad_(True)
    ref = t([-2.0, -2.0]).requires_grad_(True)
    z0 = torch.tensor(0.3, requires_grad=True)
    out = kto_loss(policy, ref, torch.tensor([True, False]), z0, beta=0.1)
    grads = torch.autograd.grad(out.losses.sum(), [policy, ref, z0], allow_unused=True)
    assert grads[0] is not None and (grads[0] != 0).all()
    assert grads[1] is None and grads[2] is None
    assert not out.rewards.requires_grad


def test_hparams_and_errors():
    assert hparam_names(LOSSES["simpo"]) == {"simpo_gamma", "label_smoothing"}
    assert hparam_names(LOSSES["cpo"]) == {"label_smoothing", "cpo_alpha"}
    assert hparam_names(LOSSES["orpo"]) == frozenset()
    assert hparam_names(LOSSES["npo"]) == frozenset()
    # the NLL's token count is a batch statistic, not a hyper-parameter
    assert statistic_names(LOSSES["cpo"]) == statistic_names(LOSSES["orpo"]) == {"sft_num_tokens"}
    assert statistic_names(LOSSES["npo"]) == frozenset()
    with pytest.raises(ValueError, match="simpo.*label_smoothing"):
        compute_loss("simpo", pair(), beta=2.0, label_smoothing=0.7)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t([-1.0]), t([-1.0]), torch.tensor([1]), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(t([-1.0, -2.0]), t([-1.0]), torch.tensor([True, False]), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(t([-1.0]), None, torch.tensor([True]), 0.0, beta=0.0)


# ---------------------------------------------------------------------------------------------------------
# 2. TRL 1.x's own code


class _FakeAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


B, T, V = 4, 7, 11


def _trl_pair_batch(seed: int):
    """Random logits (2B, T, V) and a TRL CPO/ORPO batch whose prompt is the first token only.

    With a one-token prompt TRL's ORPO NLL over "prompt and response" covers the response only (the first
    token is never predicted), so it equals the response-token NLL used here.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (2 * B,), generator=g)  # 1 prompt token + 1..T-1 response tokens
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    attention = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * attention
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, 0] = -100
    batch = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch[f"{side}_input_ids"] = ids[rows]
        batch[f"{side}_attention_mask"] = attention[rows]
        batch[f"{side}_labels"] = labels[rows]
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    return batch, logits, labels


def _our_pair_logps(logits: torch.Tensor, labels: torch.Tensor) -> PairLogps:
    """Per-sequence sums of response-token log-probs, computed here independently of models/logprobs.py."""
    shifted = labels[:, 1:]
    mask = shifted != -100
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    sums, counts = (token_logps * mask).sum(-1), mask.sum(-1)
    return PairLogps(sums[:B], sums[B:], None, None, counts[:B], counts[B:])


def _stand_in(trainer_cls, logits, **attrs):
    ns = SimpleNamespace(
        accelerator=_FakeAccelerator(),
        is_encoder_decoder=False,
        aux_loss_enabled=False,
        pad_token_id=0,
        padding_value=0,
        concatenated_inputs=trainer_cls.concatenated_inputs,
        get_batch_logps=trainer_cls.get_batch_logps,
        **attrs,
    )
    ns.concatenated_forward = functools.partial(trainer_cls.concatenated_forward, ns)
    return ns, (lambda input_ids, **_: SimpleNamespace(logits=logits))


CPO_CASES = [
    # (TRL CPOConfig loss_type, cpo_alpha, label_smoothing, our loss list, our weights)
    ("sigmoid", 1.0, 0.0, ["cpo"], None),
    ("sigmoid", 0.3, 0.1, ["cpo"], None),
    ("simpo", 0.0, 0.0, ["simpo"], None),
    ("simpo", 0.0, 0.2, ["simpo"], None),
    ("simpo", 0.7, 0.0, ["simpo", "sft"], [1.0, 0.7]),  # TRL's simpo + cpo_alpha * NLL
]


@pytest.mark.trl
@pytest.mark.parametrize(("loss_type", "cpo_alpha", "eps", "names", "weights"), CPO_CASES)
def test_cpo_and_simpo_match_trl(loss_type, cpo_alpha, eps, names, weights):
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    batch, logits, labels = _trl_pair_batch(seed=len(names) + int(10 * eps))
    trl_logits = logits.clone().requires_grad_(True)
    ours_logits = logits.clone().requires_grad_(True)
    beta, gamma = (2.0, 0.6) if loss_type == "simpo" else (0.1, 0.5)
    trainer, model = _stand_in(
        cpo_trainer.CPOTrainer, trl_logits,
        beta=beta, label_smoothing=eps, loss_type=loss_type, cpo_alpha=cpo_alpha, simpo_gamma=gamma, alpha=0.0,
    )  # fmt: skip
    trainer.cpo_loss = functools.partial(cpo_trainer.CPOTrainer.cpo_loss, trainer)
    trl_loss, trl_metrics = cpo_trainer.CPOTrainer.get_batch_loss_metrics(trainer, model, batch)

    # only what our losses use: simpo has no cpo_alpha (it is the sft weight), cpo no simpo_gamma
    kw = {"simpo_gamma": gamma, "label_smoothing": eps, "cpo_alpha": cpo_alpha}
    kw = {k: v for k, v in kw.items() if any(k in LOSS_HPARAMS[n] for n in names)}
    out = compute_loss(names, _our_pair_logps(ours_logits, labels), beta=beta, loss_weights=weights, **kw)
    torch.testing.assert_close(out.losses.mean(), trl_loss, rtol=0, atol=1e-10)
    (g_trl,) = torch.autograd.grad(trl_loss, trl_logits)
    (g_ours,) = torch.autograd.grad(out.losses.mean(), ours_logits)
    torch.testing.assert_close(g_ours, g_trl, rtol=0, atol=1e-10)
    assert out.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"])
    assert out.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"])


@pytest.mark.trl
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    batch, logits, labels = _trl_pair_batch(seed=7)
    trl_logits = logits.clone().requires_grad_(True)
    ours_logits = logits.clone().requires_grad_(True)
    trainer, model = _stand_in(orpo_trainer.ORPOTrainer, trl_logits, beta=beta)
    trainer.odds_ratio_loss = functools.partial(orpo_trainer.ORPOTrainer.odds_ratio_loss, trainer)
    trl_loss, trl_metrics = orpo_trainer.ORPOTrainer.get_batch_loss_metrics(trainer, model, batch)

    out = compute_loss("orpo", _our_pair_logps(ours_logits, labels), beta=beta)
    torch.testing.assert_close(out.losses.mean(), trl_loss.double(), rtol=0, atol=1e-6)
    (g_trl,) = torch.autograd.grad(trl_loss, trl_logits)
    (g_ours,) = torch.autograd.grad(out.losses.mean(), ours_logits)
    torch.testing.assert_close(g_ours, g_trl, rtol=0, atol=1e-6)
    for name, ours in (("rewards/chosen", out.chosen_rewards), ("rewards/rejected", out.rejected_rewards)):
        assert ours.mean().item() == pytest.approx(trl_metrics[name], abs=1e-6)


class _KTOFusedHeadStub(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns per-token log-probs we choose, one
    tensor for the KL rows (recognised by their ``input_ids`` object) and one for the examples."""

    def __init__(self, kl_input_ids, per_token, kl_per_token) -> None:
        super().__init__()
        self.kl_input_ids, self.per_token, self.kl_per_token = kl_input_ids, per_token, kl_per_token

    def forward(self, *, input_ids, labels, fused_lm_head, **_):
        assert fused_lm_head
        logps = self.kl_per_token if input_ids is self.kl_input_ids else self.per_token
        zeros = torch.zeros(logps.shape)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)


@pytest.mark.trl
@pytest.mark.parametrize(("weights", "seed"), [((1.0, 1.0), 0), ((1.0, 1.5), 1), ((0.8, 1.0), 2)])
def test_kto_matches_trl(weights, seed):
    """TRL's KTOTrainer._compute_loss on chosen per-sequence log-probs: loss, gradient, kl and reward metrics."""
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    n, width = 6, 5
    g = torch.Generator().manual_seed(seed)
    desirable = torch.tensor([True, False, True, True, False, False])
    policy = -5 * torch.rand(n, generator=g, dtype=torch.float64)
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64)
    kl_policy = -5 * torch.rand(n, generator=g, dtype=torch.float64)
    kl_ref = kl_policy - 0.2 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    trl_in, ours_in = policy.clone().requires_grad_(True), policy.clone().requires_grad_(True)

    def per_token(x):  # (N,) -> (N, width - 1), the sequence log-prob on the first predicted position
        out = torch.zeros(n, width - 1, dtype=x.dtype)
        return out.index_put((torch.arange(n), torch.zeros(n, dtype=torch.long)), x)

    ones = torch.ones(n, width, dtype=torch.long)
    completion = ones.clone()
    completion[:, :2] = 0
    batch = {
        "input_ids": ones.clone(), "attention_mask": ones, "completion_mask": completion,
        "KL_input_ids": ones.clone(), "KL_attention_mask": ones, "KL_completion_mask": completion,
        "label": desirable, "ref_logps": ref, "ref_KL_logps": kl_ref,
    }  # fmt: skip
    model = _KTOFusedHeadStub(batch["KL_input_ids"], per_token(trl_in), per_token(kl_policy)).train()
    trainer = SimpleNamespace(
        model=model, accelerator=_FakeAccelerator(), calculate_KL=True, aux_loss_enabled=False,
        precompute_ref_logps=True, loss_type="kto", beta=0.1,
        desirable_weight=weights[0], undesirable_weight=weights[1],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._compute_kl_logps = functools.partial(kto_trainer.KTOTrainer._compute_kl_logps, trainer)
    trl_loss = kto_trainer.KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    z0 = kto_reference_point(kto_kl_estimate(kl_policy, kl_ref))
    out = kto_loss(ours_in, ref, desirable, z0, beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    torch.testing.assert_close(out.losses.mean(), trl_loss, rtol=0, atol=1e-10)
    (g_trl,) = torch.autograd.grad(trl_loss, trl_in)
    (g_ours,) = torch.autograd.grad(out.losses.mean(), ours_in)
    torch.testing.assert_close(g_ours, g_trl, rtol=0, atol=1e-10)

    chosen, rejected = out.rewards[desirable].mean(), out.rewards[~desirable].mean()
    ours_metrics = {
        "kl": z0,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": policy[desirable].mean(),
        "logps/rejected": policy[~desirable].mean(),
    }
    for name, value in ours_metrics.items():
        assert value.item() == pytest.approx(trl_metrics[name], abs=1e-6), name
