"""The optimizer and learning-rate schedule of a stage (a mixin of ``CausalLMModule``): the factories given
(LightningCLI ``OptimizerCallable``/``LRSchedulerCallable``) or AdamW with warmup then decay, stepped per optimizer
step; and a warning, before the first step, when half-precision weights make the update too small to register.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dpo_lightning.stages.preflight import update_resolution_warning
from dpo_lightning.training.optim import warmup_decay_schedule


class Optimization:
    """The stage's ``configure_optimizers``."""

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.AdamW(params, lr=1e-6)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("set max_steps or max_epochs so the LR schedule knows its length")
            scheduler = warmup_decay_schedule(
                optimizer, total_steps=int(total), warmup_ratio=self.hparams.warmup_ratio, decay=self.hparams.lr_decay
            )
        self._check_loaded_dtype(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_loaded_dtype(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn, before the first step, when ``model.dtype`` was left unset and the weights loaded in half
        precision (transformers 5 loads a checkpoint's own dtype: Qwen2.5 in bf16) with an Adam step too small
        for them: the CLI's check of the configuration (`preflight.update_resolution_warning`) could not see it."""
        configured = self.hparams.get("dtype")
        if configured not in (None, "auto") or self.lora is not None:
            return  # the configuration says the dtype (the CLI checked it); LoRA adapters train in float32
        trained = {p.dtype for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        half = [d for d in (torch.bfloat16, torch.float16) if d in trained]
        if not half:
            return
        group = optimizer.param_groups[0]
        lr = group.get("initial_lr", group["lr"])  # (a warmup scheduler has already scaled "lr" to its start)
        precision = str(self.trainer.precision)
        if update_resolution_warning(precision, lr, configured, optimizer=_class_path(optimizer)):
            return  # the precision converts the weights: the configuration check said it already
        message = update_resolution_warning(precision, lr, half[0], optimizer=_class_path(optimizer), loaded=True)
        if message:
            rank_zero_warn(message)


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


__all__ = ["Optimization"]
