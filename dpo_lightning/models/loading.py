"""Loading the models a stage trains or compares against: from a hub id, a local path, or a config.

A causal LM (policy, reference) by default; a stage may ask for another ``AutoModelFor...`` class
(the reward model: ``AutoModelForSequenceClassification`` with one label, whose score head a
causal-LM checkpoint or config gets new, as transformers gives it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
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


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and their buffers for
    real (RoPE's ``inv_freq`` is computed in ``__init__``, and no checkpoint holds it)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def float32_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s float32 buffers by name: taken in ``setup``, before a precision plugin casts the
    module (``bf16-true``, ``16-true``), for :func:`restore_float32_buffers`."""
    return {k: v.detach().clone() for k, v in module.named_buffers() if v.dtype == torch.float32}


def restore_float32_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back in float32 the buffers of ``saved`` that a cast to bf16/fp16 rounded (``bf16-true`` casts the
    whole module): RoPE's ``inv_freq`` in bf16 shifts the rotary phase by up to ~1 rad at position 1000, so
    the model attends differently from the one that was trained; weights keep the precision's dtype. A buffer
    whose submodule is gone (a model freed since) is dropped from ``saved``."""
    for name, value in list(saved.items()):
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name) if owner_name else module
        except AttributeError:  # a model freed since setup (the precomputed reference): nothing to restore
            del saved[name]
            continue
        current = owner._buffers.get(leaf)
        if current is not None and current.dtype != torch.float32:
            owner._buffers[leaf] = value.to(current.device)


def weights_dtype(source: str | None, config: dict[str, Any] | None, dtype: str | torch.dtype | None,
                  trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model will hold: ``dtype`` if given, else its config's (the checkpoint's), else float32.
    Every rank of a sharded load must agree on it before any weights exist."""
    resolved = resolve_dtype(dtype)
    if isinstance(resolved, torch.dtype):
        return resolved
    if config is not None:
        recorded = config.get("dtype") or config.get("torch_dtype")
    else:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        recorded = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(recorded, torch.dtype):
        return recorded
    return _DTYPES.get(str(recorded).removeprefix("torch."), torch.float32) if recorded else torch.float32


def empty_model(
    source: str | None,
    *,
    auto_class: type = AutoModelForCausalLM,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """The model :func:`load_model` would return, with its parameters on the meta device: what a rank
    other than 0 holds before FSDP2 shards it and rank 0 broadcasts the weights (``memory.sharded_init``)."""
    if config is not None:
        fields = {**dict(config), **config_overrides}
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **config_overrides)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with parameters_on_meta():
        return auto_class.from_config(cfg, trust_remote_code=trust_remote_code, **kwargs)


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` names a local file or folder rather than a hub id (``org/name`` or ``name``)."""
    return (
        spec.startswith(("/", "./", "../", "~", ".\\"))
        or spec.endswith(("/", os.sep))
        or spec.count("/") > 1
        or "\\" in spec
        or Path(spec).exists()
    )


def check_local_source(spec: str, what: str) -> None:
    """FileNotFoundError naming ``spec`` when it is a local path that does not exist.

    Without this a mistyped path reaches the hub client, whose message is about repo id syntax.
    """
    if looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"{what} {spec!r}: no such file or folder")


def check_vocab(model: PreTrainedModel, tokenizer_size: int | None) -> None:
    """ValueError when the tokenizer has ids the model's embedding table cannot look up.

    Caught here, at build time, instead of as ``IndexError: index out of range`` at the first step.
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if tokenizer_size is not None and rows is not None and tokenizer_size > rows:
        raise ValueError(
            f"the tokenizer has {tokenizer_size} tokens but the model's embedding table has {rows} rows "
            f"({type(model.config).__name__}.vocab_size={getattr(model.config, 'vocab_size', None)}): ids >= {rows} "
            "would index out of range; use the model's own tokenizer or a model built for this one"
        )


def load_causal_lm(source: str | PreTrainedModel | None = None, **kwargs: Any) -> PreTrainedModel:
    """Build a causal LM from exactly one of ``source`` (hub id, path or model) and ``config``.

    ``config`` is a dict with ``model_type`` (e.g. ``"llama"``) plus that config class's fields;
    the model is randomly initialised from it (tests, the offline tiny recipe). ``vocab_size``
    fills in the config's when it does not give one (usually ``len(tokenizer)``). The other
    keywords (``dtype``, ``trust_remote_code``, ``attn_implementation``) are :func:`load_model`'s.
    """
    return load_model(source, auto_class=AutoModelForCausalLM, **kwargs)


def load_model(
    source: str | PreTrainedModel | None = None,
    *,
    auto_class: type = AutoModelForCausalLM,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """:func:`load_causal_lm` for any ``auto_class`` (``AutoModelForSequenceClassification``...).

    ``config_overrides`` set config fields on loading or building (``num_labels=1``); a model
    object is returned as it is.
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
        fields = {**dict(config), **config_overrides}
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError("model_config needs a 'model_type' such as 'llama' or 'gpt2'")
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        cfg = AutoConfig.for_model(model_type, **fields)
        model = auto_class.from_config(cfg, trust_remote_code=trust_remote_code, **kwargs)
        if isinstance(torch_dtype, torch.dtype):
            for param in model.parameters():  # buffers (RoPE's inv_freq) stay float32, as from_pretrained keeps them
                param.data = param.data.to(torch_dtype)
        return model
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    check_local_source(source, "model")
    return auto_class.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs, **config_overrides)


def load_policy(
    source: str | PreTrainedModel | None,
    config: dict[str, Any] | None,
    *,
    tokenizer: Any,
    max_length: int | None,
    load_kwargs: dict[str, Any],
    auto_class: type = AutoModelForCausalLM,
    overrides: dict[str, Any] | None = None,
    on_meta: bool = False,
    no_dropout: bool = True,
    lora: dict[str, Any] | None = None,
    lora_task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """A stage's trained model, in train mode: loaded (:func:`load_model`), or its architecture on the meta device
    (``on_meta``: FSDP2's sharded init on the ranks that receive rank 0's weights), checked against the tokenizer's
    vocabulary and the data's ``max_length``, its pad token set, dropout off and LoRA adapters on if asked."""
    vocab_size = len(tokenizer) if tokenizer is not None else None
    build = {"auto_class": auto_class, "config": config, "vocab_size": vocab_size, **load_kwargs, **(overrides or {})}
    model = empty_model(source, **build) if on_meta else load_model(source, **build)
    check_vocab(model, vocab_size)
    check_max_length(model, max_length)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if no_dropout:
        disable_dropout(model)
    if lora is not None:
        model = wrap_lora(model, **lora, task_type=lora_task_type)
    model.train()  # from_pretrained returns eval mode, and Lightning no longer calls train()
    return model


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


def wrap_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (PEFT); base weights stay frozen.

    ``target_modules=None`` lets PEFT pick the architecture's usual projections; ``"all-linear"``
    targets every linear layer but the output head. ``task_type="SEQ_CLS"`` (reward model) also
    trains the new score head in full, as PEFT does for that task.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA needs PEFT: pip install 'dpo_lightning[peft]'") from err
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type
    )
    return get_peft_model(model, config)


def unsharded_lora_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of the PEFT (LoRA) ``model`` holding ``state``, its full state dict (gathered from FSDP2
    shards: a sharded model can be neither copied nor merged in place), to export merged or as an adapter."""
    from peft import get_peft_model  # (LoRA needs PEFT; ``model`` is a PEFT model)

    base = model.get_base_model()
    # fully_shard swaps a module's class for an FSDP subclass of it: build the class it subclassed.
    cls = next(c for c in type(base).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = get_peft_model(cls(base.config), model.peft_config[model.active_adapter])
    copy.load_state_dict(state, strict=True, assign=True)
    return copy


@torch.no_grad()
def merged_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s weights as the plain model it wraps names and computes them, the model left unchanged.

    A model without PEFT wrapping: its parameters. A PEFT (LoRA) model: the base model's names
    (``model.layers.0.self_attn.q_proj.weight``), each adapted layer's weight and bias as its active
    adapters make them, ``W + delta`` (PEFT's own delta and variant merge, per layer: no copy of the model),
    and a ``modules_to_save`` module's active copy. A tied weight comes once, under its first name, as
    ``named_parameters`` gives it.
    """
    if not hasattr(model, "get_base_model"):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    seen: set[int] = set()  # tied weights: the first name only

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapter
            copies = module.modules_to_save
            chosen = copies[active] if not module.disable_adapters and active in copies else module.original_module
            yield from walk(chosen, prefix)
            return
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, LoraLayer):
                raise ValueError(f"{prefix or 'the model'} is a {type(module).__name__}: only LoRA layers merge here")
            layer = module.get_base_layer()
            merged = {name: p.detach() for name, p in layer.named_parameters()}
            if not module.merged and not module.disable_adapters:
                for adapter in module.active_adapters:
                    if adapter not in module.lora_A:
                        continue
                    weight = merged["weight"]
                    variant = getattr(module, "lora_variant", {}).get(adapter)
                    if variant is not None:  # DoRA and other variants merge their own way
                        merged["weight"] = variant.merge_safe(module, adapter, weight.clone())
                    else:
                        merged["weight"] = weight + module.get_delta_weight(adapter).to(weight.dtype)
                    if module.lora_bias.get(adapter):
                        merged["bias"] = merged["bias"] + module.lora_B[adapter].bias * module.scaling[adapter]
            for name, p in layer.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + name, merged[name]
            return
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(model.get_base_model(), "")


def text_config(config: Any) -> Any:
    """The language model's part of a config (multimodal configs nest it), or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_max_length(model: PreTrainedModel, max_length: int | None) -> None:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's {positions} positions "
            f"({type(config).__name__}); lower data.max_length or use a longer-context model"
        )
