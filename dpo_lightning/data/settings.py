"""The settings every data module shares, checked once (`TokenizedDataModule.__init__` declares them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .columns import check_column_options
from .errors import warn
from .tokenize import TRUNCATION_MODES

AUTO = "auto"  # collator: the data module's fast collator when the stage and its model take it, else padded rows


def check_settings(
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: str,
    val_fraction: float | None,
    batch_size: int,
    eval_batch_size: int | None,
    collator: str,
    collators: Mapping[str, Any],
    columns: Mapping[str, str] | None,
    drop_columns: Sequence[str] | None,
    fields: Sequence[str],
) -> None:
    """The settings every data module has: those that cannot work raise `ValueError`; a
    ``truncation_mode`` that nothing reads is named in a warning."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive or None, got {max_prompt_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ValueError(
            f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}"
        )
    if collator != AUTO and collator not in collators:
        raise ValueError(f"unknown collator {collator!r}; choose one of {sorted([AUTO, *collators])}")
    check_column_options(columns, drop_columns, fields)
    if max_prompt_length is None and truncation_mode != "keep_end":
        warn(f"truncation_mode={truncation_mode!r} is ignored: with max_prompt_length=None no prompt is cut")


def object_arguments(tokenizer: Any, dataset: Any) -> list[str]:
    """The arguments given as objects: not hyperparameters (they neither serialise nor print well)."""
    return [name for name, value in (("tokenizer", tokenizer), ("dataset", dataset)) if not isinstance(value, str)]


__all__ = ["AUTO", "check_settings", "object_arguments"]
