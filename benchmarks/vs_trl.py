"""dpo_lightning vs TRL's DPOTrainer on identical inputs: throughput, peak memory, MFU. Not part of pytest.

    python benchmarks/vs_trl.py                      # HH harmless-base, Llama 4x256, 4k BPE, T=512, 8 pairs;
                                                     # ours at its defaults (prefix sharing) and with packing alone
    python benchmarks/vs_trl.py --scenario memory    # 128k vocab, T=2048, 2 pairs: ours lean / ours plain / TRL
    python benchmarks/vs_trl.py --scenario sweep     # ours: time per pair vs length (256..2048) and vocab (4k..128k)
    python benchmarks/vs_trl.py --scenario padsweep  # ours, pad vs pack: time follows real tokens, not padding
    python benchmarks/vs_trl.py --scenario sharesweep  # ours, pack vs share vs auto over prompt/response shapes

Each side runs in its own child process (``bench_sides.py``), sides alternating, on the same saved
random-init weights, the same strings, batch size, max_length, loss, optimizer (AdamW, constant LR,
no weight decay, no clipping) and order (no shuffling), dropout off. Before reporting any speed it
checks that both sides compute the same step-0 loss and per-sequence log-probs on the first batch.

MFU = model FLOPs / s over the machine's fp32 GEMM rate, timed in this run. Model FLOPs count the
real (non-padding) tokens only: per sequence of n tokens, 4 x (2 P n + 2 L d n^2) (policy forward +
backward = 3 forwards, reference = 1 forward; P = matmul parameters incl. the LM head, L layers,
d hidden size; causal attention scores and values), whatever the implementation actually executes:
prefix sharing forwards each prompt once, so its MFU is an effective figure (the run prints the share
of token positions it forwards).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_data
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "../shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
TOLERANCE = 1e-4  # relative, on the step-0 loss and every sequence log-prob


def gemm_peak_flops(threads: int, n: int = 2048, reps: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """Measured ``dtype`` (default fp32) matmul rate (FLOP/s) on this machine with ``threads`` threads (or the GPU)."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def train_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of one DPO step over sequences of the given lengths (see the module docstring)."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d * (config.num_key_value_heads or config.num_attention_heads) // config.num_attention_heads  # GQA: k, v
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size  # q, o + k, v + gated MLP
    matmul_params = layers * per_layer + vocab * d  # + LM head
    return sum(4 * (2 * matmul_params * n + 2 * layers * d * n * n) for n in lengths)


def run_side(folder: Path, spec: dict, name: str) -> dict:
    spec_path, out_path = folder / f"{name}.spec.json", folder / f"{name}.out.json"
    spec_path.write_text(json.dumps({**spec, "folder": str(folder)}))
    cmd = [sys.executable, str(Path(__file__).with_name("bench_sides.py")), str(spec_path), str(out_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"side {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def summarize(result: dict, spec: dict, flops_per_step: list[float], tokens: list[int], peak: float) -> dict:
    """Throughput over the timed steps (the last ``steps`` step-end intervals)."""
    ends, steps = result["step_ends"], spec["steps"]
    elapsed = ends[-1] - ends[-1 - steps]
    timed = range(len(ends) - steps, len(ends))  # indices of the timed steps
    return {
        "pairs_per_s": spec["batch_size"] * steps / elapsed,
        "tokens_per_s": sum(tokens[i] for i in timed) / elapsed,
        "s_per_step": elapsed / steps,
        "peak_rss_mib": result["peak_rss_mib"],
        "train_rss_growth_mib": result["peak_rss_mib"] - result["rss_before_mib"],
        "device_peak_mib": result["device_peak_mib"],
        "step0_loss": result["step0"]["loss"],
        "mfu": sum(flops_per_step[i] for i in timed) / elapsed / peak,
    }


def same_step0(a: dict, b: dict) -> float:
    """Largest relative difference between two sides' step-0 loss and sequence log-probs."""
    pairs = [(a["loss"], b["loss"]), *zip(a["logps"], b["logps"], strict=True)]
    return max(abs(x - y) / max(1.0, abs(y)) for x, y in pairs)


def prepare(folder: Path, args) -> tuple[list[dict], object]:
    """Write model + pairs for the chosen scenario; returns the kept rows and the model config."""
    if args.scenario == "hh":
        rows = bench_data.load_hh(args.data)
        tokenizer = bench_data.train_bpe([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], args.vocab)
        rows = bench_data.keep_pairs(rows, tokenizer, args.max_length)
    else:
        tokenizer = bench_data.word_tokenizer(args.vocab)
        rows = bench_data.synthetic_pairs(args.batch_size * (args.warmup + args.steps), args.max_length, args.vocab)
    config = bench_data.llama_config(len(tokenizer), args.max_length, args.layers, args.hidden)
    bench_data.write_inputs(folder, rows, tokenizer, config, seed=args.seed)
    return rows, config


def compare(args) -> None:
    folder = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    rows, config = prepare(folder, args)
    base = {
        "batch_size": args.batch_size, "max_length": args.max_length, "loss": args.loss, "beta": args.beta,
        "lr": args.lr, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
        "pack_budget": args.pack_budget, "checkpointing": args.checkpointing == "on",
    }
    sides = {"ours": {**base, "side": "ours", "collator": args.collator, "lean": args.lean}}
    for collator in args.also or ():  # our other batch layouts, in the same run
        if collator != args.collator:
            sides[f"ours_{collator}"] = {**base, "side": "ours", "collator": collator, "lean": args.lean}
    if args.scenario == "memory":
        sides["ours_plain"] = {**base, "side": "ours", "collator": "pad", "lean": False}
    sides["trl"] = {**base, "side": "trl"}
    print(f"pairs kept: {len(rows)}; timed pairs: {args.batch_size * args.steps}; folder {folder}", flush=True)

    peak = gemm_peak_flops(args.threads)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):  # alternate the order
            results[name].append(run_side(folder, sides[name], f"{name}{r}"))
            print(f"  ran {name} (repeat {r}): {results[name][-1]['wall_s']:.0f} s", flush=True)

    ours = results["ours"][0]
    worst = max(same_step0(res["step0"], ours["step0"]) for runs in results.values() for res in runs)
    print(f"step-0 check: max relative difference of loss and {len(ours['step0']['logps'])} "
          f"sequence log-probs across sides = {worst:.2e} (tolerance {TOLERANCE:g})")
    if worst > TOLERANCE:
        sys.exit("step-0 loss / log-probs differ between sides: refusing to report speed")

    tokens = ours["batch_tokens"]
    lengths = _batch_lengths(folder, rows, args)
    flops = [train_flops(config, ls) for ls in lengths]
    table = {}
    for name, runs in results.items():
        summaries = [summarize(res, sides[name], flops, tokens, peak) for res in runs]
        best = max(summaries, key=lambda s: s["pairs_per_s"])  # best of the repeats, both sides alike
        best["peak_rss_mib"] = min(s["peak_rss_mib"] for s in summaries)
        table[name] = best
    _print_table(table, peak, args)
    if {"share", "auto"} & {args.collator, *(args.also or ())}:
        print(f"prefix sharing forwards {_shared_fraction(folder, rows, args):.3f} of the token positions packing "
              "forwards; MFU counts every sequence whole, so it is an effective figure where ours shares")


def _tokenized(folder: Path, rows: list[dict], args) -> list:
    """(chosen, rejected) `TokenizedSide`s of the pairs the run trains on, as our tokenization (= TRL's) makes them."""
    from transformers import AutoTokenizer

    from dpo_lightning.data import PreferenceExample, TokenizeConfig, render, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    used = rows[: args.batch_size * (args.warmup + args.steps)]
    rendered = [render(PreferenceExample(r["prompt"], r["chosen"], r["rejected"]), tokenizer, None) for r in used]
    return tokenize_pairs(rendered, tokenizer, TokenizeConfig(max_length=args.max_length, max_prompt_length=None))


def _batch_lengths(folder: Path, rows: list[dict], args) -> list[list[int]]:
    """Token lengths of every sequence of every batch."""
    lengths = [len(s.input_ids) for pair in _tokenized(folder, rows, args) for s in pair]
    per_batch = 2 * args.batch_size
    return [lengths[i : i + per_batch] for i in range(0, len(lengths), per_batch)]


def _shared_fraction(folder: Path, rows: list[dict], args) -> float:
    """Token positions prefix sharing forwards over those of packing (every sequence whole), on the run's pairs."""
    from dpo_lightning.data.prefix_sharing import shared_length

    pairs = _tokenized(folder, rows, args)
    whole = sum(len(c.input_ids) + len(r.input_ids) for c, r in pairs)
    shared = sum(shared_length(c.input_ids, c.response_start, r.input_ids, r.response_start) for c, r in pairs)
    return (whole - shared) / whole


def _print_table(table: dict[str, dict], peak: float, args) -> None:
    print(f"\nGEMM peak (fp32, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    cols = ["pairs_per_s", "tokens_per_s", "s_per_step", "peak_rss_mib", "train_rss_growth_mib", "step0_loss", "mfu"]
    if torch.cuda.is_available():
        cols.insert(4, "device_peak_mib")
    print("side        " + "".join(f"{c:>22}" for c in cols))
    for name, row in table.items():
        print(f"{name:<12}" + "".join(f"{row[c]:>22.4g}" for c in cols))
    trl = table["trl"]
    for name, row in table.items():
        if name == "trl":
            continue
        print(f"{name}/trl: pairs/s x{row['pairs_per_s'] / trl['pairs_per_s']:.2f}, "
              f"peak RSS x{row['peak_rss_mib'] / trl['peak_rss_mib']:.2f}, "
              f"train RSS growth x{row['train_rss_growth_mib'] / max(trl['train_rss_growth_mib'], 1e-9):.2f}")
    for name in table:
        if name.startswith("ours_") and name != "ours_plain":
            other, ours = table[name], table["ours"]
            print(f"ours({args.collator})/{name}: pairs/s x{ours['pairs_per_s'] / other['pairs_per_s']:.2f}, "
                  f"peak RSS x{ours['peak_rss_mib'] / other['peak_rss_mib']:.2f}")
    if "ours_plain" in table:
        plain, ours = table["ours_plain"], table["ours"]
        print(f"ours(lean)/ours(plain full logits): peak RSS x{ours['peak_rss_mib'] / plain['peak_rss_mib']:.2f}, "
              f"train RSS growth x{ours['train_rss_growth_mib'] / plain['train_rss_growth_mib']:.2f}")


def sweep(args) -> None:
    """Ours only: seconds per pair against sequence length (vocab 4k) and vocabulary (length 512)."""
    points = [(n, 4096) for n in (256, 512, 1024, 2048)] + [(512, v) for v in (32768, 131072)]
    print("max_length  vocab  s/pair  real tokens/pair  s per 1k tokens", flush=True)
    for length, vocab in points:
        folder = Path(tempfile.mkdtemp(prefix="dpo_sweep_"))
        point = argparse.Namespace(**{**vars(args), "max_length": length, "vocab": vocab, "scenario": "synthetic"})
        prepare(folder, point)
        spec = {
            "batch_size": args.batch_size, "max_length": length, "loss": args.loss, "beta": args.beta,
            "lr": args.lr, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "side": "ours", "collator": args.collator, "lean": args.lean, "pack_budget": args.pack_budget,
        }
        res = run_side(folder, spec, "sweep")
        elapsed = res["step_ends"][-1] - res["step_ends"][-1 - args.steps]
        per_pair = elapsed / (args.steps * args.batch_size)
        tokens = res["batch_tokens"][-1] / args.batch_size
        print(f"{length:>10} {vocab:>6} {per_pair:>7.3f} {tokens:>17.0f} {1000 * per_pair / tokens:>16.3f}", flush=True)


def padsweep(args) -> None:
    """Ours only, padded vs packed: one long sequence per batch, the rest short (see bench_data.mixed_pairs).

    Right padding pays for ``2 B x longest`` token slots; packing for the real tokens. Time per step
    should follow the padded slots with ``pad`` and the real tokens with ``pack``.
    """
    print("longest  collator  s/step  real tokens/step  padded slots/step  ms per 1k real tokens", flush=True)
    for length in (256, 512, 1024, 2048):
        folder = Path(tempfile.mkdtemp(prefix="dpo_padsweep_"))
        tokenizer = bench_data.word_tokenizer(args.vocab)
        rows = bench_data.mixed_pairs(args.batch_size * (args.warmup + args.steps), args.batch_size, length, args.vocab)
        config = bench_data.llama_config(len(tokenizer), length, args.layers, args.hidden)
        bench_data.write_inputs(folder, rows, tokenizer, config, seed=args.seed)
        for collator in ("pad", "pack"):
            spec = {
                "batch_size": args.batch_size, "max_length": length, "loss": args.loss, "beta": args.beta,
                "lr": args.lr, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                "side": "ours", "collator": collator, "lean": args.lean, "pack_budget": args.pack_budget,
                "checkpointing": args.checkpointing == "on",
            }
            res = run_side(folder, spec, f"padsweep_{collator}")
            per_step = (res["step_ends"][-1] - res["step_ends"][-1 - args.steps]) / args.steps
            real = res["batch_tokens"][-1]
            slots = 2 * args.batch_size * length
            print(f"{length:>7} {collator:>9} {per_step:>7.3f} {real:>17} {slots:>18} {1e6 * per_step / real:>22.2f}",
                  flush=True)


def sharesweep(args) -> None:
    """Ours only: packing alone, prefix sharing always, and ``auto`` (share a batch only where the cost model
    says it is cheaper), over prompt/response shapes; measured time ratios next to the cost model's."""
    points = [(256, 256), (128, 384), (64, 448), (32, 480)]  # (longest prompt, longest response)
    print(f"hidden {args.hidden}; prompt  response  pack s/step  share/pack time (model)  auto/pack time  "
          "batches shared by auto", flush=True)
    for prompt, response in points:
        folder = Path(tempfile.mkdtemp(prefix="dpo_sharesweep_"))
        tokenizer = bench_data.word_tokenizer(args.vocab)
        n = args.batch_size * (args.warmup + args.steps)
        rows = bench_data.shaped_pairs(n, prompt, response, args.vocab, seed=args.seed)
        length = prompt + response + 1
        config = bench_data.llama_config(len(tokenizer), length, args.layers, args.hidden)
        bench_data.write_inputs(folder, rows, tokenizer, config, seed=args.seed)
        per_step, costs = {}, None
        for r in range(args.repeats):
            for collator in ("pack", "share", "auto") if r % 2 == 0 else ("auto", "share", "pack"):
                spec = {
                    "batch_size": args.batch_size, "max_length": length, "loss": args.loss, "beta": args.beta,
                    "lr": args.lr, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                    "side": "ours", "collator": collator, "lean": args.lean,
                    "checkpointing": args.checkpointing == "on",
                }
                res = run_side(folder, spec, f"sharesweep_{collator}")
                elapsed = (res["step_ends"][-1] - res["step_ends"][-1 - args.steps]) / args.steps
                per_step[collator] = min(per_step.get(collator, elapsed), elapsed)
                costs = res["layout_costs"][-args.steps:]  # the timed batches: (shared, packed) each
        model = sum(c[0] for c in costs) / sum(c[1] for c in costs)
        shared = sum(c[0] < c[1] for c in costs)
        print(f"{prompt:>14} {response:>9} {per_step['pack']:>12.3f} {per_step['share'] / per_step['pack']:>13.2f} "
              f"({model:.2f}) {per_step['auto'] / per_step['pack']:>15.2f} {shared:>14}/{len(costs)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["hh", "memory", "sweep", "padsweep", "sharesweep"], default="hh")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="HH-style .jsonl.gz (chosen/rejected conversations)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (hh 8, memory 2, sweep 2)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (hh 512, memory 2048)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (hh 4096, memory 131072)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, order alternating; best is reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--collator", choices=["pad", "pack", "share", "auto"], default=None,
                   help="ours: hh auto (the library's default: share where it saves compute), others pad")
    p.add_argument("--also", nargs="*", choices=["pad", "pack", "share", "auto"], default=None,
                   help="ours with these collators too, in the same run (hh: pack)")
    p.add_argument("--pack-budget", type=int, default=None, help="tokens per packed row (default: longest sequence)")
    p.add_argument("--no-lean", dest="lean", action="store_false", help="ours: full-logits log-probs")
    p.add_argument(
        "--checkpointing", choices=["on", "off"], default="on",
        help="activation checkpointing on both sides (on: TRL 1.x's default gradient_checkpointing=True)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    defaults = {
        "hh": (8, 512, 4096, "auto", ["pack"]), "memory": (2, 2048, 131072, "pad", []),
        "sweep": (2, None, None, "pad", []), "padsweep": (4, None, 4096, None, []),
        "sharesweep": (8, None, 4096, None, []),
    }
    for field, value in zip(("batch_size", "max_length", "vocab", "collator", "also"), defaults[args.scenario]):
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's start is not timed)")
    print(f"{platform.processor() or platform.machine()}; torch {torch.__version__}; args {vars(args)}", flush=True)
    {"sweep": sweep, "padsweep": padsweep, "sharesweep": sharesweep}.get(args.scenario, compare)(args)


if __name__ == "__main__":
    main()
