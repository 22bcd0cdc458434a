"""What a stage writes into its checkpoints and reads back from them (a mixin of ``CausalLMModule``).

The contract keys below are what ``export`` and the CLI read. The weights follow the frozen models' rules
(``models/frozen.py``): a frozen model its source can rebuild (a reference or teacher loaded from a path) is left
out and put back from the model loaded at ``__init__``; so is the frozen base of a LoRA policy loaded from a
path, checked by a fingerprint so a changed source is refused. Resume state (the per-rank RNG streams, the open
metric window, the token count) is written here and restored at the first batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from dpo_lightning.training.optim import describe_factory
from dpo_lightning.training.resume import RESUME_KEY, restore_resume_state, resume_state, set_rng_states

STAGE_KEY = "dpo_lightning_stage"  # checkpoint key: the module class, so `export` can load any stage
TOKENS_KEY = "dpo_lightning_num_tokens"  # checkpoint key: input tokens trained on so far (all ranks)
POLICY_CONFIG_KEY = "dpo_lightning_policy_config"  # the policy's config: an export needs no model source
EXPORT_DTYPE_KEY = "dpo_lightning_compute_dtype"  # the dtype the policy computed in: an export's default
# the optimizer and scheduler factories as data (`optim.describe_factory`): a resume lists their changes too
FACTORIES_KEY = "dpo_lightning_optimizer_settings"
FROZEN_BASE_KEY = "dpo_lightning_frozen_base"  # a LoRA checkpoint without its frozen base weights
# Where checkpoints written before the reference owned its model (0.x) kept its weights, and where they are now.
OLD_REF_PREFIX, REF_PREFIX = "ref_model.", "reference.model."


class CheckpointHooks:
    """The stage's checkpoint hooks: contract keys, frozen weights left out when rebuildable, resume state."""

    def frozen_prefixes(self, *, rebuildable_only: bool) -> list[str]:
        """State-dict prefixes of the frozen models (``frozen_models``); only those checkpoints may leave out."""
        return [f"{name}.model." for name, frozen in self.frozen_models().items()
                if not (rebuildable_only and frozen.keep_in_checkpoint())]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # RNG restored here, not at load: Lightning draws from it in between (the loader's seed).
        if self._resume_rng is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None

    def _total_tokens(self) -> Tensor:
        local = torch.tensor(float(self._tokens_seen), dtype=torch.float64, device=self.device)
        if self._trainer is None or self.trainer.world_size == 1:  # saved outside a fit, or one process
            return local
        return self.trainer.strategy.reduce(local, reduce_op="sum")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RESUME_KEY] = resume_state(self.train_metrics)  # collective: every rank runs this hook
        checkpoint[TOKENS_KEY] = int(self._total_tokens().item())  # collective too
        checkpoint[STAGE_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[POLICY_CONFIG_KEY] = self.model.config.to_dict()
        checkpoint[EXPORT_DTYPE_KEY] = str(self.compute_dtype()).removeprefix("torch.")
        checkpoint[FACTORIES_KEY] = {"optimizer": describe_factory(self.optimizer_factory),
                                     "scheduler": describe_factory(self.scheduler_factory)}
        if self.reference is not None:
            checkpoint.update(self.reference.checkpoint_state())
        state = checkpoint.get("state_dict")
        if state is None:
            return
        if self._rebuildable_base():
            # LoRA: the frozen base weights are the model source's; the checkpoint holds what training changed.
            for key in self._frozen_base():
                state.pop(key, None)
            checkpoint[FROZEN_BASE_KEY] = {"source": self.policy_source, "fingerprint": self._fingerprint()}
        if not self._loads_strictly:  # (under FSDP2 they leave sharded checkpoints only: state_dict below)
            prefixes = tuple(self.frozen_prefixes(rebuildable_only=True))
            for key in [k for k in state if prefixes and k.startswith(prefixes)]:
                del state[key]

    def _omitted_prefixes(self) -> tuple[str, ...]:
        """Under FSDP2's sharded checkpoints rebuildable frozen models stay out of the module's state dict, hence
        out of checkpoints (2 bytes per parameter at bf16); FSDP2 loads strictly, so :meth:`load_state_dict`
        puts the rebuilt ones back. TR-DPO's synced reference is kept."""
        strategy = getattr(self._trainer, "strategy", None)
        if not (self._loads_strictly and getattr(strategy, "_save_distributed_checkpoint", False)):
            return ()
        return tuple(self.frozen_prefixes(rebuildable_only=True))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        prefixes = tuple(kwargs.get("prefix", "") + p for p in self._omitted_prefixes())
        for key in [k for k in state if prefixes and k.startswith(prefixes)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if self._omitted_prefixes():
            state_dict = {**self._rebuilt_frozen(state_dict, self._omitted_prefixes()), **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _rebuilt_frozen(self, state: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
        """The weights of the frozen models under ``prefixes`` that ``state`` lacks, as loaded at ``__init__``."""
        rebuilt = {}
        for prefix in prefixes:
            if not any(k.startswith(prefix) for k in state):
                holder = self.get_submodule(prefix.removesuffix(".model."))
                rebuilt.update({prefix + k: v for k, v in holder.model.state_dict().items()})
        return rebuilt

    def compute_dtype(self) -> torch.dtype:
        """The dtype the policy computes in: the precision's (bf16-*, 16-*), FSDP2's mixed-precision bf16,
        or its weights' dtype; an export is written in it by default."""
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        if self._loads_strictly and self.memory.fsdp_mixed_precision:  # sharded, bf16 parameters in compute
            return torch.bfloat16
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def _rebuildable_base(self) -> bool:
        """A LoRA policy loaded from a hub id or path, not sharded: its frozen base can be loaded again."""
        return self.lora is not None and self.policy_source is not None and not self._loads_strictly

    def _frozen_base(self) -> dict[str, Tensor]:
        """The frozen parameters of the policy by checkpoint key (tied weights under each of their names)."""
        return {f"model.{k}": v for k, v in frozen_parameters(self.model).items()}

    def _fingerprint(self) -> Tensor:
        """Per-tensor float64 sums of the frozen base: a resume or export refuses a source whose weights changed."""
        if self._base_fingerprint is None:
            self._base_fingerprint = fingerprint(frozen_parameters(self.model))
        return self._base_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            # Lightning restores no training progress to evaluate a checkpoint: its metrics would be logged at
            # step 0, epoch 0. They belong at the optimizer step (and whole epochs) the checkpoint was trained to.
            if "global_step" in checkpoint:
                trainer.fit_loop.epoch_loop._batches_that_stepped = int(checkpoint["global_step"])
            if "epoch" in checkpoint:
                trainer.fit_loop.epoch_progress.current.completed = int(checkpoint["epoch"])
        if RESUME_KEY in checkpoint:
            self._resume_rng = restore_resume_state(self.global_rank, self.train_metrics, checkpoint[RESUME_KEY])
        # The count so far goes to rank 0 (the others start at 0), so the next sum over ranks continues it.
        self._tokens_seen = int(checkpoint.get(TOKENS_KEY, 0)) if self.global_rank == 0 else 0
        if self.reference is not None:
            self.reference.load_checkpoint_state(checkpoint)
        # (ModelParallelStrategy loads weights itself and passes no state_dict here.)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for key in [k for k in state if k.startswith(OLD_REF_PREFIX)]:  # written before the reference held it
            state[REF_PREFIX + key.removeprefix(OLD_REF_PREFIX)] = state.pop(key)
        if FROZEN_BASE_KEY in checkpoint:
            # The LoRA base left out of the checkpoint: the one loaded from the source in __init__.
            check_frozen_base(checkpoint[FROZEN_BASE_KEY], self._fingerprint())
            for key, value in self._frozen_base().items():
                state.setdefault(key, value.detach())
        # A frozen model left out of the checkpoint was rebuilt from its source in __init__.
        state.update(self._rebuilt_frozen(state, tuple(self.frozen_prefixes(rebuildable_only=False))))


def frozen_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s frozen parameters by state-dict key (a tied weight under each of its names)."""
    state = model.state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if isinstance(v, nn.Parameter) and not v.requires_grad}


def fingerprint(parameters: Mapping[str, Tensor]) -> Tensor:
    """Per-tensor float64 sums: tells one set of base weights from another without storing them."""
    sums = [torch.sum(p.detach(), dtype=torch.float64).cpu() for p in parameters.values()]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)


def check_frozen_base(saved: Mapping[str, Any], fingerprint: Tensor) -> None:
    """ValueError when the LoRA base loaded now is not the one the checkpoint's adapters were trained on."""
    expected = saved["fingerprint"]
    if expected.shape != fingerprint.shape or not torch.allclose(fingerprint, expected, rtol=1e-6, atol=1e-6):
        raise ValueError(
            f"the LoRA checkpoint holds adapters only; its base weights come from {saved['source']!r}, which now "
            "holds different weights than when the checkpoint was written (another revision?): load the same base"
        )


__all__ = [
    "EXPORT_DTYPE_KEY", "FACTORIES_KEY", "FROZEN_BASE_KEY", "POLICY_CONFIG_KEY", "REF_PREFIX", "STAGE_KEY",
    "TOKENS_KEY", "CheckpointHooks", "check_frozen_base", "fingerprint", "frozen_parameters",
]
