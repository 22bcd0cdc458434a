"""Iterative DPO: SFT, then rounds of generate -> judge -> pairs -> DPO, each stage in its own folder.

``python -m dpo_lightning iterate --config recipes/pipeline_tiny.yaml`` runs the stages through the
same commands a user runs (``fit`` with a stage recipe, ``generate`` with a generation recipe), adding
only what chains them: the previous stage's export as the next stage's model, the round's pairs as
DPO's data, and the reference (the initial SFT model, or the previous round's policy). Folders::

    <output_dir>/sft/stage/version_0/hf_export               the SFT model (round 0's policy)
    <output_dir>/round_1/generate/{samples,pairs}.jsonl     samples of round 0's policy, judged, paired
    <output_dir>/round_1/dpo/version_0/hf_export            round 1's policy
    ...
    <output_dir>/report.csv, report.png, tensorboard/       one row per round (round 0: the SFT model)

Each stage records in its folder (``stage.json``, written atomically before it starts) the settings it
runs with: the whole configuration its command resolves (`cli.resolved_config`) and which stages
made its inputs. A stage is done when that record says so and its output is complete (an export
carries its marker; ``generate``'s manifest says its pairs are written); a pipeline killed anywhere
and re-run with the same config skips finished stages, resumes a killed ``fit`` from its
``last.ckpt`` and a killed ``generate`` from the prompts it wrote. Re-run with other settings, the
first stage whose settings differ is refused, naming them: its output and every later round's were
made with the recorded ones. One run at a time per output folder (`folders.FolderLock`); SIGTERM stops
at the current stage's next safe point (an optimizer step, a written batch) or between stages, with
`Preempted` (exit 143): the same command resumes.

On several processes every one runs ``iterate``, started by torchrun or srun (`ranks.check_launch` refuses
Lightning's own launcher); the global rank 0 process holds the lock and writes the records and the report.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.utilities import rank_zero_only

from dpo_lightning.cli.config_errors import ShortErrors
from dpo_lightning.data.errors import DataError, warn
from dpo_lightning.generation.manifest import read_manifest
from dpo_lightning.pipeline.evaluation import Evaluation
from dpo_lightning.pipeline.ranks import check_launch, global_rank
from dpo_lightning.pipeline.report import _NO_PLOT, _can_plot, write_report
from dpo_lightning.pipeline.stage_runs import (
    STAGE_RECORD,
    Stage,
    _is_recipe,
    _run_fit_stage,
    _run_generate_stage,
    _stop_if_preempted,
)
from dpo_lightning.training.callbacks import PreemptionWatch
from dpo_lightning.training.folders import FolderLock, read_record

log = logging.getLogger(__name__)


def iterate(
    output_dir: str,
    sft: Stage,
    generate: Stage,
    dpo: Stage,
    rounds: int = 3,
    reference: Literal["initial", "previous"] = "previous",
    mix_with: str | None = None,
    mix_limit: int | None = None,
    evaluation: Evaluation | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run (or resume) the pipeline; returns the report rows (round 0 is the SFT model).

    Args:
        output_dir: Folder of every stage's output and the report.
        sft: The SFT recipe (run first), or ``config`` naming an existing model to start from.
        generate: The generation recipe (``python -m dpo_lightning generate``) sampling each round's pairs.
        dpo: The DPO recipe each round trains with, from the previous round's policy on its pairs.
        rounds: Rounds of generate -> DPO after SFT.
        reference: DPO's reference in each round: ``previous`` (the policy the round starts from, the
            on-policy choice of RLHFlow and self-rewarding LMs: each round is a KL-regularised step from
            where the last one ended) or ``initial`` (the SFT model in every round: the policy stays
            within one KL budget of it overall).
        mix_with: Original preference data added to every round's pairs, as the source article does (a
            source as ``PreferenceDataModule.dataset``: a file, a hub name, ``synthetic:sort``); None: the
            round's own pairs only.
        mix_limit: How many original pairs (its first ones) to add; None: all.
        evaluation: How each round's policy is measured; see `Evaluation`.
        seed: Seed of the rounds' sampling: round r samples with seed ``1000 * seed + r`` (the stages'
            training seeds are their recipes' ``seed_everything``, set in their ``args``).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if reference not in ("initial", "previous"):
        raise ValueError(f"reference must be 'initial' or 'previous', got {reference!r}")
    stages = {"sft": ("fit", sft), "generate": ("generate", generate), "dpo": ("fit", dpo)}
    check_launch({name: (command, ["--config", stage.config, *stage.args]) for name, (command, stage) in stages.items()
                  if name != "sft" or _is_recipe(stage.config)})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = evaluation or Evaluation()
    if not _can_plot() and global_rank() == 0:  # said now, not when the report is written after every stage trained
        warn(_NO_PLOT)
    watch = PreemptionWatch("stopping at the current stage's next safe point (an optimizer step, a written batch) "
                            "or before the next stage, then exiting")
    # One run per folder: the lock is the global rank 0 process's; the other processes of its run wait for its files.
    lock = FolderLock(out, "iterate (output_dir)") if global_rank() == 0 else contextlib.nullcontext()
    with lock, watch:
        initial = _run_fit_stage(sft, out / "sft", "stage") if _is_recipe(sft.config) else sft.config
        policies = [initial]
        for r in range(1, rounds + 1):
            round_dir = out / f"round_{r}"
            pairs = _run_generate_stage(generate, policies[-1], round_dir / "generate", seed=1000 * seed + r)
            _check_pairs(pairs, r, mix_with)
            mixed = None
            if mix_with is not None:
                mixed = (pairs, mix_with, mix_limit, round_dir / "mixed_pairs.jsonl")
            ref = initial if reference == "initial" else None  # None: a frozen copy of the policy it starts from
            policy = _run_fit_stage(dpo, round_dir, "dpo", model=policies[-1], pairs=pairs, ref_model=ref, mix=mixed)
            policies.append(policy)
        _stop_if_preempted("the report")
        if not _report_runs_here(evaluation, out):
            return []
        return write_report(out, policies, initial, evaluation, reference, _timings(out, rounds))


def _report_runs_here(evaluation: Evaluation, out: Path) -> bool:
    """Whether this process writes the report: the global rank 0 one (every rank of a multi-GPU run runs
    ``iterate``; each stage's Trainer has set the rank, which is `global_rank` under torchrun and srun), and only
    when ``evaluation.enabled``."""
    if not evaluation.enabled:
        log.warning("the report is skipped (evaluation.enabled is false): %s holds every round's folders, "
                    "and no report.csv", out)
        return False
    if getattr(rank_zero_only, "rank", 0) != 0:
        log.info("rank %d: the report is written by the global rank 0 process only", rank_zero_only.rank)
        return False
    return True


def _timings(out: Path, rounds: int) -> dict[str, float]:
    """Wall time per round (round 0: SFT) from the stage records: the sum of the attempts' times."""
    folders = {"round_0": [out / "sft" / "stage"]}
    for r in range(1, rounds + 1):
        folders[f"round_{r}"] = [out / f"round_{r}" / "generate", out / f"round_{r}" / "dpo"]
    timings = {"round_0": 0.0}  # no SFT stage: the model given was not trained here
    for key, stages in folders.items():
        records = [read_record(folder / STAGE_RECORD) for folder in stages]
        if all(records):
            timings[key] = sum(record.get("seconds", 0.0) for record in records)
    return timings


def _check_pairs(pairs: Path, r: int, mix_with: str | None) -> None:
    """A round whose samples gave no pair: an error saying what to change (with ``mix_with``, a warning)."""
    made = (read_manifest(pairs.parent) or {}).get("pairs") or {}
    if made.get("count", 1) > 0:
        return
    why = (f"round {r}'s samples gave no preference pair ({made.get('summary', '')}): no prompt had two scored, "
           "non-empty responses whose scores differ by min_margin or more")
    if mix_with is not None:
        warn(f"{pairs}: {why}; the round's DPO trains on the {mix_with} pairs alone")
        return
    raise DataError(f"{pairs}: {why}, so DPO has nothing to train on. Sample more, or more varied, responses "
                    "(generate args --model.num_samples, --model.temperature), pair more of them (--output.pairing "
                    "all, a lower --output.min_margin), use a judge with finer scores, or add original pairs "
                    "(mix_with)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m dpo_lightning iterate --config recipes/pipeline_tiny.yaml``."""
    class IterateParser(ShortErrors, ArgumentParser):
        """jsonargparse's parser with one- or two-line errors."""

    parser = IterateParser(prog="python -m dpo_lightning iterate", description=__doc__.splitlines()[0],
                           allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(iterate, as_positional=False)
    config = parser.parse_args(argv)
    init = parser.instantiate_classes(config)
    names = ("output_dir", "sft", "generate", "dpo", "rounds", "reference", "mix_with", "mix_limit", "evaluation",
             "seed")
    kwargs = {k: init[k] for k in names}
    rows = iterate(**kwargs)
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "policy"})
    return rows


__all__ = ["iterate", "main"]
