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

Sweeps (``--sweeps``; the default runs the first five, 27 runs; ``batch`` and ``length`` run when named):

- ``beta``: beta in 0.01, 0.05, 0.1, 0.3, 1.0 (each over ``--seeds``);
- ``beta_lowlr``: the same betas at learning rate 1e-4 (first seed);
- ``lr``: AdamW learning rate in 1e-4, 3e-4, 1e-3, 3e-3 at beta 0.1;
- ``smoothing``: 20% of the *training* labels flipped (chosen and rejected swapped; validation
  stays clean), then ``sigmoid`` with label_smoothing 0, 0.1, 0.2 (cDPO) and ``robust`` with 0.2,
  at learning rate 1e-4;
- ``rpo``: ``loss_type [sigmoid, sft]`` with weights [1, 1] (DPO plus the chosen NLL) at beta 0.01, 0.1;
- ``batch``: ``data.batch_size`` 8, 16, 32, 64 at a fixed 9600 training pairs (1200, 600, 300, 150
  steps; ``--steps`` is ignored), beta 0.1, lr 1e-4; then sizes 8 and 64 again with the learning
  rate scaled by sqrt(batch / 32);
- ``length``: ``data.max_length`` / ``data.max_prompt_length`` cuts that bite on this task (pairs
  are 10-20 tokens) at beta 0.1, lr 1e-4. The data module's warnings (pairs dropped, prompts and
  responses cut, per split) are recorded, and held-out accuracy and margin are also measured on the
  *uncut* validation pairs (the logged ``val/*`` metrics see the cut ones).

Writes PNG figures to ``--out`` (default ``docs/figures``), prints a markdown table per sweep and
saves the raw numbers as ``results.json`` in ``--workdir`` after every run (a later call with other
``--sweeps`` adds to it, reusing the SFT runs); ``--replot`` redraws the figures from that file
without training. Draws with matplotlib (a dependency). Not part of pytest.

    python benchmarks/beta_sweep.py                       # SFT per seed, then all sweeps, seeds 0 1 (27 runs)
    python benchmarks/beta_sweep.py --sweeps beta --seeds 0
    python benchmarks/beta_sweep.py --sweeps batch length --seeds 0   # 11 runs (+ SFT unless reused)
    python benchmarks/beta_sweep.py --init random --sweeps beta --workdir runs/sweep_random --out /tmp/figs
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dpo_lightning.cli import DPOLightningCLI, cli_main  # noqa: E402
from dpo_lightning.data import synthetic  # noqa: E402
from dpo_lightning.models.logprobs import IGNORE_INDEX, sequence_logps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.yaml"
BETAS = (0.01, 0.05, 0.1, 0.3, 1.0)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
NOISE = 0.2  # fraction of training pairs with chosen and rejected swapped in the smoothing sweep
SMOOTHING = (("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.2), ("robust", 0.2))
RPO_BETAS = (0.01, 0.1)
LOW_LR = 1e-4  # the beta sweep again at a tenth of the recipe's learning rate
DEFAULT_SWEEPS = ("beta", "beta_lowlr", "lr", "smoothing", "rpo")  # rpo: DPO + the chosen NLL (RPO)
SWEEPS = (*DEFAULT_SWEEPS, "batch", "length")  # the last two only when named in --sweeps
PAIRS = 9600  # training pairs seen by every run of the batch sweep (the recipe's 300 steps x 32)
BATCHES = (8, 16, 32, 64)
BATCH_REF = 32  # the batch size the learning rate LOW_LR belongs to (the recipe's)
SQRT_BATCHES = (8, 64)  # rerun with lr LOW_LR * sqrt(batch / BATCH_REF)
# (max_length, max_prompt_length): prompts are 6-11 tokens (BOS, "sort:", the digits, "="), responses
# 4-9 (the digits and EOS), pairs 10-20; chosen and rejected first differ at response token 0-7.
LENGTHS = ((64, 32), (16, 32), (16, 8), (12, 32), (12, 6))
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


@torch.no_grad()
def uncut_pairs(policy, reference, tokenizer, rows, beta: float) -> dict[str, float]:
    """Preference accuracy and margin (nats) on the held-out pairs at full length (nothing cut):
    BOS + prompt words, then the response words and EOS, as the data module builds them untruncated."""
    eos = tokenizer.eos_token_id
    margins = []
    for row in rows:
        prompt = tokenizer(row["prompt"]).input_ids
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            response = tokenizer(row[side], add_special_tokens=False).input_ids + [eos]
            seqs.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [eos] * (width - len(s)) for s in seqs])
        lab = torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        pol = sequence_logps(policy(input_ids=ids, attention_mask=attn).logits, lab).logps
        ref = sequence_logps(reference(input_ids=ids, attention_mask=attn).logits, lab).logps
        margins.append(((pol[0] - ref[0]) - (pol[1] - ref[1])).item())
    return {"uncut/accuracy": sum(m > 0 for m in margins) / len(margins),
            "uncut/margin_logratio": sum(margins) / len(margins)}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def data_counts(messages: list[str]) -> dict[str, int]:
    """What the data module's warnings report, per split: ``{split}/dropped_identical`` (same tokens
    after truncation), ``{split}/dropped_empty``, ``{split}/prompts_cut``, ``{split}/responses_cut``,
    and the totals they are out of (``{split}/pairs``, ``{split}/responses``: kept pairs, 2 x kept)."""
    out: dict[str, int] = {}
    for msg in messages:
        split = re.search(r"\(split '(\w+)'\)", msg)
        if not split:
            continue
        sp = split.group(1)
        if m := re.search(r"dropped (\d+) of (\d+) pairs whose chosen and rejected are the same tokens", msg):
            out[f"{sp}/dropped_identical"], out[f"{sp}/total"] = int(m[1]), int(m[2])
        elif m := re.search(r"dropped (\d+) of (\d+) pairs whose response is empty", msg):
            out[f"{sp}/dropped_empty"], out[f"{sp}/total"] = int(m[1]), int(m[2])
        elif m := re.search(r"cut the prompt of (\d+) of (\d+) pairs .* and (\d+) of (\d+) responses", msg):
            out[f"{sp}/prompts_cut"], out[f"{sp}/pairs"] = int(m[1]), int(m[2])
            out[f"{sp}/responses_cut"], out[f"{sp}/responses"] = int(m[3]), int(m[4])
    return out


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
    collect = _Collect()  # the data module's warnings: what truncation cut and dropped, with counts
    data_log = logging.getLogger("dpo_lightning.data")
    data_log.addHandler(collect)
    try:
        cli = cli_main(args, cli_class=SnapshotCLI)
    finally:
        sys.argv = argv
        data_log.removeHandler(collect)
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
    row.update(uncut_pairs(cli.model.model, cli.initial_policy, tokenizer, rows, beta))
    row["data_warnings"] = collect.messages
    row["data_counts"] = data_counts(collect.messages)
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
        store.write_text(json.dumps(results, indent=1))  # kept even if this call is interrupted
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
    if "batch" in names:
        runs = [(b, LOW_LR, "") for b in BATCHES]
        runs += [(b, LOW_LR * math.sqrt(b / BATCH_REF), "sqrt") for b in SQRT_BATCHES]
        for batch, lr, scaling in runs:
            n_steps = PAIRS // batch
            over = [*start, "--data.batch_size", str(batch), "--model.optimizer.init_args.lr", f"{lr:.3g}"]
            row = run(f"batch{batch}_lr{lr:.3g}_s{seeds[0]}", over, workdir, n_steps, seeds[0], samples, 0.1)
            add({"sweep": "batch", "batch_size": batch, "lr": float(f"{lr:.3g}"), "steps": n_steps,
                 "lr_scaling": scaling or "none", **row})
    if "length" in names:
        for max_length, max_prompt in LENGTHS:
            over = [*start, "--data.max_length", str(max_length), "--data.max_prompt_length", str(max_prompt),
                    "--model.optimizer.init_args.lr", str(LOW_LR)]
            row = run(f"len{max_length}_prompt{max_prompt}_s{seeds[0]}", over, workdir, steps, seeds[0], samples, 0.1)
            add({"sweep": "length", "max_length": max_length, "max_prompt_length": max_prompt, "lr": LOW_LR, **row})
    return results


# --------------------------------------------------------------------------------------------------
# tables and figures


def table(results: list[dict], sweep_name: str) -> str:
    rows = [r for r in results if r["sweep"] == sweep_name]
    if not rows:
        return ""
    key = {"sft": ("tag",), "beta": ("beta",), "beta_lowlr": ("beta", "lr"), "lr": ("lr",),
           "smoothing": ("loss_type", "label_smoothing"), "rpo": ("loss_type", "beta"),
           "batch": ("batch_size", "lr", "steps"), "length": ("max_length", "max_prompt_length")}[sweep_name]
    if sweep_name == "length":
        return _length_table(rows)
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


def _length_table(rows: list[dict]) -> str:
    head = ["max_length", "max_prompt_length", "train pairs dropped", "train prompts cut", "train responses cut",
            "val pairs dropped", "val acc (cut, logged)", "held-out acc (uncut)", "margin uncut (nats)",
            "KL(pi||ref), sampled", "greedy exact", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.get("data_counts", {})
        dropped = lambda sp: c.get(f"{sp}/dropped_identical", 0) + c.get(f"{sp}/dropped_empty", 0)  # noqa: E731
        cells = [
            str(r["max_length"]), str(r["max_prompt_length"]),
            str(dropped("train")),
            f"{c.get('train/prompts_cut', 0)} of {c.get('train/pairs', 10000 - dropped('train'))}",
            f"{c.get('train/responses_cut', 0)} of {c.get('train/responses', 2 * (10000 - dropped('train')))}",
            str(dropped("validation")),
            f"{r['val/rewards/accuracies']:.3f}",
            f"{r['uncut/accuracy']:.3f}",
            f"{r['uncut/margin_logratio']:.1f}",
            f"{r['kl']:.1f} ± {r['kl_se']:.1f}",
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

    batch_rows = [r for r in results if r["sweep"] == "batch"]
    if batch_rows:
        fig, axes = plt.subplots(1, 5, figsize=(19, 3.6))
        panels = [("held-out accuracy", "val/rewards/accuracies", False),
                  ("held-out margin D (nats)", "val/margin_logratio", False),
                  ("chosen log-ratio (nats)", "val/chosen_logratio", False),
                  ("KL(policy || ref), sampled (nats)", "kl", False),
                  ("ground truth: greedy exact sort", "greedy_exact", False)]
        series = [("none", f"lr {LOW_LR:g} at every size", "tab:blue", "o"),
                  ("sqrt", f"lr {LOW_LR:g} x sqrt(batch / {BATCH_REF})", "tab:orange", "s")]
        for ax, (title, key, _) in zip(axes, panels):
            for scaling, label, color, marker in series:
                rows = sorted((r for r in batch_rows if r["lr_scaling"] == scaling), key=lambda r: r["batch_size"])
                if rows:
                    ax.plot([r["batch_size"] for r in rows], [r[key] for r in rows], marker=marker, color=color,
                            label=label, ls="-" if scaling == "none" else "")
            ax.set_xscale("log", base=2)
            ax.set_xticks(BATCHES, [f"{b}\n({PAIRS // b} st.)" for b in BATCHES], fontsize=8)
            ax.set_xlabel("data.batch_size (optimizer steps)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        sft = [r for r in results if r["sweep"] == "sft" and r["seed"] == batch_rows[0]["seed"]]
        if sft:
            axes[4].axhline(sft[0]["greedy_exact"], color="black", ls="--", lw=0.8, label="SFT start")
            axes[4].legend(fontsize=8)
        fig.suptitle(f"batch size at a fixed {PAIRS} training pairs, beta 0.1 — recipes/tiny.yaml from SFT, "
                     "2-core CPU; held-out: 200 prompts", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "batch_sweep.png"))

    len_rows = [r for r in results if r["sweep"] == "length"]
    if len_rows:
        labels = [f"{r['max_length']}/{r['max_prompt_length']}" for r in len_rows]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        x = range(len(len_rows))
        c = [r.get("data_counts", {}) for r in len_rows]
        dropped = [d.get("train/dropped_identical", 0) + d.get("train/dropped_empty", 0) for d in c]
        axes[0].bar([i - 0.27 for i in x], [d / 100 for d in dropped], 0.27, label="pairs dropped (of 10000)")
        axes[0].bar(x, [d.get("train/prompts_cut", 0) / 100 for d in c], 0.27,
                  label="prompts cut (of 10000)")
        axes[0].bar([i + 0.27 for i in x], [d.get("train/responses_cut", 0) / 200 for d in c], 0.27,
                    label="responses cut (of 20000)")
        axes[0].set_title("train split, data module counts (%)", fontsize=10)
        axes[0].legend(fontsize=8)
        axes[1].bar([i - 0.2 for i in x], [r["val/rewards/accuracies"] for r in len_rows], 0.4,
                    label="logged val acc (cut pairs)")
        axes[1].bar([i + 0.2 for i in x], [r["uncut/accuracy"] for r in len_rows], 0.4, label="uncut held-out pairs")
        axes[1].set_ylim(min(min(r["uncut/accuracy"], r["val/rewards/accuracies"]) for r in len_rows) - 0.05, 1.0)
        axes[1].set_title("held-out accuracy", fontsize=10)
        axes[1].legend(fontsize=8)
        axes[2].bar(x, [r["kl"] for r in len_rows])
        axes[2].set_title("KL(policy || ref), sampled (nats)", fontsize=10)
        axes[3].bar(x, [r["greedy_exact"] for r in len_rows])
        axes[3].set_title("ground truth: greedy exact sort", fontsize=10)
        sft = [r for r in results if r["sweep"] == "sft" and r["seed"] == len_rows[0]["seed"]]
        if sft:
            axes[3].axhline(sft[0]["greedy_exact"], color="black", ls="--", lw=0.8, label="SFT start")
            axes[3].legend(fontsize=8)
        for ax in axes:
            ax.set_xticks(list(x), labels, fontsize=8)
            ax.set_xlabel("max_length / max_prompt_length")
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"truncation (pairs are 10-20 tokens), beta 0.1, lr {LOW_LR:g} — {caption}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "length_sweep.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(DEFAULT_SWEEPS),
                        help=f"default: {' '.join(DEFAULT_SWEEPS)}; batch and length run only when named")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the beta sweep (others: first)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the recipe's 300)")
    parser.add_argument("--samples", type=int, default=4, help="sampled responses per held-out prompt")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--init", choices=("sft", "random"), default="sft",
                        help="start DPO from an SFT run (default) or from the recipe's random init")
    parser.add_argument("--replot", action="store_true", help="redraw from <workdir>/results.json, no training")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (default: up to 2); use 1 when other jobs share the cores: two threads "
                             "fighting a busy core made a run 20x slower here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
