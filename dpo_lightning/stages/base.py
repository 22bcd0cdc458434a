"""CausalLMModule: the LightningModule every training stage derives from.

It owns what stages share: loading the policy (hub id, path, config or object) and tokenizer,
dropout, LoRA, the optimizer/scheduler factories and default schedule, the memory knobs,
activation checkpointing and FSDP2 sharding of the models it holds, a reference strategy if the
stage has one (``references/strategies.py``), exact metric windows, and resume state. An objective is a
subclass that declares its metrics (``metrics_class``), its default checkpoint monitor, the batch
it consumes (``batch_format``), and implements :meth:`CausalLMModule.step`: batch -> loss, with
its metrics updated. Shared code has no branch on the objective.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning._moved import import_module
from dpo_lightning.data.prefix_sharing import attention_cost
from dpo_lightning.data.tokenizer import resolve_tokenizer
from dpo_lightning.models.lm_head import lean_sequence_logps, lean_unsupported
from dpo_lightning.models.loading import (
    check_max_length,
    check_vocab,
    empty_model,
    float32_buffers,
    freeze,
    load_model,
    restore_float32_buffers,
    text_config,
    weights_dtype,
    wrap_lora,
)
from dpo_lightning.models.loading import disable_dropout as _disable_dropout
from dpo_lightning.models.logprobs import SequenceLogps, sequence_logps
from dpo_lightning.references.strategies import REF_PREFIX, Reference, resolve_reference
from dpo_lightning.stages.options import LoraOptions, MemoryOptions, option_group
from dpo_lightning.stages.preflight import PACKED_COLLATORS, ConfigError, check_strategy, update_resolution_warning
from dpo_lightning.training.callbacks import align_checkpoint_saves, check_validation_interval
from dpo_lightning.training.distributed import enable_activation_checkpointing, is_sharded, shard_models
from dpo_lightning.training.metrics import RunningMeans
from dpo_lightning.training.optim import Decay, describe_factory, warmup_decay_schedule
from dpo_lightning.training.resume import RESUME_KEY, restore_resume_state, resume_state, set_rng_states

log = logging.getLogger(__name__)

STAGE_KEY = "dpo_lightning_stage"  # checkpoint key: the module class, so `export` can load any stage
TOKENS_KEY = "dpo_lightning_num_tokens"  # checkpoint key: input tokens trained on so far (all ranks)
POLICY_CONFIG_KEY = "dpo_lightning_policy_config"  # the policy's config: an export needs no model source
EXPORT_DTYPE_KEY = "dpo_lightning_compute_dtype"  # the dtype the policy computed in: an export's default
# the optimizer and scheduler factories as data (`optim.describe_factory`): a resume lists their changes too
FACTORIES_KEY = "dpo_lightning_optimizer_settings"
FROZEN_BASE_KEY = "dpo_lightning_frozen_base"  # a LoRA checkpoint without its frozen base weights



class CausalLMModule(L.LightningModule):
    """Base of every training stage: a trainable Hugging Face causal LM and its plumbing."""

    metrics_class: ClassVar[type[RunningMeans]]
    checkpoint_monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")  # metric, mode of the best checkpoint
    batch_format: ClassVar[str] = "pairs"  # what the data module must produce: "pairs" or "unpaired"
    progress_bar_metric: ClassVar[tuple[str, str] | None] = None  # (metric, short name) shown per validation
    progress_bar_train: ClassVar[tuple[tuple[str, str], ...]] = ()  # (metric, short name) shown with the loss
    # The trained model's class and the config fields it is loaded with (the reward model:
    # AutoModelForSequenceClassification, num_labels=1), and PEFT's task type for LoRA.
    auto_model_class: ClassVar[type] = AutoModelForCausalLM
    model_overrides: ClassVar[dict[str, Any]] = {}
    lora_task_type: ClassVar[str] = "CAUSAL_LM"

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        disable_dropout: bool = True,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.1,
        lr_decay: Decay = "cosine",
        lora: LoraOptions | None = None,
        memory: MemoryOptions | None = None,
    ) -> None:
        """
        Args:
            model: Policy to train: a hub id or local path of any ``AutoModelForCausalLM``, or a model.
            model_config: Instead of ``model``: a config dict with ``model_type`` to build a random-init policy.
            tokenizer: Hub id, path or tokenizer; sizes a config-built vocabulary and is saved with exports.
            max_length: Longest sequence the data will feed; checked against the model's positions up front.
            dtype: Weights dtype when loading: float32, bfloat16, float16 or auto; None keeps the default.
            attn_implementation: Attention kernel for Hugging Face models (``sdpa``, ``eager``, ``flash_attention_2``).
            trust_remote_code: Allow models whose code lives on the hub. Off unless you trust the source.
            disable_dropout: Turn off dropout in the policy, as TRL does by default.
            optimizer: Optimizer factory (LightningCLI ``OptimizerCallable``); None means AdamW(lr=1e-6).
            scheduler: LR scheduler factory; None means linear warmup then ``lr_decay``, stepped per optimizer step.
            warmup_ratio: Fraction of the optimizer steps spent warming up the default schedule: ceil(ratio x
                steps) steps rising from 0 at the first, as TRL's ``warmup_steps`` given as a ratio.
            lr_decay: Decay of the default schedule after warmup: cosine, linear or constant.
            lora: Train LoRA adapters instead of every weight (r, alpha, dropout, target_modules); None: full.
            memory: Memory knobs: lean_logprobs, logprob_chunk_elements, activation_checkpointing,
                fsdp_mixed_precision.
        """
        super().__init__()
        self.lora = option_group(lora, LoraOptions)
        self.memory = option_group(memory, MemoryOptions, MemoryOptions())
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for name in ("model", "ref_model", "tokenizer"):  # objects neither serialise nor print well
            value = self.hparams.get(name)
            if value is not None and not isinstance(value, str):
                # A tokenizer object is recorded by its source, so the module's and the data
                # module's hyper-parameters agree (Lightning refuses to log conflicting ones).
                source = getattr(value, "name_or_path", None)
                self.hparams[name] = source if name == "tokenizer" and source else f"<{type(value).__name__} instance>"
        if max_length is None:  # unset here: the data module's max_length is the one that applies
            self.hparams.pop("max_length", None)
        self.hparams["lora"] = None if self.lora is None else asdict(self.lora)
        self.hparams["memory"] = asdict(self.memory)
        self._hparams_initial = copy.deepcopy(self._hparams)  # what loggers record: the same plain values
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

        self.tokenizer = resolve_tokenizer(tokenizer, trust_remote_code)
        self._load_kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                             "attn_implementation": attn_implementation}
        vocab_size = len(self.tokenizer) if self.tokenizer is not None else None
        self.policy_source = model if isinstance(model, str) else None
        build = {"auto_class": self.auto_model_class, "config": model_config, "vocab_size": vocab_size}
        if self.memory.sharded_init:
            if self.lora is not None or not (isinstance(model, str) or model_config is not None):
                raise ValueError("memory.sharded_init loads a hub id, a path or a model_config, without LoRA")
            # Every rank must agree on the dtype before any weights exist; only rank 0 loads them.
            self._load_kwargs["dtype"] = weights_dtype(model, model_config, dtype, trust_remote_code)
        if self.memory.sharded_init and _launch_rank() != 0:
            self.model = empty_model(model, **build, **self._load_kwargs, **self.model_overrides)
        else:
            self.model = load_model(model, **build, **self._load_kwargs, **self.model_overrides)
        check_vocab(self.model, vocab_size)
        check_max_length(self.model, max_length)
        if self.tokenizer is not None and self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if disable_dropout:
            _disable_dropout(self.model)
        if self.lora is not None:
            self.model = wrap_lora(self.model, **asdict(self.lora), task_type=self.lora_task_type)
        self.model.train()  # from_pretrained returns eval mode, and Lightning no longer calls train()
        self.ref_model: nn.Module | None = None
        self.reference: Reference | None = None
        self._loads_strictly = False  # set under FSDP2, which loads checkpoints strictly: every weight is saved
        self._base_fingerprint: Tensor | None = None  # of the frozen LoRA base, computed at the first save

        self.train_metrics = self.metrics_class("train")
        self.val_metrics = self.metrics_class("val")
        self.test_metrics = self.metrics_class("test")
        self._resume_rng: dict[str, Any] | None = None  # set by on_load_checkpoint, used at the next batch
        self._grad_norm: Tensor | None = None  # of the last optimizer step, logged as train/grad_norm
        self._closed_window: dict[str, Tensor] | None = None  # train metrics of the window this step closed
        self._step_lr: float | None = None  # the learning rate the last optimizer step applied, train/lr
        # Input tokens (not padding) this rank has trained on since step 0: train/num_tokens, summed over ranks.
        self._tokens_seen = 0

    # ------------------------------------------------------------------ models

    @property
    def lean_logprobs(self) -> bool:
        """Whether log-probs come from the last hidden states (``models/lm_head.py``) rather than full logits:
        ``memory.lean_logprobs``, or by default wherever the model allows it (:meth:`lean_off_because`)."""
        return self.lean_off_because() is None

    def lean_off_because(self) -> str | None:
        """Why this run computes full logits, or None when it takes the lean path."""
        if self.memory.lean_logprobs is not None:
            return None if self.memory.lean_logprobs else "model.memory.lean_logprobs: false"
        return lean_unsupported(self.model, sharded=self._loads_strictly)

    def load_model(self, source: str | PreTrainedModel) -> PreTrainedModel:
        """A causal LM loaded the way the policy was (dtype, attention kernel, remote-code setting)."""
        return load_model(source, **self._load_kwargs)

    def attach_reference(self, reference: str | Reference, ref_model: str | nn.Module | None = None) -> None:
        """Give the stage a reference strategy (called by stages that compare against one)."""
        self.reference = resolve_reference(reference)
        self.reference.build(self, ref_model)
        self.hparams["reference"] = self._hparams_initial["reference"] = self.reference.spec()

    def train(self, mode: bool = True) -> CausalLMModule:
        """Lightning puts the whole module in train mode; a reference model always stays in eval."""
        super().train(mode)
        if self.ref_model is not None:
            freeze(self.ref_model)
        return self

    def sequence_logps(self, model: nn.Module, batch: Mapping[str, Tensor]) -> SequenceLogps:
        """One forward over the batch's rows (or the packed rows holding them) -> response log-probs ``(rows,)``."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # A packed batch (data/packing.py) says which sequence each position belongs to; its 4D
        # additive mask must match the attention dtype (sdpa refuses a float32 mask on bf16 weights).
        packed = {}
        if "sequence_ids" in batch:
            packed = {"sequence_ids": batch["sequence_ids"], "num_sequences": int(batch["num_sequences"])}
            if "attention_mask" in inputs and inputs["attention_mask"].is_floating_point():
                inputs["attention_mask"] = inputs["attention_mask"].to(model.dtype)
        chunk = self.memory.logprob_chunk_elements
        if self.lean_logprobs:
            return lean_sequence_logps(model, inputs, batch["labels"], chunk_elements=chunk, **packed)
        logits = model(**inputs, use_cache=False).logits  # (rows, T, V), or (R, L, V) packed
        return sequence_logps(logits, batch["labels"], chunk_elements=chunk, **packed)

    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """Reference log-probs of the batch's sequences ``(rows,)``, or None without a reference."""
        return None if self.reference is None else self.reference.logps(self, batch)

    # ------------------------------------------------------------------ the objective's contract

    def step(self, batch: Mapping[str, Tensor], metrics: RunningMeans) -> Tensor:
        """The objective: the batch's loss (a scalar), with ``metrics`` updated. Subclasses implement it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps and logging

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # RNG restored here, not at load: Lightning draws from it in between (the loader's seed).
        if self._resume_rng is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        self._tokens_seen += input_tokens(batch)
        if is_sharded(self.model):
            # FSDP2: reduce-scatter the gradients once per optimizer step, at its last micro-batch (Lightning's
            # no_backward_sync covers DDP only); until then each rank accumulates them unsharded.
            self.model.set_requires_gradient_sync(not self.trainer.fit_loop.epoch_loop._should_accumulate())
        return self.step(batch, self.train_metrics)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.reference is not None:
            # Lightning counts the step only once this hook returns: this is step global_step + 1.
            self.reference.after_optimizer_step(self, self.global_step + 1)
        if _logs_this_step(self.trainer) and self.train_metrics.has_updates:
            # The window closes with the step, before any callback sees the batch end: a checkpoint written
            # there (every_n_train_steps, save_every_n_steps) holds the next window, not this one, which
            # on_train_batch_end logs after it (a resume used to log this window again with the next).
            self._closed_window = self.train_metrics.compute()
            self.train_metrics.reset()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradient norm before clipping, as TRL logs it (gradients are already synced across ranks).
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # The learning rate this step applies (the scheduler moves it after the step), TRL's learning_rate.
        self._step_lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Log the window since the last log at exactly the steps Lightning writes logs, so each
        # logged value covers every example of the window on every rank (closed by optimizer_step).
        values, self._closed_window = self._closed_window, None
        if values is not None:
            # TRL's companions of the window: the learning rate and gradient norm of this step.
            lr = self._step_lr if self._step_lr is not None else self.trainer.optimizers[0].param_groups[0]["lr"]
            values["train/lr"] = torch.tensor(lr, dtype=torch.float64)  # a float32 would log 5.0000002e-4
            if self._grad_norm is not None:
                values["train/grad_norm"] = self._grad_norm
            # TRL's num_tokens: every input token trained on so far, on every rank (a collective: every
            # rank logs at the same steps).
            values["train/num_tokens"] = self._total_tokens()
            self._write_logs(values)
            self.log_dict(values, on_step=True, on_epoch=False, sync_dist=False, logger=False)
            self.log("loss", values["train/loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
            for name, short in self.progress_bar_train:
                if f"train/{name}" in values:
                    self.log(short, values[f"train/{name}"], prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def _log_epoch(self, metrics: RunningMeans) -> None:
        if not metrics.has_updates:
            return
        values = metrics.compute()  # already synced across ranks as sums
        # Reset outside inference mode: states cloned under it could not be updated by a later
        # validation inside fit (e.g. trainer.validate() before trainer.fit()).
        with torch.inference_mode(False):
            metrics.reset()
        # In fit, on TRL's axes (_write_logs); a `validate`/`test` of its own goes through Lightning, which
        # returns what is logged (trainer.validate(...)[0]) and has no optimizer step to count.
        in_fit = self.trainer.state.fn == "fit"
        if in_fit:
            self._write_logs(values)
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=False, logger=not in_fit)
        if self.progress_bar_metric is not None:
            name, short = self.progress_bar_metric
            if f"{metrics.prefix}/{name}" in values:
                self.log(f"{metrics.prefix}_{short}", values[f"{metrics.prefix}/{name}"], prog_bar=True, logger=False)

    def _write_logs(self, values: Mapping[str, Tensor]) -> None:
        """Write ``values`` to the trainer's loggers on TRL's axes (during ``fit``): the step is the number of
        optimizer steps done (Lightning's own axis is one behind, counting those before the current one), and
        ``epoch`` is fractional, epochs done plus the share of this epoch's batches trained, as TRL logs it.
        (``self.log`` then keeps the values for callbacks and the progress bar, not for the loggers: a logged
        ``step`` or ``epoch`` would replace the ones checkpoint names and monitors read.)"""
        if not self.loggers or self.trainer.sanity_checking:  # (Lightning logs nothing of the sanity check either)
            return
        row = {name: float(value) for name, value in values.items()}
        row["epoch"] = self._fractional_epoch()
        for logger in self.loggers:
            logger.log_metrics(row, step=self.global_step)
            logger.save()

    def _fractional_epoch(self) -> float:
        """TRL's ``epoch``: ``current_epoch + batches trained this epoch / batches per epoch``."""
        trainer = self.trainer
        per_epoch = trainer.num_training_batches
        if not (isinstance(per_epoch, int | float) and math.isfinite(per_epoch) and per_epoch > 0):
            return float(trainer.current_epoch)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch + done / per_epoch

    # ------------------------------------------------------------------ optimisation

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

    # ------------------------------------------------------------------ scale-out

    def configure_model(self) -> None:
        """Activation checkpointing if asked; FSDP2 sharding under ``ModelParallelStrategy`` only."""
        if self.memory.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.device_mesh is None:
            if self.memory.sharded_init:
                raise ValueError("memory.sharded_init needs trainer.strategy ModelParallelStrategy (FSDP2): under "
                                 "other strategies every rank holds the whole model; set it false")
            return  # single device, DDP: nothing to shard here
        if self.memory.lean_logprobs:
            why = _lean_unsupported_sharded(self.model)
            if why:
                raise ValueError(f"lean_logprobs under ModelParallelStrategy (FSDP2): {why}; set it false")
        # ModelParallelStrategy loads both checkpoint formats strictly: keep the reference in them.
        self._loads_strictly = True
        param_dtype = torch.bfloat16 if self.memory.fsdp_mixed_precision else None
        initial = None
        if self.memory.sharded_init and not getattr(self, "_materialized", False):
            # Rank 0's whole weights (references to them: sharding frees the module's copy, not these).
            initial = self.model.state_dict() if self.global_rank == 0 else {}
        shard_models(self.model, [self.ref_model], self.device_mesh, param_dtype=param_dtype)
        if initial is not None:
            self._materialize(initial, param_dtype)

    def _materialize(self, initial: dict[str, Tensor], ref_dtype: torch.dtype | None) -> None:
        """``memory.sharded_init``: rank 0 broadcasts its weights tensor by tensor; every rank keeps its shards
        of the policy, and of the reference, a copy of the policy's initial weights (in its storage dtype)."""
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, dict(initial), options=options)  # (it replaces the dict's values)
        if self.ref_model is not None:
            if ref_dtype is not None and initial:
                initial = {k: v.to(ref_dtype) if v.is_floating_point() else v for k, v in initial.items()}
            set_model_state_dict(self.ref_model, initial, options=options)
        self._materialized = True

    # ------------------------------------------------------------------ hooks for the reference

    def setup(self, stage: str) -> None:
        # Before configure_model and the precision plugin may cast the modules (bf16-true, FSDP2's bf16 reference).
        self._fp32_buffers = float32_buffers(self)
        if self._trainer is not None:

            check_strategy(self.trainer.strategy)  # FSDP1, refused from Python as from the CLI
            self._check_datamodule(getattr(self.trainer, "datamodule", None))
            self._choose_fast_paths(getattr(self.trainer, "datamodule", None))
        if stage == "fit" and self._trainer is not None:
            check_validation_interval(self.trainer)
            align_checkpoint_saves(self.trainer)
        if self.reference is not None:
            self.reference.setup(self)

    def packing_unsupported(self) -> str | None:
        """Why this stage's batches cannot be packed rows (block-causal 4D mask), or None."""
        kernel = getattr(self.model.config, "_attn_implementation", None) or self._load_kwargs["attn_implementation"]
        if kernel not in (None, "sdpa", "eager"):
            return f"attention kernel {kernel!r} cannot take the packed rows' block-causal 4D mask"
        return positions_unsupported(self.model)

    def _choose_fast_paths(self, datamodule: Any) -> None:
        """Resolve ``data.collator: auto`` (packed rows when the stage and model take them) and say, once,
        which batches and log-prob path this run uses, and why."""
        lines = []
        choose = getattr(datamodule, "choose_collator", None)
        if choose is not None:
            # the model's reason (attention kernel, sliding window); a stage may add its own
            kernel = CausalLMModule.packing_unsupported(self) or sliding_window_unsupported(
                self.model.config, getattr(datamodule, "hparams", {}).get("max_length")
            )
            unsupported = self.packing_unsupported() or kernel
            named = getattr(datamodule, "collator_name", None)
            if kernel and named in PACKED_COLLATORS:
                raise ConfigError(f"data.collator={named}: {kernel}, so packed rows would not compute what padded rows "
                                  "compute; use data.collator: auto (which pads here) or pad")
            chosen, reason = choose(unsupported, attention_cost(self.model.config))
            if chosen is not None:
                lines.append(f"batches: {chosen}" + (f" ({reason})" if reason else ""))
        if self.auto_model_class is AutoModelForCausalLM:  # a reward model scores, it has no log-probs
            why = self.lean_off_because()
            path = "lean, from the last hidden states" if why is None else f"full logits ({why})"
            lines.append(f"log-probs: {path}")
        if lines and self.trainer.is_global_zero and not getattr(self, "_said_fast_paths", False):
            self._said_fast_paths = True
            rank_zero_info("; ".join(lines))

    def _check_datamodule(self, datamodule: Any) -> None:
        """ValueError before the first step when the data module makes batches of another kind (a pair
        batch would otherwise train an SFT model on both sides, and fail nowhere)."""
        made = getattr(datamodule, "batch_format", None)
        if made is None or made == self.batch_format:
            return
        raise ValueError(
            f"{type(self).__name__} trains on {self.batch_format!r} batches but {type(datamodule).__name__} makes "
            f"{made!r} batches: use the data module for this stage (SFTModule: SFTDataModule; DPOModule, "
            "RewardModule: PreferenceDataModule; KTOModule: KTODataModule)"
        )

    def on_fit_start(self) -> None:
        self._restore_fp32_buffers()
        if self.reference is not None:
            self.reference.on_fit_start(self)

    def on_validation_start(self) -> None:
        self._restore_fp32_buffers()
        self._prepare_evaluation()

    def on_test_start(self) -> None:
        self._restore_fp32_buffers()
        self._prepare_evaluation()

    def _prepare_evaluation(self) -> None:
        """A ``validate``/``test`` of its own (outside ``fit``): the reference prepares the split it reads."""
        if self.reference is not None and self.trainer.state.fn != "fit":
            self.reference.on_evaluation_start(self, "test" if self.trainer.testing else "validation")

    def _restore_fp32_buffers(self) -> None:
        """The float32 buffers a ``bf16-true``/``16-true`` cast rounded, back in float32 (``models.py``)."""
        restore_float32_buffers(self, getattr(self, "_fp32_buffers", None) or {})

    # ------------------------------------------------------------------ checkpoints

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
        state = checkpoint.get("state_dict")
        if state is not None and self._rebuildable_base():
            # LoRA: the frozen base weights are the model source's; the checkpoint holds what training changed.
            for key in self._frozen_base_keys():
                state.pop(key, None)
            checkpoint[FROZEN_BASE_KEY] = {"source": self.policy_source, "fingerprint": self._fingerprint()}
        if self.reference is None:
            return
        checkpoint.update(self.reference.state_dict())
        if state is not None and not (self._loads_strictly or self.reference.keep_weights_in_checkpoint(self)):
            for key in [k for k in state if k.startswith(REF_PREFIX)]:
                del state[key]

    def _omits_reference(self) -> bool:
        """Under FSDP2's sharded checkpoints a reference rebuilt from its source stays out of the module's state
        dict, hence out of checkpoints (2 bytes per parameter at bf16); FSDP2 loads strictly, so
        :meth:`load_state_dict` puts the rebuilt one back. TR-DPO's synced reference is kept."""
        if not (self._loads_strictly and self.ref_model is not None and self.reference is not None):
            return False
        strategy = getattr(self._trainer, "strategy", None)
        sharded = bool(getattr(strategy, "_save_distributed_checkpoint", False))
        return sharded and not self.reference.keep_weights_in_checkpoint(self)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        if self._omits_reference():
            prefix = kwargs.get("prefix", "") + REF_PREFIX
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if self._omits_reference() and not any(k.startswith(REF_PREFIX) for k in state_dict):
            rebuilt = {REF_PREFIX + k: v for k, v in self.ref_model.state_dict().items()}
            state_dict = {**state_dict, **rebuilt}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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

    def _frozen_base_keys(self) -> list[str]:
        return list(self._frozen_base())

    def _fingerprint(self) -> Tensor:
        """Per-tensor float64 sums of the frozen base: a resume or export refuses a source whose weights changed."""
        if self._base_fingerprint is None:
            self._base_fingerprint = fingerprint(frozen_parameters(self.model))
        return self._base_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RESUME_KEY in checkpoint:
            self._resume_rng = restore_resume_state(self.global_rank, self.train_metrics, checkpoint[RESUME_KEY])
        # The count so far goes to rank 0 (the others start at 0), so the next sum over ranks continues it.
        self._tokens_seen = int(checkpoint.get(TOKENS_KEY, 0)) if self.global_rank == 0 else 0
        if self.reference is not None:
            self.reference.load_state_dict(checkpoint)
        # (ModelParallelStrategy loads weights itself and passes no state_dict here.)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        if FROZEN_BASE_KEY in checkpoint:
            # The LoRA base left out of the checkpoint: the one loaded from the source in __init__.
            check_frozen_base(checkpoint[FROZEN_BASE_KEY], self._fingerprint())
            current = self.state_dict()
            for key in self._frozen_base_keys():
                state.setdefault(key, current[key])
        # A reference left out of the checkpoint was rebuilt from its source in __init__.
        if self.ref_model is not None and not any(k.startswith(REF_PREFIX) for k in state):
            for key, value in self.ref_model.state_dict().items():
                state[REF_PREFIX + key] = value


def positions_unsupported(model: nn.Module) -> str | None:
    """Why a model cannot restart positions per packed sequence, or None: packed rows need a forward that
    takes ``position_ids`` and positions that come from them. Bloom and MPT take none (ALiBi biases from
    the row: measured 8e-2 nats off on MPT, a crash on Bloom); Falcon with ``alibi`` ignores them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = text_config(base.config)
    name = type(base).__name__
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{name} takes no position_ids, so packed sequences cannot restart their positions"
    if getattr(text, "alibi", False) or getattr(getattr(text, "attn_config", None), "alibi", False):
        return f"{name} uses ALiBi, whose position biases come from the row, not position_ids"
    return None


def sliding_window_unsupported(config: Any, max_length: int | None) -> str | None:
    """Why packed rows would not be exact for a model with sliding-window attention layers, or None.

    transformers uses a 4D mask as given, in sliding-window layers too, so packed and prefix-shared rows
    attend past the window that the padded path applies. Exact all the same when no sequence is longer
    than the window (two positions of one sequence are then always within it).
    """
    text = text_config(config)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if max_length is not None and max_length <= window:
        return None
    return (f"the model's sliding-window attention (window {window}) is not applied to packed rows' 4D mask, and "
            f"data.max_length={max_length} exceeds the window")


def _launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, Lightning's re-launched ranks); 0 for
    the process that launches the others."""
    return _get_rank() or 0


def _lean_unsupported_sharded(model: nn.Module) -> str | None:

    return lean_unsupported(model, sharded=True)


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


def stage_class_of(checkpoint: Mapping[str, Any]) -> type[CausalLMModule]:
    """The stage class that wrote ``checkpoint``: recorded at save, or the CLI's ``_class_path``; DPOModule
    for checkpoints older than the stage base."""

    hparams = checkpoint.get("hyper_parameters") or {}
    path = checkpoint.get(STAGE_KEY) or hparams.get("_class_path") or "dpo_lightning.stages.dpo.DPOModule"
    module, _, name = str(path).rpartition(".")
    cls = getattr(import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, CausalLMModule)):
        raise ValueError(f"checkpoint names {path!r} as its module, which is not a dpo_lightning stage")
    return cls


def input_tokens(batch: Mapping[str, Any]) -> int:
    """Input tokens of a batch, padding excluded: prefix-shared rows say how many their pairs hold (each
    prompt counted on both sides, as the other layouts count it), packed rows count their sequences'
    positions, padded rows their attention mask (the KL rows of a KTO batch included: they are forwarded too)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    if "sequence_ids" in batch:
        return int((batch["sequence_ids"] >= 0).sum())
    count = 0
    for key in ("attention_mask", "kl_attention_mask"):
        mask = batch.get(key)
        if mask is not None and mask.dim() == 2:
            count += int(mask.sum())
    return count


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _logs_this_step(trainer: L.Trainer) -> bool:
    """True in ``on_train_batch_end`` when Lightning will write step logs after this batch."""
    if trainer.fit_loop.epoch_loop._should_accumulate():  # mid accumulation: no optimizer step, no log
        return False
    return trainer._logger_connector.should_update_logs


__all__ = ["CausalLMModule", "STAGE_KEY", "check_frozen_base", "stage_class_of"]
