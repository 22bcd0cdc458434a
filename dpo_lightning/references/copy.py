"""CopyReference (``reference: copy``): a frozen copy of the initial policy (or a separate ``ref_model``),
optionally TR-DPO's synced reference."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dpo_lightning.models.loading import merged_parameters
from dpo_lightning.references.base import Reference, Stage


class CopyReference(Reference):
    """A frozen copy of the initial policy (or of ``ref_model``), evaluated every step.

    With ``sync_steps`` it is TR-DPO's reference (Gorbatovski et al. 2024): every ``sync_steps``
    optimizer steps it moves towards the policy, ``ref <- sync_alpha * policy + (1 - sync_alpha) * ref``
    (``sync_alpha = 1`` copies the policy). A synced reference is kept in checkpoints.
    """

    name = "copy"

    def __init__(self, sync_steps: int | None = None, sync_alpha: float = 1.0) -> None:
        """
        Args:
            sync_steps: TR-DPO: move the reference towards the policy every this many optimizer steps.
            sync_alpha: TR-DPO mix: ref <- alpha * policy + (1 - alpha) * ref (1 is a hard copy).
        """
        super().__init__()
        if sync_steps is not None and sync_steps < 1:
            raise ValueError(f"reference sync_steps must be >= 1 or None, got {sync_steps}")
        if not 0.0 < sync_alpha <= 1.0:
            raise ValueError(f"reference sync_alpha must be in (0, 1], got {sync_alpha}")
        self.sync_steps = sync_steps
        self.sync_alpha = sync_alpha

    def build(self, stage: Stage, ref_model: str | nn.Module | None) -> None:
        self.hold_initial_policy(stage, ref_model)

    def logps(self, stage: Stage, batch: Mapping[str, Tensor]) -> Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return stage.sequence_logps(self.model, batch).logps

    def keep_in_checkpoint(self) -> bool:
        # A synced reference is no longer its source: resuming without it restarts TR-DPO from ref_0.
        return super().keep_in_checkpoint() or self.sync_steps is not None

    def after_optimizer_step(self, stage: Stage, step: int) -> None:
        if self.sync_steps and step % self.sync_steps == 0:
            mix_into_reference_(self.model, stage.model, self.sync_alpha)


@torch.no_grad()
def mix_into_reference_(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO sync: ``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter, in place.

    ``alpha = 1`` is the hard update (the reference becomes a copy of the policy), as in TRL's
    ``sync_ref_model`` with ``ref_model_mixup_alpha``. A LoRA policy counts as the model it computes:
    its adapted weights merged, ``W + delta`` (``models.merged_parameters``), into a reference of the
    base architecture (the adapters are not copied, so the reference stays a plain model).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ref_sync_alpha must be in (0, 1], got {alpha}")
    ref_params = dict(reference.named_parameters())
    synced = set()
    for name, value in merged_parameters(policy):
        target = ref_params.get(name)
        if target is None:
            raise ValueError(f"the reference has no parameter {name!r}: TR-DPO needs the policy's architecture")
        target.lerp_(value.to(target.dtype), alpha)
        synced.add(name)
    if len(synced) != len(ref_params):
        missing = sorted(set(ref_params) - synced)
        raise ValueError(f"the policy has no parameter {missing[0]!r} of the reference ({len(missing)} in all): TR-DPO "
                         "needs the policy's architecture")


__all__ = ["CopyReference", "mix_into_reference_"]
