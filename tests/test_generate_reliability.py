"""`generate` survives what training survives: a kill between its two files, a kill mid-batch, SIGTERM,
re-runs with other settings, two runs on one folder, and inputs that give nothing (docs/reliability.md,
The pipeline). Each test reproduces a fault the first fault hunt found (issue #26)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import dpo_lightning.generation.writer as generation_writer
from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.generation.module import GenerationModule
from dpo_lightning.generation.pairing import make_pairs
from dpo_lightning.generation.writer import JudgedSamplesWriter
from dpo_lightning.training.callbacks import PREEMPTED_EXIT_CODE, Preempted
from dpo_lightning.training.folders import FolderError, FolderLock

from tiny import save_sort_policy

ROOT = Path(__file__).resolve().parents[1]
SORT = "function:dpo_lightning.data.synthetic:sort_reward"


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return save_sort_policy(tmp_path_factory.mktemp("policy") / "export")


def _prompts(policy: str, **kwargs) -> PromptDataModule:
    options = {"tokenizer": policy, "dataset": "synthetic:sort", "split": "validation", "limit": 6, "batch_size": 2,
               **kwargs}
    return PromptDataModule(**options)


def _generate(policy: str, out: Path, *callbacks: L.Callback, pairing: str = "best_vs_worst", judge: str = SORT,
              **data) -> None:
    prompts = _prompts(policy, **data)
    module = GenerationModule(model=policy, tokenizer=prompts.tokenizer, num_samples=4, max_new_tokens=10, seed=5)
    writer = JudgedSamplesWriter(output_dir=str(out), judge=judge, pairing=pairing)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[writer, *callbacks]).predict(module, datamodule=prompts, return_predictions=False)


def _files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("samples.jsonl", "pairs.jsonl")}


class _RaiseAfterRecords(L.Callback):
    """A kill (KeyboardInterrupt) once ``records`` records are in the part file; the writer runs first."""

    def __init__(self, records: int) -> None:
        self.records = records

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        part = Path(trainer.callbacks[0].output_dir) / "samples.part0.jsonl"
        if part.exists() and len(part.read_text().splitlines()) >= self.records:
            raise KeyboardInterrupt("killed")


@pytest.fixture(scope="module")
def uninterrupted(policy, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    _generate(policy, out)
    return _files(out)


# ------------------------------------------------------------------------------ 1. a kill between the two files


def test_a_kill_between_samples_and_pairs_is_finished_by_the_rerun(policy, tmp_path, monkeypatch, uninterrupted):
    """Killed after samples.jsonl was merged, before pairs.jsonl was written: the re-run writes the pairs
    (it used to exit 0 with 'nothing left to sample' and never write them)."""
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the files")

    with monkeypatch.context() as patch:
        patch.setattr(generation_writer, "write_pairs", killed)  # where the writer calls it
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            _generate(policy, out)
    assert (out / "samples.jsonl").exists() and not (out / "pairs.jsonl").exists()
    _generate(policy, out)
    assert _files(out) == uninterrupted


def test_pairs_deleted_by_hand_are_written_again(policy, tmp_path, uninterrupted):
    out = tmp_path / "out"
    _generate(policy, out)
    (out / "pairs.jsonl").unlink()
    _generate(policy, out)
    assert _files(out) == uninterrupted


# ------------------------------------------------------------------------------ 2. samples independent of batching


def test_a_kill_mid_batch_changes_no_sample(policy, tmp_path, uninterrupted):
    """Batches of 2; killed after 3 records (mid-batch: the second batch's first record is written, its
    second not): the re-run's files are byte for byte the uninterrupted run's. The old per-batch seed
    (from the batch's first prompt) made every later sample differ."""
    out = tmp_path / "out"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _generate(policy, out, _RaiseAfterRecords(3))
    assert len((out / "samples.part0.jsonl").read_text().splitlines()) == 4  # the kill came after batch 2's writes
    lines = (out / "samples.part0.jsonl").read_text().splitlines()
    (out / "samples.part0.jsonl").write_text("\n".join(lines[:3]) + "\n")  # as if killed between its two records
    _generate(policy, out)
    assert _files(out) == uninterrupted


def test_samples_do_not_depend_on_the_batch_size(policy, tmp_path, uninterrupted):
    """Each response draws from a random stream seeded from (seed, prompt id, sample index): batches of 1,
    3 and 6 prompts give the samples of batches of 2 (CPU float32, where the tiny model's left-padded
    batched forward is batch-invariant; docs/reliability.md says what is guaranteed elsewhere)."""
    for batch_size in (1, 3, 6):
        _generate(policy, tmp_path / f"b{batch_size}", batch_size=batch_size)
        assert _files(tmp_path / f"b{batch_size}") == uninterrupted, batch_size


def test_a_rerun_with_another_batch_size_continues_exactly(policy, tmp_path, uninterrupted):
    out = tmp_path / "out"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _generate(policy, out, _RaiseAfterRecords(2))
    _generate(policy, out, batch_size=4)
    assert _files(out) == uninterrupted


def test_sampling_leaves_the_global_rng_alone(policy):
    prompts = _prompts(policy)
    module = GenerationModule(model=policy, tokenizer=prompts.tokenizer, num_samples=2, max_new_tokens=6)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).predict(
        module, datamodule=prompts)
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------ 3. SIGTERM


class _SigtermAfterBatch(L.Callback):
    def __init__(self, batch: int, signum: int = signal.SIGTERM) -> None:
        self.batch, self.signum = batch, signum

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_cuts_the_batch_in_flight_and_stops_with_preempted(policy, tmp_path, uninterrupted, signum,
                                                                    default_sigint):
    """SIGTERM (or Ctrl-C) at the start of batch 2: that batch is cut short and not written, the run stops with
    Preempted (the CLI's exit 143, 130 for Ctrl-C) naming what is done; the re-run finishes exactly. (It used to
    log 'Received SIGTERM', sample every other prompt and exit 0.)"""
    out = tmp_path / "out"
    before = signal.getsignal(signum)
    name = signal.Signals(signum).name
    done = rf"received {name}: 2 of 6 prompts are sampled .*run the same command again"
    with pytest.raises(Preempted, match=done) as e:
        _generate(policy, out, _SigtermAfterBatch(1, signum))
    assert e.value.exit_code == (130 if signum == signal.SIGINT else 143)
    assert len((out / "samples.part0.jsonl").read_text().splitlines()) == 2
    assert not (out / "samples.jsonl").exists()
    assert signal.getsignal(signum) == before  # the handler was put back
    _generate(policy, out)
    assert _files(out) == uninterrupted


@pytest.mark.slow
def test_sigterm_through_the_cli_exits_143_with_the_resume_line(policy, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dpo_lightning", "generate", "--config", str(ROOT / "recipes/tiny_generate.yaml"),
            "--model.model", policy, "--data.tokenizer", policy, "--data.limit", "64", "--data.batch_size", "2",
            "--output.output_dir", str(out), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = out / "samples.part0.jsonl"
    while proc.poll() is None and not (part.exists() and part.read_text().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "dpo_lightning: preempted: received SIGTERM" in err and "run the same command again" in err
    done = len(part.read_text().splitlines())
    assert 2 <= done < 64 and not (out / "samples.jsonl").exists()


# ------------------------------------------------------------------------------ 4. re-runs with other settings


def test_another_pairing_on_a_finished_folder_makes_the_pairs_again(policy, tmp_path, caplog):
    """`--output.pairing all` on a finished folder: pairs.jsonl is made again from samples.jsonl (it used
    to exit 0 with the old best-vs-worst pairs); the samples are not touched."""
    out = tmp_path / "out"
    _generate(policy, out)
    samples = (out / "samples.jsonl").read_bytes()
    with caplog.at_level("WARNING"):
        _generate(policy, out, pairing="all")
    assert "made with pairing='best_vs_worst', min_margin=0.0; making it again" in caplog.text
    assert (out / "samples.jsonl").read_bytes() == samples
    records = [json.loads(line) for line in samples.splitlines()]
    expected = sum(len(make_pairs([None if r == "" else s for r, s in zip(rec["responses"], rec["scores"])],
                                  "all").pairs) for rec in records)
    assert len((out / "pairs.jsonl").read_text().splitlines()) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pairs"]["settings"] == {"pairing": "all", "min_margin": 0.0}
    assert manifest["pairs"]["count"] == expected


def test_a_smaller_limit_is_refused_and_a_larger_one_samples_the_rest(policy, tmp_path, uninterrupted):
    """A folder of 6 prompts re-run with limit 4 is refused naming data.limit (it used to report '4 of 4
    done' and keep 6); with limit 8 its 6 prompts are kept and 2 more sampled, as a fresh run of 8 would."""
    out = tmp_path / "out"
    _generate(policy, out)
    with pytest.raises(FolderError, match=r"its samples are of 6 prompts, this run has 4 .*limit: 6 \(recorded\) -> 4"):
        _generate(policy, out, limit=4)
    assert _files(out) == uninterrupted
    _generate(policy, out, limit=8)
    _generate(policy, tmp_path / "fresh", limit=8)
    assert _files(out) == _files(tmp_path / "fresh")


def test_other_sampling_settings_are_refused_naming_them(policy, tmp_path):
    out = tmp_path / "out"
    _generate(policy, out)
    prompts = _prompts(policy)
    module = GenerationModule(model=policy, tokenizer=prompts.tokenizer, num_samples=4, max_new_tokens=10, seed=6)
    writer = JudgedSamplesWriter(output_dir=str(out), judge=SORT)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    with pytest.raises(FolderError, match=r"made with other settings \(seed: 5 \(recorded\) -> 6 \(now\)\)"):
        trainer.predict(module, datamodule=prompts, return_predictions=False)


# ------------------------------------------------------------------------------ 5. one run per folder


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(policy, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dpo_lightning.training.folders import FolderLock; "
         "FolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderError, match=rf"in use by process {holder.pid} on host .*; wait for that run"):
            _generate(policy, out)
        assert not (out / "samples.jsonl").exists() and not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    _generate(policy, out)  # the killed holder's lock is taken over
    assert (out / "pairs.jsonl").exists()


def test_the_lock_is_released_when_a_run_fails(policy, tmp_path):
    out = tmp_path / "out"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _generate(policy, out, _RaiseAfterRecords(2))
    with FolderLock(out):  # free again
        pass


# ------------------------------------------------------------------------------ 6. inputs that give nothing


def test_an_empty_prompts_file_is_named_with_the_reason(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    from dpo_lightning.data.errors import DataError

    for name in ("prompts.jsonl", "blank.jsonl"):
        with pytest.raises(DataError, match=rf"{name}: the file is empty \(no rows\)"):
            PromptDataModule(tokenizer="synthetic:sort", dataset=str(tmp_path / name)).setup()


def test_a_judge_that_ties_everything_gives_an_empty_pairs_file_counted_in_the_manifest(policy, tmp_path):
    out = tmp_path / "out"
    _generate(policy, out, judge="function:tests.judge_fixtures:constant")
    assert (out / "pairs.jsonl").read_text() == ""
    pairs = json.loads((out / "manifest.json").read_text())["pairs"]
    assert pairs["count"] == 0 and "6 prompts gave no pair" in pairs["summary"]
