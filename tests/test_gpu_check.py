"""benchmarks/gpu_check.py --dry-run: the GPU check's code path on the CPU with a tiny model, as a subprocess
(its training sides are subprocesses of their own). Slow: ~40 s on 2 loaded cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_and_writes_every_figure(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"].startswith("cpu")

    # Training: ours (and TRL where installed) with tokens/s, MFU, peak memory; printed and in the JSON.
    ours = result["training"]["ours"]
    assert ours["tokens_per_s"] > 0 and 0 < ours["mfu_measured_peak"] < 1 and ours["peak_rss_mib"] > 0
    assert "ours  tokens/s" in out and "MFU" in out and "peak memory" in out
    try:
        import trl  # noqa: F401
    except ImportError:
        assert "skipped" in result["training"]["trl"] and "TRL: not importable" in out
    else:
        trl_row = result["training"]["trl"]
        assert trl_row["tokens_per_s"] > 0 and "trl   tokens/s" in out
        # The same work: both sides scored the first batch alike (fp32 on the CPU).
        assert result["training"]["step0_max_relative_difference"] < 1e-4

    # Generation: HF through GenerationModule; vLLM said to be skipped without CUDA.
    s, hf = result["settings"], result["generation"]["hf_generate"]
    assert 0 < hf["tokens"] <= s["gen_prompts"] * s["gen_samples"] * s["gen_max_new_tokens"]
    assert "generation tokens/s: HF generate" in out and "vLLM skipped: no CUDA device" in out

    # The parameter count behind the MFU is the model's.
    config = LlamaConfig(**{k: v for k, v in result["model"]["config"].items() if k != "model_type"})
    assert result["model"]["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
