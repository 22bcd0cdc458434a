"""Precomputed reference log-probs: one pass of the reference before training, cached on disk.

The cache key covers the reference weights, the dataset's fingerprint and the tokenization
settings, so a change to any of them recomputes (``reference.PrecomputedReference`` runs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


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
