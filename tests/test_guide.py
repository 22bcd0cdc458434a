"""The maths of docs/guide.md, checked against the library and autograd.

Notation as in the guide and ``losses.py``: c, r policy log-probs of the chosen / rejected
response, rc, rr the reference's, hc = c - rc, hr = r - rr, D = hc - hr, s = sigmoid.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_lightning.losses import PairLogps, compute_loss, ipo, npo, sigmoid
from dpo_lightning.models.logprobs import sequence_logps

s = torch.sigmoid


def _pairs(b: int = 6, seed: int = 0) -> tuple[PairLogps, list[torch.Tensor]]:
    """Random per-sequence log-probs in float64, every tensor a leaf that records its gradient."""
    g = torch.Generator().manual_seed(seed)
    c, r, rc, rr = (-20 * torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4))
    leaves = [t.requires_grad_() for t in (c, r, rc, rr)]
    tokens = torch.randint(1, 12, (2, b), generator=g).double()
    return PairLogps(c, r, rc, rr, tokens[0], tokens[1]), leaves


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_dpo_gradient_is_the_weighted_difference(beta):
    """Guide: dL/dc = -beta s(-beta D), dL/dr = +beta s(-beta D), and nothing reaches the reference.

    s(-beta D) = s(rhat_rejected - rhat_chosen): how wrong the implicit reward is on this pair.
    """
    logps, (c, r, rc, rr) = _pairs()
    sigmoid(logps, beta=beta).losses.sum().backward()
    D = ((c - rc) - (r - rr)).detach()
    weight = s(-beta * D)
    torch.testing.assert_close(c.grad, -beta * weight)
    torch.testing.assert_close(r.grad, beta * weight)
    assert rc.grad is None and rr.grad is None  # the reference is a constant


def test_gradient_weight_is_one_half_at_the_start_and_fades_when_the_pair_is_won():
    """Guide: at step 0 (policy = reference) every pair has weight 1/2; a pair ranked right by a wide
    margin contributes almost nothing, one ranked wrong close to the full beta."""
    beta = 0.1
    for margin, weight in ((0.0, 0.5), (100.0, s(torch.tensor(-10.0)).item()), (-100.0, s(torch.tensor(10.0)).item())):
        c = torch.tensor([margin], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        sigmoid(PairLogps(c, zero, zero, zero, zero + 1, zero + 1), beta=beta).losses.sum().backward()
        assert c.grad.item() == pytest.approx(-beta * weight)
    assert s(torch.tensor(-10.0)).item() < 5e-5


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_gradient_and_its_finite_target(eps):
    """Guide: cDPO's dL/dc = -beta [(1 - eps) s(-beta D) - eps s(beta D)], zero at D* = ln((1 - eps) / eps) / beta."""
    beta = 0.1
    logps, (c, r, rc, rr) = _pairs()
    sigmoid(logps, beta=beta, label_smoothing=eps).losses.sum().backward()
    D = ((c - rc) - (r - rr)).detach()
    torch.testing.assert_close(c.grad, -beta * ((1 - eps) * s(-beta * D) - eps * s(beta * D)))
    torch.testing.assert_close(r.grad, -c.grad)

    target = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    sigmoid(PairLogps(target, zero, zero, zero, zero + 1, zero + 1), beta=beta, label_smoothing=eps).losses.backward()
    assert abs(target.grad.item()) < 1e-12


def test_ipo_gradient_regresses_onto_one_over_two_beta():
    """Guide: IPO's dL/dc = 2 (m - 1/(2 beta)) / Lc with m = hc/Lc - hr/Lr; zero once m = 1/(2 beta)."""
    beta = 0.1
    logps, (c, r, rc, rr) = _pairs()
    ipo(logps, beta=beta).losses.sum().backward()
    lc, lr = logps.chosen_tokens, logps.rejected_tokens
    m = ((c - rc) / lc - (r - rr) / lr).detach()
    torch.testing.assert_close(c.grad, 2 * (m - 1 / (2 * beta)) / lc)
    torch.testing.assert_close(r.grad, -2 * (m - 1 / (2 * beta)) / lr)


def test_npo_gradient_is_gradient_ascent_times_a_fading_weight():
    """Guide: minimising log pi(y) (gradient ascent on the NLL) has dL/dr = 1 whatever pi(y) is;
    NPO has dL/dr = 2 s(beta hr): 1 where pi = ref, -> 0 once pi(y) << ref(y); the loss is >= 0."""
    beta = 0.1
    logps, (c, r, rc, rr) = _pairs()
    out = npo(logps, beta=beta)
    out.losses.sum().backward()
    hr = (r - rr).detach()
    torch.testing.assert_close(r.grad, 2 * s(beta * hr))
    assert (out.losses >= 0).all()

    far_below = torch.tensor([-500.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    npo(PairLogps(zero, far_below, zero, zero, zero + 1, zero + 1), beta=beta).losses.backward()
    assert far_below.grad.item() < 1e-20  # the unbounded loss would still push with gradient 1


def test_parameter_gradient_of_a_model_equals_the_guide_formula():
    """On a tiny model: grad_theta L = -(beta / B) sum_i s(-beta D_i) (grad c_i - grad r_i), the
    gradient of the surrogate with the weights held constant; the reference gets no gradient."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    policy = LlamaForCausalLM(config).double()
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # move the policy off the reference so the weights differ per pair
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b, t, beta = 3, 8, 0.5
    ids = torch.randint(0, 16, (2 * b, t))
    labels = ids.clone()
    labels[:, :3] = -100  # a 3-token prompt

    def logps_of(model):
        return sequence_logps(model(input_ids=ids).logits, labels).logps  # (2B,)

    with torch.no_grad():
        ref = logps_of(reference)
    pol = logps_of(policy)
    pair = PairLogps(pol[:b], pol[b:], ref[:b], ref[b:], torch.ones(b), torch.ones(b))
    loss = compute_loss("sigmoid", pair, beta=beta).losses.mean()
    params = [p for p in policy.parameters()]
    autograd = torch.autograd.grad(loss, params, retain_graph=True)

    D = ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:])).detach()
    surrogate = -(beta / b) * (s(-beta * D) * (pol[:b] - pol[b:])).sum()
    formula = torch.autograd.grad(surrogate, params)
    for a, f in zip(autograd, formula):
        torch.testing.assert_close(a, f)
    assert all(p.grad is None for p in reference.parameters())


def test_closed_form_optimum_and_what_beta_does():
    """Guide, on a discrete toy (K responses to one prompt):

    - pi* = ref exp(r / beta) / Z maximises E_pi[r] - beta KL(pi || ref) (no perturbation does better);
    - r = beta log(pi* / ref) + beta log Z, so Bradley-Terry on implicit rewards equals Bradley-Terry on r;
    - a LARGER beta keeps pi* CLOSER to the reference (KL falls monotonically), the opposite of
      "high beta = aggressive".
    """
    g = torch.Generator().manual_seed(0)
    k = 12
    ref = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    reward = torch.randn(k, generator=g, dtype=torch.float64)

    def objective(pi, beta):
        return (pi * reward).sum() - beta * (pi * (pi / ref).log()).sum()

    kls = []
    for beta in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
        pi_star = ref * torch.exp(reward / beta)
        log_z = torch.log(pi_star.sum())
        pi_star = pi_star / pi_star.sum()
        best = objective(pi_star, beta)
        for _ in range(50):
            other = torch.softmax(pi_star.log() + 0.1 * torch.randn(k, generator=g, dtype=torch.float64), 0)
            assert objective(other, beta) < best
        implicit = beta * (pi_star / ref).log()
        torch.testing.assert_close(implicit + beta * log_z, reward)
        i, j = 0, 1
        torch.testing.assert_close(s(implicit[i] - implicit[j]), s(reward[i] - reward[j]))
        kls.append((pi_star * (pi_star / ref).log()).sum().item())
    assert all(a > b for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.01 < 1.0 < kls[0]


def test_dpo_loss_is_bradley_terry_on_implicit_rewards():
    """Guide: L = -log s(rhat_w - rhat_l), rhat = beta (log pi - log ref), the returned rewards."""
    logps, _ = _pairs()
    out = sigmoid(logps, beta=0.1)
    torch.testing.assert_close(out.losses, -F.logsigmoid(out.chosen_rewards - out.rejected_rewards).detach(),
                               check_dtype=False)
    assert out.losses.detach().sub(math.log(2)).abs().max() > 0  # not trivially ln 2
