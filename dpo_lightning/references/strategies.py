"""Reference strategies: how a stage obtains the reference log-probs its loss compares against.

One small class per kind behind one interface, chosen in YAML by a short name
(``reference: copy``) or, with settings, by class (``reference: {class_path: CopyReference,
init_args: {sync_steps: 64}}``):

- :class:`CopyReference` (``copy``): a frozen copy of the initial policy, or a separate ``ref_model``;
  optionally TR-DPO: every ``sync_steps`` optimizer steps ``ref <- alpha * policy + (1 - alpha) * ref``.
- :class:`AdapterReference` (``adapter``): the policy is a LoRA model (``lora`` group); the reference
  is the same base weights with the adapters off, so one set of base weights is in memory.
- :class:`PrecomputedReference` (``precomputed``): one pass over the train and validation data before
  training computes the log-probs, cached on disk (``references/precompute.py``); the reference model is freed.
- :class:`NoReference` (``none``): reference-free losses (SimPO, ORPO, CPO).

A new kind (e.g. the previous round's policy in iterative DPO) is one more subclass; the stage
calls only the methods below.
"""

from __future__ import annotations

import copy
import difflib
import gc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dpo_lightning._moved import import_module
from dpo_lightning.models.loading import freeze, merged_parameters, parameters_on_meta
from dpo_lightning.references.precompute import (
    cache_key,
    compute_reference_logps,
    default_cache_dir,
    load_cached,
    save_cached,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from dpo_lightning.stages.base import CausalLMModule

log = logging.getLogger(__name__)

REF_PREFIX = "ref_model."
REF_TABLES_KEY = "dpo_lightning_reference_logps"
_EVALUATED_SPLITS = {"validate": "validation", "test": "test"}  # trainer.state.fn -> the split it reads


class Reference:
    """Interface of a reference strategy. Every hook is optional but :meth:`logps`."""

    name: ClassVar[str] = ""

    def build(self, stage: CausalLMModule, ref_model: str | nn.Module | None) -> None:
        """Called once at the end of the stage's ``__init__`` (the policy, LoRA included, exists)."""

    def logps(self, stage: CausalLMModule, batch: Mapping[str, Tensor]) -> Tensor | None:
        """Reference log-probs of the batch's sequences (``(rows,)``), or None without a reference."""
        raise NotImplementedError

    def keep_weights_in_checkpoint(self, stage: CausalLMModule) -> bool:
        """Whether checkpoints must hold ``stage.ref_model``'s weights (it cannot be rebuilt from its source)."""
        return False

    def setup(self, stage: CausalLMModule) -> None:
        """At the start of every trainer entry point, before ``configure_model`` may shard the models."""

    def on_fit_start(self, stage: CausalLMModule) -> None:
        """Before the first training step (after the model is on its device)."""

    def on_evaluation_start(self, stage: CausalLMModule, split: str) -> None:
        """Before a ``validate`` or ``test`` of its own (outside ``fit``) over ``split`` (``validation`` or
        ``test``): the checkpoint is loaded, the model on its device, the loader built."""

    def after_optimizer_step(self, stage: CausalLMModule, step: int) -> None:
        """After optimizer step ``step`` (1-based count of steps taken)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state for checkpoints (small: no model weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def spec(self) -> str | dict[str, Any]:
        """How this strategy is written in a config: the short name, or class path and settings."""
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        defaults = {k: v for k, v in vars(type(self)()).items() if not k.startswith("_")}
        if settings == defaults and self.name:
            return self.name
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": settings}


class NoReference(Reference):
    """No reference model: for losses that never read reference log-probs (SimPO, CPO, ORPO, SFT)."""

    name = "none"

    def logps(self, stage: CausalLMModule, batch: Mapping[str, Tensor]) -> Tensor | None:
        return None


class CopyReference(Reference):
    """A frozen copy of the initial policy (or of ``ref_model``), evaluated every step.

    With ``sync_steps`` it is TR-DPO's reference (Gorbatovski et al. 2024): every ``sync_steps``
    optimizer steps it moves towards the policy, ``ref <- sync_alpha * policy + (1 - sync_alpha) * ref``
    (``sync_alpha = 1`` copies the policy). A synced reference is kept in checkpoints.
    """

    name = "copy"

    def __init__(self, sync_steps: int | None = None, sync_alpha: float = 1.0) -> None:
        """
        Args:
            sync_steps: TR-DPO: move the reference towards the policy every this many optimizer steps.
            sync_alpha: TR-DPO mix: ref <- alpha * policy + (1 - alpha) * ref (1 is a hard copy).
        """
        if sync_steps is not None and sync_steps < 1:
            raise ValueError(f"reference sync_steps must be >= 1 or None, got {sync_steps}")
        if not 0.0 < sync_alpha <= 1.0:
            raise ValueError(f"reference sync_alpha must be in (0, 1], got {sync_alpha}")
        self.sync_steps = sync_steps
        self.sync_alpha = sync_alpha
        self._rebuildable = True

    def build(self, stage: CausalLMModule, ref_model: str | nn.Module | None) -> None:
        self._rebuildable = _attach_frozen_reference(stage, ref_model)

    def logps(self, stage: CausalLMModule, batch: Mapping[str, Tensor]) -> Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return stage.sequence_logps(stage.ref_model, batch).logps

    def keep_weights_in_checkpoint(self, stage: CausalLMModule) -> bool:
        # A synced reference is no longer its source: resuming without it restarts TR-DPO from ref_0.
        return not self._rebuildable or self.sync_steps is not None

    def after_optimizer_step(self, stage: CausalLMModule, step: int) -> None:
        if self.sync_steps and step % self.sync_steps == 0:
            mix_into_reference_(stage.ref_model, stage.model, self.sync_alpha)


class AdapterReference(Reference):
    """The LoRA policy with its adapters switched off: one set of base weights in memory."""

    name = "adapter"

    def build(self, stage: CausalLMModule, ref_model: str | nn.Module | None) -> None:
        if stage.lora is None:
            raise ValueError("reference 'adapter' is the policy with its LoRA adapters off: set the lora group")
        if ref_model is not None:
            raise ValueError("reference 'adapter' uses the policy's own base weights: leave ref_model unset")

    def logps(self, stage: CausalLMModule, batch: Mapping[str, Tensor]) -> Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad(), stage.model.disable_adapter():
            return stage.sequence_logps(stage.model, batch).logps


class PrecomputedReference(Reference):
    """Reference log-probs computed once before training, cached on disk; the model is then freed.

    The cache key covers the reference weights, the dataset's fingerprint and the tokenization
    settings, so a change to any of them recomputes. The tables (``(N, 2)`` floats per split) are
    also kept in checkpoints, so a resume needs neither the reference model nor the cache.
    """

    name = "precomputed"

    def __init__(self, cache_dir: str | None = None) -> None:
        """
        Args:
            cache_dir: Where precomputed reference log-probs are cached; None: ~/.cache/dpo_lightning.
        """
        self.cache_dir = cache_dir
        self._tables: dict[str, Tensor] = {}  # train and validation, of the fit (kept in checkpoints)
        self._evaluated: Tensor | None = None  # the split of a validate/test of its own, looked up by index
        self._evaluated_data: str | None = None  # that split's fingerprint before its index column
        self._fingerprint: str | None = None

    def build(self, stage: CausalLMModule, ref_model: str | nn.Module | None) -> None:
        _attach_frozen_reference(stage, ref_model)  # the model to run the pass with

    def setup(self, stage: CausalLMModule) -> None:
        if stage.ref_model is not None and self._fingerprint is None:  # before configure_model may shard it
            self._fingerprint = weights_fingerprint(stage.ref_model)
        fn = getattr(stage.trainer.state.fn, "value", None) if stage._trainer is not None else None
        split = _EVALUATED_SPLITS.get(fn)
        if split is not None:
            # A validate/test of its own: Lightning builds the loader (and fetches its first batch) before
            # on_validation_start, where the table is computed; the batches say which rows they hold instead.
            dm = getattr(stage.trainer, "datamodule", None)
            if hasattr(dm, "add_index") and dm.splits.get(split) is not None:  # (other loaders: batches with ref_logps)
                self._evaluated_data = dm.splits[split]._fingerprint  # the cache key's, as a fit's pass keys it
                dm.add_index(split)

    def logps(self, stage: CausalLMModule, batch: Mapping[str, Tensor]) -> Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self._evaluated is not None and "index" in batch:
            rows = self._evaluated[batch["index"].cpu()]  # (B, 2): chosen, rejected
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["index"].device)  # (2B,), chosen first
        raise RuntimeError(
            "reference 'precomputed' but the batch carries no ref_logps: use PreferenceDataModule "
            "(the log-probs are computed at fit start) or a loader whose batches carry them"
        )

    def on_fit_start(self, stage: CausalLMModule) -> None:
        dm = self._datamodule(stage)
        for split, dataset in dm.reference_splits().items():
            table = self._tables.get(split)  # from the checkpoint of a resume
            if table is None:
                table = self._table(stage, dm, split, dataset)
            self._tables[split] = table
            dm.set_reference_logps(split, table)
        stage.ref_model = None  # only the policy stays resident from here on
        gc.collect()

    def on_evaluation_start(self, stage: CausalLMModule, split: str) -> None:
        # The reference as it stands now (a checkpoint's tables are of its fit's data, which may not be this).
        dm = getattr(stage.trainer, "datamodule", None)
        dataset = dm.splits.get(split) if hasattr(dm, "add_index") else None  # (other loaders: batches with ref_logps)
        if dataset is None or "ref_chosen_logps" in dataset.column_names:  # no data, or attached by a fit
            return
        self._evaluated = self._table(stage, dm, split, dataset, self._evaluated_data)

    def _datamodule(self, stage: CausalLMModule) -> Any:
        dm = getattr(stage.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_reference_logps"):
            raise ValueError("reference 'precomputed' needs PreferenceDataModule (or batches carrying ref_logps)")
        return dm

    def _table(self, stage: CausalLMModule, dm: Any, split: str, dataset: Any, data: str | None = None) -> Tensor:
        """``(N, 2)`` reference log-probs of ``split``: from the cache, else one pass of the reference.
        ``data``: the split's fingerprint for the cache key, when ``dataset`` has gained columns since."""
        cache_dir = Path(self.cache_dir or default_cache_dir())
        key = cache_key(self._fingerprint, data or dataset._fingerprint, dm.tokenization_settings())
        path = cache_dir / f"{key}.pt"
        table = load_cached(path)
        if table is not None:
            rank_zero_info(f"precomputed reference log-probs for {split}: cache hit {path}")
            return table
        if stage.ref_model is None:
            raise RuntimeError(f"reference 'precomputed': no reference log-probs for split {split!r}, and the "
                               "reference model was freed after a fit's pass (train and validation); run it in a new "
                               "process, e.g. `python -m dpo_lightning test --ckpt_path ...`")
        rank_zero_info(f"precomputing reference log-probs for {split} ({len(dataset)} pairs), cached in {path}")
        batches = (stage.trainer.strategy.batch_to_device(b) for b in dm.ordered_dataloader(split))
        table = compute_reference_logps(batches, lambda b: stage.sequence_logps(stage.ref_model, b).logps, len(dataset))
        if stage.trainer.is_global_zero:
            save_cached(path, table)
        return table

    def state_dict(self) -> dict[str, Any]:
        return {REF_TABLES_KEY: dict(self._tables)} if self._tables else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tables = dict(state.get(REF_TABLES_KEY, {}))


def _attach_frozen_reference(stage: CausalLMModule, ref_model: str | nn.Module | None) -> bool:
    """Set ``stage.ref_model`` to a frozen copy of the initial policy, or to ``ref_model`` loaded.

    Returns whether it can be rebuilt from its source (a hub id or path): checkpoints then leave it
    out, since saving 7B of frozen weights per checkpoint buys nothing. A random-init or in-memory
    reference is stored, so a resumed run always gets back the same one.
    """
    if ref_model is not None:
        if stage.memory.sharded_init:
            raise ValueError("memory.sharded_init copies the reference from the policy; a separate ref_model is not "
                             "supported with it yet")
        stage.ref_model = freeze(stage.load_model(ref_model))
        return isinstance(ref_model, str)
    policy = stage.model
    if stage.memory.sharded_init:
        # The architecture only: its weights arrive after sharding (CausalLMModule._materialize).
        with parameters_on_meta():
            stage.ref_model = freeze(stage.auto_model_class.from_config(policy.config, dtype=policy.dtype))
        return stage.policy_source is not None
    # A LoRA policy's reference is its base weights: adapters removed, not merged.
    stage.ref_model = freeze(copy.deepcopy(policy).unload() if hasattr(policy, "unload") else copy.deepcopy(policy))
    return stage.policy_source is not None


REFERENCES: dict[str, type[Reference]] = {
    cls.name: cls for cls in (CopyReference, AdapterReference, PrecomputedReference, NoReference)
}


def resolve_reference(spec: str | Reference | Mapping[str, Any]) -> Reference:
    """A strategy from its short name (``copy``), an instance, or ``{class_path, init_args}``."""
    if isinstance(spec, Reference):
        return spec
    if isinstance(spec, Mapping):  # as stored in hyper-parameters (load_from_checkpoint)

        module, _, name = str(spec["class_path"]).rpartition(".")
        cls = getattr(import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Reference)):
            raise ValueError(f"{spec['class_path']} is not a dpo_lightning.references.strategies.Reference")
        return cls(**dict(spec.get("init_args") or {}))
    if spec not in REFERENCES:

        close = difflib.get_close_matches(str(spec), list(REFERENCES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reference {spec!r}{hint}: use one of {', '.join(REFERENCES)} or a Reference class")
    return REFERENCES[spec]()


@torch.no_grad()
def mix_into_reference_(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO sync: ``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter, in place.

    ``alpha = 1`` is the hard update (the reference becomes a copy of the policy), as in TRL's
    ``sync_ref_model`` with ``ref_model_mixup_alpha``. A LoRA policy counts as the model it computes:
    its adapted weights merged, ``W + delta`` (``models.merged_parameters``), into a reference of the
    base architecture (the adapters are not copied, so the reference stays a plain model).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ref_sync_alpha must be in (0, 1], got {alpha}")
    ref_params = dict(reference.named_parameters())
    synced = set()
    for name, value in merged_parameters(policy):
        target = ref_params.get(name)
        if target is None:
            raise ValueError(f"the reference has no parameter {name!r}: TR-DPO needs the policy's architecture")
        target.lerp_(value.to(target.dtype), alpha)
        synced.add(name)
    if len(synced) != len(ref_params):
        missing = sorted(set(ref_params) - synced)
        raise ValueError(f"the policy has no parameter {missing[0]!r} of the reference ({len(missing)} in all): TR-DPO "
                         "needs the policy's architecture")


__all__ = [
    "AdapterReference",
    "CopyReference",
    "NoReference",
    "PrecomputedReference",
    "REFERENCES",
    "Reference",
    "mix_into_reference_",
    "resolve_reference",
]
