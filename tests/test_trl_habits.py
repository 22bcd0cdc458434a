"""What a TRL user expects of the CLI (issue #15): clipping at 1.0, logs in a short run with the
learning rate and gradient norm, one optimizer knob, no logger needed, an honest `validate`, a
top-level help that lists `export`, and a TRL-shaped recipe."""

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dpo_lightning.cli import cli_main

from tiny import ListLogger

ROOT = Path(__file__).resolve().parents[1]


def args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "recipes/tiny.yaml"),
        "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "10",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.batch_size", "8", "--data.val_split", "null", *extra,
    ]


class StepLogger(ListLogger):
    """ListLogger that keeps every logged key (not only train/*), by step."""

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})


def test_cli_defaults_clip_at_one_and_log_every_ten_steps(tmp_path):
    cli = cli_main(args(tmp_path)[:2] + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.gradient_clip_val == 1.0  # TRL's max_grad_norm
    assert cli.trainer.log_every_n_steps == 10  # TRL's logging_steps (Lightning's default is 50)
    assert cli.trainer.logger._default_hp_metric is False  # no stray hp_metric in TensorBoard


def test_a_short_run_logs_on_trls_step_axis_with_the_rate_each_step_applied(tmp_path):
    """20 optimizer steps, a log every 10, validation every 5 batches: train rows at steps 10 and 20, TRL's
    ``global_step`` once the step is done (Lightning's own axis says 9 and 19), validation at 5, 10, 15, 20
    (the sanity check before training is not logged);
    each row has TRL's fractional ``epoch`` (batches trained / batches per epoch). train/lr is the rate the
    logged step applied (TRL's learning_rate, read before the scheduler moves; it was the next step's),
    train/grad_norm finite and > 0; no lr-AdamW, no hp_metric."""
    from dpo_lightning.training.optim import warmup_decay_factor

    logger = StepLogger()
    cli = cli_main(args(tmp_path, "--data.val_split", "null", "--data.val_fraction", "0.1",
                        "--trainer.val_check_interval", "5", "--trainer.check_val_every_n_epoch", "null",
                        "--model.lr_decay", "cosine", "--trainer.num_sanity_val_steps", "1"), run=False)
    cli.trainer.loggers = [cli.trainer.logger, logger]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rows = {step: row for step, row in logger.rows.items() if "train/loss" in row}
    assert sorted(rows) == [10, 20]
    assert sorted(step for step, row in logger.rows.items() if "val/loss" in row) == [5, 10, 15, 20]
    per_epoch = cli.trainer.num_training_batches
    base = cli.trainer.optimizers[0].defaults["lr"]
    for step, row in logger.rows.items():
        assert row["epoch"] == pytest.approx(step / per_epoch)  # accumulation 1: a batch per step
    for step, row in rows.items():
        assert row["train/grad_norm"] > 0 and math.isfinite(row["train/grad_norm"])
        # The step-th step applies factor(step - 1) of the recipe's schedule over 20 steps.
        hp = cli.model.hparams
        warmup = math.ceil(20 * hp.warmup_ratio)
        expected = base * warmup_decay_factor(step - 1, warmup_steps=warmup, total_steps=20, decay=hp.lr_decay)
        assert row["train/lr"] == pytest.approx(expected, rel=1e-6)
    assert not any(k.startswith("lr-") or k == "hp_metric" for row in logger.rows.values() for k in row)


def test_runs_without_a_logger(tmp_path):
    cli = cli_main(["fit", *args(tmp_path, "--trainer.logger", "false", "--trainer.max_steps", "2")])
    assert cli.trainer.global_step == 2


def test_the_top_level_optimizer_flag_is_gone(tmp_path):
    """LightningCLI's --optimizer replaced model.optimizer and dropped the warmup/decay schedule."""
    with pytest.raises(SystemExit):
        cli_main(args(tmp_path, "--optimizer", "torch.optim.SGD"), run=False)


def test_validate_of_a_model_on_its_own_says_why_rewards_are_zero(tmp_path):
    cli = cli_main(args(tmp_path, "--data.val_split", "validation"), run=False)
    with pytest.warns(UserWarning, match="reference is a copy of the policy being evaluated"):
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)


def test_fits_own_validation_does_not_say_its_rewards_are_zero(tmp_path, recwarn):
    """The warning above is for a model evaluated on its own; a fit's validation compares against the model
    training started from (it said "0 by construction" at every fit's first validation, then reported 0.9)."""
    cli = cli_main(args(tmp_path, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
                        "--trainer.limit_val_batches", "1", "--data.val_split", "validation"), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.callback_metrics  # it validated
    assert not [w for w in recwarn if "by construction" in str(w.message)]


def test_top_level_help_names_the_program_and_lists_export():
    out = subprocess.run([sys.executable, "-m", "dpo_lightning", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m dpo_lightning") and "export CKPT OUT_DIR" in out.stdout
    for subcommand in ("fit", "validate", "test"):
        assert subcommand in out.stdout


def test_the_readme_datamodule_example_runs_as_written_on_a_local_model(tmp_path, monkeypatch):
    """README's second example with local paths for the hub ids: it failed with "Error while merging
    hparams: the keys ['tokenizer', 'max_length'] are present in both ..." once a logger was on."""
    import gzip
    import json
    import re

    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs

    tokenizer = build_tokenizer("synthetic:sort")
    tokenizer.save_pretrained(tmp_path / "model")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    with gzip.open(tmp_path / "prefs.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(row) for row in generate_pairs(40, seed=0)))
    monkeypatch.chdir(tmp_path)

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (first,) = [b for b in blocks if "train_dataloaders=my_loader" in b]
    (second,) = [b for b in blocks if "PreferenceDataModule(" in b]
    namespace = {}
    exec(first.split("module = DPOModule(")[0], namespace)  # its imports (the rest needs `my_loader`)
    code = second.replace('"meta-llama/Llama-2-7b-hf"', repr(str(tmp_path / "model")))
    code = code.replace("L.Trainer(max_epochs=1)", "L.Trainer(max_epochs=1, enable_progress_bar=False)")
    exec(code, namespace)
    assert namespace["module"].global_step > 0


def test_num_tokens_counts_every_input_token_trained_on_so_far(tmp_path):
    """train/num_tokens (TRL's name) at a logged step = the non-padding input tokens of every batch trained
    on up to that step, cumulative (the 2B sequences of each pair batch, each prompt on both sides, padding
    excluded), whatever the batch layout."""
    from dpo_lightning.stages.base import input_tokens

    logger = StepLogger()
    seen: list[int] = []

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # Packed and prefix-shared rows (the default) mark the sequence each position scores for, and a
            # sequence's positions run 0..n-1 even where its prompt is shared: n = last position + 1.
            if "sequence_ids" in batch:
                ids, pos = batch["sequence_ids"], batch["position_ids"]
                seen.append(sum(int(pos[ids == s].max()) + 1 for s in range(batch["num_sequences"])))
            else:
                seen.append(int(batch["attention_mask"].sum()))

    cli = cli_main(args(tmp_path, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "3"), run=False)
    cli.trainer.loggers = [cli.trainer.logger, logger]
    cli.trainer.callbacks.append(Count())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rows = {step: row for step, row in logger.rows.items() if "train/num_tokens" in row}
    assert sorted(rows) == [3, 6]
    assert rows[3]["train/num_tokens"] == sum(seen[:3]) and rows[6]["train/num_tokens"] == sum(seen)
    packed = {"sequence_ids": torch.tensor([[0, 0, 1, -1], [2, 2, 2, 3]])}
    assert input_tokens(packed) == 7 and seen[0] < 2 * 32 * 64  # padding is not counted


def test_progress_bar_counts_optimizer_steps_and_shows_margin_and_accuracy(tmp_path):
    """With accumulation 2, 6 optimizer steps are 12 micro-batches: the bar reads 6/6 (Lightning's own would
    read 12/12), shows the loss, reward margin and accuracy, and a resumed run's bar starts at its step."""
    from dpo_lightning.training.callbacks import StepProgressBar

    extra = ("--trainer.max_steps", "6", "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "2",
             "--trainer.enable_progress_bar", "true", "--checkpoint.save_every_n_steps", "3")
    cli = cli_main(["fit", *args(tmp_path, *extra)])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)
    shown = bar.get_metrics(cli.trainer, cli.model)
    assert {"loss", "margin", "acc"} <= shown.keys()
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    more = cli_main(args(tmp_path, *extra[:-2], "--trainer.max_steps", "8"), run=False)
    starts = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            starts.append(trainer.progress_bar_callback.train_progress_bar.n)

    more.trainer.callbacks.append(Watch())
    more.trainer.fit(more.model, datamodule=more.datamodule, ckpt_path=str(last))
    assert starts[0] == 6 and more.trainer.progress_bar_callback.train_progress_bar.n == 8


@pytest.mark.parametrize("given", ["none", "the data's object"])
@pytest.mark.parametrize("spec", ["folder", "synthetic:sort"])
def test_the_module_and_data_module_in_ones_own_trainer_with_a_logger(tmp_path, given, spec):
    """Drop-in (user trial 2): `DPOModule(model=folder)` (no tokenizer: the folder's), or README's
    ``tokenizer=data.tokenizer`` with a tokenizer spec such as ``synthetic:sort``, beside `PreferenceDataModule` in
    a Trainer with any logger failed: "Error while merging hparams: the keys ['tokenizer'] ... different values".
    Both record the data module's tokenizer, in the logged hyper-parameters and in the checkpoint."""
    from lightning.pytorch.loggers import CSVLogger

    from dpo_lightning import DPOModule, PreferenceDataModule

    from tiny import save_sort_policy

    folder = save_sort_policy(tmp_path / "policy")
    data = PreferenceDataModule(tokenizer=folder if spec == "folder" else spec, dataset="synthetic:sort",
                                batch_size=4, max_length=64, max_prompt_length=32)
    module = DPOModule(model=folder, tokenizer=None if given == "none" else data.tokenizer)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, logger=CSVLogger(tmp_path / "logs"),
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    wanted = data.hparams["tokenizer"]
    assert module.hparams["tokenizer"] == wanted
    hparams = (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()
    assert f"tokenizer: {wanted}" in hparams
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path or next(Path(tmp_path).rglob("*.ckpt")),
                      map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["tokenizer"] == wanted
