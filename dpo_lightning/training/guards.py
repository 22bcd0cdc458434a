"""The non-finite guard: training stops before an optimizer step whose loss or gradients hold NaN or inf, so no
NaN reaches the weights, a checkpoint or an export, and the last checkpoint stays the last good state.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor


class NonFiniteError(RuntimeError):
    """Training stopped: a loss or gradient was not finite. The step was not applied."""


def any_rank(trainer: pl.Trainer, flags: Tensor) -> Tensor:
    """Element-wise max of ``flags`` over ranks: every rank takes the same decision."""
    if trainer.world_size > 1:
        flags = trainer.strategy.reduce(flags, reduce_op="max")
    return flags


class NonFiniteGuard(Callback):
    """Stop ``fit`` before an optimizer step whose loss or gradients hold NaN or inf.

    Checked once per optimizer step, agreed across ranks (one tiny all-reduce): the losses of the
    accumulated micro-batches and every local gradient. Under fp16 mixed precision the gradient
    check is left to the gradient scaler, which skips overflowing steps by design. A non-finite
    validation loss stops the run too, before a checkpoint can record it as the best.
    """

    def __init__(self, check_gradients: bool = True) -> None:
        """
        Args:
            check_gradients: Also check the gradients (one pass over them per optimizer step).
        """
        self.check_gradients = check_gradients
        self._bad_loss: Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # stays on device: no sync per micro-batch
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.tensor(False, device=pl_module.device)
        self._bad_loss = None
        bad_grad = torch.tensor(False, device=bad_loss.device)
        if self.check_gradients and not str(trainer.precision).startswith("16"):
            bad_grad = ~_all_finite([p.grad for p in pl_module.parameters() if p.grad is not None], bad_loss.device)
        flags = any_rank(trainer, torch.stack([bad_loss, bad_grad]).float())
        if flags.any():
            what = "loss" if flags[0] else "gradients"
            lr = optimizer.param_groups[0].get("lr", float("nan"))
            raise NonFiniteError(
                f"non-finite {what} at optimizer step {trainer.global_step + 1}: training stopped before the "
                f"step was applied (the last checkpoint is the last good state; nothing is exported). "
                f"{likely_causes(trainer, lr)}"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteError(
                f"non-finite val/loss ({float(loss)}) at step {trainer.global_step}: stopped before a checkpoint "
                f"could record it; check precision {trainer.precision!r} and the learning rate"
            )


def _all_finite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Whether every element of ``tensors`` is finite, as a 0-d bool tensor (no host sync).

    One fused norm per tensor: a NaN or inf anywhere makes that tensor's norm non-finite.
    FSDP2 parameters and gradients are DTensors: their local shards are checked.
    """
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t for t in local if t.numel()]
    if not local:
        return torch.tensor(True, device=device)
    norms = torch._foreach_norm([t.detach() for t in local])
    return torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()


def finite_weights(trainer: pl.Trainer, module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite on every rank (a collective under several ranks)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    ok = _all_finite(list(module.parameters()), device)
    return not bool(any_rank(trainer, (~ok).float().reshape(1)).item())


def likely_causes(trainer: pl.Trainer, lr: float) -> str:
    causes = f"Likely causes: a learning rate too high (lr={lr:.3g})"
    if not str(trainer.precision).startswith("32"):
        causes += f", or overflow at precision {trainer.precision!r} (try bf16-mixed or 32-true)"
    return causes + "; gradient clipping (trainer.gradient_clip_val) can help"


__all__ = ["NonFiniteError", "NonFiniteGuard", "any_rank", "finite_weights", "likely_causes"]
