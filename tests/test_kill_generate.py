"""kill -9 through the real ``generate`` command at several moments, then the same command again: the
finished folder's ``samples.jsonl`` and ``pairs.jsonl`` are byte for byte those of a run never killed.

Runs ``tests/scripts/kill_generate.py`` (each run a subprocess of its own, killed with SIGKILL) for 4
trials: mid-sampling with the re-run killed mid-sampling too, and three kills made to land on the
moments between the files (``samples.jsonl`` in place with the part files not yet removed; between
``samples.jsonl`` and ``pairs.jsonl``; between ``pairs.jsonl`` and its manifest entry). The re-runs use
another batch size (3, not 4). A longer run of the script gives the figures of docs/reliability.md.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.stages.export import export_hf

from tiny import tiny_config

SCRIPT = Path(__file__).parent / "scripts" / "kill_generate.py"
ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_generate_killed_anywhere_then_rerun_is_byte_identical(tmp_path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    export_hf(load_causal_lm(None, config={**tiny_config(), "vocab_size": len(tokenizer)}), tokenizer,
              tmp_path / "policy")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--policy", str(tmp_path / "policy"), "--out", str(tmp_path / "kill"),
         "--trials", "4", "--modes", "sampling-twice", "mid-merge", "between-files", "after-pairs",
         "--resume-batch-size", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "generate kill -9 trials: 4, byte-identical: 4" in proc.stdout, proc.stdout
