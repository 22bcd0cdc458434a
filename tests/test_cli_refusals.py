"""Bad values refused in one line through the real CLI, before anything loads, and nothing left behind
(user trial: one-line errors): trainer counts Lightning divides by, a data module refusing its settings, a
missing model for `generate`, a value of the wrong type inside an optimizer, `test`/`validate` without the
split, and the run folder a refused `fit` had claimed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def refused(capsys, *args: str, code: int = 1) -> list[str]:
    """``main(args)`` in-process: it must exit with ``code``; the lines it printed on stderr, seeding aside."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if not line.startswith("Seed set to")]


def fit(tmp_path: Path, *extra: str) -> list[str]:
    """``fit`` of the tiny recipe, a few steps, logs under tmp_path/runs."""
    return ["fit", "--config", TINY, "--trainer.max_steps", "2", "--data.batch_size", "8",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


@pytest.mark.parametrize(("args", "line"), [
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be >= 1, got 0"),
    (["--trainer.accumulate_grad_batches", "-2"], "trainer.accumulate_grad_batches must be >= 1, got -2"),
    (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be >= 1, got 0"),
    (["--trainer.check_val_every_n_epoch", "0", "--trainer.val_check_interval", "null"],
     "trainer.check_val_every_n_epoch must be >= 1, got 0"),
    (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val must be >= 0"),
])
def test_a_trainer_count_lightning_divides_by_is_refused_before_anything_loads(tmp_path, capsys, args, line):
    """accumulate_grad_batches 0 used to tokenize, start the fit and die in a ZeroDivisionError traceback."""
    out = refused(capsys, *fit(tmp_path, *args))
    assert len(out) == 1 and out[0].startswith(f"dpo_lightning: error: {line}"), out
    assert not (tmp_path / "runs").exists()  # refused before the run folder is claimed


def test_the_trainers_own_refusal_is_one_line(tmp_path, capsys):
    out = refused(capsys, *fit(tmp_path, "--trainer.max_steps", "-5"))
    assert len(out) == 1 and out[0].startswith("dpo_lightning: error: trainer: `max_steps` must be"), out


@pytest.mark.parametrize(("args", "line"), [
    (["--data.batch_size", "0"], "data (PreferenceDataModule): batch sizes must be positive, got batch_size=0"),
    (["--data.eval_batch_size", "0"], "data (PreferenceDataModule): batch sizes must be positive, got batch_size=8, "
                                      "eval_batch_size=0"),
    (["--data.collator", "kto"], "data (PreferenceDataModule): collator='kto': unpaired (KTO) data is KTODataModule"),
    (["--model.class_path", "dpo_lightning.KTOModule", "--data.collator", "share"],
     "data (KTODataModule): unknown collator 'share'; choose one of ['auto', 'kto', 'pad']"),
])
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_data_module_refusing_its_settings_is_one_line_before_anything_loads(tmp_path, capsys, command, args,
                                                                              line):
    """These ValueErrors were raised while the CLI read the first rows (the data module built in the preflight),
    outside the CLI's one-line path: a traceback."""
    out = refused(capsys, command, *fit(tmp_path, *args)[1:])
    assert len(out) == 1 and out[0].startswith(f"dpo_lightning: error: {line}"), out
    assert not (tmp_path / "runs").exists()


GENERATE = str(ROOT / "recipes" / "tiny_generate.yaml")


def test_generate_with_a_missing_model_names_the_option_and_the_path(tmp_path, capsys, monkeypatch):
    """tiny_generate before tiny_sft (runs/tiny_sft/version_0/hf_export missing) was a 23-frame traceback."""
    monkeypatch.chdir(tmp_path)  # the recipe's relative export path, surely absent
    out = refused(capsys, "generate", "--config", GENERATE, "--output.output_dir", str(tmp_path / "gen"))
    assert len(out) == 1, out
    assert out[0].startswith("dpo_lightning: error: model.model 'runs/tiny_sft/version_0/hf_export': no such file "
                             "or folder; it is a training run's export: run that fit first"), out
    assert not (tmp_path / "gen").exists()


def test_generate_with_a_missing_tokenizer_path_names_the_option(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()  # exists: the path check passes; nothing may load before the tokenizer's is checked too
    missing = tmp_path / "nope" / "tokenizer"
    out = refused(capsys, "generate", "--config", GENERATE, "--model.model", str(model), "--data.tokenizer",
                  str(missing), "--output.output_dir", str(tmp_path / "gen"))
    assert out == [f"dpo_lightning: error: data.tokenizer {str(missing)!r}: no such file or folder"]


@pytest.mark.parametrize(("args", "line"), [
    (["test"], "test: nothing to test: data.dataset 'synthetic:sort' has the splits ['train', 'validation'] and "
               "data.test_split is null; set data.test_split to one of them"),
    (["test", "--data.test_split", "tset"], "test: nothing to test: data.dataset 'synthetic:sort' has the splits "
                                            "['train', 'validation'] and data.test_split 'tset' is not one of its"),
    (["validate", "--data.val_split", "null"], "validate: nothing to validate: data.dataset 'synthetic:sort' has the "
                                               "splits ['train', 'validation'] and data.val_split is null; set "
                                               "data.val_split to one of them (or data.val_fraction"),
    (["validate", "--data.val_split", "valid"], "validate: nothing to validate: data.dataset 'synthetic:sort' has "
                                                "the splits ['train', 'validation'] and data.val_split 'valid' is"),
])
def test_evaluating_without_the_split_is_refused_naming_the_option(tmp_path, capsys, args, line):
    """`test` on a recipe without a test split exited 0 after testing nothing (Lightning's zero-length warning)."""
    out = refused(capsys, args[0], "--config", TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                  *args[1:])
    assert len(out) == 1 and out[0].startswith(f"dpo_lightning: error: {line}"), out
    assert not (tmp_path / "runs").exists()


def test_evaluating_a_split_the_source_has_runs(tmp_path, capsys):
    """The check refuses only what has nothing to evaluate: a named split, or a held-out fraction, runs."""
    common = ["--config", TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
              "--trainer.enable_progress_bar", "false", "--data.eval_batch_size", "8"]
    main(["test", *common, "--data.test_split", "validation", "--trainer.limit_test_batches", "1"])
    main(["validate", *common, "--data.val_split", "null", "--data.val_fraction", "0.1",
          "--trainer.limit_val_batches", "1"])
    out = capsys.readouterr().out
    assert "test/loss" in out and "val/loss" in out, out


@pytest.mark.parametrize("args", [
    ["--model.loss_type", "sigmod"],  # refused while the stage is built: after the run folder was claimed
    ["--trainer.max_steps", "-5"],  # refused by the Trainer, also after the claim
])
def test_a_refused_fit_leaves_no_run_folder_and_the_next_fit_gets_version_0(tmp_path, capsys, args):
    """A refused run left an empty runs/<name>/version_N, so the next real run landed in version_N+1 while recipes
    (tiny_generate.yaml, the pipeline) name runs/tiny_sft/version_0."""
    refused(capsys, *fit(tmp_path, *args))
    root = tmp_path / "runs" / "tiny"
    assert root.is_dir() and list(root.iterdir()) == []
    main(fit(tmp_path, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
             "--trainer.limit_val_batches", "1"))
    assert [p.name for p in root.iterdir()] == ["version_0"]
    assert (root / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_a_failed_run_gives_back_only_its_own_empty_claims(tmp_path):
    from dpo_lightning.training.runs import claim_version, claims_released_on_failure

    root = tmp_path / "runs"
    (root / "version_0").mkdir(parents=True)  # empty, but made by someone else: kept
    with pytest.raises(RuntimeError), claims_released_on_failure():
        written = root / f"version_{claim_version(root)}"
        (written / "events").write_text("x")  # holds a file: kept
        empty = root / f"version_{claim_version(root)}"
        raise RuntimeError("refused")
    assert sorted(p.name for p in root.iterdir()) == ["version_0", written.name]
    assert not empty.exists()
    with claims_released_on_failure():  # a run that succeeds keeps its folder, empty or not
        kept = root / f"version_{claim_version(root)}"
    assert kept.is_dir() and kept.name == "version_2"


@pytest.mark.parametrize("name", ["fsdp2", "ModelParalelStrategy", "lightning.pytorch.strategies.NoSuchStrategy"])
def test_a_strategy_that_is_neither_a_name_nor_a_class_is_one_line(tmp_path, capsys, name):
    """It was Lightning's ValueError traceback, after the data was read."""
    out = refused(capsys, *fit(tmp_path, "--trainer.strategy", name))
    assert len(out) == 1 and out[0].startswith(f"dpo_lightning: error: trainer.strategy={name!r} is neither"), out
    assert "lightning.pytorch.strategies.ModelParallelStrategy" in out[0]


@pytest.mark.parametrize("name", ["lightning.pytorch.strategies.ModelParallelStrategy", "ModelParallelStrategy"])
def test_a_strategy_class_given_on_the_command_line_is_the_strategy(name):
    """``--trainer.strategy <class path>`` (or a class name of lightning.pytorch.strategies) on the command line: the
    parser keeps it as a string, which Lightning refused as 'an invalid strategy name'; it is the class."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from dpo_lightning.cli import cli_main

    cli = cli_main(["--config", TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                    "--trainer.strategy", name, "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy)


def test_a_sharded_fsdp2_checkpoint_outside_fsdp2_is_one_line_naming_both_ways(tmp_path, capsys):
    """``validate --ckpt_path`` of an FSDP2 run's checkpoint on one process was an IsADirectoryError traceback."""
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    dcp.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=str(ckpt), no_dist=True)
    torch.save({"global_step": 4, "epoch": 0}, ckpt / "meta.pt")
    out = refused(capsys, "validate", "--config", TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                  "--ckpt_path", str(ckpt))
    assert len(out) == 1 and "is a sharded FSDP2 checkpoint, which only --trainer.strategy ModelParallel" in out[0]
    assert f"python -m dpo_lightning export {ckpt} DIR" in out[0]
