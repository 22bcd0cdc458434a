"""Hyper-parameter sweeps on the bundled digit-sorting task: the figures and tables of docs/guide.md.

Every run is ``python -m dpo_lightning fit --config recipes/tiny.yaml`` with overrides, driven
in-process through ``dpo_lightning.cli.cli_main`` (the public CLI, so the sweep follows the
recipe). As in practice, DPO starts from an SFT model, which is also its reference: first one
run with ``--model.loss_type sft`` (the NLL of the chosen responses, no reference) from the
recipe's random init, then every DPO run from its Hugging Face export (``--init random`` skips
the SFT stage: DPO from the recipe's random-init model, whose near-uniform reference caps the
sampled KL near ln 16 nats per token). After each run the script measures, on the 200
held-out prompts of the task:

- the validation metrics the module logs (``val/rewards/accuracies``, ``val/rewards/margins``,
  ``val/rewards/chosen``, ``val/rewards/rejected``; divided by beta they are log-ratios in nats);
- KL(policy || reference) per response, estimated by sampling: ``--samples`` responses per prompt
  from the policy at temperature 1 (at most 10 new tokens, i.e. the longest answer and EOS), and
  the mean over them of ``log pi(y|x) - log ref(y|x)`` (both from ``logprobs.sequence_logps``);
  the reference is the initial policy, copied before training starts;
- the task's ground-truth reward (``synthetic.sort_reward``) of those samples, and the fraction
  of prompts that greedy decoding sorts exactly.

Sweeps (``--sweeps``, default all five):

- ``beta``: beta in 0.01, 0.05, 0.1, 0.3, 1.0 (each over ``--seeds``);
- ``beta_lowlr``: the same betas at learning rate 1e-4 (first seed);
- ``lr``: AdamW learning rate in 1e-4, 3e-4, 1e-3, 3e-3 at beta 0.1;
- ``smoothing``: 20% of the *training* labels flipped (chosen and rejected swapped; validation
  stays clean), then ``sigmoid`` with label_smoothing 0, 0.1, 0.2 (cDPO) and ``robust`` with 0.2,
  at learning rate 1e-4;
- ``rpo``: ``loss_type [sigmoid, sft]`` with weights [1, 1] (DPO plus the chosen NLL) at beta 0.01, 0.1.

Writes PNG figures to ``--out`` (default ``docs/figures``), prints a markdown table per sweep and
saves the raw numbers as ``results.json`` in ``--workdir`` after every run (a later call with other
``--sweeps`` adds to it, reusing the SFT runs); ``--replot`` redraws the figures from that file
without training. Needs matplotlib (``pip install matplotlib``). Not part of pytest.

    python benchmarks/beta_sweep.py                       # SFT per seed, then all sweeps, seeds 0 1 (27 runs)
    python benchmarks/beta_sweep.py --sweeps beta --seeds 0
    python benchmarks/beta_sweep.py --init random --sweeps beta --workdir runs/sweep_random --out /tmp/figs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dpo_lightning.cli import DPOLightningCLI, cli_main  # noqa: E402
from dpo_lightning.data import synthetic  # noqa: E402
from dpo_lightning.logprobs import IGNORE_INDEX, sequence_logps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.yaml"
BETAS = (0.01, 0.05, 0.1, 0.3, 1.0)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
NOISE = 0.2  # fraction of training pairs with chosen and rejected swapped in the smoothing sweep
SMOOTHING = (("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.2), ("robust", 0.2))
RPO_BETAS = (0.01, 0.1)
LOW_LR = 1e-4  # the beta sweep again at a tenth of the recipe's learning rate
SWEEPS = ("beta", "beta_lowlr", "lr", "smoothing", "rpo")  # DPO + the chosen NLL (RPO), against likelihood displacement
MAX_NEW_TOKENS = 10  # the longest answer (8 digits) + EOS, and one spare
VAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
            "logps/chosen", "logps/rejected")


class SnapshotCLI(DPOLightningCLI):
    """The real CLI; before ``fit`` it keeps a copy of the initial policy: the reference, by definition."""

    def before_fit(self) -> None:
        self.initial_policy = copy.deepcopy(self.model.model).eval()


# --------------------------------------------------------------------------------------------------
# held-out measurements


@torch.no_grad()
def sample(model, prompts: torch.Tensor, eos: int, pad: int, greedy: bool, generator: torch.Generator):
    """Continue ``prompts`` (N, P) (equal lengths, no padding) for up to MAX_NEW_TOKENS tokens.

    Returns ``(ids (N, P + new), labels (N, P + new))``: labels are the sampled tokens up to and
    including the first EOS, -100 on the prompt and after the EOS (so ``sequence_logps`` scores
    exactly the response). Plain ancestral sampling at temperature 1, no top-k/top-p.
    """
    ids = prompts
    done = torch.zeros(len(ids), dtype=torch.bool)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for _ in range(MAX_NEW_TOKENS):
        logits = model(input_ids=ids).logits[:, -1].float()  # (N, V)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)  # (N,)
        label = torch.where(done, torch.full_like(nxt, IGNORE_INDEX), nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        labels = torch.cat([labels, label[:, None]], 1)
        done |= nxt == eos
        if done.all():
            break
    return ids, labels


@torch.no_grad()
def held_out(policy, reference, tokenizer, rows, samples: int, seed: int) -> dict[str, float]:
    """Sampled KL(policy || reference), ground-truth reward of samples, greedy exact-sort rate."""
    policy.eval()
    reference.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    g = torch.Generator().manual_seed(seed)
    by_len: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
    for row in rows:
        ids = tokenizer(row["prompt"]).input_ids  # BOS + words, as the data module builds them
        by_len[len(ids)].append((row["prompt"], ids))
    kl, reward, exact_sampled, greedy_exact, lengths = [], [], [], [], []
    for group in by_len.values():
        texts = [t for t, _ in group]
        prompts = torch.tensor([ids for _, ids in group])  # (n, P)
        # greedy: does the policy sort?
        ids, labels = sample(policy, prompts, eos, pad, greedy=True, generator=g)
        for text, out in zip(texts, ids[:, prompts.shape[1]:]):
            greedy_exact.append(synthetic.sort_reward(text, _decode(tokenizer, out)) == 1.0)
        # sampled: KL and ground-truth reward
        rep = prompts.repeat_interleave(samples, 0)  # (n * samples, P)
        ids, labels = sample(policy, rep, eos, pad, greedy=False, generator=g)
        attn = torch.ones_like(ids)
        pol = sequence_logps(policy(input_ids=ids, attention_mask=attn).logits, labels)
        ref = sequence_logps(reference(input_ids=ids, attention_mask=attn).logits, labels)
        kl += (pol.logps - ref.logps).tolist()
        lengths += pol.n_tokens.tolist()
        for i, out in enumerate(ids[:, prompts.shape[1]:]):
            r = synthetic.sort_reward(texts[i // samples], _decode(tokenizer, out))
            reward.append(r)
            exact_sampled.append(r == 1.0)
    n = len(kl)
    mean_kl = sum(kl) / n
    sd = math.sqrt(sum((x - mean_kl) ** 2 for x in kl) / max(n - 1, 1))
    return {
        "kl": mean_kl,
        "kl_se": sd / math.sqrt(n),
        "sample_reward": sum(reward) / n,
        "sample_exact": sum(exact_sampled) / n,
        "greedy_exact": sum(greedy_exact) / len(greedy_exact),
        "sample_tokens": sum(lengths) / n,
    }


def _decode(tokenizer, ids: torch.Tensor) -> str:
    words = []
    for i in ids.tolist():
        if i == tokenizer.eos_token_id:
            break
        words.append(tokenizer.convert_ids_to_tokens(i))
    return " " + " ".join(w for w in words if w not in tokenizer.all_special_tokens)


# --------------------------------------------------------------------------------------------------
# one run


def run(tag: str, overrides: list[str], workdir: Path, steps: int, seed: int, samples: int, beta: float) -> dict:
    args = [
        "fit", "--config", str(RECIPE),
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(min(100, steps)),  # the recipe's 100; a validation at the end
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
        "--trainer.logger.init_args.name", tag,
        *overrides,
    ]
    print(f"[sweep] {tag}: python -m dpo_lightning {' '.join(args)}", flush=True)
    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        cli = cli_main(args, cli_class=SnapshotCLI)
    finally:
        sys.argv = argv
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    row: dict = {"tag": tag, "seed": seed, "beta": beta, "seconds": seconds, "log_dir": str(cli.trainer.log_dir)}
    row.update({f"val/{k}": metrics[f"val/{k}"] for k in VAL_KEYS})
    row["val/chosen_logratio"] = row["val/rewards/chosen"] / beta
    row["val/rejected_logratio"] = row["val/rewards/rejected"] / beta
    row["val/margin_logratio"] = row["val/rewards/margins"] / beta
    tokenizer = cli.datamodule.tokenizer
    rows = synthetic.load_dataset("synthetic:sort", seed=0)["validation"]  # the recipe's data.seed: 0
    row.update(held_out(cli.model.model, cli.initial_policy, tokenizer, rows, samples, seed=1000 + seed))
    print(f"[sweep] {tag}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
          flush=True)
    return row


def noisy_data(workdir: Path, fraction: float) -> Path:
    """The task's train split with ``fraction`` of its pairs swapped, and its clean validation split."""
    folder = workdir / f"noisy{int(fraction * 100)}"
    folder.mkdir(parents=True, exist_ok=True)
    data = synthetic.load_dataset("synthetic:sort", seed=0)
    rng = random.Random(0)
    with open(folder / "train.jsonl", "w") as f:
        for row in data["train"]:
            if rng.random() < fraction:
                row = {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
            f.write(json.dumps(row) + "\n")
    with open(folder / "validation.jsonl", "w") as f:
        for row in data["validation"]:
            f.write(json.dumps(row) + "\n")
    return folder


def sweep(names: list[str], seeds: list[int], workdir: Path, steps: int, samples: int, init: str) -> list[dict]:
    """Run the sweeps ``names``; rows of other sweeps already in ``<workdir>/results.json`` are kept, and
    an SFT run there is reused while its export exists. The file is rewritten after every run."""
    store = workdir / "results.json"
    old = json.loads(store.read_text()) if store.exists() else []
    results = [r for r in old if r["sweep"] not in names and r["sweep"] != "sft"]
    done_sft = {r["seed"]: r for r in old if r["sweep"] == "sft" and (Path(r["log_dir"]) / "hf_export").exists()}

    def add(row: dict) -> None:
        results.append(row)
        store.write_text(json.dumps(results, indent=1))

    # Where each seed's DPO runs start, and their reference: the recipe's random init, or that seed's SFT
    # model (the seed sets the SFT run's initialisation; from a fixed start a DPO run is deterministic).
    starts: dict[int, list[str]] = {seed: [] for seed in seeds}
    if init == "sft":
        for seed in seeds if "beta" in names else seeds[:1]:
            row = done_sft.pop(seed, None)
            if row is None:
                row = {"sweep": "sft", **run(f"sft_s{seed}", ["--model.loss_type", "sft"], workdir, steps, seed,
                                              samples, 0.1)}
            add(row)
            starts[seed] = ["--model.model", str(Path(row["log_dir"]) / "hf_export"), "--model.model_config", "null"]
        results.extend(done_sft.values())  # SFT runs of other seeds, kept
    start = starts[seeds[0]]
    if "beta" in names:
        for beta in BETAS:
            for seed in seeds:
                over = [*starts[seed], "--model.beta", str(beta)]
                add({"sweep": "beta", **run(f"beta{beta}_s{seed}", over, workdir, steps, seed, samples, beta)})
    if "beta_lowlr" in names:
        for beta in BETAS:
            over = [*start, "--model.beta", str(beta), "--model.optimizer.init_args.lr", str(LOW_LR)]
            row = run(f"beta{beta}_lr{LOW_LR}_s{seeds[0]}", over, workdir, steps, seeds[0], samples, beta)
            add({"sweep": "beta_lowlr", "lr": LOW_LR, **row})
    if "lr" in names:
        for lr in LRS:
            over = [*start, "--model.optimizer.init_args.lr", str(lr)]
            add({"sweep": "lr", "lr": lr, **run(f"lr{lr}_s{seeds[0]}", over, workdir, steps, seeds[0], samples, 0.1)})
    if "smoothing" in names:
        folder = noisy_data(workdir, NOISE)
        for loss, eps in SMOOTHING:
            over = [*start, "--data.dataset", str(folder), "--model.loss_type", loss,
                    "--model.label_smoothing", str(eps), "--model.optimizer.init_args.lr", str(LOW_LR)]
            row = run(f"noise{NOISE}_{loss}{eps}_s{seeds[0]}", over, workdir, steps, seeds[0], samples, 0.1)
            add({"sweep": "smoothing", "loss_type": loss, "label_smoothing": eps, "lr": LOW_LR, **row})
    if "rpo" in names:
        for beta in RPO_BETAS:
            over = [*start, "--model.loss_type", "[sigmoid, sft]", "--model.loss_weights", "[1.0, 1.0]",
                    "--model.beta", str(beta)]
            row = run(f"rpo_beta{beta}_s{seeds[0]}", over, workdir, steps, seeds[0], samples, beta)
            add({"sweep": "rpo", "loss_type": "sigmoid+sft", **row})
    return results


# --------------------------------------------------------------------------------------------------
# tables and figures


def table(results: list[dict], sweep_name: str) -> str:
    rows = [r for r in results if r["sweep"] == sweep_name]
    if not rows:
        return ""
    key = {"sft": ("tag",), "beta": ("beta",), "beta_lowlr": ("beta", "lr"), "lr": ("lr",),
           "smoothing": ("loss_type", "label_smoothing"), "rpo": ("loss_type", "beta")}[sweep_name]
    head = [*key, "seed", "val acc", "val loss", "val margin (reward)", "margin (nats)", "chosen log-ratio",
            "rejected log-ratio", "KL(pi||ref), sampled", "sampled reward", "greedy exact", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in key] + [
            str(r["seed"]),
            f"{r['val/rewards/accuracies']:.3f}",
            f"{r['val/loss']:.3f}",
            f"{r['val/rewards/margins']:.2f}",
            f"{r['val/margin_logratio']:.1f}",
            f"{r['val/chosen_logratio']:+.1f}",
            f"{r['val/rejected_logratio']:+.1f}",
            f"{r['kl']:.1f} ± {r['kl_se']:.1f}",
            f"{r['sample_reward']:.2f}",
            f"{r['greedy_exact']:.2f}",
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scalars(log_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def _by(rows: list[dict], key: str) -> tuple[list, dict[str, list[float]]]:
    """Group rows by ``key``: the sorted keys and, per metric, the mean over seeds."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    xs = sorted(groups)
    mean = lambda m: [sum(r[m] for r in groups[x]) / len(groups[x]) for x in xs]  # noqa: E731
    metrics = ("val/rewards/accuracies", "val/margin_logratio", "val/rewards/margins", "kl", "greedy_exact",
               "sample_reward", "val/chosen_logratio", "val/rejected_logratio")
    return xs, {m: mean(m) for m in metrics}


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    caption = "recipes/tiny.yaml, 300 steps, 2-core CPU; held-out: 200 prompts"

    beta_rows = [r for r in results if r["sweep"] == "beta"]
    if beta_rows:
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        panels = [
            ("held-out accuracy", "val/rewards/accuracies", False),
            ("held-out margin D (nats)", "val/margin_logratio", True),
            ("KL(policy || ref), sampled (nats)", "kl", True),
            ("ground truth: greedy exact sort", "greedy_exact", False),
        ]
        low_rows = [r for r in results if r["sweep"] == "beta_lowlr"]
        series = [(beta_rows, "lr 1e-3 (the recipe's)", "tab:blue")]
        if low_rows:
            series.append((low_rows, f"lr {LOW_LR:g}", "tab:orange"))
        for ax, (title, key, logy) in zip(axes, panels):
            for rows, label, color in series:
                xs, m = _by(rows, "beta")
                for r in rows:
                    ax.scatter(r["beta"], r[key], color=color, alpha=0.4, s=12, zorder=2)
                ax.plot(xs, m[key], marker="o", color=color, label=label, zorder=3)
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("beta")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        xs, m = _by(beta_rows, "beta")
        axes[1].plot(xs, [m["val/margin_logratio"][0] * xs[0] / x for x in xs], ls=":", color="black",
                     label="∝ 1/beta")
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=8)
        sft = [r for r in results if r["sweep"] == "sft"]
        if sft:
            sft_exact = sum(r["greedy_exact"] for r in sft) / len(sft)
            axes[3].axhline(sft_exact, color="black", ls="--", lw=0.8, label="SFT start (mean)")
            axes[3].legend(fontsize=8)
        fig.suptitle(f"beta sweep (dots: runs, line: mean over seeds) — {caption}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "beta_sweep.png"))

        # training curves of one seed per beta, from the TensorBoard events: a row per learning rate
        seed0 = min(r["seed"] for r in beta_rows)
        groups = [(f"lr {LOW_LR:g}", [r for r in low_rows if r["seed"] == seed0])] if low_rows else []
        groups.append(("lr 1e-3 (the recipe's)", [r for r in beta_rows if r["seed"] == seed0]))
        fig, grid = plt.subplots(len(groups), 4, figsize=(16, 3.6 * len(groups)), squeeze=False)
        for axes, (label, rows) in zip(grid, groups):
            for r in sorted(rows, key=lambda r: r["beta"]):
                s = _scalars(r["log_dir"])
                b = r["beta"]
                line = axes[0].plot(*s["train/loss"], label=f"beta {b}")[0]
                axes[1].plot(*s["train/rewards/accuracies"], color=line.get_color())
                steps, chosen = s["train/rewards/chosen"]
                axes[2].plot(steps, [v / b for v in chosen], color=line.get_color())
                steps, rejected = s["train/rewards/rejected"]
                axes[2].plot(steps, [v / b for v in rejected], color=line.get_color(), ls="--")
                axes[3].plot(*s["train/logps/chosen"], color=line.get_color())
                axes[3].plot(*s["train/logps/rejected"], color=line.get_color(), ls="--")
            axes[0].axhline(math.log(2), color="black", lw=0.8, ls=":")
            axes[0].set_yscale("log")
            titles = ["train/loss (dotted: ln 2)", "train/rewards/accuracies",
                      "rewards/beta (log-ratio): chosen —, rejected --", "logps/chosen —, logps/rejected --"]
            for ax, title in zip(axes, titles):
                ax.set_title(title, fontsize=10)
                ax.set_xlabel("optimizer step")
                ax.grid(alpha=0.3)
            axes[0].set_ylabel(label, fontsize=11)
            axes[2].set_yscale("symlog")
            axes[0].legend(fontsize=8)
        fig.suptitle(f"training curves per beta (seed {seed0}) — {caption}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "beta_curves.png"))

    lr_rows = [r for r in results if r["sweep"] == "lr"]
    if lr_rows:
        xs, m = _by(lr_rows, "lr")
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, (title, key, logy) in zip(axes, [
            ("held-out accuracy", "val/rewards/accuracies", False),
            ("KL(policy || ref), sampled (nats)", "kl", True),
            ("ground truth: greedy exact sort", "greedy_exact", False),
        ]):
            ax.plot(xs, m[key], marker="o")
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("AdamW learning rate (beta 0.1)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        sft = [r for r in results if r["sweep"] == "sft" and r["seed"] == lr_rows[0]["seed"]]
        if sft:
            axes[2].axhline(sft[0]["greedy_exact"], color="black", ls="--", lw=0.8, label="SFT start")
            axes[2].legend(fontsize=8)
        fig.suptitle(f"learning-rate sweep — {caption}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "lr_sweep.png"))

    sm_rows = [r for r in results if r["sweep"] == "smoothing"]
    if sm_rows:
        labels = [f"{r['loss_type']}\neps={r['label_smoothing']}" for r in sm_rows]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, (title, key) in zip(axes, [
            ("clean held-out accuracy", "val/rewards/accuracies"),
            ("held-out margin D (nats)", "val/margin_logratio"),
            ("KL(policy || ref), sampled (nats)", "kl"),
            ("ground truth: greedy exact sort", "greedy_exact"),
        ]):
            ax.bar(range(len(sm_rows)), [r[key] for r in sm_rows], color="tab:blue")
            ax.set_xticks(range(len(sm_rows)), labels, fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylim(min(r["val/rewards/accuracies"] for r in sm_rows) - 0.05, 1.0)
        sft = [r for r in results if r["sweep"] == "sft" and r["seed"] == sm_rows[0]["seed"]]
        if sft:
            axes[3].axhline(sft[0]["greedy_exact"], color="black", ls="--", lw=0.8, label="SFT start")
            axes[3].legend(fontsize=8)
        title = f"{int(NOISE * 100)}% of training labels flipped, beta 0.1, lr {LOW_LR:g}"
        fig.suptitle(f"{title} — {caption}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "label_smoothing.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the beta sweep (others: first)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the recipe's 300)")
    parser.add_argument("--samples", type=int, default=4, help="sampled responses per held-out prompt")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--init", choices=("sft", "random"), default="sft",
                        help="start DPO from an SFT run (default) or from the recipe's random init")
    parser.add_argument("--replot", action="store_true", help="redraw from <workdir>/results.json, no training")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    store = args.workdir / "results.json"
    if args.replot:
        results = json.loads(store.read_text())
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = sweep(args.sweeps, args.seeds, args.workdir, args.steps, args.samples, args.init)
    for name in ("sft", *SWEEPS):
        text = table(results, name)
        if text:
            print(f"\n## {name}\n\n{text}")
    for path in plot(results, args.out):
        print(f"wrote {path}")
    print(f"\ntorch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
