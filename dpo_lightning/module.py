"""Where ``DPOModule`` lived before the stage base: kept so ``from dpo_lightning.module import DPOModule`` works."""

from dpo_lightning.dpo import DPOModule, StepOutput
from dpo_lightning.kto import KTOModule
from dpo_lightning.stage import CausalLMModule

__all__ = ["CausalLMModule", "DPOModule", "KTOModule", "StepOutput"]
