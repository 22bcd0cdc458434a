"""Nothing lost, nothing silent, through the real CLI: a diverging run stops before NaN reaches the
weights, a checkpoint or an export; runs without validation data are checkpointed as they go;
preemption saves and exits non-zero; ``--ckpt_path last`` resumes the latest run in its own folder,
bitwise as if never stopped; concurrent runs never share a folder; bad checkpoints and sources are
named before anything loads."""

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from dpo_lightning import DPOModule
from dpo_lightning.cli import DPOLightningCLI, cli_main, main
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.training.callbacks import PREEMPTED_EXIT_CODE, NonFiniteError
from dpo_lightning.training.preemption import INTERRUPTED_EXIT_CODE, PreemptionWatch, preemption_signal
from dpo_lightning.training.runs import claim_version

from tiny import Crash, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def fit_args(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    """The tiny recipe, no validation split, checkpoints every 4 optimizer steps, logs under tmp_path."""
    return [
        "fit", "--config", str(ROOT / "recipes/tiny.yaml"),
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.val_split", "null",
        "--data.batch_size", "8",
        "--checkpoint.save_every_n_steps", "4",
        "--checkpoint.save_every_minutes", "null",
        *extra,
    ]


def build(args: list[str]):
    """The CLI's objects for ``fit ARGS`` without running it."""
    assert args[0] == "fit"
    return cli_main(args[1:], run=False)


def weights(module: DPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_dir(tmp_path: Path, version: int = 0) -> Path:
    return tmp_path / "runs" / "tiny" / f"version_{version}"


# ---------------------------------------------------------------------------------------- non-finite


def test_diverging_run_stops_with_exit_1_and_exports_nothing(tmp_path, capsys):
    """SGD at lr 1e20: the first update makes the weights inf; the run stops at the next check
    (a save point or the next loss), exit 1, one line naming the step and the learning rate; no
    export is written and no checkpoint holds a non-finite tensor."""
    args = fit_args(
        tmp_path, 30, "--model.optimizer.class_path", "torch.optim.SGD", "--model.optimizer.init_args.lr", "1e20",
        "--checkpoint.save_every_n_steps", "1",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "dpo_lightning: error:" in err and "non-finite" in err or "NaN or inf" in err
    assert "learning rate too high (lr=" in err
    assert not (run_dir(tmp_path) / "hf_export").exists()
    for ckpt in run_dir(tmp_path).rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), ckpt


def test_nonfinite_loss_stops_before_the_step_is_applied(tmp_path):
    """A loss that turns NaN at step 3 raises NonFiniteError before optimizer step 3: the weights
    are those after step 2, finite, and last.ckpt (written every step) holds step 2."""
    from lightning.pytorch.callbacks import Callback

    class PoisonLoss(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                batch["labels"][0, -1] = 10**6  # out-of-vocabulary label -> the pure loss cannot be finite
    cli = build(fit_args(tmp_path, 10, "--checkpoint.save_every_n_steps", "1"))
    before = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.update(weights(pl_module))

    with pytest.raises(Exception):  # the poisoned label may fail in gather before the guard sees it
        cli.trainer.callbacks += [PoisonLoss(), Snapshot()]
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # Independent of how the poison surfaced: no step past 2 was applied or saved.
    assert cli.trainer.global_step == 2
    last = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2


def test_guard_raises_on_nan_gradients(tmp_path):
    """NaN gradients with a finite loss (a NaN weight that only gradients see): NonFiniteError, weights untouched."""
    from lightning.pytorch.callbacks import Callback

    class PoisonGrad(Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 1:
                next(p for p in pl_module.model.parameters() if p.grad is not None).grad[0] = float("nan")

    cli = build(fit_args(tmp_path, 10))
    cli.trainer.callbacks.insert(0, PoisonGrad())
    snapshot = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshot.clear()
            snapshot.update(weights(pl_module))

    cli.trainer.callbacks.insert(0, Snapshot())
    with pytest.raises(NonFiniteError, match="non-finite gradients at optimizer step 2"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert_bitwise(weights(cli.model), snapshot)  # the poisoned step was not applied


# ---------------------------------------------------------------------------------------- resume


def test_no_validation_checkpoints_periodically_and_ckpt_path_last_resumes_exactly(tmp_path):
    """No validation split. Crash after step 6 (last.ckpt written at step 4), then `--ckpt_path last`
    from a fresh command: it finds version_0's last.ckpt, continues in version_0 and ends bitwise
    equal to an uninterrupted 10-step run."""
    straight = cli_main(fit_args(tmp_path / "a", 10))
    expected = weights(straight.model)

    crashed = tmp_path / "b"
    with pytest.raises(Crash):
        cli_main(fit_args(crashed, 10, "--trainer.callbacks+", "tiny.CrashAfterStep", "--trainer.callbacks.step", "6"))
    last = run_dir(crashed) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4

    resumed = cli_main(fit_args(crashed, 10, "--ckpt_path", "last"))
    assert Path(resumed.trainer.log_dir) == run_dir(crashed)
    assert not run_dir(crashed, 1).exists()
    assert resumed.trainer.global_step == 10
    assert_bitwise(weights(resumed.model), expected)
    # The final state of the fit is in last.ckpt, whatever the save schedule (10 is not a multiple of 4).
    assert torch.load(last, weights_only=True)["global_step"] == 10


def test_resume_at_an_epoch_boundary_with_dropout_is_exact(tmp_path):
    """Dropout on, 5 batches per epoch, last.ckpt at step 5 (the last batch of epoch 0), crash in
    epoch 1, resume: bitwise equal to the uninterrupted run. The training loader used to draw its
    workers' seed from the global RNG when epoch 1 began, a draw the resume could not replay."""
    dropout = tmp_path / "dropout.yaml"
    dropout.write_text(
        "model:\n  init_args:\n    disable_dropout: false\n    model_config:\n      model_type: llama\n"
        "      hidden_size: 64\n      intermediate_size: 128\n      num_hidden_layers: 2\n"
        "      num_attention_heads: 4\n      num_key_value_heads: 4\n      max_position_embeddings: 64\n"
        "      attention_dropout: 0.1\n"
    )
    extra = ("--config", str(dropout), "--trainer.limit_train_batches", "5", "--checkpoint.save_every_n_steps", "5")
    straight = cli_main(fit_args(tmp_path / "a", 8, *extra))
    with pytest.raises(Crash):
        cli_main(fit_args(tmp_path / "b", 8, *extra, "--trainer.callbacks+", "tiny.CrashAfterStep",
                          "--trainer.callbacks.step", "6"))
    assert torch.load(run_dir(tmp_path / "b") / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    resumed = cli_main(fit_args(tmp_path / "b", 8, *extra, "--ckpt_path", "last"))
    assert_bitwise(weights(resumed.model), weights(straight.model))


def test_ckpt_path_last_without_a_previous_run_warns_and_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="no last.ckpt under .*starting a new run from step 0"):
        cli = cli_main(fit_args(tmp_path, 2, "--ckpt_path", "last"))
    assert cli.trainer.global_step == 2


def test_changed_hyperparameters_on_resume_apply_and_are_listed(tmp_path):
    cli_main(fit_args(tmp_path, 4))
    with pytest.warns(UserWarning, match=r"model\.beta: 0\.1 \(checkpoint\) -> 0\.5 \(now\)"):
        cli = cli_main(fit_args(tmp_path, 6, "--ckpt_path", "last", "--model.beta", "0.5"))
    assert cli.model.hparams.beta == 0.5  # Lightning's CLI would have put the checkpoint's 0.1 back


# ---------------------------------------------------------------------------------------- preemption


def test_sigterm_saves_at_an_optimizer_step_and_exits_143_then_resumes_exactly(tmp_path, capsys):
    """SIGTERM in the middle of an accumulation (batch 5 of 2-batch steps): the run finishes that
    optimizer step, writes last.ckpt at step 3, exits 143 (not 0); the resumed run equals an
    uninterrupted one bitwise."""
    accumulate = ("--trainer.accumulate_grad_batches", "2")
    straight = cli_main(fit_args(tmp_path / "a", 8, *accumulate))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "b", 8, *accumulate, "--trainer.callbacks+", "tiny.SignalAtBatch",
                      "--trainer.callbacks.batch", "4"))
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert "preempted: received SIGTERM" in capsys.readouterr().err
    last = run_dir(tmp_path / "b") / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not (run_dir(tmp_path / "b") / "hf_export").exists()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))

    resumed = cli_main(fit_args(tmp_path / "b", 8, *accumulate, "--ckpt_path", "last"))
    assert_bitwise(weights(resumed.model), weights(straight.model))


def test_ctrl_c_saves_at_an_optimizer_step_and_exits_130_then_resumes_exactly(tmp_path, capsys, default_sigint):
    """Ctrl-C (SIGINT) is a person's preemption: the run finishes the optimizer step, writes last.ckpt, says how
    to resume and exits 130 (the shell's status for Ctrl-C); the resumed run equals an uninterrupted one."""
    accumulate = ("--trainer.accumulate_grad_batches", "2")
    straight = cli_main(fit_args(tmp_path / "a", 8, *accumulate))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "b", 8, *accumulate, "--trainer.callbacks+", "tiny.SignalAtBatch",
                      "--trainer.callbacks.batch", "4", "--trainer.callbacks.signum", str(int(signal.SIGINT))))
    assert exit_info.value.code == INTERRUPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert "interrupted: received SIGINT" in err and "--ckpt_path last" in err
    last = run_dir(tmp_path / "b") / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is the program's again

    resumed = cli_main(fit_args(tmp_path / "b", 8, *accumulate, "--ckpt_path", "last"))
    assert_bitwise(weights(resumed.model), weights(straight.model))


def test_a_second_ctrl_c_stops_at_once(default_sigint):
    """The first Ctrl-C asks for a stop at the next safe point; the second is Python's KeyboardInterrupt."""
    with PreemptionWatch("saving, then stopping"):
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption_signal() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------- run folders


def test_concurrent_runs_claim_distinct_folders(tmp_path):
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(claim_version(tmp_path))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(16))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"version_{i}" for i in range(16))


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """Both CLIs are parsed before either trains (as two jobs launched at once): distinct versions."""
    class BuildOnlyCLI(DPOLightningCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            pass

    first = cli_main(fit_args(tmp_path, 1), cli_class=BuildOnlyCLI)
    second = cli_main(fit_args(tmp_path, 1), cli_class=BuildOnlyCLI)
    assert (first.trainer.logger.version, second.trainer.logger.version) == (0, 1)
    assert first.trainer.log_dir != second.trainer.log_dir


# ---------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"PK\x03\x04 truncated", "not a"),
        ("safetensors", "safetensors"),
    ],
    ids=["empty", "truncated", "safetensors"],
)
def test_bad_checkpoint_is_named_before_the_model_is_built(tmp_path, monkeypatch, capsys, content, message):
    bad = tmp_path / "last.ckpt"
    if content == "safetensors":  # real weights, given where a training checkpoint belongs
        from safetensors.torch import save_file

        bad = tmp_path / "model.safetensors"
        save_file({"w": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(content)

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr("dpo_lightning.models.loading.load_model", no_build)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, 2, "--ckpt_path", str(bad)))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert str(bad) in err and message in err.lower()


def test_missing_local_model_path_says_no_such_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_causal_lm("./checkpoints/my-sft-model")
    from dpo_lightning.data import load_tokenizer

    with pytest.raises(FileNotFoundError, match="tokenizer './my-tokenizer': no such file or folder"):
        load_tokenizer("./my-tokenizer")


def test_tokenizer_larger_than_the_embedding_table_is_refused_at_init():
    from dpo_lightning.data.synthetic import build_tokenizer

    tokenizer = build_tokenizer("synthetic:sort")
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tokenizer)} tokens but the model's embedding"):
        DPOModule(model_config=tiny_config(vocab_size=len(tokenizer) - 3), tokenizer=tokenizer)


def test_the_checkpoint_block_in_docs_reliability_parses_through_the_cli(tmp_path):
    import re

    import yaml

    text = (ROOT / "docs/reliability.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "save_every_n_steps" in b)
    (tmp_path / "ckpt.yaml").write_text(block)
    cli = build(fit_args(tmp_path, 1)[:3] + ["--config", str(tmp_path / "ckpt.yaml")])
    checkpoint = cli.trainer.checkpoint_callback
    expected = yaml.safe_load(block)["checkpoint"]
    assert (checkpoint.save_every_n_steps, checkpoint.save_every_minutes, checkpoint.save_on_preemption) == (
        expected["save_every_n_steps"], expected["save_every_minutes"], expected["save_on_preemption"]
    )
