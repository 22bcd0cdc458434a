"""Reward over-optimisation in miniature: iterative DPO judged by a learned reward model, the ground truth beside it.

Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization") train a policy against a proxy reward model
and measure a gold reward beside it: the proxy keeps rising while the gold reward rises, peaks and falls. The
bundled sorting task has the gold reward in closed form (``synthetic.sort_reward``), so the same measurement
runs on a CPU in minutes, through the real CLI (in-process):

1. The reward model: ``recipes/tiny_rm.yaml`` (Bradley-Terry on the task's own pairs), or ``--rm``.
2. The SFT model: ``recipes/tiny_sft.yaml``, or ``--sft``. Both pipelines below start from this one export.
3. Two pipelines, the same in all but the judge that turns samples into pairs:
   ``recipes/pipeline_tiny_rm.yaml`` (the reward model judges) and the same recipe with the ground truth
   (``sort_reward``) judging (what ``recipes/pipeline_tiny.yaml`` ran before #27), ``--rounds`` rounds each
   (``iterate --sft.config <export> --rounds N``).
4. Every round's policy (round 0: SFT) samples ``--samples`` answers per held-out prompt (the 200 validation
   prompts of ``synthetic:sort``, temperature 1, seed ``--seed``), and the same samples are scored by both:
   - gold: mean ``sort_reward``; the share of exact sorts; the greedy exact rate (one greedy answer per prompt);
   - judged: the reward model's mean score (its raw logit), and the same in gold units: ``a + b * score``, where
     ``gold ~ a + b * score`` is the least-squares fit on the SFT model's samples (so round 0's judged and gold
     rewards agree by construction, and any later gap is the proxy parting from the truth);
   - the judge's ranking accuracy on the policy's own samples: over pairs of samples of one prompt whose gold
     rewards differ, the share the reward model orders the same way (a tie in its score counts half);
   - the pairs each round trained on: the share whose chosen answer is truly better (gold), truly equal, worse;
   - KL(policy || SFT) from the same samples (sum over response tokens of the log-ratio), per response.
   Standard errors are over prompts.

Prints a markdown table (with each pipeline's command, the seeds and each round's wall time) and draws
``--out`` (matplotlib, Agg). One torch thread (``--threads``): the models are tiny and the machine shared.

    python benchmarks/reward_overoptimisation.py --rounds 5    # the recorded run: docs/figures/ (png)
    python benchmarks/reward_overoptimisation.py --quick       # smoke run (~1 min), figure under --workdir
    python benchmarks/reward_overoptimisation.py --replot      # redraw from <workdir>/overoptimisation.json

Not part of pytest (tests/test_pipeline_rm.py runs the recipe).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from dpo_lightning.cli import cli_main  # noqa: E402
from dpo_lightning.data.prompts import PromptDataModule  # noqa: E402
from dpo_lightning.data.synthetic import sort_reward  # noqa: E402
from dpo_lightning.generation.judges import RewardModelJudge  # noqa: E402
from dpo_lightning.generation.sampling import generate  # noqa: E402
from dpo_lightning.models.loading import load_causal_lm  # noqa: E402
from dpo_lightning.pipeline import main as iterate_main  # noqa: E402
from dpo_lightning.pipeline import response_logps, sample_with_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RM_RECIPE = GOLD_RECIPE = "recipes/pipeline_tiny_rm.yaml"
# The control: the same recipe, its pairs judged by the ground truth (partial credit), which is what
# recipes/pipeline_tiny.yaml ran before #27 made its rounds pass/fail-judged rejection-sampling fine-tuning.
GOLD_JUDGE = "function:dpo_lightning.data.synthetic:sort_reward"
RECIPE_RM_PATH = "runs/tiny_rm/version_0/hf_export"  # what recipes/pipeline_tiny_rm.yaml names
MAX_NEW_TOKENS = 12


def _cli(args: list[str]):
    print(f"[overopt] python -m dpo_lightning {' '.join(args)}", flush=True)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        return cli_main(args)
    finally:
        sys.argv = argv


def train(recipe: str, workdir: Path, steps: int | None) -> tuple[Path, float]:
    """``fit --config recipe`` into ``workdir/runs``; its export and wall time."""
    start = time.perf_counter()
    args = ["fit", "--config", str(ROOT / recipe), "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    cli = _cli(args)
    return Path(cli.trainer.log_dir) / "hf_export", time.perf_counter() - start


def run_pipeline(recipe: str, out: Path, sft: Path, rounds: int, rm: Path | None, quick: bool) -> list[dict]:
    """``iterate --config recipe`` from the SFT export ``sft`` (the reward model's path substituted in the
    generate stage's arguments; without ``rm``, the ground truth judges instead); the report rows (policy,
    seconds)."""
    config = yaml.safe_load((ROOT / recipe).read_text())
    gen_args = list(config["generate"]["args"])
    at = gen_args.index("--output.judge") + 1
    gen_args[at] = gen_args[at].replace(RECIPE_RM_PATH, str(rm)) if rm is not None else GOLD_JUDGE
    if rm is None and "--output.judge_options" in gen_args:  # the reward model's batch size
        i = gen_args.index("--output.judge_options")
        del gen_args[i:i + 2]
    dpo_args = list(config["dpo"]["args"])
    if quick:
        gen_args += ["--data.limit", "100"]
        dpo_args += ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    args = ["--config", str(ROOT / recipe), "--output_dir", str(out), "--sft.config", str(sft),
            "--rounds", str(rounds), "--generate.args", json.dumps(gen_args), "--dpo.args", json.dumps(dpo_args),
            "--generate.config", str(ROOT / config["generate"]["config"]),
            "--dpo.config", str(ROOT / config["dpo"]["config"])]
    if quick:
        args += ["--evaluation.limit", "20"]
    print(f"[overopt] python -m dpo_lightning iterate {' '.join(args)}", flush=True)
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return iterate_main(args)
    finally:
        sys.argv = argv


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-prompt values ``(P,)`` and its standard error over prompts."""
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0


def rank_accuracy(gold: torch.Tensor, judged: torch.Tensor) -> float:
    """Over pairs (i < j) of one prompt's samples with different gold rewards, the share the judge orders the same
    way; ``gold`` and ``judged`` are ``(P, k)``. A tie in the judge's score counts half."""
    right = total = 0.0
    k = gold.shape[1]
    for i in range(k):
        for j in range(i + 1, k):
            g = torch.sign(gold[:, i] - gold[:, j])  # (P,)
            s = torch.sign(judged[:, i] - judged[:, j])  # (P,)
            differ = (g != 0) & ~s.isnan()  # an unscored sample (empty answer) is in no pair
            right += ((s == g) & differ).sum().item() + 0.5 * ((s == 0) & differ).sum().item()
            total += differ.sum().item()
    return right / max(total, 1)


def pair_truth(pairs: Path) -> dict[str, float]:
    """The pairs a round trained on, by the ground truth: shares truly better, equal, worse."""
    if not pairs.exists():
        return {}
    rows = [json.loads(line) for line in pairs.open()]
    diffs = [sort_reward(r["prompt"], r["chosen"]) - sort_reward(r["prompt"], r["rejected"]) for r in rows]
    n = max(len(diffs), 1)
    return {"pairs": len(rows), "pairs_better": sum(d > 0 for d in diffs) / n,
            "pairs_equal": sum(d == 0 for d in diffs) / n, "pairs_worse": sum(d < 0 for d in diffs) / n}


def measure(policy_path: str, sft, rm: RewardModelJudge, data: PromptDataModule, k: int, seed: int) -> dict:
    """Gold and judged rewards of ``k`` samples per held-out prompt, the judge's ranking accuracy, KL to SFT and
    the greedy exact rate of the policy at ``policy_path``; the per-sample gold and judged scores too."""
    policy = load_causal_lm(policy_path).eval()
    rows = sample_with_ids(policy, data, k, MAX_NEW_TOKENS, seed)
    prompts = [r["prompt"] for r in rows for _ in r["samples"]]
    texts = [text for r in rows for _, text in r["samples"]]
    gold = torch.tensor([sort_reward(p, t) for p, t in zip(prompts, texts)]).view(len(rows), k)  # (P, k)
    scores = rm.score(prompts, texts)  # None for an empty answer (EOS first): no token for the RM to score
    judged = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float64).view(len(rows), k)
    kl = torch.stack([response_logps(policy, r["prompt_ids"], [ids for ids, _ in r["samples"]])
                      - response_logps(sft, r["prompt_ids"], [ids for ids, _ in r["samples"]]) for r in rows])  # (P, k)
    held_out = [json.loads(p) for p in data.prompts["prompt"]]  # the data module keeps each prompt as JSON
    greedy = generate(policy, data.tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)
    out = {"policy": policy_path, "gold_per_sample": gold.flatten().tolist(), "rm_per_sample": scores,
           "rank_accuracy": rank_accuracy(gold, judged),
           "exact": (gold == 1.0).double().mean().item(),
           "greedy_exact": sum(sort_reward(p, a) == 1.0 for p, a in zip(held_out, greedy)) / len(greedy)}
    out["gold"], out["gold_se"] = mean_se(gold.double().mean(1))
    per_prompt = judged.nanmean(1)  # (P,): the scored samples' mean
    out["rm"], out["rm_se"] = mean_se(per_prompt[~per_prompt.isnan()])
    out["unscored"] = scores.count(None)
    out["kl"], out["kl_se"] = mean_se(kl.double().mean(1))
    return out


def calibrate(rows: list[dict]) -> tuple[float, float]:
    """``gold ~ a + b * rm`` by least squares on the SFT model's samples the reward model scored (the first row)."""
    scored = [(s, g) for s, g in zip(rows[0]["rm_per_sample"], rows[0]["gold_per_sample"]) if s is not None]
    x, y = torch.tensor(scored, dtype=torch.float64).T  # (n,) each
    b = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return (y.mean() - b * x.mean()).item(), b.item()


def table(result: dict) -> str:
    a, b = result["calibration"]
    recipes = {"reward model": f"`{Path(RM_RECIPE).name}`",
               "ground truth": f"`{Path(GOLD_RECIPE).name}`, judge `sort_reward`"}
    lines = [
        "| pairs judged by (recipe) | round | seeds | KL(policy \\|\\| SFT) | true reward | judged reward (RM, gold "
        "units) | gap | RM score | exact (sampled) | exact (greedy) | RM ranking accuracy | pairs trained on: truly "
        "better / equal / worse | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["pipelines"].items():
        for r in rows:
            seeds = f"0 / {r['round']} / {result['seed']}" if r["round"] else f"0 / - / {result['seed']}"
            judged = a + b * r["rm"]
            pairs = (f"{r['pairs_better']:.2f} / {r['pairs_equal']:.2f} / {r['pairs_worse']:.2f} ({r['pairs']})"
                     if "pairs" in r else "-")
            lines.append(
                f"| {name} ({recipes[name]}) | {r['round']} | {seeds} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                f"| {r['gold']:.3f} ± {r['gold_se']:.3f} | {judged:.3f} ± {abs(b) * r['rm_se']:.3f} "
                f"| {judged - r['gold']:+.3f} | {r['rm']:.2f} "
                f"| {r['exact']:.3f} | {r['greedy_exact']:.3f} | {r['rank_accuracy']:.3f} | {pairs} "
                f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = result["calibration"]
    rm_rows, gold_rows = result["pipelines"]["reward model"], result["pipelines"]["ground truth"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [r["round"] for r in rm_rows]
    left.errorbar(rounds, [a + b * r["rm"] for r in rm_rows], yerr=[abs(b) * r["rm_se"] for r in rm_rows],
                  marker="o", ls="--", color="tab:red", capsize=2,
                  label="RM-judged run: judged reward (RM, gold units)")
    left.errorbar(rounds, [r["gold"] for r in rm_rows], yerr=[r["gold_se"] for r in rm_rows], marker="o",
                  color="tab:red", capsize=2, label="RM-judged run: true reward")
    left.errorbar([r["round"] for r in gold_rows], [r["gold"] for r in gold_rows],
                  yerr=[r["gold_se"] for r in gold_rows], marker="s", color="black", capsize=2,
                  label="ground-truth-judged run: true reward")
    for r in rm_rows:
        left.annotate(f"KL {r['kl']:.1f}", (r["round"], r["gold"]), textcoords="offset points", xytext=(4, -12),
                      fontsize=7, color="tab:red")
    left.set_xlabel("round (0 = SFT)")
    left.set_ylabel("mean reward of the policy's samples")
    left.set_xticks(rounds)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="center right")
    left.set_title("judged vs true reward (sort_reward), held-out prompts", fontsize=9)
    right.plot(rounds, [r["rank_accuracy"] for r in rm_rows], marker="o", color="tab:red",
               label="RM ranking accuracy on the policy's samples")
    with_pairs = [r for r in rm_rows if "pairs" in r]
    right.plot([r["round"] for r in with_pairs], [r["pairs_better"] for r in with_pairs], marker="^",
               color="tab:orange", label="RM-judged pairs trained on: chosen truly better")
    right.plot([r["round"] for r in with_pairs], [r["pairs_worse"] for r in with_pairs], marker="v",
               color="tab:purple", label="... chosen truly worse")
    right.set_xlabel("round (0 = SFT)")
    right.set_xticks(rounds)
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("how often the reward model is right", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", type=Path, help="a reward-model export (default: run recipes/tiny_rm.yaml)")
    parser.add_argument("--sft", type=Path, help="an SFT export to start from (default: run recipes/tiny_sft.yaml)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="samples per held-out prompt for the measurements")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the measurements")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "overoptimisation")
    parser.add_argument("--out", type=Path, help="the figure (default docs/figures/reward_overoptimisation.png; "
                                                 "--quick: under --workdir)")
    parser.add_argument("--quick", action="store_true", help="1 round, short stages, 20 prompts: a smoke run")
    parser.add_argument("--replot", action="store_true", help="redraw from <workdir>/overoptimisation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (args.workdir / "reward_overoptimisation.png" if args.quick
                       else ROOT / "docs" / "figures" / "reward_overoptimisation.png")
    saved = args.workdir / "overoptimisation.json"
    if args.replot:
        result = json.loads(saved.read_text())
        print(table(result))
        plot(result, out)
        return
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rounds = 1 if args.quick else args.rounds
    rm_path, rm_seconds = (args.rm, 0.0) if args.rm else train("recipes/tiny_rm.yaml", args.workdir,
                                                               50 if args.quick else None)
    sft_path, sft_seconds = (args.sft, 0.0) if args.sft else train("recipes/tiny_sft.yaml", args.workdir,
                                                                   20 if args.quick else None)
    reports = {
        "reward model": run_pipeline(RM_RECIPE, args.workdir / "rm_judged", sft_path, rounds, rm_path, args.quick),
        "ground truth": run_pipeline(GOLD_RECIPE, args.workdir / "gold_judged", sft_path, rounds, None, args.quick),
    }
    data = PromptDataModule(tokenizer=str(sft_path), dataset="synthetic:sort", split="validation",
                            limit=20 if args.quick else 200, batch_size=64, drop_columns=None)
    sft = load_causal_lm(str(sft_path)).eval()
    judge = RewardModelJudge(str(rm_path), batch_size=256, device="cpu")
    pipelines: dict[str, list[dict]] = {}
    for name, report in reports.items():
        folder = args.workdir / ("rm_judged" if name == "reward model" else "gold_judged")
        rows = []
        for row in report:
            m = measure(row["policy"], sft, judge, data, args.samples, args.seed)
            m.update(round=row["round"], seconds=sft_seconds if row["round"] == 0 else row["seconds"],
                     **pair_truth(folder / f"round_{row['round']}" / "generate" / "pairs.jsonl"))
            print(f"[overopt] {name} round {row['round']}: gold {m['gold']:.3f} rm {m['rm']:.3f} kl {m['kl']:.2f} "
                  f"rank acc {m['rank_accuracy']:.3f} greedy exact {m['greedy_exact']:.3f}", flush=True)
            rows.append(m)
        pipelines[name] = rows
    result = {
        "pipelines": pipelines, "calibration": calibrate(pipelines["reward model"]),
        "rm": str(rm_path), "sft": str(sft_path), "rm_seconds": rm_seconds, "sft_seconds": sft_seconds,
        "rounds": rounds, "samples": args.samples, "seed": args.seed,
        "commands": {"reward model": f"python -m dpo_lightning iterate --config {RM_RECIPE} --sft.config <sft> "
                                     f"--rounds {rounds} (RM path substituted)",
                     "ground truth": f"python -m dpo_lightning iterate --config {GOLD_RECIPE} --sft.config <sft> "
                                     f"--rounds {rounds} (judge {GOLD_JUDGE})"},
        "seconds": time.perf_counter() - start,
    }
    saved.write_text(json.dumps(result))
    print(table(result))
    a, b = result["calibration"]
    print(f"\ncalibration on the SFT model's samples: gold ~ {a:.3f} + {b:.4f} * RM score; reward model trained "
          f"in {rm_seconds:.1f} s, SFT in {sft_seconds:.1f} s; whole benchmark {result['seconds']:.0f} s")
    plot(result, out)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
