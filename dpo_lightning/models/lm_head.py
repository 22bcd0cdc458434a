"""Split a Hugging Face causal LM into its backbone and LM head, for the lean log-prob path.

``logprobs.sequence_logps_from_hidden`` needs the last hidden states, the LM head's weight (and
bias) and whatever the model does to its logits after the head. This file finds those pieces on
a model and runs the backbone; it refuses, with a clear message, the models whose logits it
cannot reproduce exactly, so the lean path never silently computes something else.

Under FSDP2 the model runs whole with its LM head swapped for the identity (its root unit gathers
the embeddings and head); models that scale or soft-cap logits in their forward keep full logits there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from dpo_lightning.models.loading import text_config
from dpo_lightning.models.logprobs import DEFAULT_CHUNK_ELEMENTS, SequenceLogps, sequence_logps_from_hidden

# Config fields some architectures use to post-process logits that we do not reproduce.
_UNSUPPORTED_FIELDS = ("output_multiplier", "lm_head_multiplier")
# Model types whose ``logits_scaling`` divides the logits (Granite family, MiniCPM3).
_DIVIDE_BY_LOGITS_SCALING = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "minicpm3")


class LogitTransform(NamedTuple):
    """``logits -> softcap * tanh(scale * logits / softcap)`` (no tanh when ``softcap`` is None)."""

    scale: float
    softcap: float | None


def logit_transform(config) -> LogitTransform:
    """The post-LM-head logit transform declared by a transformers config; raises if unsupported."""
    text = text_config(config)
    model_type = getattr(text, "model_type", "")
    for field in _UNSUPPORTED_FIELDS:
        if getattr(text, field, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"lean_logprobs does not reproduce {model_type}'s `{field}` logit scaling; "
                "set lean_logprobs=False for this model"
            )
    scale = getattr(text, "logit_scale", None)  # Cohere multiplies its logits by it
    scaling = getattr(text, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        if model_type not in _DIVIDE_BY_LOGITS_SCALING or scale is not None:
            raise NotImplementedError(
                f"lean_logprobs does not know how {model_type!r} applies `logits_scaling`; "
                "set lean_logprobs=False for this model"
            )
        scale = 1.0 / scaling
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(scale=1.0 if scale is None else float(scale), softcap=softcap)


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The module that returns ``last_hidden_state`` and the ``nn.Linear`` LM head of a causal LM."""
    if hasattr(model, "get_base_model"):  # PEFT: adapters live inside the wrapped model's modules
        model = model.get_base_model()
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        # A LoRA-wrapped (peft layers are not nn.Linear) or custom head would be bypassed by reading .weight.
        raise NotImplementedError(
            f"lean_logprobs needs a plain nn.Linear LM head, got {type(head).__name__}; "
            "leave the LM head out of the adapter's target modules or set lean_logprobs=False"
        )
    backbone = model.base_model
    if backbone is model:
        raise NotImplementedError(f"{type(model).__name__} exposes no backbone (base_model); set lean_logprobs=False")
    return backbone, head


def _is_fsdp2(model: torch.nn.Module) -> bool:

    return isinstance(model, FSDPModule)


def lean_unsupported(model: torch.nn.Module, sharded: bool = False) -> str | None:
    """Why the lean path cannot score ``model`` exactly (its LM head, its logit post-processing), or None;
    ``sharded``: under FSDP2, where the logit post-processing must be the identity."""
    try:
        transform = logit_transform(model.config)
        backbone_and_head(model)
        if sharded and transform != LogitTransform(1.0, None):
            return "the model scales or soft-caps its logits in its forward, which the lean path under FSDP2 skips"
    except NotImplementedError as e:
        return str(e).split(";")[0]
    except AttributeError:  # not a transformers causal LM (no config or output embeddings)
        return f"{type(model).__name__} is not a Hugging Face causal LM with an output embedding"
    return None


def lean_sequence_logps(
    model: torch.nn.Module,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> SequenceLogps:
    """Per-sequence response log-probs of ``model`` on ``inputs``, without building ``(N, T, V)`` logits.

    Under FSDP2 the backbone cannot be called on its own: the root unit (embeddings, final norm, LM
    head) all-gathers its parameters in the model's own forward. So the model runs whole, with its LM
    head swapped for the identity: its "logits" are the last hidden states, and the head's weight, left
    unsharded by the root's forward (FSDP2 keeps the root's parameters gathered until backward), is
    then used by the chunked projection; its gradient goes through FSDP2's reduce-scatter as usual.
    """
    backbone, head = backbone_and_head(model)
    transform = logit_transform(model.config)
    if _is_fsdp2(model):
        if transform != LogitTransform(1.0, None):
            raise NotImplementedError(f"{transform} applied in the model's forward: not under FSDP2")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_output_embeddings(torch.nn.Identity())
        try:
            hidden = model(**inputs, use_cache=False).logits  # (N, T, H): the identity head's "logits"
        finally:
            base.set_output_embeddings(head)
    else:
        hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (N, T, H)
    return sequence_logps_from_hidden(
        hidden,
        head.weight,
        labels,
        lm_head_bias=head.bias,
        logit_scale=transform.scale,
        logit_softcap=transform.softcap,
        sequence_ids=sequence_ids,
        num_sequences=num_sequences,
        chunk_elements=chunk_elements,
    )
