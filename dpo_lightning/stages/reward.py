"""RewardModule: a Bradley-Terry reward model trained on preference pairs, on the stage base.

The model is an ``AutoModelForSequenceClassification`` with one label: a causal LM checkpoint or
config gets a new, randomly initialised score head (transformers warns about it, as it should),
and its reward for a sequence is the score at its last non-padding token. Per step: one forward
over the ``2B`` sequences of ``PreferenceDataModule`` (chosen first: padded rows, or by default
prefix-shared rows, where the backbone runs once and the score head reads each sequence's last
position), the per-pair loss of
``losses.bradley_terry_loss`` (with the data's ``margin`` column when it has one), metrics as TRL's
``RewardTrainer`` names them. The export is a folder ``AutoModelForSequenceClassification`` loads;
it is what the reward-model judge scores samples with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from dpo_lightning.losses import bradley_terry_loss
from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.stages.preflight import PACKED_COLLATORS
from dpo_lightning.training.metrics import RewardMetrics


class RewardModule(CausalLMModule):
    """A scalar reward model on preference pairs: ``loss = -log sigmoid(r_chosen - r_rejected - margin)``.

    Consumes the pair batches of ``PreferenceDataModule``: padded (``input_ids``/``attention_mask`` of
    shape ``(2B, T)``, chosen rows first) or packed / prefix-shared rows (``sequence_ids``: the score is
    read at each sequence's last position), optional ``margin`` ``(B,)``. Under FSDP2 rows are padded.
    """

    metrics_class = RewardMetrics
    checkpoint_monitor = ("val/accuracy", "max")
    batch_format = "pairs"
    progress_bar_metric = ("accuracy", "acc")
    progress_bar_train = (("margin", "margin"), ("accuracy", "acc"))
    auto_model_class = AutoModelForSequenceClassification
    model_overrides = {"num_labels": 1}
    lora_task_type = "SEQ_CLS"
    exported_as = "the reward model"

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        center_rewards_coefficient: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            model: Model to train: a hub id or local path (a causal LM gets a new score head), or a model.
            center_rewards_coefficient: Weight of ``(r_chosen + r_rejected) ** 2`` in the loss, which keeps
                rewards centred on 0 (TRL's name; 0.01 in its docs); None for none.
            **kwargs: The stage base's settings (model_config, tokenizer, optimizer, lora, memory, ...).
        """
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0 or None, got {center_rewards_coefficient}")
        memory = kwargs.get("memory")
        lean = memory.get("lean_logprobs") if isinstance(memory, Mapping) else getattr(memory, "lean_logprobs", False)
        if lean:
            raise ValueError("memory.lean_logprobs computes language-model log-probs, which a reward model has none "
                             "of; set it false")
        super().__init__(model=model, **kwargs)
        if self.model.config.pad_token_id is None:
            raise ValueError("RewardModule reads each row's score at its last token before padding, found through the "
                             "pad token id: give tokenizer (the CLI links data.tokenizer) or a model whose config has "
                             "pad_token_id")
        self.center_rewards_coefficient = center_rewards_coefficient

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Rewards ``(2B,)`` (float32) of a pair batch: the score at each sequence's last token."""
        if "sequence_ids" in batch:
            return self._packed_rewards(batch)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.squeeze(-1).float()  # (2B,)

    def _packed_rewards(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Packed or prefix-shared rows: the backbone once over the rows, the score head at each sequence's last
        position (where ``sequence_ids`` last names it), ``(2B,)`` float32."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        mask = batch["attention_mask"]  # (R, 1, L, L) additive: in the attention's dtype
        hidden = base.base_model(
            input_ids=batch["input_ids"],
            attention_mask=mask.to(self.model.dtype) if mask.is_floating_point() else mask,
            position_ids=batch["position_ids"], use_cache=False,
        ).last_hidden_state  # (R, L, H)
        seq = batch["sequence_ids"].reshape(-1)  # (R*L,)
        real = (seq >= 0).nonzero().squeeze(1)  # (N,) flat positions holding a token
        last = torch.zeros(int(batch["num_sequences"]), dtype=torch.long, device=seq.device)
        last.scatter_reduce_(0, seq[real], real, reduce="amax", include_self=False)  # (2B,) last position of each
        scores = base.score(hidden.reshape(-1, hidden.shape[-1]).index_select(0, last))  # (2B, 1)
        return scores.squeeze(-1).float()

    def packing_unsupported(self) -> str | None:

        reason = super().packing_unsupported()
        if reason is not None:
            return reason
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            return "under FSDP2 a reward model scores padded rows (its backbone cannot run apart from its score head)"
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if base.base_model is base or not isinstance(getattr(base, "score", None), torch.nn.Module):
            return f"{type(base).__name__} has no backbone and score head to run apart"
        return None

    def setup(self, stage: str) -> None:

        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        collator = getattr(datamodule, "hparams", {}).get("collator")
        if collator in PACKED_COLLATORS and (reason := self.packing_unsupported()):
            raise ValueError(f"data.collator={collator}: {reason}; set data.collator to 'auto' or 'pad'")

    def step(self, batch: Mapping[str, Tensor], metrics: RewardMetrics) -> Tensor:
        rewards = self(batch)
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]  # (B,), (B,)
        losses = bradley_terry_loss(
            chosen, rejected, batch.get("margin"), center_rewards_coefficient=self.center_rewards_coefficient
        )
        metrics.update(losses=losses, chosen_rewards=chosen, rejected_rewards=rejected, weight=batch.get("weight"))
        return losses.mean()


__all__ = ["RewardModule"]
