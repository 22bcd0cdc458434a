"""The training stages: one LightningModule base (`base.CausalLMModule`) and one file per objective.

SFT (`sft`) -> reward model (`reward`) -> DPO (`dpo`) / KTO (`kto`); a new objective is one more file
here, a subclass that declares its metrics, checkpoint metric and batch format and implements ``step``.
Beside them: `options` (the LoRA and memory groups), `preflight` (settings checked before weights load)
and `export` (any stage's checkpoint -> a Hugging Face folder).
"""

from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.stages.dpo import DPOModule, StepOutput
from dpo_lightning.stages.kto import KTOModule
from dpo_lightning.stages.reward import RewardModule
from dpo_lightning.stages.sft import SFTModule

__all__ = ["CausalLMModule", "DPOModule", "KTOModule", "RewardModule", "SFTModule", "StepOutput"]
