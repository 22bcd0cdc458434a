"""Which fast paths a run takes (a mixin of ``CausalLMModule``): packed or prefix-shared batches
(``data.collator: auto``) and the lean log-prob path (last hidden states, ``models/lm_head.py``) instead of full
``(rows, T, V)`` logits; each where the model and stage compute exactly what the plain path computes, said once.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from dpo_lightning.data.prefix_sharing import attention_cost
from dpo_lightning.models.lm_head import lean_sequence_logps, lean_unsupported
from dpo_lightning.models.loading import text_config
from dpo_lightning.models.logprobs import SequenceLogps, sequence_logps
from dpo_lightning.stages.preflight import PACKED_COLLATORS, ConfigError


class FastPaths:
    """The stage's choice of batches and log-prob path."""

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

    def check_lean_sharded(self) -> None:
        """ValueError when ``memory.lean_logprobs: true`` asks for the lean path a sharded model cannot take."""
        if self.memory.lean_logprobs:
            why = lean_unsupported(self.model, sharded=True)
            if why:
                raise ValueError(f"lean_logprobs under ModelParallelStrategy (FSDP2): {why}; set it false")

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

    def packing_unsupported(self) -> str | None:
        """Why this stage's batches cannot be packed rows (block-causal 4D mask), or None."""
        kernel = getattr(self.model.config, "_attn_implementation", None) or self._load_kwargs["attn_implementation"]
        if kernel not in (None, "sdpa", "eager"):
            return f"attention kernel {kernel!r} cannot take the packed rows' block-causal 4D mask"
        return positions_unsupported(self.model)

    def choose_fast_paths(self, datamodule: Any) -> None:
        """Resolve ``data.collator: auto`` (packed rows when the stage and model take them) and say, once,
        which batches and log-prob path this run uses, and why."""
        lines = []
        choose = getattr(datamodule, "choose_collator", None)
        if choose is not None:
            # the model's reason (attention kernel, sliding window); a stage may add its own
            kernel = FastPaths.packing_unsupported(self) or sliding_window_unsupported(
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


__all__ = ["FastPaths", "positions_unsupported", "sliding_window_unsupported"]
