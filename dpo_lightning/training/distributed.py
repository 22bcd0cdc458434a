"""Scale-out helpers: FSDP2 sharding of policy and reference, activation checkpointing, and
consolidation of sharded (distributed) checkpoints into one state dict.

Nothing here launches processes or reduces tensors by hand: Lightning's strategies
(``ddp``, ``ModelParallelStrategy``, ``FSDPStrategy``) do that. ``CausalLMModule.configure_model``
calls :func:`shard_models` only when the strategy gives the module a device mesh
(``ModelParallelStrategy``); under every other strategy sharding is a no-op.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

# Name of the non-tensor part of a sharded Lightning checkpoint (``lightning.fabric.utilities.load``).
_METADATA_FILENAME = "meta.pt"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM, in order.

    Uses the classes the model itself names as unsplittable (``_no_split_modules``, e.g.
    ``LlamaDecoderLayer``, ``GPT2Block``), which is what HF's own device maps and FSDP1's
    auto-wrap use; falls back to the longest ``nn.ModuleList`` for models that name none.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}: no _no_split_modules, no ModuleList")
    return list(max(lists, key=len))


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Classes of :func:`decoder_layers`: the ``transformer_layer_cls`` of FSDP1 auto-wrap."""
    return {type(layer) for layer in decoder_layers(model)}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Hugging Face's own switch, non-reentrant: the checkpoint sits inside each decoder layer's
    ``__call__``, so it composes with FSDP2's per-layer hooks and keeps parameter names (and
    therefore checkpoints) unchanged.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation (gradient) checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_sharded(model: nn.Module) -> bool:

    return isinstance(model, FSDPModule)


def shard_models(
    policy: nn.Module,
    frozen: list[nn.Module | None],
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
) -> None:
    """``fully_shard`` the policy and the frozen models a stage holds over the mesh's data-parallel dimension.

    Each decoder layer is its own FSDP unit (one all-gather per layer, freed after use) and
    the root picks up what is left (embeddings, final norm, LM head). ``param_dtype`` is the
    compute dtype: parameters are all-gathered in it, while gradients are reduced in float32
    and the sharded parameters and optimizer state keep the dtype the model was loaded in.
    ``None`` computes in that dtype too (exact comparisons on CPU).

    Frozen models (a reference) are sharded the same way: they are only ever evaluated (no
    gradients, no optimizer state), so their shards are stored directly in ``param_dtype``: the
    all-gather casts to that dtype anyway, so their outputs are unchanged and their memory halves.
    ``None`` entries (no reference model) are skipped.
    """
    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    frozen = [m for m in frozen if m is not None]
    if param_dtype is not None:
        for model in frozen:
            # Parameters only: buffers (RoPE's inv_freq) stay float32, as the policy's do.
            for param in model.parameters():
                param.data = param.data.to(param_dtype)
    for model in (policy, *frozen):
        if is_sharded(model):  # configure_model runs once per trainer entry point (fit, validate, ...)
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def broadcast_initial_weights(
    policy: nn.Module, frozen: list[Any], initial: dict[str, torch.Tensor], frozen_dtype: torch.dtype | None
) -> None:
    """``memory.sharded_init``, after :func:`shard_models`: rank 0 broadcasts its weights (``initial``, its
    ``state_dict()`` taken before sharding; empty on the other ranks) tensor by tensor; every rank keeps its shards
    of the policy, and each frozen model (``models.frozen.FrozenModel``) built on the meta device as a copy of the
    policy takes the same weights in its storage dtype (``FrozenModel.materialize``)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, dict(initial), options=options)  # (it replaces the dict's values)
    for model in frozen:
        model.materialize(initial, frozen_dtype, options)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a model, on CPU, for saving it whole (e.g. a Hugging Face export).

    Under FSDP2 this is a collective: call it on every rank; rank 0 gets the tensors, the other
    ranks an empty dict. An unsharded model just returns its own ``state_dict()``.
    """
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidate_checkpoint(path: str | Path, only: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint as one in-memory dict, whether saved whole or sharded.

    ``path`` is either a single file (``ModelParallelStrategy(save_distributed_checkpoint=False)``,
    DDP, single device) or the folder of a sharded checkpoint (``save_distributed_checkpoint=True``:
    one ``.distcp`` file per rank plus ``meta.pt``). Runs in one process without a process group.
    The result has the usual keys (``state_dict`` with full, unsharded tensors, ``hyper_parameters``,
    ``optimizer_states``, ...), so ``torch.save(result, "model.ckpt")`` gives a file that
    ``DPOModule.load_from_checkpoint`` and the Hugging Face export read. ``only`` loads just the
    sharded entries whose flattened name starts with it (``"state_dict.model."``: the policy's
    weights, without optimizer state or reference) and returns no ``optimizer_states``.
    """
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not (path / _METADATA_FILENAME).is_file():
        raise ValueError(f"{path} is neither a checkpoint file nor a sharded checkpoint folder ({_METADATA_FILENAME})")
    # An empty target plus this planner loads every tensor whole, in the saved nesting (as
    # torch's dcp_to_torch_save and Lightning's consolidate_checkpoint do, without the extra file).
    tensors: dict[str, Any] = {}
    reader = FileSystemReader(path)
    keys = None
    if only is not None:
        keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(only)}
    _load_state_dict(tensors, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    checkpoint = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = tensors.pop("state_dict", {})
    optimizers = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if only is None:
        checkpoint["optimizer_states"] = [tensors.pop(k) for k in optimizers]
    checkpoint.update(tensors)
    return checkpoint
