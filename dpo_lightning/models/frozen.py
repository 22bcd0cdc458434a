"""FrozenModel: a model a stage holds besides the policy (a reference, a distillation teacher), with its rules.

A frozen model owns its weights and says how the stage treats them; the stage asks for these through one hook
(``CausalLMModule.frozen_models``), so a new frozen model is one more attribute of the stage, not new stage code:

- frozen: no gradients, and eval mode whatever ``train()`` the stage is put in;
- sharded: under FSDP2 it is ``fully_shard``-ed like the policy, its shards stored in the compute dtype
  (``training/distributed.shard_models``); its float32 buffers are restored with the stage's after a cast;
- checkpointed only when it cannot be rebuilt: a model loaded from a hub id or path (``source``) is loaded
  again on resume, so checkpoints leave its weights out (:meth:`FrozenModel.keep_in_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dpo_lightning.models.loading import freeze


class FrozenModel(nn.Module):
    """A frozen model (``model``, or None when there is none) and the source it can be loaded again from."""

    def __init__(self, model: nn.Module | None = None, source: str | None = None) -> None:
        """
        Args:
            model: The frozen model; None for a holder without one (yet, or any more).
            source: The hub id or path it was loaded from: checkpoints then leave its weights out.
        """
        super().__init__()
        self.hold(model, source)

    def hold(self, model: nn.Module | None, source: str | None = None) -> None:
        """Hold ``model`` (frozen here), loaded from ``source`` (None: built in memory, so checkpoints keep it)."""
        self.model = None if model is None else freeze(model)
        self.source = source
        self.train(False)

    def release(self) -> None:
        """Free the model (e.g. once its outputs are cached): only what else refers to it keeps it alive."""
        self.model = None

    def keep_in_checkpoint(self) -> bool:
        """Whether checkpoints must hold the weights: when nothing can load them again."""
        return self.source is None

    def train(self, mode: bool = True) -> FrozenModel:
        """Always eval mode: a frozen model's dropout never runs, whatever mode the stage is put in."""
        return super().train(False)

    def materialize(self, initial: Mapping[str, Tensor], dtype: torch.dtype | None, options: Any) -> None:
        """``memory.sharded_init``: fill a model built on the meta device once it is sharded. ``initial`` is
        the policy's initial state (rank 0's; empty on the others), ``dtype`` the frozen shards' storage dtype
        and ``options`` the broadcasting ``StateDictOptions``. Only a copy of the policy has weights to take
        from it (``CopyReference``); the default has nothing to fill."""


__all__ = ["FrozenModel"]
