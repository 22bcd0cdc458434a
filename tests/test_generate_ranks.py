"""``generate`` on 2 processes (DDP, gloo), user trial 2: a re-run that leaves one rank no prompt to sample
finishes (it was ``DataLoader within local rank has zero length``); after a ``kill -9`` of the launching process
the other rank stops too (it went on sampling into the folder a re-run takes over); either way the finished
folder is the one a run never stopped writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import save_sort_policy

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # two 2-process runs of the CLI


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def command(policy: str, out: Path, limit: int = 8) -> list[str]:
    return [sys.executable, "-m", "dpo_lightning", "generate", "--config", str(ROOT / "recipes" / "tiny_generate.yaml"),
            "--model.model", policy, "--data.tokenizer", policy, "--data.limit", str(limit), "--data.batch_size", "2",
            "--model.num_samples", "2", "--model.max_new_tokens", "6", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false", "--output.output_dir", str(out)]


def generate(policy: str, out: Path, limit: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run(command(policy, out, limit), cwd=out.parent, env=ENV, capture_output=True, text=True,
                          timeout=600)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_after_a_kill_9_of_the_launcher_the_other_rank_stops_and_the_rerun_is_byte_identical(tmp_path):
    policy = save_sort_policy(tmp_path / "policy")
    straight = tmp_path / "straight"
    assert generate(policy, straight, limit=400).returncode == 0
    out = tmp_path / "out"
    launcher = subprocess.Popen(command(policy, out, limit=400), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while lines(out / "samples.part1.jsonl") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(children) == 1  # rank 1
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 60
    while alive(children[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(children[0]), "rank 1 went on after its launcher was killed"
    written = lines(out / "samples.part1.jsonl")
    assert 0 < written < 200  # it stopped before its share was done
    rerun = generate(policy, out, limit=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name


def test_a_rerun_that_leaves_one_rank_nothing_to_sample_finishes(tmp_path):
    policy = save_sort_policy(tmp_path / "policy")
    out = tmp_path / "out"
    first = generate(policy, out)
    assert first.returncode == 0, first.stderr[-3000:]
    samples = (out / "samples.jsonl").read_bytes()
    pairs = (out / "pairs.jsonl").read_bytes()
    records = [json.loads(line) for line in samples.decode().splitlines()]
    assert len(records) == 8
    # Rank 0 samples positions 0, 2, 4, 6 in batches [0, 2], [4, 6]; rank 1 positions 1, 3, 5, 7. A run killed
    # with rank 0's first batch unwritten: the re-run gives rank 0 one batch and rank 1 none.
    kept = [r for i, r in enumerate(records) if i not in (0, 2)]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (out / "pairs.jsonl").unlink()
    rerun = generate(policy, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "6 of 8 prompts were sampled by an earlier run" in rerun.stderr
    assert (out / "samples.jsonl").read_bytes() == samples
    assert (out / "pairs.jsonl").read_bytes() == pairs
