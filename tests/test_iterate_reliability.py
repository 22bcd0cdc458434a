"""`iterate` survives what training survives: re-runs with other settings are refused naming them, a
finished pipeline re-run redoes nothing and reports the recorded times, a redone stage makes the later
ones refuse, one run per output folder, SIGTERM between stages stops before the next, and a round with no
pair says what to change (docs/reliability.md, The pipeline; issue #26).

Most tests stand the stages' commands in with fakes that write what the real ones write (an export with
its marker; pairs and the generate manifest), so the pipeline's bookkeeping is tested in seconds; the
settings each stage records are still resolved by the real CLI parsers from the real recipes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import dpo_lightning.cli as cli
import dpo_lightning.pipeline.report as pipeline_report
from dpo_lightning.data.errors import DataError
from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.generation.samples_io import write_manifest
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.pipeline import Evaluation, Stage, iterate
from dpo_lightning.stages.export import EXPORT_MARKER, export_hf
from dpo_lightning.training.callbacks import Preempted
from dpo_lightning.training.folders import FolderError, FolderLock

from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


class FakeStages:
    """The fit and generate commands the pipeline calls, standing in: each call is recorded, takes 0.2 s and
    writes what the real command would leave (an export with its marker; pairs and the generate manifest)."""

    def __init__(self, monkeypatch, pairs: int = 2, on_generate=None) -> None:
        self.fits: list[list[str]] = []
        self.generates: list[list[str]] = []
        self.pairs, self.on_generate = pairs, on_generate

        def fit(args, **kwargs):
            self.fits.append(args)
            time.sleep(0.2)
            export = Path(_value(args, "--trainer.logger.init_args.save_dir")) / _value(
                args, "--trainer.logger.init_args.name") / "version_0" / "hf_export"
            export.mkdir(parents=True, exist_ok=True)
            (export / "config.json").write_text("{}")
            (export / EXPORT_MARKER).write_text("{}")

        def generate(args, **kwargs):
            self.generates.append(args)
            time.sleep(0.2)
            out = Path(_value(args, "--output.output_dir"))
            out.mkdir(parents=True, exist_ok=True)
            row = {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}
            (out / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(self.pairs)))
            summary = f"1 prompt, 2 responses -> {self.pairs} pairs"
            write_manifest(out, {"pairs": {"settings": {}, "count": self.pairs, "summary": summary}})
            if self.on_generate is not None:
                self.on_generate()

        monkeypatch.setattr(cli, "cli_main", fit)
        monkeypatch.setattr(cli, "generate_main", generate)
        monkeypatch.setattr(pipeline_report, "evaluate_policy",
                            lambda policy, start, reference, evaluation: {"reward": 0.5, "win_rate": 0.5, "kl": 0.0,
                                                                          "kl_stderr": 0.0})


def _stages(lr: str = "1.0e-4"):
    sft = Stage(str(ROOT / "recipes/tiny_sft.yaml"), ["--trainer.max_steps", "4"])
    generate = Stage(str(ROOT / "recipes/tiny_generate.yaml"), ["--data.limit", "24"])
    dpo = Stage(str(ROOT / "recipes/tiny.yaml"), ["--model.optimizer.init_args.lr", lr, "--trainer.max_steps", "4"])
    return sft, generate, dpo


def _report(out: Path) -> list[dict[str, str]]:
    with (out / "report.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_rerun_with_another_dpo_lr_is_refused_naming_it(tmp_path, monkeypatch):
    """The first fault hunt: a re-run with another DPO learning rate reused the finished rounds silently and
    rewrote report.csv as if the new rate had been used. Now the first stage whose settings differ is
    refused, naming the setting, and nothing is rewritten."""
    out = tmp_path / "pipe"
    FakeStages(monkeypatch)
    iterate(str(out), *_stages("1.0e-4"), rounds=2)
    report = (out / "report.csv").read_bytes()
    again = FakeStages(monkeypatch)
    with pytest.raises(FolderError, match=r"round_1/dpo stage was made with other settings \(config\.model\.init_args"
                                          r"\.optimizer\.init_args\.lr: 0\.0001 \(recorded\) -> 0\.0002 \(now\)\)"):
        iterate(str(out), *_stages("2.0e-4"), rounds=2)
    assert again.fits == [] and again.generates == []
    assert (out / "report.csv").read_bytes() == report


def test_a_finished_pipeline_rerun_redoes_nothing_and_reports_the_recorded_times(tmp_path, monkeypatch):
    """Re-run with the same settings: no stage runs again, and the report's seconds are the stages' recorded
    wall times (they were 0.0: the time of skipping them)."""
    out = tmp_path / "pipe"
    first = FakeStages(monkeypatch)
    iterate(str(out), *_stages(), rounds=2)
    assert len(first.fits) == 3 and len(first.generates) == 2
    seconds = [float(row["seconds"]) for row in _report(out)]
    again = FakeStages(monkeypatch)
    iterate(str(out), *_stages(), rounds=3)  # one more round: only its two stages run
    assert len(again.fits) == 1 and len(again.generates) == 1
    rows = _report(out)
    assert [float(row["seconds"]) for row in rows[:3]] == seconds and all(s >= 0.2 for s in seconds)
    assert float(rows[3]["seconds"]) >= 0.4  # generate + DPO


def test_a_redone_stage_makes_the_later_ones_refuse(tmp_path, monkeypatch):
    """round_1/generate removed by hand and redone: round_1/dpo was trained on the old pairs, so it is
    refused (its recorded input is another generate run) instead of being reused."""
    import shutil

    out = tmp_path / "pipe"
    FakeStages(monkeypatch)
    iterate(str(out), *_stages(), rounds=1)
    shutil.rmtree(out / "round_1" / "generate")
    FakeStages(monkeypatch)
    with pytest.raises(FolderError, match=r"round_1/dpo stage was made with other settings \(inputs\.pairs: "
                                          r"'[0-9a-f]+' \(recorded\) -> '[0-9a-f]+' \(now\)\)"):
        iterate(str(out), *_stages(), rounds=1)


def test_a_stage_folder_without_its_record_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "pipe"
    (out / "round_1" / "generate").mkdir(parents=True)
    (out / "round_1" / "generate" / "pairs.jsonl").write_text("")
    fakes = FakeStages(monkeypatch)
    with pytest.raises(FolderError, match=r"round_1/generate: holds files but no stage.json"):
        iterate(str(out), *_stages(), rounds=1)
    assert len(fakes.generates) == 0


def test_iterate_refuses_a_folder_in_use(tmp_path, monkeypatch):
    out = tmp_path / "pipe"
    fakes = FakeStages(monkeypatch)
    with FolderLock(out), pytest.raises(FolderError, match=rf"in use by process {os.getpid()} on host"):
        iterate(str(out), *_stages(), rounds=1)
    assert fakes.fits == []


def test_sigterm_between_stages_stops_before_the_next_one(tmp_path, monkeypatch):
    """SIGTERM while round 1's generate runs (outside any DPO stage): the generate stage finishes its unit
    and is recorded done, the pipeline stops before round 1's DPO with Preempted (exit 143); the re-run
    goes on from there. (It used to run every later stage and the report, and exit 0.)"""
    out = tmp_path / "pipe"
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))  # what old code ran into
    try:
        fakes = FakeStages(monkeypatch, on_generate=lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(Preempted, match=r"received SIGTERM: stopped before the round_1/dpo stage.*run the same "
                                            r"iterate command again"):
            iterate(str(out), *_stages(), rounds=2)
        assert len(fakes.fits) == 1 and len(fakes.generates) == 1  # SFT and round 1's generate
        assert json.loads((out / "round_1" / "generate" / "stage.json").read_text())["done"]
        assert not caught  # the pipeline's handler took it
    finally:
        signal.signal(signal.SIGTERM, previous)
    again = FakeStages(monkeypatch)
    iterate(str(out), *_stages(), rounds=2)
    assert len(again.fits) == 2 and len(again.generates) == 1  # round 1's DPO, round 2


def test_sigterm_in_a_generate_stage_gives_the_pipelines_resume_line(tmp_path, monkeypatch):
    """A stage preempted (here generate, stopped with its records durable) ends the pipeline with one resume
    line, the pipeline's, and the stage stays not done (its time so far recorded)."""
    out = tmp_path / "pipe"

    def preempted():
        status = "received SIGTERM: 3 of 24 prompts are sampled in round_1/generate, each complete"
        raise Preempted(f"{status}; run the same command again to sample the rest", status)

    FakeStages(monkeypatch, on_generate=preempted)
    with pytest.raises(Preempted) as info:
        iterate(str(out), *_stages(), rounds=1)
    assert str(info.value) == ("round_1/generate stage: received SIGTERM: 3 of 24 prompts are sampled in "
                               "round_1/generate, each complete; run the same iterate command again to resume "
                               "(finished stages are kept)")
    record = json.loads((out / "round_1" / "generate" / "stage.json").read_text())
    assert not record["done"] and record["seconds"] >= 0.2


def test_a_round_without_pairs_says_what_to_change(tmp_path, monkeypatch):
    out = tmp_path / "pipe"
    fakes = FakeStages(monkeypatch, pairs=0)
    with pytest.raises(DataError, match=r"round_1/generate/pairs.jsonl: round 1's samples gave no preference pair "
                                        r"\(.*\).*--output.pairing all"):
        iterate(str(out), *_stages(), rounds=1)
    assert len(fakes.fits) == 1  # SFT only: no DPO on nothing


def test_a_round_without_pairs_trains_on_the_mixed_in_pairs_with_a_warning(tmp_path, monkeypatch, caplog):
    out = tmp_path / "pipe"
    fakes = FakeStages(monkeypatch, pairs=0)
    with caplog.at_level("WARNING"):
        iterate(str(out), *_stages(), rounds=1, mix_with="synthetic:sort", mix_limit=4)
    assert "the round's DPO trains on the synthetic:sort pairs alone" in caplog.text
    assert len(fakes.fits) == 2 and len((out / "round_1" / "mixed_pairs.jsonl").read_text().splitlines()) == 4


def test_a_judge_that_ties_everything_stops_iterate_before_dpo_through_the_real_generate(tmp_path):
    """The real generate command, a judge that gives every response the same score: 0 pairs; iterate stops
    with the reason and what to change (the DPO stage used to fail with 'could not read the json file:')."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    export_hf(load_causal_lm(None, config={**tiny_config(), "vocab_size": len(tokenizer)}), tokenizer,
              tmp_path / "sft")
    generate = Stage(str(ROOT / "recipes/tiny_generate.yaml"),
                     ["--data.limit", "4", "--model.num_samples", "2", "--output.judge",
                      "function:tests.judge_fixtures:constant"])
    dpo = Stage(str(ROOT / "recipes/tiny.yaml"))
    with pytest.raises(DataError, match=r"pairs.jsonl: round 1's samples gave no preference pair \(4 prompts, 8 "
                                        r"responses -> 0 pairs.*\): no prompt had two scored, non-empty responses"):
        iterate(str(tmp_path / "pipe"), Stage(str(tmp_path / "sft")), generate, dpo, rounds=1,
                evaluation=Evaluation(limit=2))
    assert not (tmp_path / "pipe" / "round_1" / "dpo").exists()


def test_a_resume_lists_a_changed_learning_rate(tmp_path):
    """The optimizer is a factory, not a hyper-parameter, so checkpoints did not record it and a resume with
    another learning rate listed nothing; now the checkpoint records it and the change is listed, saying
    truly that the checkpoint's applies (its optimizer state, learning rate included, is restored)."""
    args = ["fit", "--config", str(ROOT / "recipes/tiny.yaml"), "--trainer.max_steps", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.val_split", "null", "--data.batch_size", "4", "--checkpoint.save_every_n_steps", "1"]
    cli.cli_main(args)
    with pytest.warns(UserWarning, match=r"the checkpoint's apply .*\n  model\.optimizer\.init_args\.lr: 0\.001 "
                                         r"\(checkpoint\) -> 0\.0005 \(now\)"):
        resumed = cli.cli_main([*args, "--ckpt_path", "last", "--model.optimizer.init_args.lr", "5e-4",
                                "--trainer.max_steps", "3"])
    assert resumed.trainer.optimizers[0].param_groups[0]["initial_lr"] == 1e-3
