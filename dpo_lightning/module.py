"""DPOModule: the LightningModule that trains a policy against a frozen reference.

The only file that knows about Lightning. Per step: one forward of the policy and one of the
reference over the stacked ``2B`` rows (chosen first), sequence log-probs of the response
tokens (``logprobs.py``), per-pair losses and rewards (``losses.py``), metrics (``metrics.py``).
How the reference log-probs are obtained (a frozen copy, the policy with its LoRA adapters
off, a precomputed table, or none at all) is ``reference.py``'s business; KTO's unpaired
batches take their own path through :meth:`DPOModule.kto_forward`.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.checkpoint import RESUME_KEY, restore_resume_state, resume_state, set_rng_states
from dpo_lightning.distributed import enable_activation_checkpointing, shard_dpo_models
from dpo_lightning.lm_head import lean_sequence_logps
from dpo_lightning.logprobs import DEFAULT_CHUNK_ELEMENTS, SequenceLogps, sequence_logps
from dpo_lightning.losses import (
    REFERENCE_FREE,
    KTOOutput,
    LossOutput,
    PairLogps,
    check_loss_config,
    compute_loss,
    kto_kl_estimate,
    kto_loss,
    kto_reference_point,
    kto_weight_warning,
)
from dpo_lightning.metrics import KTOMetrics, PreferenceMetrics
from dpo_lightning.models import check_vocab, freeze, load_causal_lm
from dpo_lightning.models import disable_dropout as _disable_dropout
from dpo_lightning.optim import Decay, warmup_decay_schedule
from dpo_lightning.reference import (
    REFERENCE_KINDS,
    ReferenceKind,
    cache_key,
    compute_reference_logps,
    default_cache_dir,
    load_cached,
    mix_into_reference_,
    save_cached,
    weights_fingerprint,
    wrap_lora,
)

log = logging.getLogger(__name__)

REF_PREFIX = "ref_model."
REF_TABLES_KEY = "dpo_lightning_reference_logps"


class StepOutput(NamedTuple):
    """What :meth:`DPOModule.forward` returns for a batch of pairs."""

    loss: LossOutput  # per-pair losses and rewards
    policy: SequenceLogps  # (2B,) policy statistics, chosen first
    ref_logps: Tensor | None  # (2B,) reference log-probs; None without a reference
# The frozen reference is meant to be in eval mode; Lightning warns about it at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# The metrics are synced as sums before they are logged (metrics.py): sync_dist would re-average them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(train|val|test)(/|_acc')")


class DPOModule(L.LightningModule):
    """Direct Preference Optimization (and relatives) of a Hugging Face causal LM.

    Consumes the batch dict documented in ``docs/architecture.md``: ``input_ids``,
    ``attention_mask`` and ``labels`` of shape ``(2B, T)``, chosen rows first.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        model_config: dict[str, Any] | None = None,
        ref_model: str | PreTrainedModel | None = None,
        reference: ReferenceKind = "copy",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_kwargs: dict[str, float] | None = None,
        disable_dropout: bool = True,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.1,
        lr_decay: Decay = "cosine",
        logprob_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        lean_logprobs: bool = False,
        activation_checkpointing: bool = False,
        fsdp_mixed_precision: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str | None = None,
        reference_cache_dir: str | None = None,
        ref_sync_steps: int | None = None,
        ref_sync_alpha: float = 1.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
    ) -> None:
        """
        Args:
            model: Policy to train: a hub id or local path of any ``AutoModelForCausalLM``, or a model.
            model_config: Instead of ``model``: a config dict with ``model_type`` to build a random-init policy.
            ref_model: Reference: ``None`` for a frozen copy of the initial policy, or a hub id / path / model.
            reference: How reference log-probs are obtained: copy (frozen model), adapter (LoRA policy with
                adapters off), precomputed (one pass before training, cached, model freed) or none.
            tokenizer: Hub id, path or tokenizer; sizes a config-built vocabulary and is saved with exports.
            max_length: Longest sequence the data will feed; checked against the model's positions up front.
            loss_type: Loss name from ``dpo_lightning.losses.LOSSES`` (TRL's names), or a list of them.
            loss_weights: Weights of the losses when ``loss_type`` is a list (e.g. RPO: sigmoid + alpha * sft).
            beta: Strength of the KL penalty towards the reference (inverse temperature of the reward).
            label_smoothing: Assumed probability that a preference label is flipped (robust, cDPO, exo_pair).
            loss_kwargs: Other loss hyper-parameters by name, e.g. ``{"discopop_tau": 0.05}``.
            disable_dropout: Turn off dropout in the policy, as TRL does by default.
            dtype: Weights dtype when loading: float32, bfloat16, float16 or auto; None keeps the default.
            attn_implementation: Attention kernel for Hugging Face models (``sdpa``, ``eager``, ``flash_attention_2``).
            trust_remote_code: Allow models whose code lives on the hub. Off unless you trust the source.
            optimizer: Optimizer factory (LightningCLI ``OptimizerCallable``); None means AdamW(lr=1e-6).
            scheduler: LR scheduler factory; None means linear warmup then ``lr_decay``, stepped per optimizer step.
            warmup_ratio: Fraction of the optimizer steps spent warming up the default schedule.
            lr_decay: Decay of the default schedule after warmup: cosine, linear or constant.
            logprob_chunk_elements: Float32 elements per chunk when computing log-probs (bounds extra memory).
            lean_logprobs: Score response positions from the last hidden states; never builds (2B, T, V) logits.
            activation_checkpointing: Recompute each policy decoder layer in backward to save activation memory.
            fsdp_mixed_precision: Under ModelParallelStrategy (FSDP2): bf16 compute, fp32 gradient reduction.
            lora_r: LoRA rank when reference is ``adapter``.
            lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            lora_dropout: Dropout on the LoRA branch.
            lora_target_modules: Module names to adapt (e.g. [q_proj, v_proj], or all-linear); None: PEFT's default.
            reference_cache_dir: Where precomputed reference log-probs are cached; None: ~/.cache/dpo_lightning.
            ref_sync_steps: TR-DPO: every this many optimizer steps move the reference towards the policy.
            ref_sync_alpha: TR-DPO mix: ref <- alpha * policy + (1 - alpha) * ref (1 is a hard copy).
            desirable_weight: KTO weight of desirable examples (lambda_D).
            undesirable_weight: KTO weight of undesirable examples (lambda_U).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for name, value in (("model", model), ("ref_model", ref_model), ("tokenizer", tokenizer)):
            if value is not None and not isinstance(value, str):
                self.hparams[name] = f"<{type(value).__name__} instance>"
        # Every loss setting is checked before any weights load (names, keys, ranges, unused values).
        self.loss_config = check_loss_config(
            loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing, loss_kwargs=loss_kwargs
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

        self.tokenizer = _resolve_tokenizer(tokenizer, trust_remote_code)
        load_kwargs = {
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "attn_implementation": attn_implementation,
        }
        vocab_size = len(self.tokenizer) if self.tokenizer is not None else None
        self.model = load_causal_lm(model, config=model_config, vocab_size=vocab_size, **load_kwargs)
        check_vocab(self.model, vocab_size)
        _check_max_length(self.model, max_length)
        if self.tokenizer is not None and self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if disable_dropout:
            _disable_dropout(self.model)
        self.model.train()  # from_pretrained returns eval mode, and Lightning no longer calls train()
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.is_kto = names == ["kto"]
        no_reference = REFERENCE_FREE | {"sft"}  # losses that never read reference log-probs
        if reference == "copy" and ref_model is None and all(n in no_reference for n in names):
            log.info("loss_type %s needs no reference model: using reference='none'", names)
            reference = "none"
        if reference == "none" and not all(n in no_reference for n in names):
            raise ValueError(f"reference='none' suits reference-free losses {sorted(no_reference)}, not {names}")
        if reference not in REFERENCE_KINDS:
            raise ValueError(f"unknown reference {reference!r}: use one of {', '.join(REFERENCE_KINDS)}")
        if not self.is_kto and (desirable_weight != 1.0 or undesirable_weight != 1.0):
            raise ValueError(
                f"desirable_weight/undesirable_weight weight KTO's examples; loss_type {names} does not use them"
            )
        if self.is_kto and reference == "precomputed":
            raise ValueError("KTO's KL rows are built per batch, so their reference log-probs cannot be precomputed")
        if ref_sync_steps is not None and reference != "copy":
            raise ValueError("TR-DPO (ref_sync_steps) updates a reference model: use reference='copy'")
        self.hparams["reference"] = reference
        self.ref_model: PreTrainedModel | None = None
        self._ref_rebuildable = True
        if reference == "adapter":
            # One set of base weights: the reference is the policy with its adapters switched off.
            self.model = wrap_lora(
                self.model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules
            )
        elif reference in ("copy", "precomputed"):
            # Checkpoints leave the reference out when it can be rebuilt from its source (a hub id
            # or path, or the policy's own source): saving 7B frozen weights per checkpoint buys
            # nothing. A reference that cannot be rebuilt (a random-init or in-memory policy) is
            # stored, so a resumed run always gets back the same reference.
            if ref_model is None:
                self.ref_model = freeze(copy.deepcopy(self.model))
                self._ref_rebuildable = isinstance(model, str)
            else:
                self.ref_model = freeze(load_causal_lm(ref_model, **load_kwargs))
                self._ref_rebuildable = isinstance(ref_model, str)
        self._ref_weights: str | None = None  # fingerprint for the precomputed cache
        self._ref_tables: dict[str, Tensor] = {}  # precomputed (N, 2) log-probs per split

        metrics = KTOMetrics if self.is_kto else PreferenceMetrics
        self.train_metrics = metrics("train")
        self.val_metrics = metrics("val")
        self.test_metrics = metrics("test")
        self._resume_rng: dict[str, Any] | None = None  # set by on_load_checkpoint, used at the next batch

    # ------------------------------------------------------------------ forward

    def train(self, mode: bool = True) -> DPOModule:
        """Lightning puts the whole module in train mode; the reference always stays in eval."""
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    def sequence_logps(self, model: torch.nn.Module, batch: Mapping[str, Tensor]) -> SequenceLogps:
        """One forward over all ``2B`` rows (or the packed rows holding them) -> response log-probs ``(2B,)``."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # A packed batch (data/packing.py) says which sequence each position belongs to; its 4D
        # additive mask must match the attention dtype (sdpa refuses a float32 mask on bf16 weights).
        packed = {}
        if "sequence_ids" in batch:
            packed = {"sequence_ids": batch["sequence_ids"], "num_sequences": int(batch["num_sequences"])}
            if "attention_mask" in inputs and inputs["attention_mask"].is_floating_point():
                inputs["attention_mask"] = inputs["attention_mask"].to(model.dtype)
        chunk = self.hparams.logprob_chunk_elements
        if self.hparams.get("lean_logprobs", False):
            return lean_sequence_logps(model, inputs, batch["labels"], chunk_elements=chunk, **packed)
        logits = model(**inputs, use_cache=False).logits  # (2B, T, V), or (R, L, V) packed
        return sequence_logps(logits, batch["labels"], chunk_elements=chunk, **packed)

    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """Reference log-probs of the batch's sequences, ``(2B,)`` (``(N,)`` for KTO), or None."""
        if "ref_logps" in batch:  # precomputed, carried by the batch
            return batch["ref_logps"]
        kind = self.hparams.reference
        if kind == "none":
            return None
        if kind == "adapter":
            with self.model.disable_adapter():
                return self.sequence_logps(self.model, batch).logps
        if self.ref_model is None:
            raise RuntimeError(
                "reference='precomputed' but the batch carries no ref_logps: use PreferenceDataModule "
                "(the log-probs are computed at fit start) or a loader whose batches carry them"
            )
        return self.sequence_logps(self.ref_model, batch).logps

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
        out = compute_loss(self.loss_config, pair)
        return StepOutput(out, policy, ref)

    def kto_forward(self, batch: Mapping[str, Tensor]) -> tuple[KTOOutput, SequenceLogps, Tensor]:
        """KTO on an unpaired batch (``data/kto.py``): ``(KTOOutput, policy SequenceLogps, z0)``.

        z0, the KL reference point, is the mean policy-minus-reference log-ratio of the batch's
        mismatched rows (prompt i with completion i+1), summed over every rank before dividing,
        clamped at 0 and detached; the pure loss takes it as an argument.
        """
        policy = self.sequence_logps(self.model, batch)
        ref = self.reference_logps(batch)
        kl_batch = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
                    "labels": batch["kl_labels"]}
        with torch.no_grad():
            kl_policy = self.sequence_logps(self.model, kl_batch).logps
            kl_ref = None if ref is None else self.reference_logps(kl_batch)
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

    def _shared_step(self, batch: Mapping[str, Tensor], metrics: PreferenceMetrics | KTOMetrics) -> Tensor:
        if self.is_kto:
            kto, policy, z0 = self.kto_forward(batch)
            metrics.update(losses=kto.losses, rewards=kto.rewards, logps=policy.logps, desirable=batch["desirable"],
                           kl=z0, weight=batch.get("weight"))
            return kto.losses.mean()
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
            # Only eval batches on several ranks carry it: 0 for the padding that evens out shards.
            weight=batch.get("weight"),
        )
        return out.losses.mean()

    # ------------------------------------------------------------------ steps

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # RNG restored here, not at load: Lightning draws from it in between (the loader's seed).
        if self._resume_rng is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, self.train_metrics)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps = self.hparams.ref_sync_steps
        if steps and not self.trainer.fit_loop.epoch_loop._should_accumulate() and (self.global_step % steps == 0):
            # TR-DPO: global_step already counts this batch's optimizer step.
            mix_into_reference_(self.ref_model, self.model, self.hparams.ref_sync_alpha)
        # Log the window since the last log at exactly the steps Lightning writes logs, so each
        # logged value covers every pair of the window on every rank.
        if _logs_this_step(self.trainer) and self.train_metrics.has_updates:
            values = self.train_metrics.compute()
            self.train_metrics.reset()
            self.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)
            self.log("loss", values["train/loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def _log_epoch(self, metrics: PreferenceMetrics) -> None:
        if not metrics.has_updates:
            return
        values = metrics.compute()  # already synced across ranks as sums
        # Reset outside inference mode: states cloned under it could not be updated by a later
        # validation inside fit (e.g. trainer.validate() before trainer.fit()).
        with torch.inference_mode(False):
            metrics.reset()
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)
        accuracy = f"{metrics.prefix}/rewards/accuracies"
        if accuracy in values:
            self.log(f"{metrics.prefix}_acc", values[accuracy], prog_bar=True, logger=False)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-6)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("set max_steps or max_epochs so the LR schedule knows its length")
            scheduler = warmup_decay_schedule(
                optimizer,
                total_steps=int(total),
                warmup_ratio=self.hparams.warmup_ratio,
                decay=self.hparams.lr_decay,
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ scale-out

    def configure_model(self) -> None:
        """Activation checkpointing if asked; FSDP2 sharding under ``ModelParallelStrategy`` only."""
        if self.hparams.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.device_mesh is None:
            return  # single device, DDP, FSDP1: nothing to shard here
        if self.hparams.get("lean_logprobs", False):
            # The lean path calls the backbone and LM head directly, bypassing the root FSDP
            # unit's unshard/reshard hooks; refuse rather than compute on shards.
            raise ValueError("lean_logprobs is not supported under ModelParallelStrategy (FSDP2) yet; set it false")
        # ModelParallelStrategy loads both checkpoint formats strictly: keep the reference in them.
        self._ref_rebuildable = False
        param_dtype = torch.bfloat16 if self.hparams.fsdp_mixed_precision else None
        shard_dpo_models(self.model, self.ref_model, self.device_mesh, param_dtype=param_dtype)

    # ------------------------------------------------------------------ precomputed reference

    def setup(self, stage: str) -> None:
        # Fingerprint the reference before configure_model may shard it.
        if self.hparams.reference == "precomputed" and self.ref_model is not None and self._ref_weights is None:
            self._ref_weights = weights_fingerprint(self.ref_model)

    def on_fit_start(self) -> None:
        if self.hparams.reference == "precomputed":
            self._precompute_reference()
        dm = getattr(self.trainer, "datamodule", None)
        if self.is_kto and hasattr(dm, "label_counts"):
            # The KTO paper's range for the weights given the desirable/undesirable balance.
            message = kto_weight_warning(
                *dm.label_counts("train"), self.hparams.desirable_weight, self.hparams.undesirable_weight
            )
            if message:
                warnings.warn(message, stacklevel=1)

    def _precompute_reference(self) -> None:
        """One pass of the reference over train and validation data, cached on disk; then free it.

        The cache key covers the reference weights, the dataset's fingerprint and the tokenization
        settings, so a change to any of them recomputes. Every rank runs the same pass (under FSDP
        the sharded reference needs all ranks in step); rank 0 writes the cache.
        """
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_reference_logps"):
            raise ValueError("reference='precomputed' needs PreferenceDataModule (or batches carrying ref_logps)")
        cache_dir = Path(self.hparams.reference_cache_dir or default_cache_dir())
        for split, dataset in dm.reference_splits().items():
            table = self._ref_tables.get(split)
            path = cache_dir / f"{cache_key(self._ref_weights, dataset._fingerprint, dm.tokenization_settings())}.pt"
            if table is None:
                table = load_cached(path)
                if table is not None:
                    log.info("precomputed reference log-probs for %s: cache hit %s", split, path)
            if table is None:
                log.info("precomputing reference log-probs for %s (%d pairs)", split, len(dataset))
                batches = (self.trainer.strategy.batch_to_device(b) for b in dm.ordered_dataloader(split))
                table = compute_reference_logps(
                    batches, lambda b: self.sequence_logps(self.ref_model, b).logps, len(dataset)
                )
                if self.trainer.is_global_zero:
                    save_cached(path, table)
            self._ref_tables[split] = table
            dm.set_reference_logps(split, table)
        # Only the policy stays resident from here on.
        self.ref_model = None
        gc.collect()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RESUME_KEY] = resume_state(self.train_metrics)  # collective: every rank runs this hook
        if self._ref_tables:  # small ((N, 2) floats) and needed to resume without the reference model
            checkpoint[REF_TABLES_KEY] = dict(self._ref_tables)
        if self._ref_rebuildable:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(REF_PREFIX)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RESUME_KEY in checkpoint:
            self._resume_rng = restore_resume_state(self.global_rank, self.train_metrics, checkpoint[RESUME_KEY])
        self._ref_tables = dict(checkpoint.get(REF_TABLES_KEY, {}))
        # A reference left out of the checkpoint was rebuilt from its source in __init__.
        # (ModelParallelStrategy loads weights itself and passes no state_dict here.)
        state = checkpoint.get("state_dict")
        if state is not None and self.ref_model is not None and not any(k.startswith(REF_PREFIX) for k in state):
            for key, value in self.ref_model.state_dict().items():
                state[REF_PREFIX + key] = value


def _resolve_tokenizer(
    tokenizer: str | PreTrainedTokenizerBase | None, trust_remote_code: bool
) -> PreTrainedTokenizerBase | None:
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from dpo_lightning.data import load_tokenizer

    return load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)


def _check_max_length(model: PreTrainedModel, max_length: int | None) -> None:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's {positions} positions "
            f"({type(config).__name__}); lower data.max_length or use a longer-context model"
        )


def _logs_this_step(trainer: L.Trainer) -> bool:
    """True in ``on_train_batch_end`` when Lightning will write step logs after this batch."""
    loop = trainer.fit_loop
    if loop.epoch_loop._should_accumulate():  # mid accumulation: no optimizer step, no log
        return False
    return trainer._logger_connector.should_update_logs


__all__ = ["DPOModule"]
