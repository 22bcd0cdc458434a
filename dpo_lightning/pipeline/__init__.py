"""Iterative DPO (``python -m dpo_lightning iterate``): the stage commands chained into rounds.

`rounds`: SFT -> (reward model) -> per round generate -> judge -> pairs -> DPO, each stage in its own
folder, skipped when done, resumed when stopped; the held-out evaluation and the report.
"""

from dpo_lightning.pipeline.rounds import (
    Evaluation,
    Stage,
    evaluate_policy,
    iterate,
    main,
    mix_pairs,
    sample_with_ids,
    write_report,
)

__all__ = ["Evaluation", "Stage", "evaluate_policy", "iterate", "main", "mix_pairs", "sample_with_ids", "write_report"]
