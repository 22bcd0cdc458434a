"""PrecomputedReference (``reference: precomputed``): reference log-probs computed once before training, cached
on disk (``references/precompute.py``); the reference model is then freed."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dpo_lightning.references.base import Reference, Stage
from dpo_lightning.references.precompute import (
    cache_key,
    compute_reference_logps,
    default_cache_dir,
    load_cached,
    save_cached,
    weights_fingerprint,
)

REF_TABLES_KEY = "dpo_lightning_reference_logps"
_EVALUATED_SPLITS = {"validate": "validation", "test": "test"}  # trainer.state.fn -> the split it reads


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
        super().__init__()
        self.cache_dir = cache_dir
        self._tables: dict[str, Tensor] = {}  # train and validation, of the fit (kept in checkpoints)
        self._evaluated: Tensor | None = None  # the split of a validate/test of its own, looked up by index
        self._evaluated_data: str | None = None  # that split's fingerprint before its index column
        self._fingerprint: str | None = None

    def build(self, stage: Stage, ref_model: str | nn.Module | None) -> None:
        self.hold_initial_policy(stage, ref_model)  # the model to run the pass with

    def setup(self, stage: Stage) -> None:
        if self.model is not None and self._fingerprint is None:  # before configure_model may shard it
            self._fingerprint = weights_fingerprint(self.model)
        fn = getattr(stage.trainer.state.fn, "value", None) if stage._trainer is not None else None
        split = _EVALUATED_SPLITS.get(fn)
        if split is not None:
            # A validate/test of its own: Lightning builds the loader (and fetches its first batch) before
            # on_validation_start, where the table is computed; the batches say which rows they hold instead.
            dm = getattr(stage.trainer, "datamodule", None)
            if hasattr(dm, "add_index") and dm.splits.get(split) is not None:  # (other loaders: batches with ref_logps)
                self._evaluated_data = dm.splits[split]._fingerprint  # the cache key's, as a fit's pass keys it
                dm.add_index(split)

    def logps(self, stage: Stage, batch: Mapping[str, Tensor]) -> Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self._evaluated is not None and "index" in batch:
            rows = self._evaluated[batch["index"].cpu()]  # (B, 2): chosen, rejected
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["index"].device)  # (2B,), chosen first
        raise RuntimeError(
            "reference 'precomputed' but the batch carries no ref_logps: use PreferenceDataModule "
            "(the log-probs are computed at fit start) or a loader whose batches carry them"
        )

    def on_fit_start(self, stage: Stage) -> None:
        dm = self._datamodule(stage)
        for split, dataset in dm.reference_splits().items():
            table = self._tables.get(split)  # from the checkpoint of a resume
            if table is None:
                table = self._table(stage, dm, split, dataset)
            self._tables[split] = table
            dm.set_reference_logps(split, table)
        self.release()  # only the policy stays resident from here on
        gc.collect()

    def on_evaluation_start(self, stage: Stage, split: str) -> None:
        # The reference as it stands now (a checkpoint's tables are of its fit's data, which may not be this).
        dm = getattr(stage.trainer, "datamodule", None)
        dataset = dm.splits.get(split) if hasattr(dm, "add_index") else None  # (other loaders: batches with ref_logps)
        if dataset is None or "ref_chosen_logps" in dataset.column_names:  # no data, or attached by a fit
            return
        self._evaluated = self._table(stage, dm, split, dataset, self._evaluated_data)

    def _datamodule(self, stage: Stage) -> Any:
        dm = getattr(stage.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_reference_logps"):
            raise ValueError("reference 'precomputed' needs PreferenceDataModule (or batches carrying ref_logps)")
        return dm

    def _table(self, stage: Stage, dm: Any, split: str, dataset: Any, data: str | None = None) -> Tensor:
        """``(N, 2)`` reference log-probs of ``split``: from the cache, else one pass of the reference.
        ``data``: the split's fingerprint for the cache key, when ``dataset`` has gained columns since."""
        cache_dir = Path(self.cache_dir or default_cache_dir())
        key = cache_key(self._fingerprint, data or dataset._fingerprint, dm.tokenization_settings())
        path = cache_dir / f"{key}.pt"
        table = load_cached(path)
        if table is not None:
            rank_zero_info(f"precomputed reference log-probs for {split}: cache hit {path}")
            return table
        if self.model is None:
            raise RuntimeError(f"reference 'precomputed': no reference log-probs for split {split!r}, and the "
                               "reference model was freed after a fit's pass (train and validation); run it in a new "
                               "process, e.g. `python -m dpo_lightning test --ckpt_path ...`")
        rank_zero_info(f"precomputing reference log-probs for {split} ({len(dataset)} pairs), cached in {path}")
        batches = (stage.trainer.strategy.batch_to_device(b) for b in dm.ordered_dataloader(split))
        table = compute_reference_logps(batches, lambda b: stage.sequence_logps(self.model, b).logps, len(dataset))
        if stage.trainer.is_global_zero:
            save_cached(path, table)
        return table

    def checkpoint_state(self) -> dict[str, Any]:
        return {REF_TABLES_KEY: dict(self._tables)} if self._tables else {}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        self._tables = dict(checkpoint.get(REF_TABLES_KEY, {}))


__all__ = ["REF_TABLES_KEY", "PrecomputedReference"]
