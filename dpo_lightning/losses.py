"""Preference losses: per-sequence log-probs ``(B,)`` -> per-pair losses ``(B,)`` + detached rewards.

Every function here is pure: no model calls, no reduction over the batch, no distributed code, no state.
A loss is chosen by name through ``LOSSES`` (names and formulas follow TRL 1.x ``DPOConfig.loss_type``);
``compute_loss`` sums a weighted list of them, as TRL does for ``loss_type=[...]`` with ``loss_weights``.
Each loss's user hyper-parameters (besides beta) are declared, with defaults and valid intervals, in
``LOSS_HPARAMS``; ``check_loss_config`` validates a whole configuration against it before any model is
loaded (unknown names, unused or misspelled hyper-parameters, out-of-range values) and returns the
``LossConfig`` that ``compute_loss`` applies.

Notation used in the docstrings (all tensors are ``(B,)``, one entry per preference pair):

    c, r      policy log-prob of the chosen / rejected response (sum over response tokens)
    rc, rr    reference log-prob of the same responses (treated as constants; detached here)
    Lc, Lr    number of response tokens of the chosen / rejected response (clamped at >= 1 where divided by)
    hc = c - rc, hr = r - rr          chosen / rejected log-ratios
    D  = hc - hr                      the DPO margin
    s(x) = sigmoid(x),  ls(x) = log sigmoid(x)

When ``ref_chosen``/``ref_rejected`` are ``None`` the losses below are reference-free: ``hc = c`` and
``hr = r`` (TRL 0.x's ``reference_free=True``, a reference that gives every response the same probability).

Rewards are ``beta * hc`` and ``beta * hr``, detached, with the raw (summed) log-ratios, as TRL 1.x
logs them for every ``loss_type`` (including ``ipo`` and ``sigmoid_norm``, whose *loss* is length-normalised).
The reference-free losses of TRL's CPO/ORPO trainers (``simpo``, ``cpo``, ``orpo``; see ``REFERENCE_FREE``)
ignore ``ref_*`` and return beta times the policy log-probs those trainers log (length-averaged for
``simpo`` and ``orpo``). ``npo`` reads only the rejected side. KTO on unpaired data is not a pair loss: it
has its own function, ``kto_loss``, with the helpers ``kto_kl_estimate``, ``kto_reference_point`` and
``kto_weight_warning``.

A few methods are defined on batch statistics (KTO's KL reference point, BCO's reward baseline, the token
mean of the SFT term, AOT's sorting). Each takes that statistic as an optional keyword argument (named in
``BATCH_STATISTICS``; these are not hyper-parameters and cannot be configured) so a module can pass an exact
cross-rank value; when it is omitted the local batch is used, as TRL does (for ``bco_pair``: delta = 0, as
TRL 1.16). The helpers ``kto_pair_batch_kl``, ``bco_batch_reward_mean`` and ``rank_matched`` compute them.
"""

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BATCH_STATISTICS",
    "HParam",
    "KTOOutput",
    "LOSSES",
    "LOSS_HPARAMS",
    "LossConfig",
    "LossFn",
    "LossOutput",
    "PairLogps",
    "REFERENCE_FREE",
    "UNPAIRED_LOSSES",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_batch_reward_mean",
    "bco_pair",
    "bradley_terry_loss",
    "check_loss_config",
    "compute_loss",
    "cpo",
    "discopop",
    "exo_pair",
    "get_loss_fn",
    "hinge",
    "hparam_names",
    "ipo",
    "kto_kl_estimate",
    "kto_loss",
    "kto_pair",
    "kto_pair_batch_kl",
    "kto_reference_point",
    "kto_weight_warning",
    "nca_pair",
    "npo",
    "orpo",
    "rank_matched",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "statistic_names",
]


class PairLogps(NamedTuple):
    """Per-sequence log-probs of a batch of B preference pairs."""

    chosen: Tensor  # (B,) policy, sum of response-token log-probs
    rejected: Tensor  # (B,)
    ref_chosen: Tensor | None  # (B,) reference; None for reference-free use
    ref_rejected: Tensor | None  # (B,)
    chosen_tokens: Tensor  # (B,) response token counts (float or long)
    rejected_tokens: Tensor  # (B,)


class LossOutput(NamedTuple):
    """Per-pair losses (not reduced) and the detached implicit rewards."""

    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


LossFn = Callable[..., LossOutput]


# --------------------------------------------------------------------------------------------------------
# shared pieces


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


class HParam(NamedTuple):
    """A user hyper-parameter of a loss (an entry of ``LOSS_HPARAMS``): its default and its valid interval.

    A bound is excluded where ``low_open``/``high_open`` say so, and always when it is infinite, so a valid
    value is finite. ``note`` is added to the error message (e.g. the value a paper recommends).
    """

    default: float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def interval(self) -> str:
        """The valid values in interval notation, e.g. ``[0.0, 0.5)``."""
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{left}{self.low}, {self.high}{right}"

    def check(self, loss: str, name: str, value: object) -> float:
        """``value`` as a float if it lies in the interval; ValueError naming loss, hyper-parameter and interval."""
        note = f" ({self.note})" if self.note else ""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"loss {loss!r} needs {name} to be a number in {self.interval()}{note}, got {value!r}")
        x = float(value)
        above = self.low < x if self.low_open or math.isinf(self.low) else self.low <= x
        below = x < self.high if self.high_open or math.isinf(self.high) else x <= self.high
        if not (above and below):  # NaN fails both
            raise ValueError(f"loss {loss!r} needs {name} in {self.interval()}{note}, got {value!r}")
        return x


def _check_hparams(loss: str, **values: object) -> None:
    """Check a loss function's hyper-parameters against its declaration in ``LOSS_HPARAMS``."""
    for name, value in values.items():
        LOSS_HPARAMS[loss][name].check(loss, name, value)


def _check_logps(logps: PairLogps) -> None:
    shape = logps.chosen.shape
    if len(shape) != 1:
        raise ValueError(f"log-probs must have shape (B,), got chosen of shape {tuple(shape)}")
    if (logps.ref_chosen is None) != (logps.ref_rejected is None):
        raise ValueError("ref_chosen and ref_rejected must both be tensors or both be None")
    for name in PairLogps._fields:
        value = getattr(logps, name)
        if value is not None and value.shape != shape:
            raise ValueError(f"PairLogps.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def _logratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """(hc, hr): policy minus reference log-probs; the reference is a constant (detached)."""
    _check_logps(logps)
    if logps.ref_chosen is None or logps.ref_rejected is None:
        return logps.chosen, logps.rejected
    return logps.chosen - logps.ref_chosen.detach(), logps.rejected - logps.ref_rejected.detach()  # (B,)


def _output(losses: Tensor, beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> LossOutput:
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def _per_token(x: Tensor, tokens: Tensor) -> Tensor:
    return x / tokens.detach().to(x.dtype).clamp(min=1.0)  # (B,)


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()


def _cdpo(margin: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) * ls(m) - eps * ls(-m): the conservative (label-smoothed) logistic loss."""
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


# --------------------------------------------------------------------------------------------------------
# statistics the module may compute across ranks and pass in


def kto_pair_batch_kl(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """Batch KL estimates for ``kto_pair``: (mean(c - rc), mean(r - rr)), detached, 0-dim, NOT clamped.

    Across ranks with equal per-rank batch sizes, average these over ranks and pass them as
    ``chosen_kl``/``rejected_kl``; ``kto_pair`` clamps them at 0 itself.
    """
    chosen_logratios, rejected_logratios = _logratios(logps)
    return chosen_logratios.detach().mean(), rejected_logratios.detach().mean()


def bco_batch_reward_mean(logps: PairLogps, *, beta: float) -> Tensor:
    """Mean implicit reward of the batch, mean(cat(beta * hc, beta * hr)), detached, 0-dim.

    This is what TRL 0.x fed into its ``RunningMoments`` each step to get BCO's baseline ``delta``; a caller
    that wants that behaviour keeps the running mean itself and passes it as ``bco_delta``. ``DPOModule``
    does not: it passes no ``bco_delta``, so ``bco_pair`` trains with delta = 0, as TRL 1.16 does.
    """
    _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(logps)
    return (beta * torch.cat((chosen_logratios, rejected_logratios))).detach().mean()


def rank_matched(values: Tensor, targets: Tensor) -> Tensor:
    """For each ``values[i]``, the element of ``targets`` of equal rank: sorted(targets)[rank(values[i])].

    Both are ``(N,)``. Pairing the i-th smallest of ``values`` with the i-th smallest of ``targets`` is what
    AOT's sort does. A module running on several ranks gathers ``values``/``targets`` of all ranks (detached),
    calls this, and keeps its own slice as ``aot_ref_matched`` / ``aot_chosen_matched`` /
    ``aot_rejected_matched``. The result is detached.
    """
    if values.shape != targets.shape or values.dim() != 1:
        raise ValueError(
            "values and targets must be (N,) of equal shape, "
            f"got {tuple(values.shape)} and {tuple(targets.shape)}"
        )
    values, targets = values.detach(), targets.detach()
    order = torch.argsort(values)  # (N,) positions of values in ascending order
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)  # (N,) rank of each value
    return torch.sort(targets).values[ranks]  # (N,)


# --------------------------------------------------------------------------------------------------------
# the losses (TRL 1.x ``loss_type`` names)


def sigmoid(logps: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO: the logistic (Bradley-Terry) loss on the margin, optionally label-smoothed (cDPO).

        loss = -(1 - eps) * ls(beta * D) - eps * ls(-beta * D),    eps = label_smoothing in [0, 0.5]

    Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", arXiv:2305.18290. Label smoothing: Mitchell (2023), "A note on
    DPO with noisy preferences & relationship to IPO" (cDPO). TRL name: ``sigmoid``. TRL 0.x applied
    ``label_smoothing`` here; TRL 1.x ignores it for ``sigmoid`` (both agree at the default 0).
    """
    _check_beta(beta)
    _check_hparams("sigmoid", label_smoothing=label_smoothing)
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


def robust(logps: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO: an unbiased DPO loss under labels flipped with probability eps.

        loss = ((1 - eps) * -ls(beta * D) - eps * -ls(-beta * D)) / (1 - 2 * eps),    eps in [0, 0.5)

    Equals ``sigmoid`` when eps = 0. Paper: Chowdhury, Kini, Natarajan (2024), "Provably Robust DPO: Aligning
    Language Models with Noisy Feedback", arXiv:2403.00409. TRL name: ``robust``.
    """
    _check_beta(beta)
    _check_hparams("robust", label_smoothing=label_smoothing)
    hc, hr = _logratios(logps)
    margin = beta * (hc - hr)  # (B,)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
    return _output(losses, beta, hc, hr)


def exo_pair(logps: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """EXO (pairwise): reverse KL from the label distribution (1 - eps, eps) to softmax(beta * (hc, hr)).

        loss = s(beta * D) * (ls(beta * D) - log(1 - eps)) + s(-beta * D) * (ls(-beta * D) - log(eps))

    eps = label_smoothing must be in (0, 1); the paper recommends 1e-3 (TRL 1.x raises for 0, TRL 0.x silently
    replaced 0 by 1e-3). Paper: Ji, Zhou, Cheng, Hu, Zhang, Wang, Zhang, Huang, Wu, Sun (2024), "Towards
    Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856, Eq. 16.
    TRL name: ``exo_pair``.
    """
    _check_beta(beta)
    _check_hparams("exo_pair", label_smoothing=label_smoothing)
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
    label_smoothing: float = 0.0,
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
    _check_hparams("aot", label_smoothing=label_smoothing)
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
    label_smoothing: float = 0.0,
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
    _check_hparams("aot_unpaired", label_smoothing=label_smoothing)
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


def discopop(logps: PairLogps, *, beta: float, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP: a log-ratio-modulated blend of the logistic and exponential losses (found by LLM search).

        m = beta * D,    w = s(m / tau)
        loss = (1 - w) * -ls(m) + w * exp(-m)

    tau = ``discopop_tau`` > 0 (paper and TRL default 0.05). Paper: Chris Lu, Holt, Fanconi, Chan, Foerster,
    van der Schaar, Lange (2024), "Discovering Preference Optimization Algorithms with and for Large Language
    Models", arXiv:2406.08414, Eq. 5. TRL name: ``discopop``.
    """
    _check_beta(beta)
    _check_hparams("discopop", discopop_tau=discopop_tau)
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
    logps: PairLogps, *, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0
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
    _check_hparams("simpo", simpo_gamma=simpo_gamma, label_smoothing=label_smoothing)
    _check_logps(logps)
    chosen = _per_token(logps.chosen, logps.chosen_tokens)  # (B,) average log-prob per token
    rejected = _per_token(logps.rejected, logps.rejected_tokens)  # (B,)
    losses = _cdpo(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    return _output(losses, beta, chosen, rejected)


def cpo(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
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
    _check_hparams("cpo", label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
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


# --------------------------------------------------------------------------------------------------------
# KTO on unpaired data: one completion per example, labelled desirable or not (not in LOSSES: not pairs)


class KTOOutput(NamedTuple):
    """Per-example KTO losses (not reduced) and the detached implicit rewards."""

    losses: Tensor  # (N,)
    rewards: Tensor  # (N,) beta * (policy - reference), detached


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    desirable: Tensor,
    kl_ref: Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO: a prospect-theoretic value of each completion's implicit reward, relative to a KL reference point.

    With ``h = policy_logps - ref_logps`` (N,) (summed over completion tokens) and z0 = ``kl_ref``:

        desirable:    loss = w_D * (1 - s(beta * (h - z0)))
        undesirable:  loss = w_U * (1 - s(beta * (z0 - h)))

    z0 estimates KL(policy || reference) on *mismatched* prompt/completion pairs of the batch; it is a
    constant here (detached, and clamped at 0 like TRL). The module gets it from ``kto_kl_estimate`` (local
    sum and count), all-reduces both over ranks and calls ``kto_reference_point``. beta, as in DPO, is the
    inverse temperature of the implicit reward (TRL default 0.1). w_D = ``desirable_weight``, w_U =
    ``undesirable_weight`` rebalance imbalanced data (``kto_weight_warning`` checks the paper's range).
    ``ref_logps=None`` makes h the policy log-prob (a uniform reference). Rewards are ``beta * h``.

    The mean of ``losses`` is TRL's ``loss`` (TRL concatenates [desirable; undesirable] terms first: a
    permutation). Paper: Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela (2024), "KTO: Model Alignment as Prospect
    Theoretic Optimization", arXiv:2402.01306, Eq. 7-8. TRL: ``KTOTrainer`` with ``loss_type="kto"``.
    """
    _check_beta(beta)
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must have shape (N,), got {tuple(policy_logps.shape)}")
    for name, value in (("ref_logps", ref_logps), ("desirable", desirable)):
        if value is not None and value.shape != policy_logps.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(policy_logps.shape)}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    h = policy_logps if ref_logps is None else policy_logps - ref_logps.detach()  # (N,)
    z0 = _as_tensor(kl_ref, h).clamp(min=0)  # ()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (h - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - h))),
    )  # (N,)
    return KTOOutput(losses, (beta * h).detach())


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    *,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """A reward model's per-pair loss (B,): Bradley-Terry, with an optional margin and centering.

        loss_i = -log s(r_chosen_i - r_rejected_i - m_i) + c * (r_chosen_i + r_rejected_i) ** 2

    ``m`` is the per-pair ``margin`` column when the data has one (Llama 2: a larger margin for
    pairs rated further apart), else 0; ``c = center_rewards_coefficient`` (Eisenstein et al.
    2023, "Helping or Herding?") pulls the rewards towards mean 0, which the plain loss leaves
    free (it depends only on differences). The mean over pairs is TRL ``RewardTrainer``'s loss:
    it adds ``c * mean((r_c + r_r) ** 2)`` to the mean of the first term. Ouyang et al. (2022),
    "Training language models to follow instructions", Eq. 1.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"rewards must both have shape (B,), got {tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if margin is not None and margin.shape != chosen_rewards.shape:
        raise ValueError(f"margin has shape {tuple(margin.shape)}, expected {tuple(chosen_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)  # (B,)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


def kto_kl_estimate(kl_policy_logps: Tensor, kl_ref_logps: Tensor | None, weight: Tensor | None = None) -> Tensor:
    """Local statistics for KTO's reference point: ``tensor([sum(policy - ref), count])``, detached, (2,).

    The inputs are the log-probs of the batch's mismatched rows (prompt i with completion (i + 1) mod N, the
    ``kl_*`` keys of the KTO batch), (N,) each. Summing both entries over ranks (one all-reduce) and calling
    ``kto_reference_point`` gives the global mean. TRL averages the per-rank means instead: the same value
    when every rank has the same batch size. ``weight`` (N,) counts row i that many times (0 for the
    padding rows of an uneven evaluation shard).
    """
    if kl_policy_logps.dim() != 1 or (kl_ref_logps is not None and kl_ref_logps.shape != kl_policy_logps.shape):
        ref_shape = None if kl_ref_logps is None else tuple(kl_ref_logps.shape)
        raise ValueError(
            f"KL log-probs must be (N,) of equal shape, got {tuple(kl_policy_logps.shape)} and {ref_shape}"
        )
    diff = kl_policy_logps if kl_ref_logps is None else kl_policy_logps - kl_ref_logps
    diff = diff.detach()
    if weight is None:
        return torch.stack((diff.sum(), torch.tensor(diff.numel(), dtype=diff.dtype, device=diff.device)))
    weight = weight.to(diff.dtype)
    return torch.stack(((diff * weight).sum(), weight.sum()))


def kto_reference_point(kl_stats: Tensor) -> Tensor:
    """z0 = max(0, sum / count) from (all-reduced) ``kto_kl_estimate`` statistics; 0-dim, detached.

    Clamped at 0 because a KL divergence is never negative; a negative estimate is sampling noise.
    """
    total, count = kl_stats.detach().unbind()
    return (total / count.clamp(min=1)).clamp(min=0)


def kto_weight_warning(
    n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> str | None:
    """A warning when the weights are outside the KTO paper's range for this data; None when they are fine.

    The paper (Eq. 8) recommends ``w_D * n_D / (w_U * n_U)`` in [1, 4/3]. TRL's KTOTrainer warns the same way
    (with 1.33 and rounding) but only when n_D != n_U; here the range is checked for any counts. The message
    gives, as TRL's does, the range for either weight that fixes it (change one, not both).
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        kind = "desirable" if n_undesirable <= 0 else "undesirable"
        return (
            f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples: all are {kind}, "
            "so the desirable/undesirable weights cannot balance them"
        )
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    d_low = n_undesirable * undesirable_weight / n_desirable
    u_high = n_desirable * desirable_weight / n_undesirable
    return (
        f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples; with "
        f"desirable_weight={desirable_weight} and undesirable_weight={undesirable_weight}, "
        f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.3g}, outside the "
        f"range [1, 4/3] the KTO paper recommends (Eq. 8). Set EITHER desirable_weight in "
        f"[{d_low:.3g}, {d_low * 4 / 3:.3g}] OR undesirable_weight in [{u_high * 3 / 4:.3g}, {u_high:.3g}]"
    )


# --------------------------------------------------------------------------------------------------------
# selection by name, and the declaration of each loss's hyper-parameters


LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "robust": robust,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
    "sft": sft,
    "kto_pair": kto_pair,
    "simpo": simpo,
    "cpo": cpo,
    "orpo": orpo,
    "npo": npo,
}

_CDPO_SMOOTHING = HParam(0.0, 0.0, 0.5)  # cDPO's flip probability eps; 0.5 makes the loss constant

# The user hyper-parameters of each loss besides beta, with the function's default and the valid interval.
# The one declaration: the functions check their arguments against it, ``check_loss_config`` validates a
# configuration with it, docs/losses.md tabulates it, and tests check it against the signatures.
LOSS_HPARAMS: dict[str, dict[str, HParam]] = {
    "sigmoid": {"label_smoothing": _CDPO_SMOOTHING},
    "hinge": {},
    "ipo": {},
    "robust": {"label_smoothing": HParam(0.0, 0.0, 0.5, high_open=True)},
    "exo_pair": {
        "label_smoothing": HParam(
            0.0, 0.0, 1.0, low_open=True, high_open=True, note="required; the EXO paper recommends 1e-3"
        )
    },
    "nca_pair": {},
    "bco_pair": {},
    "sppo_hard": {},
    "apo_zero": {},
    "apo_down": {},
    "aot": {"label_smoothing": _CDPO_SMOOTHING},
    "aot_unpaired": {"label_smoothing": _CDPO_SMOOTHING},
    "discopop": {"discopop_tau": HParam(0.05, 0.0, math.inf, low_open=True)},
    "sigmoid_norm": {},
    "sft": {},
    "kto_pair": {},
    "simpo": {"simpo_gamma": HParam(0.5, 0.0), "label_smoothing": _CDPO_SMOOTHING},
    "cpo": {"label_smoothing": _CDPO_SMOOTHING, "cpo_alpha": HParam(1.0, 0.0)},
    "orpo": {},
    "npo": {},
}

# Keyword arguments of the losses that are statistics of the batch, not settings: omitted, the loss computes
# them from its inputs; a module may compute them (e.g. across ranks) and pass them to ``compute_loss``.
BATCH_STATISTICS: dict[str, str] = {
    "bco_delta": "bco_pair's reward baseline",
    "sft_num_tokens": "the chosen-token count dividing the NLL of sft, cpo and orpo",
    "chosen_kl": "kto_pair's KL estimate of the chosen responses",
    "rejected_kl": "kto_pair's KL estimate of the rejected responses",
    "aot_ref_matched": "aot's rank-matched reference margins",
    "aot_chosen_matched": "aot_unpaired's rank-matched chosen log-ratios",
    "aot_rejected_matched": "aot_unpaired's rank-matched rejected log-ratios",
}

# Losses that never read ``ref_chosen``/``ref_rejected``: they need no reference model.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "cpo", "orpo"})

# loss_type names that are not pair losses: "kto" is KTO on unpaired data (``kto_loss``), used on its own.
UNPAIRED_LOSSES: frozenset[str] = frozenset({"kto"})

_RENAMED = {"aot_pair": "aot_unpaired"}


def _unknown_loss(name: object) -> str:
    hint = f" (TRL 1.x renamed {name!r} to {_RENAMED[name]!r})" if name in _RENAMED else ""
    close = difflib.get_close_matches(str(name), [*LOSSES, *UNPAIRED_LOSSES], n=1) if not hint else []
    hint = hint or (f" (did you mean {close[0]!r}?)" if close else "")
    unpaired = ", ".join(sorted(UNPAIRED_LOSSES))
    return (
        f"Unknown loss_type {name!r}{hint}. Valid names: {', '.join(sorted(LOSSES))}; "
        f"and, on its own for unpaired data, {unpaired}"
    )


def get_loss_fn(name: str) -> LossFn:
    """The loss function registered under ``name`` in ``LOSSES``; ValueError listing valid names otherwise."""
    if name in LOSSES:
        return LOSSES[name]
    if name in UNPAIRED_LOSSES:
        raise ValueError(f"loss_type {name!r} is KTO on unpaired data, not a pair loss: use kto_loss")
    raise ValueError(_unknown_loss(name))


@functools.cache
def _keyword_names(fn: LossFn) -> frozenset[str]:
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta")


def hparam_names(fn: LossFn) -> frozenset[str]:
    """The user hyper-parameters a loss function takes: keyword-only arguments other than ``beta`` that are
    not ``BATCH_STATISTICS``. Read from the signature; tests check it equals the ``LOSS_HPARAMS`` entry."""
    return _keyword_names(fn).difference(BATCH_STATISTICS)


def statistic_names(fn: LossFn) -> frozenset[str]:
    """The batch statistics (``BATCH_STATISTICS``) a loss function accepts as keyword arguments."""
    return _keyword_names(fn).intersection(BATCH_STATISTICS)


# --------------------------------------------------------------------------------------------------------
# a checked configuration, and the weighted sum it selects


class LossConfig(NamedTuple):
    """A checked loss configuration: build it with ``check_loss_config``, apply it with ``compute_loss``."""

    loss_type: tuple[str, ...]  # names in LOSSES, or ("kto",) for KTO on unpaired data
    loss_weights: tuple[float, ...]  # one per name
    beta: float
    hparams: tuple[dict[str, float], ...]  # one per name: every hyper-parameter it declares, given or default


def _not_used(key: str, value: object, names: Sequence[str]) -> str:
    users = sorted(loss for loss, declared in LOSS_HPARAMS.items() if key in declared)
    return f"`{key}`={value!r} is not used by loss_type {list(names)}; it is used by: {', '.join(users)}"


def _check_loss_kwargs(names: Sequence[str], loss_kwargs: Mapping[str, object]) -> None:
    """Refuse a loss_kwargs key that is no user hyper-parameter (a typo, a batch statistic, beta, ...)."""
    all_keys = sorted({key for declared in LOSS_HPARAMS.values() for key in declared} - {"label_smoothing"})
    selected = sorted({key for name in names for key in LOSS_HPARAMS.get(name, {})} - {"label_smoothing"})
    for key in loss_kwargs:
        if key in ("beta", "label_smoothing"):
            raise ValueError(f"`{key}` is an argument of its own, not a loss_kwargs key")
        if key in BATCH_STATISTICS:
            raise ValueError(
                f"`{key}` ({BATCH_STATISTICS[key]}) is a batch statistic: it is computed per batch (by the loss "
                "from its inputs, or by the module and passed to compute_loss), not configured; "
                "remove it from loss_kwargs"
            )
        if key not in all_keys:
            close = difflib.get_close_matches(str(key), all_keys, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown loss hyper-parameter {key!r} in loss_kwargs.{hint} The loss_kwargs of loss_type "
                f"{list(names)}: {', '.join(selected) or 'none'} (of all losses: {', '.join(all_keys)}; "
                "beta and label_smoothing are arguments of their own)"
            )


def check_loss_config(
    loss_type: str | Sequence[str],
    *,
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_kwargs: Mapping[str, float] | None = None,
) -> LossConfig:
    """Validate a loss configuration as a module holds it, before any model is loaded; a ``LossConfig``.

    ValueError, naming the offending value and the valid choices, for: an unknown or empty ``loss_type``
    (``"kto"`` is valid only on its own); ``loss_weights`` of the wrong length, or non-finite, or given with
    ``"kto"``; a beta that is not a finite number > 0; a ``loss_kwargs`` key that is not a user
    hyper-parameter (a typo, ``beta``, ``label_smoothing``, or a ``BATCH_STATISTICS`` name); a hyper-parameter
    that none of the selected losses uses (``label_smoothing`` counts as given when it is not 0.0); a value
    outside its loss's interval in ``LOSS_HPARAMS`` (for every selected loss that uses it). The result holds,
    per loss, each hyper-parameter it declares: the given value, or the declared default.
    """
    if isinstance(loss_type, str):
        names = [loss_type]
    elif isinstance(loss_type, Sequence):
        names = list(loss_type)
    else:
        raise ValueError(f"loss_type must be a loss name or a list of names, got {loss_type!r}")
    if not names:
        raise ValueError("loss_type must name at least one loss")
    for name in names:
        if name not in LOSSES and name not in UNPAIRED_LOSSES:
            raise ValueError(_unknown_loss(name))
    unpaired = sorted(set(names) & UNPAIRED_LOSSES)
    if unpaired and len(names) > 1:
        raise ValueError(f"loss_type {unpaired[0]!r} (unpaired data) must be used on its own, got {names}")

    if loss_weights is None:
        weights = (1.0,) * len(names)
    elif unpaired:
        raise ValueError(
            f"loss_weights={list(loss_weights)!r} is not used by loss_type {names} "
            "(KTO's weights are desirable_weight and undesirable_weight)"
        )
    else:
        if len(loss_weights) != len(names):
            raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has {len(names)}: {names}")
        for w in loss_weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ValueError(f"loss_weights must be finite numbers, got {list(loss_weights)!r}")
        weights = tuple(float(w) for w in loss_weights)
    _check_beta(beta)

    loss_kwargs = dict(loss_kwargs or {})
    _check_loss_kwargs(names, loss_kwargs)
    given = dict(loss_kwargs)
    if label_smoothing != 0.0:  # 0.0, the default, counts as not set
        given["label_smoothing"] = label_smoothing
    for key, value in given.items():
        if not any(key in LOSS_HPARAMS.get(name, {}) for name in names):
            raise ValueError(_not_used(key, value, names))
    hparams = tuple(
        {key: spec.check(name, key, given.get(key, spec.default)) for key, spec in LOSS_HPARAMS.get(name, {}).items()}
        for name in names
    )
    return LossConfig(tuple(names), weights, float(beta), hparams)


def compute_loss(
    loss: LossConfig | str | Sequence[str],
    logps: PairLogps,
    *,
    beta: float | None = None,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float | None = None,
    **kwargs: object,
) -> LossOutput:
    """Weighted sum of the per-pair losses of a configuration (TRL's ``loss_type`` + ``loss_weights``).

        losses = sum_k loss_weights[k] * LOSSES[loss_type[k]](logps, beta=beta, **hparams[k], **statistics).losses

    Two forms, one path. ``compute_loss(config, logps, **statistics)`` with ``config`` from
    ``check_loss_config``: what a module does, validating once up front. ``compute_loss(names, logps,
    beta=..., loss_weights=..., label_smoothing=..., **kwargs)``: builds the config with ``check_loss_config``
    first (so the same errors), the ``kwargs`` that are not ``BATCH_STATISTICS`` being its ``loss_kwargs``.

    ``statistics`` are ``BATCH_STATISTICS`` values for this batch (None = not given); each goes to the losses
    that accept it, and one that no selected loss accepts is a ValueError. Rewards are those of the first loss
    in the list (the losses that use the reference all return beta * summed log-ratios; the choice matters
    for the reference-free ones, which define their own reward).
    """
    if isinstance(loss, LossConfig):
        extra = [k for k, v in (("beta", beta), ("loss_weights", loss_weights)) if v is not None]
        extra += ["label_smoothing"] if label_smoothing is not None else []
        extra += sorted(k for k in kwargs if k not in BATCH_STATISTICS)
        if extra:
            raise ValueError(
                f"compute_loss got a LossConfig and also {extra}: the config holds beta, loss_weights and the "
                f"hyper-parameters; only batch statistics ({', '.join(BATCH_STATISTICS)}) go with it"
            )
        config = loss
    else:
        if beta is None:
            raise TypeError("compute_loss() needs beta when the losses are given by name")
        config = check_loss_config(
            loss,
            loss_weights=loss_weights,
            beta=beta,
            label_smoothing=0.0 if label_smoothing is None else label_smoothing,
            loss_kwargs={k: v for k, v in kwargs.items() if k not in BATCH_STATISTICS},
        )
    statistics = {k: v for k, v in kwargs.items() if k in BATCH_STATISTICS and v is not None}

    names = list(config.loss_type)
    for name in names:
        if name in UNPAIRED_LOSSES:
            raise ValueError(f"loss_type {name!r} is KTO on unpaired data, not a pair loss: use kto_loss")
    fns = [LOSSES[name] for name in names]
    for key in statistics:
        if not any(key in statistic_names(fn) for fn in fns):
            users = sorted(name for name, fn in LOSSES.items() if key in statistic_names(fn))
            raise ValueError(f"`{key}` is not used by loss_type {names}; it is used by: {', '.join(users)}")

    total: Tensor | None = None
    first: LossOutput | None = None
    for fn, weight, hparams in zip(fns, config.loss_weights, config.hparams):
        accepted = statistic_names(fn)
        out = fn(logps, beta=config.beta, **hparams, **{k: v for k, v in statistics.items() if k in accepted})
        first = out if first is None else first
        total = weight * out.losses if total is None else total + weight * out.losses  # (B,)
    assert total is not None and first is not None
    return LossOutput(total, first.chosen_rewards, first.rejected_rewards)
