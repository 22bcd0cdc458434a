"""dpo_lightning: Direct Preference Optimization and its relatives for PyTorch Lightning."""

from dpo_lightning.losses import LOSSES, LossOutput, PairLogps, compute_loss, get_loss_fn
from dpo_lightning.module import DPOModule

__version__ = "0.1.0.dev0"

__all__ = ["DPOModule", "LOSSES", "LossOutput", "PairLogps", "compute_loss", "get_loss_fn"]
