"""The reward model's loss: Bradley-Terry on the scores of chosen and rejected responses.
"""


import torch.nn.functional as F
from torch import Tensor


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
