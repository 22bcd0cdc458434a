"""DPOModule: Direct Preference Optimization and its pairwise relatives, on the stage base.

Per step: one forward of the policy over the stacked ``2B`` rows (chosen first), the reference
log-probs from the reference strategy, per-pair losses and rewards (``losses/``), metrics
(``training/metrics.py``). Everything else (loading, LoRA, optimizer, sharding, checkpoints) is the base's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import PreTrainedModel

from dpo_lightning.losses import REFERENCE_FREE, LossOutput, PairLogps, check_loss_config, compute_loss
from dpo_lightning.models.logprobs import SequenceLogps
from dpo_lightning.references import (
    AdapterReference,
    CopyReference,
    NoReference,
    PrecomputedReference,
    Reference,
    resolve_reference,
)
from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.stages.preflight import check_reference
from dpo_lightning.training.metrics import PreferenceMetrics

NEEDS_NO_REFERENCE = REFERENCE_FREE | {"sft"}  # losses that never read reference log-probs


class StepOutput(NamedTuple):
    """What :meth:`DPOModule.forward` returns for a batch of pairs."""

    loss: LossOutput  # per-pair losses and rewards
    policy: SequenceLogps  # (2B,) policy statistics, chosen first
    ref_logps: Tensor | None  # (2B,) reference log-probs; None without a reference


class DPOModule(CausalLMModule):
    """Direct Preference Optimization (and relatives) of a Hugging Face causal LM.

    Consumes the batch dict documented in ``docs/architecture.md``: ``input_ids``,
    ``attention_mask`` and ``labels`` of shape ``(2B, T)``, chosen rows first.
    """

    metrics_class = PreferenceMetrics
    checkpoint_monitor = ("val/rewards/accuracies", "max")
    batch_format = "pairs"
    progress_bar_metric = ("rewards/accuracies", "acc")
    progress_bar_train = (("rewards/margins", "margin"), ("rewards/accuracies", "acc"))

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        ref_model: str | PreTrainedModel | None = None,
        reference: str | Reference = "copy",
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_kwargs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            model: Policy to train: a hub id or local path of any ``AutoModelForCausalLM``, or a model.
            ref_model: Reference: ``None`` for a frozen copy of the initial policy, or a hub id / path / model.
            reference: How reference log-probs are obtained: copy (frozen model; TR-DPO with
                ``CopyReference(sync_steps=...)``), adapter (LoRA policy with adapters off), precomputed
                (one pass before training, cached, model freed), none, or a ``Reference`` class.
            loss_type: Loss name from ``dpo_lightning.losses.LOSSES`` (TRL's names), or a list of them.
            loss_weights: Weights of the losses when ``loss_type`` is a list (e.g. RPO: sigmoid + alpha * sft).
            beta: Strength of the KL penalty towards the reference (inverse temperature of the reward).
            label_smoothing: Assumed probability that a preference label is flipped (robust, cDPO, exo_pair).
            loss_kwargs: Other loss hyper-parameters by name, e.g. ``{"discopop_tau": 0.05}``.
            **kwargs: The stage base's settings (model_config, tokenizer, optimizer, lora, memory, ...).
        """
        # Every loss and reference setting is checked before any weights load.
        config = check_loss_config(
            loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing, loss_kwargs=loss_kwargs
        )
        if config.loss_type == ("kto",):
            raise ValueError("loss_type 'kto' trains on unpaired examples: use KTOModule "
                             "(in a recipe: model.class_path: dpo_lightning.KTOModule)")
        strategy = _choose_reference(reference, ref_model, needs=not set(config.loss_type) <= NEEDS_NO_REFERENCE)
        check_reference(strategy.name, kwargs.get("lora"), ref_model)  # before the policy loads
        super().__init__(model=model, **kwargs)
        self.loss_config = config
        self.attach_reference(strategy, ref_model)
        self._reference_is_own_copy = ref_model is None and isinstance(
            strategy, CopyReference | AdapterReference | PrecomputedReference)

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        """Losses and rewards of a batch of pairs: ``StepOutput(loss, policy, ref_logps)``."""
        policy = self.sequence_logps(self.model, batch)
        ref = self.reference_logps(batch)
        b = policy.logps.shape[0] // 2
        pair = PairLogps(
            chosen=policy.logps[:b],
            rejected=policy.logps[b:],
            ref_chosen=None if ref is None else ref[:b],
            ref_rejected=None if ref is None else ref[b:],
            chosen_tokens=policy.n_tokens[:b],
            rejected_tokens=policy.n_tokens[b:],
        )
        return StepOutput(compute_loss(self.loss_config, pair), policy, ref)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        # `validate`/`test` of a model on its own: the default reference is a copy of that very
        # model, so every reward is 0 by construction. Say so rather than report accuracy 0.0.
        # (From a checkpoint the policy is the trained one: Lightning restores no step count outside fit.)
        evaluating = self.trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)  # (not fit's validation)
        if evaluating and self.trainer.ckpt_path is None and self._reference_is_own_copy:
            rank_zero_warn(
                "the reference is a copy of the policy being evaluated, so rewards, margins and accuracies are 0 "
                "by construction; to compare against the model training started from, set model.ref_model"
            )

    on_test_start = on_validation_start

    def step(self, batch: Mapping[str, Tensor], metrics: PreferenceMetrics) -> Tensor:
        out, policy, _ = self(batch)
        b = out.losses.shape[0]
        metrics.update(
            losses=out.losses,
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
            chosen_logps=policy.logps[:b],
            rejected_logps=policy.logps[b:],
            chosen_logits_sum=policy.logits_sum[:b],
            rejected_logits_sum=policy.logits_sum[b:],
            chosen_tokens=policy.n_tokens[:b],
            rejected_tokens=policy.n_tokens[b:],
            entropy_sum=policy.entropy_sum,
            chosen_correct=None if policy.n_correct is None else policy.n_correct[:b],
            # Only eval batches on several ranks carry it: 0 for the padding that evens out shards.
            weight=batch.get("weight"),
        )
        return out.losses.mean()


def effective_reference(reference: Any, ref_model: Any, loss_type: str | Sequence[str] | None) -> Any:
    """The ``reference`` a DPOModule with these settings records: the default ``copy`` (without a ``ref_model``)
    is ``none`` when every selected loss is reference-free; anything else as given. The CLI compares a resumed
    run's settings with the checkpoint's through it."""
    losses = {loss_type} if isinstance(loss_type, str) else set(loss_type or ())
    if reference == "copy" and ref_model is None and losses and losses <= NEEDS_NO_REFERENCE:
        return "none"
    return reference


def _choose_reference(reference: str | Reference, ref_model: str | nn.Module | None, *, needs: bool) -> Reference:
    """The strategy for ``reference``; the default ``copy`` becomes ``none`` for reference-free losses."""
    if reference == "copy" and ref_model is None and not needs:
        rank_zero_info("the selected losses need no reference model: using reference='none' (no reference copy)")
        reference = "none"
    strategy = resolve_reference(reference)
    if needs and isinstance(strategy, NoReference):
        raise ValueError(
            f"reference='none' suits reference-free losses {sorted(NEEDS_NO_REFERENCE)}; the selected losses "
            "compare against a reference (DPO's sigmoid without one, TRL 0.x's reference_free, is loss_type cpo "
            "with loss_kwargs {cpo_alpha: 0})"
        )
    return strategy


__all__ = ["DPOModule", "StepOutput", "effective_reference"]
