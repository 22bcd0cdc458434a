"""Ground-truth reward against KL(policy || SFT): DPO at several betas next to best-of-N sampling.

The DPO paper's reward-vs-KL frontier (Rafailov et al. 2023, figure 2) in miniature, on the bundled
digit-sorting task, whose ground-truth reward ``synthetic.sort_reward`` (in [0, 1]) is known exactly.
Everything runs offline on a CPU, through the real CLI (``dpo_lightning.cli.cli_main``, in-process):

1. SFT: ``recipes/tiny_sft.yaml`` (150 steps from random init), or an export given with ``--sft``.
2. DPO from that export for each ``--betas``: ``recipes/tiny.yaml`` with ``--model.model <sft>``
   (the reference is then the SFT model), learning rate 1e-4, ``--steps`` steps on the task's own
   pairs (the same pairs for every beta). A callback keeps a copy of the policy at ``--snapshots``
   and at the last step, so each beta gives a short curve of points.
3. Each policy (and the SFT model, KL 0) samples ``--samples`` responses per held-out prompt (the
   200 validation prompts of ``synthetic:sort``, seed 0) at temperature 1, plain ancestral sampling
   of at most 12 new tokens (the longest answer is 8 digits + EOS). y = the mean ground-truth reward
   of the samples. KL(policy || SFT) is estimated from the same samples: the mean over them of
   ``sum_t [log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t)]``, both from ``logprobs.sequence_logps``
   on the exact sampled token ids (prompt ids + sampled ids up to and including EOS; labels -100 on
   the prompt and after EOS). Standard errors are over prompts (the per-prompt means).
4. Best-of-N from the SFT model, N in ``--best-of``: ``max(best-of)`` samples per prompt; best-of-N
   keeps, among the first N, the one with the highest ground-truth reward (ties: the first); y = the
   mean of its reward. Its KL to the SFT model is the standard analytic expression
   ``log N - (N - 1) / N`` (Stiennon et al. 2020; Beirami et al. 2024 show it is an upper bound, not
   exact when responses tie, as they do here).
5. Iterative DPO (``--iterate runs/pipeline_tiny``): each round's export of a ``python -m dpo_lightning
   iterate`` run, measured as in 3 against the SFT model (KL to SFT, not to the round's reference),
   drawn as a path from the SFT point. Give ``--sft <that run>/sft/stage/version_0/hf_export`` so that
   every point shares its SFT model.

Prints a markdown table and the wall time; draws the figure (matplotlib, Agg) to ``--out``. Runs
with one torch thread by default (``--threads``): the model is tiny, and on a shared 2-core machine
two threads were up to 10x slower. The numbers do not depend on it.

    python benchmarks/frontier.py                  # the recorded figure: docs/figures/frontier.png
    python benchmarks/frontier.py --quick          # smoke run (under a minute), figure under --workdir
    python benchmarks/frontier.py --sft runs/tiny_sft/version_0/hf_export   # reuse an SFT export
    python benchmarks/frontier.py --replot         # redraw from runs/frontier/frontier.json
    python benchmarks/frontier.py --sft runs/pipeline_tiny/sft/stage/version_0/hf_export \
        --iterate runs/pipeline_tiny              # the iterative rounds beside DPO and best-of-N

Not part of pytest.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dpo_lightning.cli import DPOLightningCLI, cli_main  # noqa: E402
from dpo_lightning.data.synthetic import load_dataset, sort_reward  # noqa: E402
from dpo_lightning.generation.sampling import decode_response  # noqa: E402
from dpo_lightning.models.logprobs import IGNORE_INDEX, sequence_logps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 12  # the longest answer (8 digits) + EOS, and spare
DPO_LR = 1e-4  # docs/recipes.md: from the SFT model, the recipe's 1e-3 degrades generation


# --------------------------------------------------------------------------------------------------
# training, through the real CLI


class Snapshots(L.Callback):
    """Keeps a frozen copy of the policy (``pl_module.model``) after each optimizer step in ``steps``."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = set(steps)
        self.models: dict[int, torch.nn.Module] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.models:
            self.models[step] = copy.deepcopy(pl_module.model).eval().requires_grad_(False)


def _fit(args: list[str], cli_class: type[DPOLightningCLI] = DPOLightningCLI) -> DPOLightningCLI:
    print(f"[frontier] python -m dpo_lightning {' '.join(args)}", flush=True)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        return cli_main(args, cli_class=cli_class)
    finally:
        sys.argv = argv


def train_sft(workdir: Path, steps: int | None) -> Path:
    """Run ``recipes/tiny_sft.yaml`` (its own 150 steps unless ``steps``); the path of its export."""
    args = ["fit", "--config", str(ROOT / "recipes" / "tiny_sft.yaml"),
            "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    return Path(_fit(args).trainer.log_dir) / "hf_export"


def train_dpo(
    sft: Path, beta: float, steps: int, snapshots: Sequence[int], workdir: Path
) -> dict[int, torch.nn.Module]:
    """DPO from ``sft`` (also the reference) at ``beta``; the policy after each snapshot step and the last."""
    keep = Snapshots(sorted({*(s for s in snapshots if s < steps), steps}))

    class CLI(DPOLightningCLI):
        def before_fit(self) -> None:
            self.trainer.callbacks.append(keep)

    _fit(["fit", "--config", str(ROOT / "recipes" / "tiny.yaml"),
          "--model.model_config", "null", "--model.model", str(sft),
          "--model.beta", str(beta), "--model.optimizer.init_args.lr", str(DPO_LR),
          "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(min(100, steps)),
          "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
          "--trainer.logger.init_args.name", f"frontier_beta{beta}",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"], CLI)
    missing = keep.steps - set(keep.models)
    if missing:
        raise RuntimeError(f"no policy snapshot at steps {sorted(missing)}")
    return keep.models


# --------------------------------------------------------------------------------------------------
# sampling and measuring


class Draws(NamedTuple):
    """Sampled sequences of one prompt length: ``prompt`` (M,) index into the prompt list, ``ids`` (M, T)
    prompt + sampled tokens (pad after EOS), ``labels`` (M, T) the sampled tokens up to and including
    EOS, -100 on the prompt and after EOS. Row ``i`` is sample ``i % k`` of its prompt."""

    prompt: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def draw(model, tokenizer, prompts: Sequence[str], k: int, seed: int) -> list[Draws]:
    """``k`` samples per prompt at temperature 1 (no top-k/top-p), up to MAX_NEW_TOKENS or EOS.

    Prompts are grouped by token length, so no row is padded and the scored ids are exactly the
    sampled ones. The same ``seed`` gives every model the same random stream.
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    groups: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer(p).input_ids for p in prompts]  # BOS + words, as the data modules build them
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    out = []
    for length in sorted(groups):
        index = torch.tensor(groups[length]).repeat_interleave(k)  # (M,)
        ids = torch.tensor([encoded[i] for i in index.tolist()])  # (M, P)
        labels = torch.full_like(ids, IGNORE_INDEX)  # (M, P)
        done = torch.zeros(len(ids), dtype=torch.bool)  # (M,)
        step = model(input_ids=ids, use_cache=True)
        for _ in range(MAX_NEW_TOKENS):
            probs = torch.softmax(step.logits[:, -1].float(), -1)  # (M, V)
            nxt = torch.multinomial(probs, 1, generator=g).squeeze(1)  # (M,)
            labels = torch.cat([labels, torch.where(done, IGNORE_INDEX, nxt)[:, None]], 1)
            ids = torch.cat([ids, torch.where(done, pad, nxt)[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
            step = model(input_ids=ids[:, -1:], cache=step.cache, use_cache=True)
        out.append(Draws(index, ids, labels))
    return out


def rewards(tokenizer, prompts: Sequence[str], draws: Sequence[Draws], k: int) -> torch.Tensor:
    """Ground-truth reward of every sample: ``(num_prompts, k)``, sample order kept."""
    table = torch.empty(len(prompts), k)
    for d in draws:
        for row, (p, ids, labels) in enumerate(zip(d.prompt.tolist(), d.ids, d.labels)):
            start = int((labels == IGNORE_INDEX).cumprod(0).sum())  # first sampled position
            new = labels[start:][labels[start:] != IGNORE_INDEX].tolist()  # sampled ids, EOS included
            table[p, row % k] = sort_reward(prompts[p], decode_response(tokenizer, ids[:start].tolist(), new))
    return table


@torch.no_grad()
def log_ratios(policy, reference, draws: Sequence[Draws], num_prompts: int, k: int) -> torch.Tensor:
    """``log pi(y|x) - log ref(y|x)`` of every sample, summed over its response tokens: ``(num_prompts, k)``."""
    table = torch.empty(num_prompts, k)
    for d in draws:
        attn = torch.ones_like(d.ids)  # causal: the padding after EOS does not reach the scored positions
        pol = sequence_logps(policy(input_ids=d.ids, attention_mask=attn).logits, d.labels).logps  # (M,)
        ref = sequence_logps(reference(input_ids=d.ids, attention_mask=attn).logits, d.labels).logps  # (M,)
        for row, (p, value) in enumerate(zip(d.prompt.tolist(), (pol - ref).tolist())):
            table[p, row % k] = value
    return table


def mean_se(per_prompt: torch.Tensor) -> tuple[float, float]:
    """Mean of per-prompt values ``(P,)`` and its standard error over prompts."""
    return per_prompt.mean().item(), (per_prompt.std() / math.sqrt(len(per_prompt))).item()


def measure(policy, reference, tokenizer, prompts: Sequence[str], k: int, seed: int) -> dict[str, float]:
    """Sampled KL(policy || reference) and mean ground-truth reward of the policy's samples, with SEs."""
    draws = draw(policy, tokenizer, prompts, k, seed)
    kl, kl_se = mean_se(log_ratios(policy, reference, draws, len(prompts), k).mean(1))
    reward, reward_se = mean_se(rewards(tokenizer, prompts, draws, k).mean(1))
    return {"kl": kl, "kl_se": kl_se, "reward": reward, "reward_se": reward_se}


def best_of_n_kl(table: torch.Tensor, n: int) -> torch.Tensor:
    """KL(best-of-n || policy) per prompt ``(P,)`` given each prompt's reward distribution, estimated from
    the rewards ``table`` ``(P, M)`` of M samples of the policy.

    Best-of-n keeps the first of the n samples with the highest reward, so every response y with reward r
    has its probability multiplied by the same factor, and the n-th-order-statistic argument gives, with
    F<(r) = P(R < r) and F<=(r) = P(R <= r), best-of-n's mass on the level r: F<=(r)^n - F<(r)^n. Hence
    KL = sum_r (F<=^n - F<^n) log((F<=^n - F<^n) / p_r), with p_r = P(R = r): exact for a known reward
    distribution (Beirami et al. 2024, Lemma 1, with ties), here with the empirical p_r of the M samples.
    It equals log n - (n - 1) / n when no two responses tie, and is smaller when they do."""
    out = torch.empty(len(table), dtype=torch.float64)
    for i, row in enumerate(table.double()):
        levels, counts = torch.unique(row, return_counts=True)  # ascending
        p = counts.double() / len(row)
        below = torch.cumsum(p, 0) - p  # F<
        mass = (below + p) ** n - below**n
        keep = mass > 0
        out[i] = (mass[keep] * torch.log(mass[keep] / p[keep])).sum()
    return out


def best_of_n_reward(table: torch.Tensor, n: int) -> torch.Tensor:
    """Expected reward of best-of-n per prompt ``(P,)`` under the empirical reward distribution of the
    ``(P, M)`` samples ``table``: sum_r r (F<=(r)^n - F<(r)^n), the same masses as `best_of_n_kl`'s."""
    out = torch.empty(len(table), dtype=torch.float64)
    for i, row in enumerate(table.double()):
        levels, counts = torch.unique(row, return_counts=True)
        p = counts.double() / len(row)
        below = torch.cumsum(p, 0) - p
        out[i] = (levels * ((below + p) ** n - below**n)).sum()
    return out


def best_of_n(
    sft, tokenizer, prompts: Sequence[str], ns: Sequence[int], seed: int, kl_samples: int = 0,
    more: Sequence[int] = (),
) -> list[dict]:
    """Best-of-N from the SFT model for each N, from one draw of max(ns) samples per prompt; with
    ``kl_samples``, also ``kl_est`` (`best_of_n_kl` from a second draw of that many samples per prompt), and
    for each N of ``more`` a row ``best-of-N (estimated)`` whose reward and KL both come from that draw's
    reward distribution (`best_of_n_reward`, `best_of_n_kl`): best-of-N beyond the N drawn per prompt."""
    table = rewards(tokenizer, prompts, draw(sft, tokenizer, prompts, max(ns), seed), max(ns))  # (P, max N)
    wide = None
    if kl_samples:
        wide = rewards(tokenizer, prompts, draw(sft, tokenizer, prompts, kl_samples, seed + 1), kl_samples)
    rows = []
    for n in ns:
        reward, reward_se = mean_se(table[:, :n].max(1).values)  # max: ties keep the same value
        row = {"method": "best-of-N", "setting": f"N={n}", "kl": math.log(n) - (n - 1) / n,
               "kl_se": 0.0, "reward": reward, "reward_se": reward_se}
        if wide is not None:
            row["kl_est"], row["kl_est_se"] = mean_se(best_of_n_kl(wide, n))
        rows.append(row)
    for n in more if wide is not None else ():
        kl, kl_se = mean_se(best_of_n_kl(wide, n))
        reward, reward_se = mean_se(best_of_n_reward(wide, n))
        rows.append({"method": "best-of-N (estimated)", "setting": f"N={n}", "kl": kl, "kl_se": kl_se,
                     "reward": reward, "reward_se": reward_se})
    return rows


# --------------------------------------------------------------------------------------------------
# output


def table(rows: Sequence[dict]) -> str:
    lines = ["| method | setting | KL(policy \\|\\| SFT), nats | ground-truth reward |", "|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl']:.3f} ± {r['kl_se']:.3f}"
        if r["method"] == "best-of-N":
            kl = f"{r['kl']:.3f} (formula)"
            if "kl_est" in r:
                kl += f"; {r['kl_est']:.3f} ± {r['kl_est_se']:.3f} (from its reward distribution)"
        lines.append(f"| {r['method']} | {r['setting']} | {kl} | {r['reward']:.3f} ± {r['reward_se']:.3f} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    bon = [r for r in rows if r["method"] == "best-of-N"]
    # legend entries are empty proxy lines, so that they list in the order drawn
    ax.errorbar([r["kl"] for r in bon], [r["reward"] for r in bon], yerr=[r["reward_se"] for r in bon],
                marker="s", color="black", capsize=2)
    ax.plot([], [], marker="s", color="black", label="best-of-N from SFT, by ground truth\n(KL: log N - (N-1)/N)")
    for r in bon:
        ax.annotate(r["setting"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if all("kl_est" in r for r in bon):
        more = [r for r in rows if r["method"] == "best-of-N (estimated)"]
        ax.errorbar([r["kl_est"] for r in bon] + [r["kl"] for r in more], [r["reward"] for r in bon + more],
                    xerr=[r["kl_est_se"] for r in bon] + [r["kl_se"] for r in more],
                    marker="s", mfc="white", color="black", ls="--", lw=0.8, capsize=2)
        for r in more:
            ax.annotate(r["setting"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8)
        ax.plot([], [], marker="s", mfc="white", color="black", ls="--",
                label="the same best-of-N, KL from the SFT model's\nreward distribution (its true KL, estimated)")
    sft = next(r for r in rows if r["method"] == "SFT")
    ax.errorbar(sft["kl"], sft["reward"], yerr=sft["reward_se"], marker="*", ms=12, color="gray", ls="none")
    ax.plot([], [], marker="*", ms=12, color="gray", ls="none", label="SFT model (its samples)")
    dpo = [r for r in rows if r["method"] == "DPO"]
    betas = sorted({r["beta"] for r in dpo})
    colors = plt.cm.viridis([i / max(len(betas) - 1, 1) * 0.85 for i in range(len(betas))])
    for i, (beta, color) in enumerate(zip(betas, colors)):
        run = sorted((r for r in dpo if r["beta"] == beta), key=lambda r: r["step"])
        # a dotted path from the SFT point through the snapshots; the last step drawn larger
        ax.plot([sft["kl"], *(r["kl"] for r in run)], [sft["reward"], *(r["reward"] for r in run)],
                color=color, lw=0.8, ls=":")
        for r in run:
            ax.errorbar(r["kl"], r["reward"], xerr=r["kl_se"], yerr=r["reward_se"], marker="o",
                        ms=7 if r is run[-1] else 4, color=color, capsize=2)
        steps = ", ".join(str(r["step"]) for r in run)
        ax.plot([], [], marker="o", color=color, ls="none", label=f"DPO beta={beta:g} (steps {steps})")
        ax.annotate(f"β={beta:g}", (run[-1]["kl"], run[-1]["reward"]), textcoords="offset points",
                    xytext=(5, 4 if i % 2 == 0 else -13), fontsize=8, color=color)  # alternate: neighbours
    rounds = sorted((r for r in rows if r["method"] == "iterate"), key=lambda r: r["round"])
    if rounds:
        ax.errorbar([sft["kl"], *(r["kl"] for r in rounds)], [sft["reward"], *(r["reward"] for r in rounds)],
                    color="tab:red", lw=1.2, ls="-")
        for r in rounds:
            ax.errorbar(r["kl"], r["reward"], xerr=r["kl_se"], yerr=r["reward_se"], marker="D", ms=6,
                        color="tab:red", capsize=2)
            ax.annotate(f"round {r['round']}", (r["kl"], r["reward"]), textcoords="offset points",
                        xytext=(6, -4), fontsize=8, color="tab:red")
        ax.plot([], [], marker="D", color="tab:red", label=f"iterate ({rounds[0]['setting'].split(',')[0]})")
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_ylabel("ground-truth reward (sort_reward), mean over samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def measure_all(args: argparse.Namespace, prompts: Sequence[str], sft_steps: int | None) -> list[dict]:
    """Train (SFT unless ``--sft``, then DPO per beta) and measure every policy: the rows of the table."""
    sft_path = args.sft or train_sft(args.workdir, sft_steps)
    sft = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(sft_path)
    rows = [{"method": "SFT", "setting": "-", **measure(sft, sft, tokenizer, prompts, args.samples, args.seed)}]
    rows += best_of_n(sft, tokenizer, prompts, args.best_of, args.seed, args.bon_kl_samples, args.bon_more)
    for beta in args.betas:
        for step, policy in train_dpo(sft_path, beta, args.steps, args.snapshots, args.workdir).items():
            m = measure(policy, sft, tokenizer, prompts, args.samples, args.seed)
            rows.append({"method": "DPO", "setting": f"beta={beta:g}, step {step}", "beta": beta, "step": step, **m})
            print(f"[frontier] DPO beta={beta:g} step {step}: {m}", flush=True)
    for folder in args.iterate:
        exports = sorted(Path(folder).glob("round_*/dpo/version_0/hf_export"), key=lambda p: int(p.parts[-4][6:]))
        for export in exports:
            r = int(export.parts[-4][6:])
            policy = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
            m = measure(policy, sft, tokenizer, prompts, args.samples, args.seed)
            rows.append({"method": "iterate", "setting": f"{Path(folder).name}, round {r}", "round": r, **m})
            print(f"[frontier] iterate {folder} round {r}: {m}", flush=True)
    print(f"\nSFT model: {sft_path}; {len(prompts)} held-out prompts; {args.samples} samples per prompt "
          f"(DPO, SFT); best-of-N from {max(args.best_of)} per prompt")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, help="an SFT export to start from (default: run recipes/tiny_sft.yaml)")
    parser.add_argument("--iterate", nargs="*", default=[], type=Path,
                        help="output folders of `python -m dpo_lightning iterate` runs whose rounds to add")
    parser.add_argument("--betas", nargs="+", type=float, default=[0.05, 0.1, 0.3, 1.0])
    parser.add_argument("--steps", type=int, default=300, help="DPO optimizer steps per beta")
    parser.add_argument("--snapshots", nargs="*", type=int, default=[100, 200],
                        help="earlier steps at which each DPO policy is also measured")
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out prompt for DPO and SFT")
    parser.add_argument("--best-of", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--bon-kl-samples", type=int, default=128,
                        help="SFT samples per prompt behind best-of-N's estimated KL (0: the formula only)")
    parser.add_argument("--bon-more", nargs="*", type=int, default=[32, 64],
                        help="larger N whose best-of-N reward and KL are estimated from those samples")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (the same stream for every model)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the model is tiny, and more threads lose on a shared machine)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "frontier",
                        help="runs, and the numbers as <workdir>/frontier.json (frontier_quick.json)")
    parser.add_argument("--out", type=Path, help="the figure (default docs/figures/frontier.png; --quick: workdir)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: SFT 50 steps, betas 0.1 1.0, 40 DPO steps, 2 samples, 50 prompts")
    parser.add_argument("--replot", action="store_true", help="redraw from <workdir>/frontier.json, no training")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    prompts = load_dataset("synthetic:sort", seed=0)["validation"]["prompt"]  # the recipes' held-out prompts
    sft_steps = None
    if args.quick:
        sft_steps, args.betas, args.steps, args.snapshots, args.samples = 50, [0.1, 1.0], 40, [20], 2
        args.best_of, prompts = [1, 2, 4], prompts[:50]
    name = "frontier_quick" if args.quick else "frontier"
    out = args.out or (args.workdir / f"{name}.png" if args.quick else ROOT / "docs" / "figures" / "frontier.png")
    store = args.workdir / f"{name}.json"
    if args.replot:
        saved = json.loads(store.read_text())
        rows, caption = saved["rows"], saved["caption"]
    else:
        rows = measure_all(args, prompts, sft_steps)
        caption = (f"synthetic:sort, {len(prompts)} held-out prompts, {args.samples} samples each (best-of-N: "
                   f"{max(args.best_of)}); error bars: 1 s.e.\nDPO from the SFT model, lr {DPO_LR:.0e}, "
                   f"{args.steps} steps (small dots: steps {', '.join(map(str, args.snapshots))}), "
                   "reference = the SFT model")
        store.write_text(json.dumps({"rows": rows, "caption": caption}, indent=1))
    print(f"\n{table(rows)}")
    plot(rows, out, caption)
    print(f"\nwrote {out} and {store}")
    seconds = time.perf_counter() - start
    print(f"wall time {seconds:.0f} s (all of main: training, sampling, plotting); torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
