"""NoReference (``reference: none``): for losses that never read reference log-probs (SimPO, CPO, ORPO, SFT)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from dpo_lightning.references.base import Reference, Stage


class NoReference(Reference):
    """No reference model: for losses that never read reference log-probs (SimPO, CPO, ORPO, SFT)."""

    name = "none"

    def logps(self, stage: Stage, batch: Mapping[str, Tensor]) -> Tensor | None:
        return None


__all__ = ["NoReference"]
