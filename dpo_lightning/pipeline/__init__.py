"""Iterative DPO (``python -m dpo_lightning iterate``): the stage commands chained into rounds.

`rounds`: SFT -> (reward model) -> per round generate -> judge -> pairs -> DPO (`iterate`, the command's
`main`); `stage_runs`: one stage in its own folder, skipped when done, resumed when stopped; `ranks`: on
several processes, which one writes the pipeline's files and how they were launched; `evaluation`:
each round's policy measured on held-out prompts; `report`: report.csv, report.png and TensorBoard.
"""

from dpo_lightning.pipeline.evaluation import (
    Evaluation,
    evaluate_policy,
    evaluation_prompts,
    exact_check,
    greedy_exact_rate,
    response_logps,
    sample_with_ids,
)
from dpo_lightning.pipeline.report import write_report
from dpo_lightning.pipeline.rounds import iterate, main
from dpo_lightning.pipeline.stage_runs import Stage, mix_pairs

__all__ = [
    "Evaluation",
    "Stage",
    "evaluate_policy",
    "evaluation_prompts",
    "exact_check",
    "greedy_exact_rate",
    "iterate",
    "main",
    "mix_pairs",
    "response_logps",
    "sample_with_ids",
    "write_report",
]
