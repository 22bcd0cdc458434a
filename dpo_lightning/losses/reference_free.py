"""The reference-free pair losses of TRL's CPO/ORPO trainers (simpo, cpo, orpo) and NPO.
"""

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lightning.losses.base import (
    LabelSmoothing,
    LossOutput,
    PairLogps,
    Range,
    _as_tensor,
    _cdpo,
    _check_beta,
    _check_logps,
    _output,
    _per_token,
)
from dpo_lightning.losses.hparams import _check_hparams

# --------------------------------------------------------------------------------------------------------
# reference-free losses (TRL's CPOTrainer / ORPOTrainer): ref_* are ignored, rewards are beta * policy log-probs


def _chosen_nll(logps: PairLogps, sft_num_tokens: Tensor | float | None) -> Tensor:
    """-sum(c) / N, N = sum(Lc) or ``sft_num_tokens``: the token-mean NLL of the batch's chosen responses, ()."""
    chosen = logps.chosen
    if sft_num_tokens is None:
        num_tokens = logps.chosen_tokens.detach().to(chosen.dtype).sum()
    else:
        num_tokens = _as_tensor(sft_num_tokens, chosen)
    return -chosen.sum() / num_tokens.clamp(min=1.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012; TRL's ORPO ``log1mexp``)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo(
    logps: PairLogps,
    *,
    beta: float,
    simpo_gamma: Annotated[float, Range(0.0)] = 0.5,
    label_smoothing: LabelSmoothing = 0.0,
) -> LossOutput:
    """SimPO: the logistic loss on the length-averaged policy margin, minus a target margin gamma; no reference.

        loss = -(1 - eps) * ls(beta * (c/Lc - r/Lr) - gamma) - eps * ls(-(beta * (c/Lc - r/Lr) - gamma))

    TRL writes it as ``logits = (c/Lc - r/Lr) - gamma / beta`` and ``-ls(beta * logits)``: the same thing.
    beta scales the average log-prob into a reward (the paper uses 2 to 10, far above DPO's 0.1); gamma =
    ``simpo_gamma`` >= 0 is the reward margin the chosen response must win by (TRL default 0.5; the paper tunes
    gamma / beta in [0.3, 1.6]). Rewards are ``beta * c/Lc`` and ``beta * r/Lr``. ``ref_*`` are ignored.
    TRL's ``CPOConfig(loss_type="simpo")`` adds ``cpo_alpha`` (default 1.0) times the chosen NLL; the SimPO
    paper does not: that mix is ``compute_loss(["simpo", "sft"], ..., loss_weights=[1.0, cpo_alpha])``.
    Paper: Meng, Xia, Chen (2024), "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. 6. TRL: ``CPOTrainer`` with ``loss_type="simpo"``, ``simpo_gamma``.
    """
    _check_beta(beta)
    _check_hparams(simpo, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing)
    _check_logps(logps)
    chosen = _per_token(logps.chosen, logps.chosen_tokens)  # (B,) average log-prob per token
    rejected = _per_token(logps.rejected, logps.rejected_tokens)  # (B,)
    losses = _cdpo(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    return _output(losses, beta, chosen, rejected)


def cpo(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: LabelSmoothing = 0.0,
    cpo_alpha: Annotated[float, Range(0.0)] = 1.0,
    sft_num_tokens: Tensor | float | None = None,
) -> LossOutput:
    """CPO: DPO's logistic loss without the reference (summed log-probs), plus alpha times the chosen NLL.

        loss_j = -(1 - eps) * ls(beta * (c_j - r_j)) - eps * ls(-beta * (c_j - r_j)) + alpha * NLL
        NLL    = -sum_i c_i / N,    N = sum_i Lc_i (or ``sft_num_tokens``, as for ``sft``)

    The NLL is TRL's cross-entropy over all chosen response tokens of the batch, the same value for every
    pair (so the mean over pairs is TRL's ``losses.mean() + cpo_alpha * nll_loss``). alpha = ``cpo_alpha``
    (>= 0; TRL default 1.0; 0 leaves the preference term alone). beta plays DPO's role with a uniform reference.
    Rewards are ``beta * c`` and ``beta * r`` (summed log-probs). ``ref_*`` are ignored. Paper: Xu, Sharaf,
    Chen, Tan, Shen, Van Durme, Murray, Kim (2024), "Contrastive Preference Optimization: Pushing the
    Boundaries of LLM Performance in Machine Translation", arXiv:2401.08417, Eq. 3 and 6. TRL: ``CPOTrainer``
    with ``loss_type="sigmoid"``, ``cpo_alpha``.
    """
    _check_beta(beta)
    _check_hparams(cpo, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
    _check_logps(logps)
    losses = _cdpo(beta * (logps.chosen - logps.rejected), label_smoothing)  # (B,)
    if cpo_alpha:
        losses = losses + cpo_alpha * _chosen_nll(logps, sft_num_tokens)
    return _output(losses, beta, logps.chosen, logps.rejected)


def orpo(logps: PairLogps, *, beta: float, sft_num_tokens: Tensor | float | None = None) -> LossOutput:
    """ORPO: the chosen NLL plus lambda times the log-sigmoid of the log odds ratio; no reference.

    With the length-averaged log-probs a = c/Lc, b = r/Lr (so exp(a) is a per-token probability):

        log_odds = (a - b) - (log(1 - exp(a)) - log(1 - exp(b)))        (log odds(chosen) / odds(rejected))
        loss_j   = NLL - beta * ls(log_odds_j),    NLL = -sum_i c_i / N  (N = sum_i Lc_i or ``sft_num_tokens``)

    beta is the paper's lambda (TRL's ``ORPOConfig.beta``, default 0.1): the weight of the odds-ratio term
    against the NLL. Rewards are ``beta * a`` and ``beta * b``, as TRL logs them. The mean over pairs is TRL's
    ``nll_loss - losses.mean()``. One difference: TRL's ORPO NLL averages over the prompt *and* response
    tokens of the chosen rows; here, as in the paper's L_SFT and in CPO, over response tokens only (the
    log-probs here cover only the response). ``ref_*`` are ignored. Paper: Hong, Lee, Thorne (2024),
    "ORPO: Monolithic Preference Optimization without Reference Model", arXiv:2403.07691, Eq. 4-7.
    TRL: ``ORPOTrainer`` (``odds_ratio_loss``).
    """
    _check_beta(beta)
    _check_logps(logps)
    chosen = _per_token(logps.chosen, logps.chosen_tokens)  # (B,) average log-prob, < 0
    rejected = _per_token(logps.rejected, logps.rejected_tokens)  # (B,)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    losses = _chosen_nll(logps, sft_num_tokens) - beta * F.logsigmoid(log_odds)
    return _output(losses, beta, chosen, rejected)


def npo(logps: PairLogps, *, beta: float) -> LossOutput:
    """NPO: push the likelihood of undesirable responses down, relative to the reference, with a bounded loss.

    Uses only the rejected side: ``rejected``, ``ref_rejected`` (negative-only data has no chosen response,
    so ``chosen``, ``ref_chosen`` and ``chosen_tokens`` may be None and are ignored):

        loss = (2 / beta) * log(1 + (pi(y) / ref(y)) ** beta) = -(2 / beta) * ls(-beta * hr)

    Why not simply "subtract the negative loss", i.e. minimise log pi(y) (gradient ascent on the NLL of the
    undesirable response)? That objective is unbounded below: it is minimised by driving pi(y) to 0, and its
    gradient never fades, so it keeps pulling the model away from everything near y and degrades it quickly
    ("catastrophic collapse" in the paper). NPO is that loss seen through the reference: as beta -> 0 its
    gradient tends to the gradient-ascent one, but the loss is bounded below by 0 and each response's
    gradient is weighted by s(beta * hr), which vanishes once pi(y) is well below ref(y). beta sets how far
    below the reference a response must fall before it stops being pushed (2 / beta keeps the gradient scale
    of gradient ascent at the start, where hr = 0).

    Rewards: ``rejected_rewards = beta * hr``; ``chosen_rewards = beta * hc`` when ``chosen`` is given (e.g.
    paired data with ``["npo", "sft"]``, NPO plus a retain NLL), zeros otherwise. Paper: Zhang, Lin, Bai, Mei
    (2024), "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
    arXiv:2404.05868, Eq. 3. TRL: none (TRL has no NPO trainer).
    """
    _check_beta(beta)
    rejected = logps.rejected
    if rejected.dim() != 1:
        raise ValueError(f"log-probs must have shape (B,), got rejected of shape {tuple(rejected.shape)}")
    for name in ("ref_rejected", "chosen", "ref_chosen"):
        value = getattr(logps, name)
        if value is not None and value.shape != rejected.shape:
            raise ValueError(f"PairLogps.{name} has shape {tuple(value.shape)}, expected {tuple(rejected.shape)}")
    hr = rejected if logps.ref_rejected is None else rejected - logps.ref_rejected.detach()  # (B,)
    if logps.chosen is None:
        hc = torch.zeros_like(hr)
    else:
        hc = logps.chosen if logps.ref_chosen is None else logps.chosen - logps.ref_chosen.detach()
    return _output(-(2 / beta) * F.logsigmoid(-beta * hr), beta, hc, hr)
