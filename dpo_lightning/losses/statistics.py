"""The batch statistics some pair losses are defined on (``BATCH_STATISTICS``), computed from a batch's
log-probs: a module on several ranks computes them across ranks (all-reduced, gathered) and passes them in.
"""

import torch
from torch import Tensor

from dpo_lightning.losses.base import PairLogps, _check_beta, _logratios


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
