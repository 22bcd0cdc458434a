"""Judges: score the sampled responses (or compare two) so that pairs can be made.

One file per kind behind the `base.Judge` interface: `function` (a Python function), `reward_model` (a sequence
classifier), `llm` (an LLM asked pairwise or for a score; its templates and verdict checks in `llm_prompts`);
`registry` maps a spec prefix to its class. A new judge is one file here and one line in `registry.JUDGES`.
"""

from dpo_lightning.generation.judges.base import Failure, Judge, JudgeStats, as_completion, as_score, warn_failures
from dpo_lightning.generation.judges.function import FunctionJudge, import_function
from dpo_lightning.generation.judges.registry import JUDGES, check_options, judge_class, resolve_judge
from dpo_lightning.generation.judges.reward_model import RewardModelJudge

__all__ = [
    "JUDGES",
    "Failure",
    "FunctionJudge",
    "Judge",
    "JudgeStats",
    "RewardModelJudge",
    "as_completion",
    "as_score",
    "check_options",
    "import_function",
    "judge_class",
    "resolve_judge",
    "warn_failures",
]
