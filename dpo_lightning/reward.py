"""RewardModule: a Bradley-Terry reward model trained on preference pairs, on the stage base.

The model is an ``AutoModelForSequenceClassification`` with one label: a causal LM checkpoint or
config gets a new, randomly initialised score head (transformers warns about it, as it should),
and its reward for a sequence is the score at its last non-padding token. Per step: one forward
over the stacked ``2B`` rows of ``PreferenceDataModule`` (chosen first), the per-pair loss of
``losses.bradley_terry_loss`` (with the data's ``margin`` column when it has one), metrics as TRL's
``RewardTrainer`` names them. The export is a folder ``AutoModelForSequenceClassification`` loads;
it is what the reward-model judge scores samples with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from dpo_lightning.losses import bradley_terry_loss
from dpo_lightning.metrics import RewardMetrics
from dpo_lightning.stage import CausalLMModule


class RewardModule(CausalLMModule):
    """A scalar reward model on preference pairs: ``loss = -log sigmoid(r_chosen - r_rejected - margin)``.

    Consumes the pair batches of ``PreferenceDataModule`` (``input_ids``/``attention_mask`` of shape
    ``(2B, T)``, chosen rows first, optional ``margin`` ``(B,)``); padded batches only (``collator:
    pad``), since the score is read at each row's last token.
    """

    metrics_class = RewardMetrics
    checkpoint_monitor = ("val/accuracy", "max")
    batch_format = "pairs"
    progress_bar_metric = ("accuracy", "acc")
    progress_bar_train = (("margin", "margin"), ("accuracy", "acc"))
    auto_model_class = AutoModelForSequenceClassification
    model_overrides = {"num_labels": 1}
    lora_task_type = "SEQ_CLS"

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
        """Rewards ``(2B,)`` (float32) of a pair batch's rows: the score at each row's last token."""
        if "sequence_ids" in batch:
            raise ValueError("RewardModule reads each row's last token, so it takes padded batches: set data.collator "
                             "to 'pad' (packed rows hold several sequences)")
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.squeeze(-1).float()  # (2B,)

    def packing_unsupported(self) -> str | None:
        return "a reward model reads each row's last token"

    def setup(self, stage: str) -> None:
        from dpo_lightning.preflight import PACKED_COLLATORS

        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "hparams", {}).get("collator") in PACKED_COLLATORS:
            raise ValueError("RewardModule reads each row's last token, so it takes padded batches: set "
                             "data.collator to 'pad'")

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
