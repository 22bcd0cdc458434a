"""Typed groups of knobs that belong together, shared by every training stage.

Each is a dataclass: jsonargparse documents its fields in ``--help`` and YAML nests them
(``model.lora.r``, ``model.memory.lean_logprobs``); ``__post_init__`` refuses bad values when
the config is parsed, before any weights load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dpo_lightning.models.logprobs import DEFAULT_CHUNK_ELEMENTS


@dataclass(frozen=True)
class LoraOptions:
    """Train LoRA adapters (PEFT) instead of every weight; the base weights stay frozen.

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator: the update is scaled by alpha / r.
        dropout: Dropout on the adapter branch.
        target_modules: Module names to adapt (e.g. [q_proj, v_proj], or all-linear); None: PEFT's default.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class MemoryOptions:
    """How log-probs, activations and FSDP2 compute trade memory for time.

    Args:
        lean_logprobs: Score response positions from the last hidden states; never builds (2B, T, V) logits.
            None (default): on wherever the model allows it (a plain LM head, known logit scaling, not under
            FSDP2); the run logs which path it takes and why. True insists, False turns it off.
        logprob_chunk_elements: Float32 elements per chunk when computing log-probs (bounds extra memory).
        activation_checkpointing: Recompute each policy decoder layer in backward to save activation memory.
        fsdp_mixed_precision: Under ModelParallelStrategy (FSDP2): bf16 compute, fp32 gradient reduction.
        sharded_init: Under FSDP2: only rank 0 loads the weights; the other ranks build the model on the meta
            device, and after sharding rank 0 broadcasts the weights tensor by tensor, so a rank's host memory
            holds its shards (rank 0: one full copy while loading), and the reference copies the policy's
            weights the same way. Not with LoRA or a separate ref_model.
    """

    lean_logprobs: bool | None = None
    logprob_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    activation_checkpointing: bool = False
    fsdp_mixed_precision: bool = True
    sharded_init: bool = False

    def __post_init__(self) -> None:
        if self.logprob_chunk_elements < 1:
            raise ValueError(f"memory.logprob_chunk_elements must be >= 1, got {self.logprob_chunk_elements}")


def option_group(value: Any, cls: type, default: Any = None) -> Any:
    """A typed group from itself, a dict (a config, or a saved checkpoint's hyper-parameters) or None
    (``default``)."""
    if isinstance(value, Mapping):
        return cls(**value)
    return default if value is None else value


def recorded_groups(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """``init_args`` with its ``lora`` and ``memory`` groups as a stage records them in its hyper-parameters
    (plain dicts of every field; ``memory`` None is the defaults), so a config compares with a checkpoint's."""
    out = dict(init_args)
    for key, cls, default in (("lora", LoraOptions, None), ("memory", MemoryOptions, MemoryOptions())):
        if key in out:
            group = option_group(out[key], cls, default)
            out[key] = None if group is None else asdict(group)
    return out


__all__ = ["LoraOptions", "MemoryOptions", "option_group", "recorded_groups"]
