"""dpo_lightning: Direct Preference Optimization and its relatives for PyTorch Lightning."""

from dpo_lightning.data import PreferenceDataModule, SFTDataModule
from dpo_lightning.dpo import DPOModule
from dpo_lightning.kto import KTOModule
from dpo_lightning.losses import LOSSES, LossOutput, PairLogps, check_loss_config, compute_loss, get_loss_fn
from dpo_lightning.options import LoraOptions, MemoryOptions
from dpo_lightning.reference import AdapterReference, CopyReference, NoReference, PrecomputedReference, Reference
from dpo_lightning.reward import RewardModule
from dpo_lightning.sft import SFTModule
from dpo_lightning.stage import CausalLMModule

__version__ = "0.1.0.dev0"

__all__ = [
    "AdapterReference",
    "CausalLMModule",
    "CopyReference",
    "DPOModule",
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
    "check_loss_config",
    "compute_loss",
    "get_loss_fn",
]
