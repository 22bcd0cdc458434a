"""The pipeline's report: one row per round (round 0: the SFT model), recomputed from the round folders, in
``report.csv``, ``report.png`` (when matplotlib imports) and TensorBoard scalars.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from dpo_lightning.data.errors import warn
from dpo_lightning.pipeline.evaluation import Evaluation, evaluate_policy
from dpo_lightning.pipeline.stage_runs import _stop_if_preempted
from dpo_lightning.training.checkpoint import atomic_write


def write_report(
    out: Path, policies: list[str], initial: str, evaluation: Evaluation, reference: str,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``report.csv``, ``report.png`` and TensorBoard scalars: one row per round, recomputed from the round
    folders (the policies' exports and the pairs files)."""
    timings = timings or {}
    rows = []
    for r, policy in enumerate(policies):
        _stop_if_preempted(f"the report's round {r}")
        ref = initial if reference == "initial" or r == 0 else policies[r - 1]
        metrics = evaluate_policy(policy, initial, ref, evaluation)
        pairs = out / f"round_{r}" / "generate" / "pairs.jsonl"
        rows.append({
            "round": r, "policy": policy, **metrics,
            "pairs": sum(1 for _ in pairs.open()) if pairs.exists() else 0,
            "seconds": round(timings.get(f"round_{r}", float("nan")), 1),
        })
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "report.csv", lambda f: f.write(text.getvalue().encode()), prefix=".report.csv.")
    _plot(rows, out / "report.png")
    write_scalars(out / "tensorboard", rows)
    return rows


def write_scalars(folder: Path, rows: list[dict[str, Any]]) -> None:
    """The report's rows as TensorBoard scalars (``pipeline/<metric>`` by round). Each report holds every round,
    so its event file starts with ``purge_step`` 0: TensorBoard reads the rounds of the newest report once, not
    those of each earlier one again (a pipeline continued with more rounds drew rounds 0-1 twice)."""
    try:
        with SummaryWriter(str(folder), purge_step=0) as tb:
            for row in rows:
                for key in ("exact", "reward", "win_rate", "kl", "pairs"):
                    if key in row:
                        tb.add_scalar(f"pipeline/{key}", row[key], row["round"])
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        warn("tensorboard is not installed: the report is in report.csv and report.png only")


_NO_PLOT = ("matplotlib is not installed: report.png will not be drawn (report.csv and TensorBoard hold the same "
            "numbers); `pip install matplotlib` to draw it")


def _can_plot() -> bool:
    """Whether matplotlib imports (a dependency, but an install without it must not fail after training)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    if not _can_plot():
        warn(_NO_PLOT)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    panels = [("reward", "held-out reward"), ("win_rate", "win rate vs SFT"), ("kl", "KL(policy || reference)")]
    if "exact" in rows[0]:
        panels.insert(0, ("exact", "greedy exact rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(rounds, [r[key] for r in rows], marker="o")
        ax.set_xlabel("round (0 = SFT)")
        ax.set_title(label)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
