"""How the reference log-probs are obtained: ``DPOModule(reference=...)``.

- ``copy``: a frozen copy of the initial policy, or a separate ``ref_model``; two models resident.
- ``adapter``: the policy is a PEFT LoRA model; the reference is the same base weights with the
  adapters disabled, so one set of base weights is in memory.
- ``precomputed``: one pass over the train and validation data computes the reference log-probs
  before training; they are cached on disk and the reference model is freed.
- ``none``: no reference, for reference-free losses (SimPO, ORPO, CPO).

TR-DPO (Gorbatovski et al. 2024) moves a ``copy`` reference towards the policy every N steps:
:func:`mix_into_reference_`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ReferenceKind = Literal["copy", "adapter", "precomputed", "none"]
REFERENCE_KINDS: tuple[str, ...] = get_args(ReferenceKind)


# --------------------------------------------------------------------------- adapter


def wrap_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (PEFT); base weights stay frozen.

    ``target_modules=None`` lets PEFT pick the architecture's usual projections; ``"all-linear"``
    targets every linear layer but the output head.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("reference='adapter' needs PEFT: pip install 'dpo_lightning[peft]'") from err
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- TR-DPO


@torch.no_grad()
def mix_into_reference_(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO sync: ``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter, in place.

    ``alpha = 1`` is the hard update (the reference becomes a copy of the policy), as in TRL's
    ``sync_ref_model`` with ``ref_model_mixup_alpha``.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ref_sync_alpha must be in (0, 1], got {alpha}")
    ref_params = dict(reference.named_parameters())
    for name, p in policy.named_parameters():
        target = ref_params.get(name)
        if target is None:
            raise ValueError(f"the reference has no parameter {name!r}: TR-DPO needs the policy's architecture")
        target.lerp_(p.detach().to(target.dtype), alpha)


# --------------------------------------------------------------------------- precomputed


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and bytes) of ``model``."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, data: str, settings: Mapping[str, Any]) -> str:
    """Key of a precomputed-log-probs cache: reference weights, dataset fingerprint, tokenization."""
    blob = json.dumps({"weights": weights, "data": data, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    root = os.environ.get("DPO_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dpo_lightning"
    )
    return Path(root) / "reference_logps"


@torch.no_grad()
def compute_reference_logps(
    batches: Iterable[Mapping[str, Tensor]],
    logps_fn: Callable[[Mapping[str, Tensor]], Tensor],
    num_examples: int,
) -> Tensor:
    """Run ``logps_fn`` (a batch of 2B rows -> ``(2B,)`` log-probs) over ``batches`` in one pass.

    Every batch carries ``index`` ``(B,)``: the examples' positions in their split. Returns
    ``(num_examples, 2)`` float32: column 0 chosen, column 1 rejected; NaN where never visited.
    """
    table = torch.full((num_examples, 2), float("nan"), dtype=torch.float32)
    for batch in batches:
        logps = logps_fn(batch).float().cpu()  # (2B,)
        b = logps.shape[0] // 2
        index = batch["index"].cpu()
        table[index, 0] = logps[:b]
        table[index, 1] = logps[b:]
    return table


def load_cached(path: Path) -> Tensor | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_cached(path: Path, table: Tensor) -> None:
    """Atomic write: a crash mid-save never leaves a truncated cache under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
