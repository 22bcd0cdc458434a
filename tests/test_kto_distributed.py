"""KTO on 2 CPU processes (DDP, gloo) over an uneven validation shard, against the same examples on 1 process.

The 2-process run is ``tests/scripts/kto_dist_check.py`` in a subprocess (Lightning's ``ddp`` launcher
re-executes ``sys.argv``); the 1-process run is the same script's ``run(1, ...)``, called here. See the
script's docstring for why the two see the same examples and the same KL rows.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_lightning.training.metrics import KTO_METRIC_NAMES

SCRIPT = Path(__file__).parent / "scripts" / "kto_dist_check.py"
ROOT = Path(__file__).parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("kto_dist_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_process_kto_validation_matches_one_process(tmp_path):
    """5 held-out examples, eval batches of 3: rank 0 validates examples 0, 2, 4, rank 1 examples 1, 3 and
    example 0 again as padding (weight 0); one process validates the 5 real examples with the same 5 KL
    rows. With r_k the policy - reference log-prob of rank k's KL rows, the right reference point is
    z0 = max(0, (sum r_0 + r_1[0] + r_1[1]) / 5), on both ranks (measured 1.3452), and every val/* metric
    equals one process's (measured: <= 8.4e-7). Rank 0's examples are all desirable and rank 1's real ones
    undesirable, so each side's means also need the metric sums of both ranks. A module that does not sum
    the KL statistics over ranks logs val/kl as the mean of the two per-rank z0s over 3 and 2 rows (measured
    1.3188); one that counts the padding's KL row divides by 6 (measured 1.3787): the test checks that each
    is more than 1e-3 off."""
    out = tmp_path / "two.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(out, weights_only=False)
    one = load_script().run(1, str(tmp_path / "one.pt"))

    # The subprocess tested this checkout, with one batch per rank, the shards the script assumes.
    assert two["package"] == one["package"] == str((ROOT / "dpo_lightning" / "__init__.py").resolve())
    assert two["batches"] == [1]
    for rank, expected in enumerate(one["rank_batches"]):
        seen = torch.load(f"{out}.rank{rank}", weights_only=True)
        assert seen.keys() == expected.keys()
        for key in expected:
            assert torch.equal(seen[key], expected[key]), (rank, key)
    assert one["rank_batches"][1]["weight"].tolist() == [1.0, 1.0, 0.0]

    # The reference point by hand, and what the two wiring mistakes would log instead.
    r0, r1 = one["kl_ratios"]
    z0 = float((r0.sum() + r1[:2].sum()) / 5)
    no_sum = (max(0.0, float(r0.mean())) + max(0.0, float(r1[:2].mean()))) / 2
    with_padding = max(0.0, float((r0.sum() + r1.sum()) / 6))
    assert z0 > 0.1, z0  # not clamped
    assert abs(no_sum - z0) > 1e-3, (no_sum, z0)
    assert abs(with_padding - z0) > 1e-3, (with_padding, z0)
    assert one["val"]["val/kl"] == pytest.approx(z0, rel=1e-5, abs=1e-6)

    assert list(one["val"]) == list(two["val"]) == [f"val/{n}" for n in KTO_METRIC_NAMES]
    for key, value in one["val"].items():
        assert two["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
