"""The pair losses that compare the policy with a reference (TRL 1.x ``loss_type`` names)."""

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
    _logratios,
    _output,
    _per_token,
)
from dpo_lightning.losses.hparams import _check_hparams
from dpo_lightning.losses.statistics import kto_pair_batch_kl, rank_matched

# --------------------------------------------------------------------------------------------------------
# the losses (TRL 1.x ``loss_type`` names)


def sigmoid(logps: PairLogps, *, beta: float, label_smoothing: LabelSmoothing = 0.0) -> LossOutput:
    """DPO: the logistic (Bradley-Terry) loss on the margin, optionally label-smoothed (cDPO).

        loss = -(1 - eps) * ls(beta * D) - eps * ls(-beta * D),    eps = label_smoothing in [0, 0.5]

    Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", arXiv:2305.18290. Label smoothing: Mitchell (2023), "A note on
    DPO with noisy preferences & relationship to IPO" (cDPO). TRL name: ``sigmoid``. TRL 0.x applied
    ``label_smoothing`` here; TRL 1.x ignores it for ``sigmoid`` (both agree at the default 0).
    """
    _check_beta(beta)
    _check_hparams(sigmoid, label_smoothing=label_smoothing)
    hc, hr = _logratios(logps)
    return _output(_cdpo(beta * (hc - hr), label_smoothing), beta, hc, hr)


def hinge(logps: PairLogps, *, beta: float) -> LossOutput:
    """Hinge loss on the margin (SLiC / RSO):

        loss = max(0, 1 - beta * D)

    Zero once D >= 1 / beta. Papers: Zhao, Joshi, Liu, Khalman, Saleh, Liu (2023), "SLiC-HF: Sequence
    Likelihood Calibration with Human Feedback", arXiv:2305.10425; Liu et al. (2023), "Statistical Rejection
    Sampling Improves Preference Optimization", arXiv:2309.06657. TRL name: ``hinge``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    return _output(torch.relu(1 - beta * (hc - hr)), beta, hc, hr)


def ipo(logps: PairLogps, *, beta: float) -> LossOutput:
    """IPO: squared regression of the length-normalised margin onto 1 / (2 * beta).

        loss = (hc / Lc - hr / Lr - 1 / (2 * beta)) ** 2

    i.e. policy AND reference log-probs are divided by the response length, as TRL does ("confirmed with the
    IPO authors"); beta is the paper's tau. Paper: Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos
    (2023), "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, Eq. 17. TRL name: ``ipo``. Rewards stay beta * (summed) log-ratios, as TRL 1.x logs
    them (TRL 0.x logged the length-normalised ones for ipo).
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    margin = _per_token(hc, logps.chosen_tokens) - _per_token(hr, logps.rejected_tokens)  # (B,)
    return _output((margin - 1 / (2 * beta)) ** 2, beta, hc, hr)


def robust(
    logps: PairLogps, *, beta: float, label_smoothing: Annotated[float, Range(0.0, 0.5, high_open=True)] = 0.0
) -> LossOutput:
    """Robust DPO: an unbiased DPO loss under labels flipped with probability eps.

        loss = ((1 - eps) * -ls(beta * D) - eps * -ls(-beta * D)) / (1 - 2 * eps),    eps in [0, 0.5)

    Equals ``sigmoid`` when eps = 0. Paper: Chowdhury, Kini, Natarajan (2024), "Provably Robust DPO: Aligning
    Language Models with Noisy Feedback", arXiv:2403.00409. TRL name: ``robust``.
    """
    _check_beta(beta)
    _check_hparams(robust, label_smoothing=label_smoothing)
    hc, hr = _logratios(logps)
    margin = beta * (hc - hr)  # (B,)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
    return _output(losses, beta, hc, hr)


def exo_pair(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: Annotated[
        float, Range(0.0, 1.0, low_open=True, high_open=True, note="required; the EXO paper recommends 1e-3")
    ] = 0.0,
) -> LossOutput:
    """EXO (pairwise): reverse KL from the label distribution (1 - eps, eps) to softmax(beta * (hc, hr)).

        loss = s(beta * D) * (ls(beta * D) - log(1 - eps)) + s(-beta * D) * (ls(-beta * D) - log(eps))

    eps = label_smoothing must be in (0, 1); the paper recommends 1e-3 (TRL 1.x raises for 0, TRL 0.x silently
    replaced 0 by 1e-3). Paper: Ji, Zhou, Cheng, Hu, Zhang, Wang, Zhang, Huang, Wu, Sun (2024), "Towards
    Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856, Eq. 16.
    TRL name: ``exo_pair``.
    """
    _check_beta(beta)
    _check_hparams(exo_pair, label_smoothing=label_smoothing)
    hc, hr = _logratios(logps)
    margin = beta * (hc - hr)  # (B,)
    eps = label_smoothing
    losses = torch.sigmoid(margin) * (F.logsigmoid(margin) - math.log1p(-eps)) + torch.sigmoid(-margin) * (
        F.logsigmoid(-margin) - math.log(eps)
    )
    return _output(losses, beta, hc, hr)


def nca_pair(logps: PairLogps, *, beta: float) -> LossOutput:
    """NCA (pairwise): absolute, not only relative, likelihood of the chosen response.

        loss = -ls(beta * hc) - 0.5 * ls(-beta * hc) - 0.5 * ls(-beta * hr)

    Paper: Chen, He, Yuan, Chen, Cai, Dong, Zhu (2024), "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369. TRL name: ``nca_pair``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    losses = -F.logsigmoid(beta * hc) - 0.5 * F.logsigmoid(-beta * hc) - 0.5 * F.logsigmoid(-beta * hr)
    return _output(losses, beta, hc, hr)


def bco_pair(logps: PairLogps, *, beta: float, bco_delta: Tensor | float | None = None) -> LossOutput:
    """BCO (pairwise): binary classification of chosen vs rejected rewards around a baseline delta.

        loss = -ls(beta * hc - delta) - ls(-(beta * hr - delta))

    ``bco_delta`` is the reward baseline (a batch statistic, detached). Omitted, delta = 0, which is what
    TRL 1.16's ``bco_pair`` computes (it has no baseline) and what ``DPOModule`` trains with: it passes no
    ``bco_delta``. TRL 0.x and the paper use a running mean of the batch rewards; that is not implemented
    here, but a caller can keep it, update it with ``bco_batch_reward_mean`` and pass it. Paper: Jung, Park,
    Lee, Kim, Kim, Yoo (2024), "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656. TRL name: ``bco_pair``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    delta = _as_tensor(0.0 if bco_delta is None else bco_delta, hc)  # () or (B,)
    losses = -F.logsigmoid(beta * hc - delta) - F.logsigmoid(-(beta * hr - delta))
    return _output(losses, beta, hc, hr)


def sppo_hard(logps: PairLogps, *, beta: float) -> LossOutput:
    """SPPO with hard labels (winner probability 1, loser 0):

        loss = (hc - 1 / (2 * beta)) ** 2 + (hr + 1 / (2 * beta)) ** 2

    Paper: Wu, Sun, Yuan, Ji, Yang, Gu (2024), "Self-Play Preference Optimization for Language Model
    Alignment", arXiv:2405.00675 (Eq. 4.7 with P = 1 / 0). TRL name: ``sppo_hard``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    losses = (hc - 0.5 / beta) ** 2 + (hr + 0.5 / beta) ** 2
    return _output(losses, beta, hc, hr)


def apo_zero(logps: PairLogps, *, beta: float) -> LossOutput:
    """APO-zero: push the chosen likelihood up and the rejected one down, each on its own.

        loss = (1 - s(beta * hc)) + s(beta * hr)

    For when the chosen responses are better than the model's own outputs. Paper: D'Oosterlinck, Xu,
    Develder, Demeester, Singh, Potts, Kiela, Mehri (2024), "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266, Eq. 7. TRL name: ``apo_zero``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    return _output(1 - torch.sigmoid(beta * hc) + torch.sigmoid(beta * hr), beta, hc, hr)


def apo_down(logps: PairLogps, *, beta: float) -> LossOutput:
    """APO-down: push the chosen likelihood down, and the rejected one down further.

        loss = s(beta * hc) + (1 - s(beta * D))

    For when the chosen responses are worse than the model's own outputs. Paper: D'Oosterlinck et al. (2024),
    arXiv:2408.06266, Eq. 8. TRL name: ``apo_down``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    return _output(torch.sigmoid(beta * hc) + 1 - torch.sigmoid(beta * (hc - hr)), beta, hc, hr)


def aot(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: LabelSmoothing = 0.0,
    aot_ref_matched: Tensor | None = None,
) -> LossOutput:
    """AOT (paired): first-order stochastic dominance of the policy margin over the reference margin.

    With x = c - r (policy) and y = rc - rr (reference), sort both over the batch and pair the i-th smallest:

        loss_i = -(1 - eps) * ls(beta * (x_(i) - y_(i))) - eps * ls(-beta * (x_(i) - y_(i)))

    Here entry j is the term of pair j's x, i.e. y_(i) is replaced by ``aot_ref_matched[j]`` = the reference
    margin with the same rank as x_j (``rank_matched(x, y)``). That is a permutation of TRL's sorted-order
    vector: same mean, same gradients. Omitted, the ranks are taken within this batch, as TRL does; pass a
    cross-rank value to sort the global batch. Paper: Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin,
    Greenewald, Navratil, Ross (2024), "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882. TRL name: ``aot``.
    """
    _check_beta(beta)
    _check_hparams(aot, label_smoothing=label_smoothing)
    hc, hr = _logratios(logps)
    policy_margin = logps.chosen - logps.rejected  # (B,)
    if aot_ref_matched is None:
        if logps.ref_chosen is None or logps.ref_rejected is None:
            ref_margin = torch.zeros_like(policy_margin)
        else:
            ref_margin = logps.ref_chosen - logps.ref_rejected
        aot_ref_matched = rank_matched(policy_margin, ref_margin)  # (B,)
    losses = _cdpo(beta * (policy_margin - aot_ref_matched.detach()), label_smoothing)
    return _output(losses, beta, hc, hr)


def aot_unpaired(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: LabelSmoothing = 0.0,
    aot_chosen_matched: Tensor | None = None,
    aot_rejected_matched: Tensor | None = None,
) -> LossOutput:
    """AOT (unpaired): stochastic dominance of the chosen log-ratios over the rejected ones.

    Sort hc and hr over the batch separately and pair the i-th smallest:

        loss_i = -(1 - eps) * ls(beta * (hc_(i) - hr_(i))) - eps * ls(-beta * (hc_(i) - hr_(i)))

    Entry j is the term of pair j's chosen response: its value uses ``aot_rejected_matched[j]`` (the rejected
    log-ratio of the same rank as hc_j), and the rejected response's gradient is added through a zero-valued
    term built with ``aot_chosen_matched[j]`` (the chosen log-ratio of the same rank as hr_j). The vector is a
    permutation of TRL's sorted one: same mean, same gradients. Omitted, ranks are taken within this batch, as
    TRL does. Paper: Melnyk et al. (2024), arXiv:2406.05882.
    TRL name: ``aot_unpaired`` (``aot_pair`` in TRL 0.x).
    """
    _check_beta(beta)
    _check_hparams(aot_unpaired, label_smoothing=label_smoothing)
    if (aot_chosen_matched is None) != (aot_rejected_matched is None):
        raise ValueError("aot_unpaired needs both aot_chosen_matched and aot_rejected_matched, or neither")
    hc, hr = _logratios(logps)
    if aot_chosen_matched is None or aot_rejected_matched is None:
        aot_rejected_matched = rank_matched(hc, hr)  # (B,) rejected log-ratio with hc_j's rank
        aot_chosen_matched = rank_matched(hr, hc)  # (B,) chosen log-ratio with hr_j's rank
    chosen_side = _cdpo(beta * (hc - aot_rejected_matched.detach()), label_smoothing)  # value + grad to hc
    rejected_side = _cdpo(beta * (aot_chosen_matched.detach() - hr), label_smoothing)  # grad to hr
    losses = chosen_side + (rejected_side - rejected_side.detach())
    return _output(losses, beta, hc, hr)


def discopop(
    logps: PairLogps, *, beta: float, discopop_tau: Annotated[float, Range(0.0, math.inf, low_open=True)] = 0.05
) -> LossOutput:
    """DiscoPOP: a log-ratio-modulated blend of the logistic and exponential losses (found by LLM search).

        m = beta * D,    w = s(m / tau)
        loss = (1 - w) * -ls(m) + w * exp(-m)

    tau = ``discopop_tau`` > 0 (paper and TRL default 0.05). Paper: Chris Lu, Holt, Fanconi, Chan, Foerster,
    van der Schaar, Lange (2024), "Discovering Preference Optimization Algorithms with and for Large Language
    Models", arXiv:2406.08414, Eq. 5. TRL name: ``discopop``.
    """
    _check_beta(beta)
    _check_hparams(discopop, discopop_tau=discopop_tau)
    hc, hr = _logratios(logps)
    margin = beta * (hc - hr)  # (B,)
    weight = torch.sigmoid(margin / discopop_tau)
    losses = (1 - weight) * -F.logsigmoid(margin) + weight * torch.exp(-margin)
    return _output(losses, beta, hc, hr)


def sigmoid_norm(logps: PairLogps, *, beta: float) -> LossOutput:
    """Length-normalised DPO: the logistic loss on the per-token margin.

        loss = -ls(beta * (hc / Lc - hr / Lr))

    Still uses the reference (unlike SimPO, which also drops it and adds a margin). Length normalisation as in
    Meng, Xia, Chen (2024), "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734. TRL name: ``sigmoid_norm`` (TRL >= 1.x, PR #5406).
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    margin = _per_token(hc, logps.chosen_tokens) - _per_token(hr, logps.rejected_tokens)  # (B,)
    return _output(-F.logsigmoid(beta * margin), beta, hc, hr)


def sft(logps: PairLogps, *, beta: float, sft_num_tokens: Tensor | float | None = None) -> LossOutput:
    """SFT / NLL on the chosen responses, token-averaged over the batch and repeated for every pair.

        loss_j = -sum_i c_i / N    for every j,    N = sum_i Lc_i (or ``sft_num_tokens``)

    This is TRL's cross-entropy over all chosen response tokens of the batch, expanded to (B,).
    ``sft_num_tokens`` (a batch statistic, detached) replaces the local token count N; with DDP averaging
    gradients over W ranks, passing (global chosen tokens) / W makes the mean over ranks the global token
    mean. ``DPOModule`` passes none: each rank (and each accumulated micro-batch) divides by its own chosen
    token count, as TRL does per device. beta only scales the rewards. RPO is
    ``compute_loss(["sigmoid", "sft"], ..., loss_weights=[1.0, alpha])``.
    Paper: Pang, Yuan, Cho, He, Sukhbaatar, Weston (2024), "Iterative Reasoning Preference Optimization",
    arXiv:2404.19733. TRL name: ``sft``.
    """
    _check_beta(beta)
    hc, hr = _logratios(logps)
    chosen = logps.chosen  # (B,)
    if sft_num_tokens is None:
        num_tokens = logps.chosen_tokens.detach().to(chosen.dtype).sum()
    else:
        num_tokens = _as_tensor(sft_num_tokens, chosen)
    nll = -chosen.sum() / num_tokens.clamp(min=1.0)  # ()
    return _output(nll.expand(chosen.shape[0]), beta, hc, hr)


def kto_pair(
    logps: PairLogps,
    *,
    beta: float,
    chosen_kl: Tensor | float | None = None,
    rejected_kl: Tensor | float | None = None,
) -> LossOutput:
    """Paired KTO (TRL 0.x / LLaMA-Factory ``kto_pair``), one value per pair.

        KLc = max(0, mean(hc)),    KLr = max(0, mean(hr))        (batch estimates, detached)
        loss_j = 0.5 * [(1 - s(beta * (hc_j - KLr))) + (1 - s(beta * (KLc - hr_j)))]

    The chosen term is anchored at the KL estimated on the rejected half and vice versa, as in TRL 0.x.
    TRL 0.x returned the 2B values [chosen terms, rejected terms]; the per-pair average here has the same
    mean. TRL 0.x also let gradients flow through the KL means; they are detached here, as in the KTO paper
    and TRL's KTOTrainer. ``chosen_kl``/``rejected_kl`` replace the batch means (e.g. cross-rank means from
    ``kto_pair_batch_kl``); they are clamped at 0 here. Paper: Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela
    (2024), "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306.
    TRL name: ``kto_pair`` (TRL 0.x; removed later in favour of KTOTrainer).
    """
    _check_beta(beta)
    if (chosen_kl is None) != (rejected_kl is None):
        raise ValueError("kto_pair needs both chosen_kl and rejected_kl, or neither")
    hc, hr = _logratios(logps)
    if chosen_kl is None or rejected_kl is None:
        chosen_kl, rejected_kl = kto_pair_batch_kl(logps)
    kl_c = _as_tensor(chosen_kl, hc).clamp(min=0)  # ()
    kl_r = _as_tensor(rejected_kl, hc).clamp(min=0)  # ()
    chosen_term = 1 - torch.sigmoid(beta * (hc - kl_r))  # (B,)
    rejected_term = 1 - torch.sigmoid(beta * (kl_c - hr))  # (B,)
    return _output(0.5 * (chosen_term + rejected_term), beta, hc, hr)
