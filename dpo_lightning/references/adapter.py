"""AdapterReference (``reference: adapter``): the LoRA policy with its adapters off, one set of base weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dpo_lightning.references.base import Reference, Stage


class AdapterReference(Reference):
    """The LoRA policy with its adapters switched off: one set of base weights in memory (it holds no model)."""

    name = "adapter"

    def build(self, stage: Stage, ref_model: str | nn.Module | None) -> None:
        if stage.lora is None:
            raise ValueError("reference 'adapter' is the policy with its LoRA adapters off: set the lora group")
        if ref_model is not None:
            raise ValueError("reference 'adapter' uses the policy's own base weights: leave ref_model unset")

    def logps(self, stage: Stage, batch: Mapping[str, Tensor]) -> Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad(), stage.model.disable_adapter():
            return stage.sequence_logps(stage.model, batch).logps


__all__ = ["AdapterReference"]
