"""The GPU check of issue #30, one script, under 8 minutes on one H100 (docs/benchmarks.md, "GPU check").

    python benchmarks/gpu_check.py [--out DIR]     # on a GPU: a ~1.1B Llama (random init), bf16-mixed
    python benchmarks/gpu_check.py --dry-run       # the same code path on the CPU, tiny model, < 1 min

Prints and writes to ``DIR/gpu_check.json`` (``--out``, default ``$OUT``, else a new temporary folder):

1. DPO training, the same work on both sides (vs_trl.py's harness: bench_sides.py runs each side in its own
   process on the same saved weights and pairs; the step-0 loss and log-probs are compared first):
   tokens/s (real tokens, padding not counted), model FLOPs utilisation and peak GPU memory of dpo_lightning
   at its defaults (``data.collator: auto``, lean log-probs, no activation checkpointing) next to TRL's
   DPOTrainer at its defaults (right padding, gradient checkpointing on), both in bf16 autocast (ours
   ``bf16-mixed``, TRL ``bf16=True``) over fp32 weights, AdamW, constant LR, no clipping. TRL absent: said
   and skipped.
   Model FLOPs (vs_trl.train_flops): per sequence of n real tokens, 4 x (2 P n + 2 L d n^2), i.e. 6 P n for
   the policy's forward and backward plus 2 P n for the reference's forward (P: matmul parameters with the
   LM head; the causal attention term likewise); prefix sharing forwards each prompt once but is counted
   whole, so ours is an effective figure. MFU: those FLOPs/s over (a) the bf16 matmul rate measured in
   this run (8192^3 on a GPU) and (b) the device's nominal dense bf16 peak where known (H100/H200: 989
   TFLOP/s); the issue's goal is >= 45% of (b).
2. Generation tokens/s: Hugging Face ``generate`` through the ``generate`` command's path (`GenerationModule`
   under ``trainer.predict``, ``bf16-true``, batches of prompts, N samples each, KV cache), and the same path
   with ``backend="vllm"`` (bf16 weights, the engine started before the clock) if vLLM is installed; tokens up
   to and including EOS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import bench_data
import torch
import vs_trl
from generation_speed import batched

NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM; TFLOP/s x 1e12

# ~1.1B: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192), 32k vocabulary, untied.
FULL = dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=32768, max_length=1024,
            batch_size=8, warmup=2, steps=6, precision="bf16-mixed", gen_prompts=64, gen_samples=4,
            gen_max_new_tokens=128, gen_batch_size=64, gemm_n=8192)
DRY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, max_length=64, batch_size=2,
           warmup=1, steps=2, precision="32-true", gen_prompts=4, gen_samples=2, gen_max_new_tokens=8,
           gen_batch_size=4, gemm_n=512)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def nominal_peak(name: str) -> float | None:
    return next((flops for key, flops in NOMINAL_BF16.items() if key in name), None)


def write_pairs(folder: Path, s: dict, seed: int = 0):
    """Random-init Llama + word tokenizer (one id per word) + synthetic pairs of exactly max_length tokens."""
    tokenizer = bench_data.word_tokenizer(s["vocab"])
    rows = bench_data.synthetic_pairs(s["batch_size"] * (s["warmup"] + s["steps"]), s["max_length"], s["vocab"], seed)
    config = bench_data.llama_config(len(tokenizer), s["max_length"], s["layers"], s["hidden"], s["heads"],
                                     s["kv_heads"], s["intermediate"])
    bench_data.write_inputs(folder, rows, tokenizer, config, seed=seed)
    return rows, config


def train(folder: Path, rows: list[dict], config, s: dict, peaks: dict[str, float | None]) -> dict:
    """Both sides of the DPO comparison (vs_trl's run_side / summarize / same_step0)."""
    base = {"batch_size": s["batch_size"], "max_length": s["max_length"], "loss": "sigmoid", "beta": 0.1,
            "lr": 1e-6, "warmup": s["warmup"], "steps": s["steps"], "threads": torch.get_num_threads(),
            "precision": s["precision"], "pack_budget": None}
    sides = {"ours": {**base, "side": "ours", "collator": "auto", "lean": None, "checkpointing": False},
             "trl": {**base, "side": "trl", "checkpointing": True}}
    try:
        import trl  # noqa: F401
    except ImportError as err:
        print(f"TRL: not importable ({err}); its side is skipped (docs/benchmarks.md: carry its wheel)", flush=True)
        sides.pop("trl")
    args = argparse.Namespace(batch_size=s["batch_size"], warmup=s["warmup"], steps=s["steps"],
                              max_length=s["max_length"])
    flops = [vs_trl.train_flops(config, lengths) for lengths in vs_trl._batch_lengths(folder, rows, args)]
    results, out = {}, {}
    for name, spec in sides.items():
        try:
            results[name] = vs_trl.run_side(folder, spec, name)
        except SystemExit as err:  # the side's process failed: say so, keep the rest of the check
            out[name] = {"failed": str(err)[-3000:]}
            print(f"  {name} FAILED:\n{str(err)[-3000:]}", flush=True)
            continue
        print(f"  ran {name}: {results[name]['wall_s']:.0f} s", flush=True)
    if "ours" not in results:
        return out
    tokens = results["ours"]["batch_tokens"]
    for name, res in results.items():
        row = vs_trl.summarize(res, sides[name], flops, tokens, peaks["measured"])
        row["mfu_measured_peak"] = row.pop("mfu")
        row["mfu_nominal_peak"] = row["mfu_measured_peak"] * peaks["measured"] / peaks["nominal"] \
            if peaks["nominal"] else None
        row["checkpointing"] = sides[name]["checkpointing"]
        out[name] = row
    if "trl" in results:
        worst = vs_trl.same_step0(results["trl"]["step0"], results["ours"]["step0"])
        out["step0_max_relative_difference"] = worst
    elif "trl" not in out:
        out["trl"] = {"skipped": "trl is not importable"}
    return out


def vllm_generation(model: str, rows: list[dict], s: dict) -> dict:
    """The same prompts through the ``generate`` command's path with ``model.backend: vllm`` (bf16, one GPU)."""
    from dpo_lightning.generation.vllm_backend import INSTALL, VLLMOptions, vllm_installed

    if not vllm_installed():
        return {"skipped": f"vllm is not installed ({INSTALL})"}
    options = VLLMOptions(gpu_memory_utilization=0.5, max_model_len=s["max_length"] + s["gen_max_new_tokens"])
    tokens, seconds = batched(model, s["gen_prompts"], s["gen_samples"], s["gen_max_new_tokens"], s["gen_batch_size"],
                              dataset=rows, accelerator="gpu", backend="vllm", dtype="bfloat16", vllm=options)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "dtype": "bfloat16"}


def generation(folder: Path, s: dict) -> dict:
    model = str(folder / "model")
    rng = random.Random(1)
    length = s["max_length"] // 4
    rows = [{"prompt": " ".join(f"t{rng.randrange(1, s['vocab'])}" for _ in range(length))}
            for _ in range(s["gen_prompts"])]
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = "bf16-true" if accelerator == "gpu" else "32-true"  # llama7b_generate.yaml's on a GPU
    run = lambda: batched(model, s["gen_prompts"], s["gen_samples"], s["gen_max_new_tokens"],  # noqa: E731
                          s["gen_batch_size"], dataset=rows, accelerator=accelerator, precision=precision)
    run()  # warm-up: kernels, allocator
    tokens, seconds = run()
    out = {"hf_generate": {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                           "precision": precision, "prompts": s["gen_prompts"], "samples": s["gen_samples"],
                           "max_new_tokens": s["gen_max_new_tokens"], "prompt_tokens": length}}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        try:
            out["vllm"] = vllm_generation(model, rows, s)
        except Exception as err:  # vLLM's own failure: recorded, the rest of the check stands
            out["vllm"] = {"skipped": f"failed: {err!r}"[:2000]}
    else:
        out["vllm"] = {"skipped": "no CUDA device"}
    return out


def report(result: dict) -> None:
    t, g = result["training"], result["generation"]
    print(f"\n{result['device']}; torch {result['versions']['torch']}; model {result['model']['params'] / 1e6:.1f}M "
          f"params; {result['peaks']['dtype']} matmul peak measured {result['peaks']['measured'] / 1e12:.2f} TFLOP/s")
    print(f"DPO training, {result['settings']['batch_size']} pairs x {result['settings']['max_length']} tokens, "
          f"{result['settings']['precision']}:")
    for name in ("ours", "trl"):
        row = t[name]
        if "skipped" in row or "failed" in row:
            print(f"  {name:<5} " + (f"skipped: {row['skipped']}" if "skipped" in row else "FAILED (see above)"))
            continue
        nominal = f"{row['mfu_nominal_peak']:.1%}" if row["mfu_nominal_peak"] is not None else "n/a"
        peak = f"{row['device_peak_mib']:.0f} MiB" if row["device_peak_mib"] is not None else "n/a (CPU)"
        print(f"  {name:<5} tokens/s {row['tokens_per_s']:.0f}  MFU {row['mfu_measured_peak']:.1%} of measured, "
              f"{nominal} of nominal  peak memory {peak}  peak RSS {row['peak_rss_mib']:.0f} MiB  "
              f"checkpointing {'on' if row['checkpointing'] else 'off'}")
    if "step0_max_relative_difference" in t:
        print(f"  step-0 loss / log-probs, largest relative difference ours vs TRL: "
              f"{t['step0_max_relative_difference']:.2e}")
    hf = g["hf_generate"]
    print(f"generation tokens/s: HF generate (GenerationModule, {hf['precision']}) {hf['tokens_per_s']:.0f} "
          f"({hf['tokens']} tokens in {hf['seconds']:.1f} s)")
    v = g["vllm"]
    print("generation tokens/s: vLLM " + (f"skipped: {v['skipped']}" if "skipped" in v else
                                           f"(GenerationModule backend vllm, bf16) {v['tokens_per_s']:.0f} "
                                           f"({v['tokens']} tokens in {v['seconds']:.1f} s)"))
    print(f"total {result['wall_s']:.0f} s; written to {result['path']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same code path on the CPU with a tiny model")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    p.add_argument("--steps", type=int, help="timed training steps (default 6; dry run 2)")
    p.add_argument("--precision", help="training precision of both sides (default bf16-mixed; dry run 32-true)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    s = dict(DRY if args.dry_run else FULL)
    if args.steps:
        s["steps"] = args.steps
    if args.precision:
        s["precision"] = args.precision
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --dry-run on a CPU")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    name = device_name()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    peaks = {"measured": vs_trl.gemm_peak_flops(torch.get_num_threads(), n=s["gemm_n"], dtype=dtype),
             "nominal": nominal_peak(name) if torch.cuda.is_available() else None, "dtype": str(dtype)}
    print(f"{name}: {dtype} matmul {peaks['measured'] / 1e12:.2f} TFLOP/s measured", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    rows, config = write_pairs(folder, s)
    result = {"device": name, "dry_run": args.dry_run, "settings": s, "peaks": peaks,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "model": {"params": param_count(config), "config": config.to_dict()}}
    try:
        import trl

        result["versions"]["trl"] = trl.__version__
    except ImportError:
        result["versions"]["trl"] = None
    result["path"] = str(out_dir / "gpu_check.json")
    save = lambda: Path(result["path"]).write_text(json.dumps(result, indent=2, default=str))  # noqa: E731
    print(f"model: {result['model']['params'] / 1e6:.1f}M params; DPO training ...", flush=True)
    result["training"] = train(folder, rows, config, s, peaks)
    save()  # what is done so far, should a time limit stop the rest
    print("generation ...", flush=True)
    result["generation"] = generation(folder, s)
    result["wall_s"] = time.perf_counter() - start
    save()
    report(result)
    return result


def param_count(config) -> int:
    """Parameter count of a bench_data Llama config (untied or tied), without building the model."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size + 2 * d  # + the two norms
    return layers * per_layer + vocab * d * (1 if config.tie_word_embeddings else 2) + d


if __name__ == "__main__":
    main()
