"""SFTModule: supervised fine-tuning of a causal LM, the stage that makes DPO's starting policy and reference.

Per step: one forward over the batch's rows (padded or packed, ``SFTDataModule``), the summed
negative log-likelihood of the loss tokens (completion / assistant tokens, or every token of
plain text), divided by the number of loss tokens in the whole optimizer step: across
gradient-accumulation micro-batches and ranks (``window_tokens``, see ``docs/stages.md``), so
every token weighs the same however tokens fall into micro-batches and ranks. Everything else
(loading, LoRA, optimizer, sharding, checkpoints) is the base's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.training.metrics import SFTMetrics


class SFTModule(CausalLMModule):
    """Supervised fine-tuning: next-token NLL of the loss tokens, normalised per optimizer step.

    Consumes ``SFTDataModule`` batches: ``input_ids``/``attention_mask``/``labels`` ``(N, T)``
    (``labels`` -100 off the loss tokens, unshifted), or packed rows; training batches carry
    ``window_tokens``, the loss-token count of this rank's accumulation window.
    """

    metrics_class = SFTMetrics
    checkpoint_monitor = ("val/loss", "min")
    batch_format = "sft"
    progress_bar_metric = ("mean_token_accuracy", "tok_acc")
    progress_bar_train = (("mean_token_accuracy", "tok_acc"),)

    def __init__(self, model: str | PreTrainedModel | None = None, **kwargs: Any) -> None:
        """
        Args:
            model: Model to train: a hub id or local path of any ``AutoModelForCausalLM``, or a model.
            **kwargs: The stage base's settings (model_config, tokenizer, optimizer, lora, memory, ...).
        """
        super().__init__(model=model, **kwargs)

    def step(self, batch: Mapping[str, Tensor], metrics: SFTMetrics) -> Tensor:
        out = self.sequence_logps(self.model, batch)  # per-sequence sums over loss tokens, (N,)
        nll = -out.logps  # (N,)
        metrics.update(nll=nll, n_tokens=out.n_tokens, n_correct=out.n_correct, entropy_sum=out.entropy_sum,
                       weight=batch.get("weight"))
        return nll.sum() / self.loss_denominator(batch, out.n_tokens)

    def loss_denominator(self, batch: Mapping[str, Tensor], n_tokens: Tensor) -> Tensor:
        """What the summed NLL of this micro-batch is divided by.

        Training with ``window_tokens``: ``W / (world_size * accumulate_grad_batches)``, W the loss
        tokens of the whole optimizer step on every rank. Lightning divides each micro-batch loss
        by ``accumulate_grad_batches`` and DDP/FSDP average gradients over ranks, so the step's
        gradient is that of ``sum(NLL over every loss token of the step) / W``, TRL's
        ``num_items_in_batch`` normalisation. Otherwise (validation, a loader of your own) the
        micro-batch's own loss-token count.
        """
        if not (self.training and "window_tokens" in batch and self._trainer is not None):
            return n_tokens.sum().clamp_min(1.0)
        local = batch["window_tokens"].to(device=n_tokens.device, dtype=torch.float32).reshape(())
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")  # W: every rank's window
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        return total.clamp_min(1.0) / scale


__all__ = ["SFTModule"]
