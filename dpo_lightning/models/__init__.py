"""Models and what is computed from their outputs, shared by every stage and by generation.

- `loading`: a model from a hub id, a path, a config or an object; dtypes, the meta-device build,
  LoRA (`wrap_lora`), freezing, dropout;
- `logprobs`: logits -> per-sequence log-probs of the response tokens (the one log-prob function);
- `lm_head`: the lean path, last hidden states -> the same log-probs without ``(rows, T, V)`` logits.

Nothing here knows about Lightning, data files or stages.
"""

from dpo_lightning.models.loading import (
    check_local_source,
    check_max_length,
    check_vocab,
    disable_dropout,
    empty_model,
    freeze,
    load_causal_lm,
    load_model,
    looks_like_path,
    merged_parameters,
    parameters_on_meta,
    resolve_dtype,
    text_config,
    weights_dtype,
    wrap_lora,
)

__all__ = [
    "check_local_source",
    "check_max_length",
    "check_vocab",
    "disable_dropout",
    "empty_model",
    "freeze",
    "load_causal_lm",
    "load_model",
    "looks_like_path",
    "merged_parameters",
    "parameters_on_meta",
    "resolve_dtype",
    "text_config",
    "weights_dtype",
    "wrap_lora",
]
