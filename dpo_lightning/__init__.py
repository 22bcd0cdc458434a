"""dpo_lightning: Direct Preference Optimization and its relatives for PyTorch Lightning.

The folders are the pipeline's parts (docs/architecture.md): `cli` -> `pipeline` -> `generation` ->
`stages` -> `references`, `losses`, `data` -> the shared machinery in `training` and `models`.
"""

from dpo_lightning._moved import MOVED, import_module
from dpo_lightning._version import __version__
from dpo_lightning.data import KTODataModule, PreferenceDataModule, SFTDataModule
from dpo_lightning.losses import LOSSES, LossOutput, PairLogps, check_loss_config, compute_loss, get_loss_fn
from dpo_lightning.references import AdapterReference, CopyReference, NoReference, PrecomputedReference, Reference
from dpo_lightning.stages import CausalLMModule, DPOModule, KTOModule, RewardModule, SFTModule
from dpo_lightning.stages.options import LoraOptions, MemoryOptions


def __getattr__(name: str):
    """``dpo_lightning.<module of the flat layout>`` (e.g. ``dpo`` in ``dpo_lightning.dpo.DPOModule``, the class
    path configs and checkpoints saved before #28 carry) -> the module it moved to (`_moved.MOVED`)."""
    if name in MOVED:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterReference",
    "CausalLMModule",
    "CopyReference",
    "DPOModule",
    "KTODataModule",
    "KTOModule",
    "LOSSES",
    "LoraOptions",
    "LossOutput",
    "MemoryOptions",
    "NoReference",
    "PairLogps",
    "PrecomputedReference",
    "PreferenceDataModule",
    "Reference",
    "RewardModule",
    "SFTDataModule",
    "SFTModule",
    "__version__",
    "check_loss_config",
    "compute_loss",
    "get_loss_fn",
]
