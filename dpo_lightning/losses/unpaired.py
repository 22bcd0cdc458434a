"""KTO on unpaired data: one completion per example, labelled desirable or not; its KL reference point.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from dpo_lightning.losses.base import _as_tensor, _check_beta

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
