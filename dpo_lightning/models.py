"""Loading the policy and reference causal LMs: from a hub id, a local path, or a config."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``None`` and ``"auto"`` keep the checkpoint's own."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype  # type: ignore[return-value]
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def load_causal_lm(
    source: str | PreTrainedModel | None = None,
    *,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build a causal LM from exactly one of ``source`` (hub id, path or model) and ``config``.

    ``config`` is a dict with ``model_type`` (e.g. ``"llama"``) plus that config class's fields;
    the model is randomly initialised from it (tests, the offline tiny recipe). ``vocab_size``
    fills in the config's when it does not give one (usually ``len(tokenizer)``).
    """
    if (source is None) == (config is None):
        raise ValueError("give exactly one of a model (hub id, path or instance) and model_config")
    if isinstance(source, PreTrainedModel):
        return source
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if config is not None:
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError("model_config needs a 'model_type' such as 'llama' or 'gpt2'")
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        cfg = AutoConfig.for_model(model_type, **fields)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code, **kwargs)
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        return model
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to 0, as TRL does by default for DPO.

    Covers ``nn.Dropout`` modules and the float ``attention_dropout`` attributes that
    Hugging Face attention layers pass straight to ``scaled_dot_product_attention``.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference model is only ever evaluated."""
    model.eval()
    model.requires_grad_(False)
    return model
