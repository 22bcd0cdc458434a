"""Reference: the interface of a reference, the frozen model a stage's loss compares the policy against.

A reference is a :class:`~dpo_lightning.models.frozen.FrozenModel`: it owns its model (``model``, None when the
kind keeps none), so the stage freezes, shards, casts and checkpoints it by the frozen model's rules, through
``CausalLMModule.frozen_models``. What a kind adds is how it gets the log-probs: one subclass per kind, one file
each (``copy``, ``adapter``, ``precomputed``, ``none``), chosen in YAML by its short name (``reference: copy``)
or by class with settings (``reference: {class_path: CopyReference, init_args: {sync_steps: 64}}``).

The hooks take the stage (a ``CausalLMModule``; stages sit above this folder, so it is not named here).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import set_model_state_dict

from dpo_lightning.models.frozen import FrozenModel
from dpo_lightning.models.loading import parameters_on_meta

Stage = Any  # a CausalLMModule


class Reference(FrozenModel):
    """Interface of a reference. Every hook is optional but :meth:`logps`."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self._copies_policy = False  # a copy of the policy built on the meta device (memory.sharded_init)

    def build(self, stage: Stage, ref_model: str | nn.Module | None) -> None:
        """Called once at the end of the stage's ``__init__`` (the policy, LoRA included, exists)."""

    def logps(self, stage: Stage, batch: Mapping[str, Tensor]) -> Tensor | None:
        """Reference log-probs of the batch's sequences (``(rows,)``), or None without a reference."""
        raise NotImplementedError

    def setup(self, stage: Stage) -> None:
        """At the start of every trainer entry point, before ``configure_model`` may shard the models."""

    def on_fit_start(self, stage: Stage) -> None:
        """Before the first training step (after the model is on its device)."""

    def on_evaluation_start(self, stage: Stage, split: str) -> None:
        """Before a ``validate`` or ``test`` of its own (outside ``fit``) over ``split`` (``validation`` or
        ``test``): the checkpoint is loaded, the model on its device, the loader built."""

    def after_optimizer_step(self, stage: Stage, step: int) -> None:
        """After optimizer step ``step`` (1-based count of steps taken)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Extra state for checkpoints, by top-level checkpoint key (small: no model weights)."""
        return {}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Read back what :meth:`checkpoint_state` wrote (the whole checkpoint is passed)."""

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments as this reference holds them."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def spec(self) -> str | dict[str, Any]:
        """How this reference is written in a config: the short name, or class path and settings."""
        settings = self.settings()
        defaults = {n: p.default for n, p in inspect.signature(type(self).__init__).parameters.items() if n in settings}
        if settings == defaults and self.name:
            return self.name
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": settings}

    def hold_initial_policy(self, stage: Stage, ref_model: str | nn.Module | None) -> None:
        """Hold a frozen copy of the initial policy, or ``ref_model`` loaded as the policy was.

        Loaded from a hub id or path, it can be rebuilt from its source: checkpoints then leave it out, since
        saving 7B of frozen weights per checkpoint buys nothing. A random-init or in-memory reference is
        stored, so a resumed run always gets back the same one.
        """
        if ref_model is not None:
            if stage.memory.sharded_init:
                raise ValueError("memory.sharded_init copies the reference from the policy; a separate ref_model is "
                                 "not supported with it yet")
            self.hold(stage.load_model(ref_model), ref_model if isinstance(ref_model, str) else None)
            return
        policy = stage.model
        if stage.memory.sharded_init:
            # The architecture only: its weights arrive after sharding (materialize).
            with parameters_on_meta():
                self.hold(stage.auto_model_class.from_config(policy.config, dtype=policy.dtype), stage.policy_source)
            self._copies_policy = True
            return
        # A LoRA policy's reference is its base weights: adapters removed, not merged.
        model = copy.deepcopy(policy).unload() if hasattr(policy, "unload") else copy.deepcopy(policy)
        self.hold(model, stage.policy_source)

    def materialize(self, initial: Mapping[str, Tensor], dtype: torch.dtype | None, options: Any) -> None:
        if not self._copies_policy or self.model is None:
            return
        if dtype is not None and initial:
            initial = {k: v.to(dtype) if v.is_floating_point() else v for k, v in initial.items()}
        set_model_state_dict(self.model, dict(initial), options=options)


__all__ = ["Reference", "Stage"]
