"""KTOModule: Kahneman-Tversky Optimization on unpaired examples, on the stage base.

Each example is desirable or undesirable on its own. The KL reference point z0 is estimated per
step from mismatched rows (prompt i with completion i+1, built by ``data/kto.py``), summed over
every rank before dividing, clamped at 0 and detached; the pure loss (``losses.kto_loss``) takes
it as an argument.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from dpo_lightning.losses import (
    KTOOutput,
    check_loss_config,
    kto_kl_estimate,
    kto_loss,
    kto_reference_point,
    kto_weight_warning,
)
from dpo_lightning.models.logprobs import SequenceLogps
from dpo_lightning.references import NoReference, PrecomputedReference, Reference, resolve_reference
from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.stages.preflight import check_reference
from dpo_lightning.training.metrics import KTOMetrics


class KTOModule(CausalLMModule):
    """KTO (Ethayarajh et al. 2024) of a Hugging Face causal LM on unpaired examples.

    Consumes ``data/kto.py``'s batches: ``input_ids``/``attention_mask``/``labels`` ``(N, T)``, the
    mismatched ``kl_*`` rows and ``desirable`` ``(N,)``. Logs TRL KTOTrainer's metric names.
    """

    metrics_class = KTOMetrics
    checkpoint_monitor = ("val/loss", "min")  # KTO logs no pairwise accuracy, as in TRL
    batch_format = "unpaired"

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        ref_model: str | PreTrainedModel | None = None,
        reference: str | Reference = "copy",
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            model: Policy to train: a hub id or local path of any ``AutoModelForCausalLM``, or a model.
            ref_model: Reference: ``None`` for a frozen copy of the initial policy, or a hub id / path / model.
            reference: copy or adapter (KTO's KL rows are built per batch, so they cannot be precomputed).
            beta: Strength of the KL penalty towards the reference.
            desirable_weight: Weight of desirable examples (lambda_D).
            undesirable_weight: Weight of undesirable examples (lambda_U).
            **kwargs: The stage base's settings (model_config, tokenizer, optimizer, lora, memory, ...).
        """
        check_loss_config("kto", beta=beta)
        for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        strategy = resolve_reference(reference)
        if isinstance(strategy, PrecomputedReference | NoReference):
            raise ValueError(f"KTO needs a live reference (copy or adapter), got {strategy.name!r}: its KL rows "
                             "are built per batch, so their reference log-probs cannot be precomputed")
        check_reference(strategy.name, kwargs.get("lora"), ref_model)  # before the policy loads
        super().__init__(model=model, **kwargs)
        self.attach_reference(strategy, ref_model)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[KTOOutput, SequenceLogps, Tensor]:
        """KTO on an unpaired batch: ``(KTOOutput, policy SequenceLogps, z0)``."""
        policy = self.sequence_logps(self.model, batch)
        ref = self.reference_logps(batch)
        kl_batch = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
                    "labels": batch["kl_labels"]}
        with torch.no_grad():
            kl_policy = self.sequence_logps(self.model, kl_batch).logps
            kl_ref = self.reference_logps(kl_batch)
        stats = kto_kl_estimate(kl_policy, kl_ref, batch.get("weight"))  # (2,): local sum and count
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        z0 = kto_reference_point(stats)
        out = kto_loss(
            policy.logps,
            ref,
            batch["desirable"],
            z0,
            beta=self.hparams.beta,
            desirable_weight=self.hparams.desirable_weight,
            undesirable_weight=self.hparams.undesirable_weight,
        )
        return out, policy, z0

    kto_forward = forward  # the name before KTO had its own module

    def step(self, batch: Mapping[str, Tensor], metrics: KTOMetrics) -> Tensor:
        kto, policy, z0 = self(batch)
        metrics.update(losses=kto.losses, rewards=kto.rewards, logps=policy.logps, desirable=batch["desirable"],
                       kl=z0, weight=batch.get("weight"))
        return kto.losses.mean()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "label_counts"):
            # The KTO paper's range for the weights given the desirable/undesirable balance.
            message = kto_weight_warning(
                *dm.label_counts("train"), self.hparams.desirable_weight, self.hparams.undesirable_weight
            )
            if message:
                warnings.warn(message, stacklevel=1)


__all__ = ["KTOModule"]
