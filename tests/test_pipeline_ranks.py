"""``iterate`` on several processes (user trial 2: rank 1 was refused by rank 0's folder lock). Every process
runs ``iterate``, started by torchrun or srun; only the global rank 0 one locks the folder and writes the stage
records, the mixed pairs and the report, which the others wait for and read. Lightning's own launcher (plain
``python -m`` with a stage on several devices) would run the whole command again per rank: refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import dpo_lightning.cli as cli
from dpo_lightning.pipeline import ranks
from dpo_lightning.pipeline.stage_runs import STAGE_RECORD, _Attempt, _begin_stage
from dpo_lightning.stages.preflight import ConfigError
from dpo_lightning.training.callbacks import Preempted, PreemptionWatch
from dpo_lightning.training.folders import FolderError, read_record, write_record

ROOT = Path(__file__).resolve().parents[1]
# What launchers set: a test of "no launcher" runs without them.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCH_VARS or name.startswith(("SLURM_", "LSB_", "OMPI_", "PMI_")):
            monkeypatch.delenv(name)


def _pipeline(out: Path, ddp: list[str], sft: list[str] = (), generate: list[str] = (), dpo: list[str] = (),
              **more) -> dict:
    return {
        "output_dir": str(out), "rounds": 1,
        "sft": {"config": str(ROOT / "recipes/tiny_sft.yaml"),
                "args": ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *ddp, *sft]},
        "generate": {"config": str(ROOT / "recipes/tiny_generate.yaml"),
                     "args": ["--data.limit", "16", "--model.num_samples", "4", "--model.max_new_tokens", "8",
                              "--data.batch_size", "4", *ddp, *generate]},
        "dpo": {"config": str(ROOT / "recipes/tiny.yaml"),
                "args": ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.batch_size", "4",
                         *ddp, *dpo]},
        **more,
    }


@pytest.mark.parametrize("stage, args, says", [
    ("dpo", ["--trainer.devices", "2"], "the dpo stage runs on 2 processes (trainer.devices 2)"),
    ("generate", ["--trainer.devices", "0,1,2"], "the generate stage runs on 3 processes (trainer.devices [0, 1, 2])"),
    ("sft", ["--trainer.num_nodes", "2"], "the sft stage runs on 2 processes (trainer.devices 1, trainer.num_nodes 2)"),
])
def test_lightnings_own_launcher_is_refused_in_one_line_before_anything_runs(
        tmp_path, monkeypatch, capsys, no_launcher, stage, args, says):
    """Plain ``python -m dpo_lightning iterate`` with a stage on several processes: Lightning's launcher would start
    rank 1 by running the whole iterate command again at the first such Trainer (and more at later ones)."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(cli, "cli_main", must_not_run)
    monkeypatch.setattr(cli, "generate_main", must_not_run)
    out = tmp_path / "pipe"
    config = tmp_path / "pipe.yaml"
    config.write_text(yaml.safe_dump(_pipeline(out, [], **{stage: args})))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["iterate", "--config", str(config)])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dpo_lightning: error: iterate: {says}"), err
    per_node = {"dpo": 2, "generate": 3, "sft": 1}[stage]
    assert f"torchrun --nproc-per-node {per_node} -m dpo_lightning iterate" in err[0] and "srun" in err[0]
    assert not out.exists()  # nothing ran, no folder was made


def test_the_same_stages_pass_the_launch_check_under_an_external_launcher(monkeypatch, no_launcher):
    stages = {"dpo": ("fit", ["--config", str(ROOT / "recipes/tiny.yaml"), "--trainer.devices", "2"])}
    with pytest.raises(ConfigError, match="the dpo stage runs on 2 processes"):
        ranks.check_launch(stages)
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun, srun (through Lightning's SLURM environment) set it too
    ranks.check_launch(stages)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    ranks.check_launch(stages)


def test_a_rank_above_0_writes_no_stage_record_and_decides_from_rank_0s(tmp_path, monkeypatch, no_launcher):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(ranks, "RANK_ZERO_WAIT_S", 0.5)
    folder = tmp_path / "round_1" / "dpo"
    settings = {"config": {"lr": 1e-4}}
    # No record from rank 0: rank 1 waits, then names the file; it writes none of its own.
    with pytest.raises(FolderError, match=rf"rank 1: waited 0 s for {folder / STAGE_RECORD} \(the round_1/dpo"):
        _begin_stage(folder, "round_1/dpo", settings)
    assert not folder.exists()
    # Rank 0's record: rank 1 takes it as it is, and refuses other settings as rank 0 does.
    record = {"stage": "round_1/dpo", "id": "rank0", "settings": settings, "done": False, "seconds": 1.5}
    write_record(folder / STAGE_RECORD, record)
    written = (folder / STAGE_RECORD).read_bytes()
    assert _begin_stage(folder, "round_1/dpo", settings) == record
    with pytest.raises(FolderError, match=r"config.lr: 0.0001 \(recorded\) -> 0.0002 \(now\)"):
        _begin_stage(folder, "round_1/dpo", {"config": {"lr": 2e-4}})
    # Its attempt neither adds its time nor marks the record done: that is rank 0's.
    with _Attempt(folder, dict(record), "round_1/dpo") as attempt:
        attempt.done()
    assert (folder / STAGE_RECORD).read_bytes() == written and sorted(os.listdir(folder)) == [STAGE_RECORD]
    # On rank 0 the same attempt writes it.
    monkeypatch.setenv("RANK", "0")
    with _Attempt(folder, dict(record), "round_1/dpo") as attempt:
        attempt.done()
    assert read_record(folder / STAGE_RECORD)["done"] is True


def test_a_rank_above_0_goes_on_once_rank_0_has_written_the_record(tmp_path, monkeypatch, no_launcher):
    monkeypatch.setenv("RANK", "1")
    folder = tmp_path / "sft" / "stage"
    record = {"stage": "sft/stage", "id": "rank0", "settings": {"a": 1}, "done": False, "seconds": 0.0}
    writer = threading.Timer(0.6, write_record, (folder / STAGE_RECORD, record))
    writer.start()
    started = time.monotonic()
    assert _begin_stage(folder, "sft/stage", {"a": 1}) == record
    assert time.monotonic() - started >= 0.5
    writer.join()


def test_a_rank_waiting_for_rank_0_stops_on_sigterm(tmp_path, monkeypatch, no_launcher):
    """A preemption reaches every rank; rank 0 stops between stages without writing the next record, so a rank
    waiting for that record stops too (instead of waiting until the timeout, or until torchrun's agent kills it)."""
    monkeypatch.setenv("RANK", "1")
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    with PreemptionWatch("test"), pytest.raises(Preempted, match=r"received SIGTERM: stopped waiting for .*stage.json"):
        _begin_stage(tmp_path / "round_2" / "generate", "round_2/generate", {})
    assert time.monotonic() - started < 30


def _torchrun(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "dpo_lightning", "iterate", "--config",
               str(config)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # two 2-process pipelines on the CPU (gloo): about a minute on 2 shared cores
def test_torchrun_runs_the_pipeline_on_2_processes_and_a_rerun_skips_every_stage(tmp_path):
    out = tmp_path / "pipe"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    evaluation = {"limit": 4, "num_samples": 2, "max_new_tokens": 8}
    config = tmp_path / "pipe_ddp.yaml"
    # mix_with: rank 0 writes round 1's mixed pairs, which rank 1's fit reads (it waits for them)
    config.write_text(yaml.safe_dump(_pipeline(out, ddp, mix_with="synthetic:sort", mix_limit=8,
                                               evaluation=evaluation)))
    first = _torchrun(config, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    exports = [out / "sft" / "stage" / "version_0" / "hf_export", out / "round_1" / "dpo" / "version_0" / "hf_export"]
    assert all((export / "config.json").is_file() for export in exports)
    assert all((out / "round_1" / name).is_file() for name in ("generate/pairs.jsonl", "mixed_pairs.jsonl"))
    stages = [out / "sft" / "stage", out / "round_1" / "generate", out / "round_1" / "dpo"]
    assert all(read_record(folder / STAGE_RECORD)["done"] for folder in stages)
    assert "Hugging Face export of the policy" in first.stderr + first.stdout
    report = (out / "report.csv").read_bytes()
    assert len(report.decode().splitlines()) == 3  # header, round 0, round 1: one report (rank 0's)
    records = [(folder / STAGE_RECORD).read_bytes() for folder in stages]

    again = _torchrun(config, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    # Every stage skipped: no attempt added its time to a record; the report is the same.
    assert [(folder / STAGE_RECORD).read_bytes() for folder in stages] == records
    assert (out / "report.csv").read_bytes() == report
    assert "Hugging Face export of the policy" not in again.stderr + again.stdout
