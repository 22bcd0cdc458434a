"""What makes iterative DPO rounds improve the true objective: variants of ``recipes/pipeline_tiny.yaml``
from one SFT start, scored by ``align_score.py`` (greedy exact sort, rewards, KL to SFT).

Every variant is a ``python -m dpo_lightning iterate`` config that starts from the same SFT export
(``sft.config: <export>``, so no SFT runs) and changes one thing or a few in the shipped recipe; the
baselines that are not rounds (a longer SFT, offline DPO on the task's own pairs) are ``fit`` commands
from the same export. Each run is a subprocess with one torch thread (``OMP_NUM_THREADS=1``), its wall
and CPU time recorded; each round's export is then scored on the 200 held-out prompts (round 0: the
SFT export). Seeds: ``--seeds 0 1 2`` runs each variant with ``seed: s`` (the rounds' sampling) and
``--seed_everything s`` in its training stages. Rows go to ``<workdir>/results.jsonl`` (one per run and
round, with the command); a re-run skips the runs already there.

    python benchmarks/align_sweep.py --sft runs/tiny_sft/version_0/hf_export --variants rpo_1 dpo --seeds 0 1
    python benchmarks/align_sweep.py --table      # the markdown table of every run in results.jsonl
    python benchmarks/align_sweep.py --plot docs/figures/align_sweep.png

``--list`` prints the variants. Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The shipped recipe's stages, spelled out so that a variant can change any part.
GENERATE_ARGS = {"--data.limit": "1000"}
DPO_ARGS = {"--model.optimizer.init_args.lr": "1.0e-4", "--trainer.max_steps": "150",
            "--trainer.val_check_interval": "50"}
SOLVED = "function:dpo_lightning.data.synthetic:sort_solved"
RPO = {"--model.loss_type": "[sigmoid, sft]", "--model.loss_weights": "[1.0, 1.0]"}


def rpo(alpha: float) -> dict[str, str]:
    return {**RPO, "--model.loss_weights": f"[1.0, {alpha}]"}


# name -> what it changes: "generate" / "dpo" args (merged over the shipped ones), "pipeline" keys, or a
# "fit" command (a baseline that is not rounds). Compute: the shipped recipe samples 1000 prompts x 8 and
# trains 150 steps of 32 pairs per round; a variant that changes one keeps the product where it can.
VARIANTS: dict[str, dict[str, Any]] = {
    "dpo": {},  # as shipped: sigmoid, best_vs_worst, 8 samples at T=1, lr 1e-4, 150 steps, reference previous
    "rpo_0.2": {"dpo": rpo(0.2)},
    "rpo_0.5": {"dpo": rpo(0.5)},
    "rpo_1": {"dpo": rpo(1.0)},
    "rpo_2": {"dpo": rpo(2.0)},
    "rpo_1_best_vs_rest": {"dpo": rpo(1.0), "generate": {"--output.pairing": "best_vs_rest"}},
    "rpo_1_all": {"dpo": rpo(1.0), "generate": {"--output.pairing": "all"}},
    "rpo_1_margin0.3": {"dpo": rpo(1.0), "generate": {"--output.min_margin": "0.3"}},
    "rpo_1_T0.7": {"dpo": rpo(1.0), "generate": {"--model.temperature": "0.7"}},
    "rpo_1_n16_p500": {"dpo": rpo(1.0), "generate": {"--model.num_samples": "16", "--data.limit": "500"}},
    "rpo_1_n4_p2000": {"dpo": rpo(1.0), "generate": {"--model.num_samples": "4", "--data.limit": "2000"}},
    "rpo_1_initial": {"dpo": rpo(1.0), "pipeline": {"reference": "initial"}},
    "rpo_1_beta0.5": {"dpo": {**rpo(1.0), "--model.beta": "0.5"}},
    "rpo_1_beta0.03": {"dpo": {**rpo(1.0), "--model.beta": "0.03"}},
    "rpo_1_lr3e-4": {"dpo": {**rpo(1.0), "--model.optimizer.init_args.lr": "3.0e-4"}},
    "rpo_1_lr3e-5": {"dpo": {**rpo(1.0), "--model.optimizer.init_args.lr": "3.0e-5"}},
    "rpo_1_mix1000": {"dpo": rpo(1.0), "pipeline": {"mix_with": "synthetic:sort", "mix_limit": 1000}},
    "rft": {"dpo": {"--model.loss_type": "sft"}},  # NLL on each round's best sample only (ReST / RAFT)
    # pass/fail judge (sort_solved): chosen always a right answer, rejected a wrong one
    "rpo_1_solved": {"dpo": rpo(1.0), "generate": {"--output.judge": SOLVED}},
    "rpo_1_solved_all": {"dpo": rpo(1.0), "generate": {"--output.judge": SOLVED, "--output.pairing": "all"}},
    "rpo_2_solved": {"dpo": rpo(2.0), "generate": {"--output.judge": SOLVED}},
    "rpo_1_solved_lr3e-4": {"dpo": {**rpo(1.0), "--model.optimizer.init_args.lr": "3.0e-4"},
                            "generate": {"--output.judge": SOLVED}},
    "rpo_1_solved_best_vs_rest": {"dpo": rpo(1.0), "generate": {"--output.judge": SOLVED,
                                                                "--output.pairing": "best_vs_rest"}},
    "rpo_1_solved_initial": {"dpo": rpo(1.0), "generate": {"--output.judge": SOLVED},
                             "pipeline": {"reference": "initial"}},
    "rpo_w0.2_solved": {"dpo": {**RPO, "--model.loss_weights": "[0.2, 1.0]"}, "generate": {"--output.judge": SOLVED}},
    "rpo_1_solved_beta0.5": {"dpo": {**rpo(1.0), "--model.beta": "0.5"}, "generate": {"--output.judge": SOLVED}},
    "rft_solved_lr3e-4": {"dpo": {"--model.loss_type": "sft", "--model.optimizer.init_args.lr": "3.0e-4"},
                          "generate": {"--output.judge": SOLVED}},
    "rft_solved_lr2e-4": {"dpo": {"--model.loss_type": "sft", "--model.optimizer.init_args.lr": "2.0e-4"},
                          "generate": {"--output.judge": SOLVED}},
    "rpo_1_solved_lr3e-4_beta0.5": {"dpo": {**rpo(1.0), "--model.optimizer.init_args.lr": "3.0e-4",
                                            "--model.beta": "0.5"}, "generate": {"--output.judge": SOLVED}},
    "rft_solved_n4_p2000": {"dpo": {"--model.loss_type": "sft"},
                            "generate": {"--output.judge": SOLVED, "--model.num_samples": "4", "--data.limit": "2000"}},
    "rft_solved_p4000": {"dpo": {"--model.loss_type": "sft"},  # 4x the sampling
                         "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    "rft_solved_n16": {"dpo": {"--model.loss_type": "sft"},  # 2x the sampling
                       "generate": {"--output.judge": SOLVED, "--model.num_samples": "16"}},
    "rft_solved_mix1000": {"dpo": {"--model.loss_type": "sft"}, "generate": {"--output.judge": SOLVED},
                           "pipeline": {"mix_with": "synthetic:sort", "mix_limit": 1000}},
    "rpo_1_solved_mix1000": {"dpo": rpo(1.0), "generate": {"--output.judge": SOLVED},
                             "pipeline": {"mix_with": "synthetic:sort", "mix_limit": 1000}},
    "rpo_w0.2_solved_lr2e-4": {"dpo": {**RPO, "--model.loss_weights": "[0.2, 1.0]",
                                       "--model.optimizer.init_args.lr": "2.0e-4"},
                               "generate": {"--output.judge": SOLVED}},
    "rpo_1_solved_beta0.03": {"dpo": {**rpo(1.0), "--model.beta": "0.03"}, "generate": {"--output.judge": SOLVED}},
    "rft_solved_lr1.5e-4": {"dpo": {"--model.loss_type": "sft", "--model.optimizer.init_args.lr": "1.5e-4"},
                            "generate": {"--output.judge": SOLVED}},
    "rft_solved_p4000_lr1.5e-4": {"dpo": {"--model.loss_type": "sft", "--model.optimizer.init_args.lr": "1.5e-4"},
                                  "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    "rft_solved_p4000_lr1.25e-4": {"dpo": {"--model.loss_type": "sft", "--model.optimizer.init_args.lr": "1.25e-4"},
                                   "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    "rft_solved_p4000_lr2e-4": {"dpo": {"--model.loss_type": "sft", "--model.optimizer.init_args.lr": "2.0e-4"},
                                "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    "rft_solved": {"dpo": {"--model.loss_type": "sft"}, "generate": {"--output.judge": SOLVED}},
    # the DPO term at the default's settings (pass/fail judge, 4000 prompts): RPO with a small DPO weight
    "rpo_w0.2_solved_p4000_lr1.5e-4": {"dpo": {**RPO, "--model.loss_weights": "[0.2, 1.0]",
                                               "--model.optimizer.init_args.lr": "1.5e-4"},
                                       "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    "rpo_w0.1_solved_p4000_lr1.5e-4": {"dpo": {**RPO, "--model.loss_weights": "[0.1, 1.0]",
                                               "--model.optimizer.init_args.lr": "1.5e-4"},
                                       "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    "rpo_w0.2_solved_p4000_lr2e-4": {"dpo": {**RPO, "--model.loss_weights": "[0.2, 1.0]",
                                             "--model.optimizer.init_args.lr": "2.0e-4"},
                                     "generate": {"--output.judge": SOLVED, "--data.limit": "4000"}},
    # baselines that are not rounds: 450 more steps from the SFT export (3 rounds x 150)
    "sft_longer": {"fit": ["--config", "recipes/tiny_sft.yaml", "--trainer.max_steps", "450",
                           "--trainer.val_check_interval", "150"]},
    "offline_dpo": {"fit": ["--config", "recipes/tiny.yaml", "--model.optimizer.init_args.lr", "1.0e-4",
                            "--trainer.max_steps", "450", "--trainer.val_check_interval", "150"]},
    "offline_rpo": {"fit": ["--config", "recipes/tiny.yaml", "--model.optimizer.init_args.lr", "1.0e-4",
                            "--trainer.max_steps", "450", "--trainer.val_check_interval", "150",
                            "--model.loss_type", "[sigmoid, sft]", "--model.loss_weights", "[1.0, 1.0]"]},
}


def _args(base: dict[str, str], change: dict[str, str]) -> list[str]:
    return [x for k, v in {**base, **change}.items() for x in (k, v)]


def pipeline_config(variant: dict[str, Any], sft: str, out: Path, seed: int) -> dict[str, Any]:
    """The iterate config of ``variant`` from the SFT export ``sft``; the pipeline's own report is cut to 8
    prompts (the rounds are scored by align_score)."""
    seed_args = {"--seed_everything": str(seed)} if seed else {}
    config = {
        "output_dir": str(out), "rounds": 3, "reference": "previous", "seed": seed,
        "sft": {"config": sft},
        "generate": {"config": "recipes/tiny_generate.yaml", "args": _args(GENERATE_ARGS, variant.get("generate", {}))},
        "dpo": {"config": "recipes/tiny.yaml", "args": _args(DPO_ARGS, {**variant.get("dpo", {}), **seed_args})},
        "evaluation": {"limit": 8, "num_samples": 2},
    }
    config.update(variant.get("pipeline", {}))
    return config


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` with one torch thread, output to ``log``; (wall seconds, CPU seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_variant(name: str, seed: int, sft: str, workdir: Path) -> list[dict[str, Any]]:
    """Train one variant at one seed; its rows (one per round), unscored."""
    variant = VARIANTS[name]
    out = workdir / name / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if "fit" in variant:
        args = ["fit", *variant["fit"], "--model.model_config", "null", "--model.model", sft,
                "--data.tokenizer", sft, "--seed_everything", str(seed),
                "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "fit",
                "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false"]
        command = [sys.executable, "-m", "dpo_lightning", *args]
        wall, cpu = run(command, out / "log.txt")
        exports = [(3, out / "fit" / "version_0" / "hf_export")]
    else:
        config = out / "pipeline.yaml"
        settings = pipeline_config(variant, sft, out, seed)
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        command = [sys.executable, "-m", "dpo_lightning", "iterate", "--config", str(config)]
        wall, cpu = run(command, out / "log.txt")
        exports = [(r, out / f"round_{r}" / "dpo" / "version_0" / "hf_export")
                   for r in range(1, settings["rounds"] + 1)]
    shown = " ".join(a if " " not in a else repr(a) for a in command[1:])
    return [{"variant": name, "seed": seed, "round": r, "export": str(e), "command": f"python {shown}",
             "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)} for r, e in exports]


def load_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


LIBRARY = ["dpo_lightning", "recipes/tiny_sft.yaml", "recipes/tiny_generate.yaml", "recipes/tiny.yaml"]


def code_version() -> str:
    """The last commit that changed the library or the stage recipes the variants run (``+``: the checkout
    changes them): rows of other versions are kept apart, since a change there (a warmup, a seed) moves
    every trajectory."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *LIBRARY)
    return git("log", "-1", "--format=%h", "--", *LIBRARY) + ("+" if dirty else "")


def sweep(args: argparse.Namespace) -> None:
    import torch
    from align_score import held_out_prompts, load, score

    torch.set_num_threads(1)
    store = args.workdir / "results.jsonl"
    done = {(r["variant"], r["seed"]) for r in load_rows(store)}
    prompts, sft_model = held_out_prompts(), load(args.sft)
    code = code_version()
    if ("sft", 0) not in done:
        row = {"variant": "sft", "seed": 0, "round": 0, "export": args.sft, "command": "-", "wall_s": 0, "cpu_s": 0,
               "code": code}
        with store.open("a") as f:
            f.write(json.dumps({**row, **score(args.sft, args.sft, prompts, sft_model=sft_model)}) + "\n")
    if ("best_of_16", 0) not in done:
        with store.open("a") as f:
            f.write(json.dumps({**best_of_16(args.sft, prompts, sft_model), "code": code}) + "\n")
    for seed in args.seeds:
        for name in args.variants:
            if (name, seed) in done:
                continue
            print(f"[align_sweep] {name} seed {seed} ...", flush=True)
            rows = run_variant(name, seed, args.sft, args.workdir)
            scored = [{**r, **score(r["export"], args.sft, prompts, sft_model=sft_model), "code": code} for r in rows]
            with store.open("a") as f:
                for r in scored:
                    f.write(json.dumps(r) + "\n")
            trail = " -> ".join(f"{r['exact']:.3f}" for r in scored)
            print(f"[align_sweep] {name} seed {seed}: exact {trail}, reward {scored[-1]['reward']:.3f}, "
                  f"KL {scored[-1]['kl']:.2f}, {rows[0]['wall_s']:.0f} s wall, {rows[0]['cpu_s']:.0f} s CPU",
                  flush=True)


def best_of_16(sft: str, prompts: list[str], sft_model) -> dict[str, Any]:
    """Best-of-16 from the SFT model, as frontier.py measures it: the reward of the best of the same 16
    samples per prompt that score the SFT row; its KL to SFT by the analytic bound log 16 - 15/16 and
    estimated from the SFT model's reward distribution (128 more samples per prompt, `best_of_n_kl`)."""
    from align_score import SAMPLES, SEED
    from frontier import best_of_n
    from transformers import AutoTokenizer

    row = best_of_n(sft_model, AutoTokenizer.from_pretrained(sft), prompts, [SAMPLES], SEED, kl_samples=128)[0]
    return {"variant": "best_of_16", "seed": 0, "round": 0, "export": sft, "command": "-", "wall_s": 0, "cpu_s": 0,
            "reward": row["reward"], "reward_se": row["reward_se"], "kl": row["kl"], "kl_se": 0.0,
            "kl_est": row["kl_est"], "kl_est_se": row["kl_est_se"]}


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, se = _mean_se(values)
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def versions(rows: list[dict[str, Any]]) -> list[str]:
    """The code versions in ``rows``, newest (last run) first."""
    seen: list[str] = []
    for r in rows:
        if r.get("code", "?") not in seen:
            seen.append(r.get("code", "?"))
    return seen[::-1]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant (of one code version): the per-round exact rates and the final round's measures, over
    its seeds."""
    runs: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        runs[r["variant"]][r["seed"]][r["round"]] = r
    sft = runs.pop("sft")[0][0]
    runs.pop("best_of_16", None)
    out = []
    for name, seeds in runs.items():
        finals = [by_round[max(by_round)] for by_round in seeds.values()]
        rounds = sorted({k for by_round in seeds.values() for k in by_round})
        trail = [sft["exact"]] + [_mean_se([s[k]["exact"] for s in seeds.values() if k in s])[0] for k in rounds]
        rising = None  # a baseline that is not rounds has no trajectory
        if "fit" not in VARIANTS.get(name, {}):
            rising = all(all(a < b for a, b in zip([sft["exact"], *(s[k]["exact"] for k in rounds)],
                                                   [s[k]["exact"] for k in rounds])) for s in seeds.values())
        out.append({
            "variant": name, "seeds": sorted(seeds), "trail": trail, "rising": rising,
            "exact": [f["exact"] for f in finals], "exact_se_run": finals[0]["exact_se"],
            "greedy_reward": [f["greedy_reward"] for f in finals], "reward": [f["reward"] for f in finals],
            "kl": [f["kl"] for f in finals], "wall_s": [f["wall_s"] for f in finals],
            "cpu_s": [f["cpu_s"] for f in finals], "command": finals[0]["command"],
        })
    return sorted(out, key=lambda r: (r["variant"] != DEFAULT, -_mean_se(r["exact"])[0]))


DEFAULT = "rft_solved_p4000_lr1.5e-4"  # what recipes/pipeline_tiny.yaml runs


def describe(name: str) -> str:
    """What a variant changes in the original DPO rounds, in short: ``loss [sigmoid, sft] x [1.0, 0.5]; lr 3e-4``."""
    variant = VARIANTS[name]
    if "fit" in variant:
        args = variant["fit"]
        recipe = args[args.index("--config") + 1]
        extra = {a: b for a, b in zip(args[2::2], args[3::2])}
        steps = extra.get("--trainer.max_steps")
        loss = extra.get("--model.loss_type", "")
        return f"`fit` {Path(recipe).name} from SFT, {steps} steps" + (f", loss {loss}" if loss else "")
    short = {"--model.loss_type": "loss", "--model.loss_weights": "x", "--model.optimizer.init_args.lr": "lr",
             "--model.beta": "beta", "--output.pairing": "pairing", "--output.min_margin": "min_margin",
             "--output.judge": "judge", "--model.temperature": "T", "--model.num_samples": "samples",
             "--data.limit": "prompts"}
    parts = [f"{short.get(k, k)} {v.split(':')[-1]}" for k, v in {**variant.get("dpo", {}),
                                                                   **variant.get("generate", {})}.items()]
    parts += [f"{k} {v}" for k, v in variant.get("pipeline", {}).items()]
    return "; ".join(parts) or "none (plain DPO)"


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown table per code version (newest first): every variant against the default's final greedy
    exact rate, each with the command that runs it."""
    out = []
    for code in versions(rows):
        mine = [r for r in rows if r.get("code", "?") == code]
        if not any(r["variant"] == "sft" for r in mine):
            continue
        sft = next(r for r in mine if r["variant"] == "sft")
        summary = summarise(mine)
        default = next((s for s in summary if s["variant"] == DEFAULT), None)
        out += [f"Measured at `{code}`. SFT start: greedy exact {sft['exact']:.3f} ± {sft['exact_se']:.3f}, greedy "
                f"reward {sft['greedy_reward']:.3f}, sampled reward {sft['reward']:.3f} ± {sft['reward_se']:.3f}.",
                ""]
        bon = next((r for r in mine if r["variant"] == "best_of_16"), None)
        if bon is not None:
            out += [f"Best-of-16 from it: sampled reward {bon['reward']:.3f} ± {bon['reward_se']:.3f} at KL to SFT "
                    f"<= {bon['kl']:.3f} (bound), {bon['kl_est']:.3f} ± {bon['kl_est_se']:.3f} (estimated).", ""]
        out += ["| variant | change to the original DPO rounds | seeds | greedy exact by round (0 = SFT), mean "
                "| rises every round, every seed | final greedy exact | vs default | final sampled reward "
                "| KL to SFT (nats) | wall s / CPU s per run | command |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in summary:
            trail = " → ".join(f"{x:.3f}" for x in s["trail"])
            rises = "-" if s["rising"] is None else "yes" if s["rising"] else "no"
            delta = "-" if default is None or s is default else \
                f"{_mean_se(s['exact'])[0] - _mean_se(default['exact'])[0]:+.3f}"
            name = f"**{s['variant']}** (default)" if s is default else s["variant"]
            command = (f"`python benchmarks/align_sweep.py --sft <sft> --variants {s['variant']} "
                       f"--seeds {' '.join(map(str, s['seeds']))}`")
            out.append(f"| {name} | {describe(s['variant'])} | {','.join(map(str, s['seeds']))} | {trail} "
                       f"| {rises} | {_fmt(s['exact'])} | {delta} "
                       f"| {_fmt(s['reward'])} | {_fmt(s['kl'], 2)} | {_mean_se(s['wall_s'])[0]:.0f} / "
                       f"{_mean_se(s['cpu_s'])[0]:.0f} | {command} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path, highlight: list[str]) -> None:
    """Greedy exact rate by round (mean over seeds, error bars: standard error over seeds) for the ``highlight``
    variants and the baselines, one panel per code version (newest first); a baseline that is not rounds is a
    tick at round 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codes = [c for c in versions(rows) if any(r["variant"] == "sft" and r.get("code", "?") == c for r in rows)]
    fig, axes = plt.subplots(1, len(codes), figsize=(6.5 * len(codes), 6.5), squeeze=False, sharey=True)
    names = list(dict.fromkeys([*highlight, *(n for n, v in VARIANTS.items() if "fit" in v)]))
    colors = {name: plt.cm.tab10.colors[i % 10] for i, name in enumerate(names)}  # one colour per variant
    for ax, code in zip(axes[0], codes):
        mine = [r for r in rows if r.get("code", "?") == code]
        shown = [s for s in summarise(mine) if s["variant"] in highlight or s["rising"] is None]
        for s in shown:
            label = f"{s['variant']} ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''})"
            color = colors[s["variant"]]
            if s["rising"] is None:
                mean, se = _mean_se(s["exact"])
                ax.errorbar([3], [mean], yerr=0 if math.isnan(se) else se, marker="_", ms=18, mew=2, color=color,
                            ls="none", label=f"{label}: {describe(s['variant'])}")
                continue
            runs: dict[int, dict[int, float]] = defaultdict(dict)
            for r in mine:
                if r["variant"] == s["variant"]:
                    runs[r["seed"]][r["round"]] = r["exact"]
            se = [0.0] + [_mean_se([runs[seed][k] for seed in runs])[1] for k in range(1, len(s["trail"]))]
            ax.errorbar(range(len(s["trail"])), s["trail"], yerr=[0 if math.isnan(e) else e for e in se],
                        marker="o", lw=2.4 if s["variant"] == DEFAULT else 1.2, color=color, capsize=2,
                        label=f"{label} (default)" if s["variant"] == DEFAULT else label)
        ax.axhline(0.9, color="gray", ls=":", lw=1)
        ax.set_xticks(range(4))
        ax.set_xlabel("round (0 = SFT)")
        ax.set_title(f"measured at {code}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(0.3, 1.0)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes[0][0].set_ylabel("greedy exact sort, 200 held-out prompts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", help="the SFT export every variant starts from")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "align_sweep")
    parser.add_argument("--results", type=Path,
                        help="the rows --table and --plot read (default: <workdir>/results.jsonl)")
    parser.add_argument("--table", action="store_true", help="print the table of results.jsonl and stop")
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    parser.add_argument("--plot", type=Path, help="draw the figure of results.jsonl to this file and stop")
    parser.add_argument("--highlight", nargs="*", default=[], help="variants drawn bold in the figure")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.list:
        for name, variant in VARIANTS.items():
            print(name, json.dumps(variant))
    elif args.plot:
        plot(load_rows(args.results or args.workdir / "results.jsonl"), args.plot, args.highlight)
    elif args.table:
        print(table(load_rows(args.results or args.workdir / "results.jsonl")))
    else:
        if not args.sft:
            parser.error("--sft is required to run variants")
        sweep(args)


if __name__ == "__main__":
    main()
