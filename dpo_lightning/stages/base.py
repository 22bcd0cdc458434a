"""CausalLMModule: the LightningModule every training stage derives from, as a lifecycle.

``__init__`` loads the policy (hub id, path, config or object) and tokenizer, with dropout off and LoRA if asked;
``setup`` checks the strategy and data and chooses the fast paths (``stages/fast_path.py``); ``configure_model``
shards the policy and every frozen model under FSDP2; ``training_step`` calls the objective; the optimizer and the
default schedule come from the factories given. What else a stage shares is a unit of its own, mixed in:
checkpoint hooks and resume state (``stages/checkpointing.py``), the fast-path choice and the log-prob forward
(``stages/fast_path.py``), metric windows and logs (``stages/step_logs.py``), the optimizer and its
schedule (``stages/optimization.py``).

Frozen models (a reference, a teacher) are ``models.frozen.FrozenModel`` attributes of the stage: the one hook
:meth:`CausalLMModule.frozen_models` finds them, and the base freezes, shards, casts and checkpoints each by its
rules. An objective is a subclass that declares its metrics (``metrics_class``), its default checkpoint monitor,
the batch it consumes (``batch_format``), and implements :meth:`CausalLMModule.step`: batch -> loss, with its
metrics updated. Shared code has no branch on the objective.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning._moved import import_module
from dpo_lightning.data.tokenizer import resolve_tokenizer
from dpo_lightning.models import loading
from dpo_lightning.models.frozen import FrozenModel
from dpo_lightning.models.loading import float32_buffers, restore_float32_buffers
from dpo_lightning.references import Reference, resolve_reference
from dpo_lightning.stages.checkpointing import STAGE_KEY, CheckpointHooks
from dpo_lightning.stages.fast_path import FastPaths
from dpo_lightning.stages.optimization import Optimization
from dpo_lightning.stages.options import LoraOptions, MemoryOptions, option_group
from dpo_lightning.stages.preflight import check_strategy
from dpo_lightning.stages.step_logs import StepLogs, input_tokens
from dpo_lightning.training.callbacks import align_checkpoint_saves, check_validation_interval
from dpo_lightning.training.distributed import (
    broadcast_initial_weights,
    enable_activation_checkpointing,
    is_sharded,
    shard_models,
)
from dpo_lightning.training.metrics import RunningMeans
from dpo_lightning.training.optim import Decay


class CausalLMModule(CheckpointHooks, FastPaths, StepLogs, Optimization, L.LightningModule):
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
    exported_as: ClassVar[str] = "the policy"  # what the end-of-fit export says it wrote

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
        # (the reference is recorded by attach_reference, as its short name or class and settings)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "reference"])
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
        self.policy_source = model if isinstance(model, str) else None
        if self.memory.sharded_init:
            if self.lora is not None or not (isinstance(model, str) or model_config is not None):
                raise ValueError("memory.sharded_init loads a hub id, a path or a model_config, without LoRA")
            # Every rank must agree on the dtype before any weights exist; only rank 0 loads them.
            self._load_kwargs["dtype"] = loading.weights_dtype(model, model_config, dtype, trust_remote_code)
        self.model = loading.load_policy(
            model, model_config, tokenizer=self.tokenizer, max_length=max_length, load_kwargs=self._load_kwargs,
            auto_class=self.auto_model_class, overrides=self.model_overrides, no_dropout=disable_dropout,
            on_meta=self.memory.sharded_init and _launch_rank() != 0, lora=self.lora and asdict(self.lora),
            lora_task_type=self.lora_task_type,
        )
        self.reference: Reference | None = None  # set by attach_reference (stages that compare against one)
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

    def frozen_models(self) -> dict[str, FrozenModel]:
        """The frozen models this stage holds, by attribute name: every ``FrozenModel`` attribute that holds a
        model (the reference's, a teacher's). The base freezes, shards (FSDP2), casts and checkpoints each by its
        rules; a stage that keeps one elsewhere overrides this."""
        return {name: m for name, m in self.named_children() if isinstance(m, FrozenModel) and m.model is not None}

    @property
    def ref_model(self) -> nn.Module | None:
        """The reference's model (read-only; the reference owns it), or None without one."""
        return None if self.reference is None else self.reference.model

    def load_model(self, source: str | PreTrainedModel) -> PreTrainedModel:
        """A causal LM loaded the way the policy was (dtype, attention kernel, remote-code setting)."""
        return loading.load_model(source, **self._load_kwargs)

    def attach_reference(self, reference: str | Reference, ref_model: str | nn.Module | None = None) -> None:
        """Give the stage a reference (called by stages that compare against one): it builds its model."""
        self.reference = resolve_reference(reference)
        self.reference.build(self, ref_model)
        self.hparams["reference"] = self._hparams_initial["reference"] = self.reference.spec()

    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """Reference log-probs of the batch's sequences ``(rows,)``, or None without a reference."""
        return None if self.reference is None else self.reference.logps(self, batch)

    # ------------------------------------------------------------------ the objective's contract

    def step(self, batch: Mapping[str, Tensor], metrics: RunningMeans) -> Tensor:
        """The objective: the batch's loss (a scalar), with ``metrics`` updated. Subclasses implement it."""
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        self._tokens_seen += input_tokens(batch)
        if is_sharded(self.model):
            # FSDP2: reduce-scatter the gradients once per optimizer step, at its last micro-batch (Lightning's
            # no_backward_sync covers DDP only); until then each rank accumulates them unsharded.
            self.model.set_requires_gradient_sync(not self.trainer.fit_loop.epoch_loop._should_accumulate())
        return self.step(batch, self.train_metrics)

    # ------------------------------------------------------------------ lifecycle

    def setup(self, stage: str) -> None:
        # Before configure_model and the precision plugin may cast the modules (bf16-true, FSDP2's bf16 frozen shards).
        self._fp32_buffers = float32_buffers(self)
        if self._trainer is not None:
            check_strategy(self.trainer.strategy)  # FSDP1, refused from Python as from the CLI
            self._check_datamodule(getattr(self.trainer, "datamodule", None))
            self._record_the_datas_tokenizer(getattr(self.trainer, "datamodule", None))
            self.choose_fast_paths(getattr(self.trainer, "datamodule", None))
        if stage == "fit" and self._trainer is not None:
            check_validation_interval(self.trainer)
            align_checkpoint_saves(self.trainer)
        if self.reference is not None:
            self.reference.setup(self)

    def configure_model(self) -> None:
        """Activation checkpointing if asked; FSDP2 sharding of the policy and the frozen models under
        ``ModelParallelStrategy`` only."""
        if self.memory.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.device_mesh is None:
            if self.memory.sharded_init:
                raise ValueError("memory.sharded_init needs trainer.strategy ModelParallelStrategy (FSDP2): under "
                                 "other strategies every rank holds the whole model; set it false")
            return  # single device, DDP: nothing to shard here
        self.check_lean_sharded()
        self._loads_strictly = True  # ModelParallelStrategy loads both checkpoint formats strictly
        param_dtype = torch.bfloat16 if self.memory.fsdp_mixed_precision else None
        initial = None
        if self.memory.sharded_init and not getattr(self, "_materialized", False):
            # Rank 0's whole weights (references to them: sharding frees the module's copy, not these).
            initial = self.model.state_dict() if self.global_rank == 0 else {}
        frozen = list(self.frozen_models().values())
        shard_models(self.model, [f.model for f in frozen], self.device_mesh, param_dtype=param_dtype)
        if initial is not None:
            broadcast_initial_weights(self.model, frozen, initial, param_dtype)
            self._materialized = True

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

    def _record_the_datas_tokenizer(self, datamodule: Any) -> None:
        """Lightning logs the module's and the data module's hyper-parameters together and refuses a key they
        record differently: a module given no tokenizer (its model folder's) or the data module's own tokenizer
        object records the data module's tokenizer, the one that made the ids it trains on."""
        given = self._hparams_initial.get("tokenizer")
        spec = getattr(datamodule, "hparams", {}).get("tokenizer")
        same = given is None or getattr(datamodule, "tokenizer", None) is self.tokenizer
        if spec is None or given == spec or not same:
            return
        self.hparams["tokenizer"] = self._hparams_initial["tokenizer"] = spec

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
        """The float32 buffers a ``bf16-true``/``16-true`` cast rounded, back in float32 (``models/loading.py``)."""
        restore_float32_buffers(self, getattr(self, "_fp32_buffers", None) or {})


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


def _launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, Lightning's re-launched ranks); 0 for
    the process that launches the others."""
    return _get_rank() or 0


__all__ = ["CausalLMModule", "STAGE_KEY", "input_tokens", "stage_class_of"]
