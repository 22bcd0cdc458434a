"""``validate`` / ``test`` of a checkpoint through the real CLI (in process): they say what they do, log their
metrics at the step the checkpoint was trained to, in a subfolder of its run (``version_N/validate``) that leaves
the training run's logs and ``config.yaml`` as they were, and never take a ``version_N`` a later ``fit`` expects.
And the same step in a user's own ``trainer.validate(ckpt_path=...)``."""

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run(subcommand: str, save_dir: Path, *args: str) -> Path:
    argv = [subcommand, "--config", str(ROOT / "recipes" / "tiny.yaml"),
            "--trainer.logger.init_args.save_dir", str(save_dir), *QUIET, *args]
    return Path(cli_main(argv).trainer.log_dir)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """tiny.yaml for 4 optimizer steps, validated at steps 2 and 4: runs/tiny/version_0."""
    save_dir = tmp_path_factory.mktemp("runs")
    run("fit", save_dir, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--checkpoint.save_every_minutes", "null")
    return save_dir


def test_validate_and_test_of_a_checkpoint_log_at_its_step_beside_the_run_and_leave_the_run_as_it_was(
    trained, caplog
):
    runs = trained / "tiny"
    version = runs / "version_0"
    before = {p.relative_to(version): digest(p) for p in version.rglob("*") if p.is_file()}
    fit_logs = scalars(version)
    assert [step for step, _ in fit_logs["val/loss"]] == [2, 4]

    with caplog.at_level("INFO"):
        log_dir = run("validate", trained, "--ckpt_path", "last")
    assert log_dir == version / "validate"
    assert f"Validating {version / 'checkpoints' / 'last.ckpt'} (optimizer step 4, epoch 0)" in caplog.text
    assert "Resuming" not in caplog.text
    validated = scalars(log_dir)
    assert [step for step, _ in validated["val/loss"]] == [4]
    assert validated["val/loss"][0][1] == pytest.approx(fit_logs["val/loss"][-1][1], abs=1e-6)
    assert validated["epoch"] == [(4, 0.0)]

    best = next((version / "checkpoints").glob("step*.ckpt"))  # the best validation's: a file of its own name
    log_dir = run("test", trained, "--data.test_split", "validation", "--ckpt_path", str(best))
    assert log_dir == version / "test"
    step = torch.load(best, map_location="cpu", weights_only=True)["global_step"]
    assert [s for s, _ in scalars(log_dir)["test/loss"]] == [step]

    # The training run's files (its config.yaml, event file, checkpoints, export) are as they were.
    after = {p.relative_to(version): digest(p) for p in version.rglob("*") if p.is_file()
             and p.relative_to(version).parts[0] not in ("validate", "test")}
    assert after == before
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]


def test_an_evaluation_of_no_run_checkpoint_takes_no_version_a_later_fit_expects(tmp_path):
    log_dir = run("validate", tmp_path)  # the recipe's freshly initialised policy: no checkpoint at all
    assert log_dir == tmp_path / "tiny" / "validate" / "version_0"
    assert (log_dir / "config.yaml").is_file()
    assert "val/loss" in scalars(log_dir)
    assert run("validate", tmp_path) == tmp_path / "tiny" / "validate" / "version_1"
    log_dir = run("fit", tmp_path, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                  "--checkpoint.save_every_minutes", "null")
    assert log_dir == tmp_path / "tiny" / "version_0"


def test_trainer_validate_of_a_checkpoint_in_a_users_own_code_logs_at_its_step(trained, tmp_path):
    """Drop-in use: the stage's own ``on_load_checkpoint`` puts the metrics at the checkpoint's step, whichever
    logger the user's Trainer has."""
    ckpt = trained / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, map_location="cpu", weights_only=False)
    def settings(key: str) -> dict:  # (without jsonargparse's `_class_path`)
        return {k: v for k, v in hparams[key].items() if not k.startswith("_")}

    module = DPOModule(**settings("hyper_parameters"))
    data = PreferenceDataModule(**settings("datamodule_hyper_parameters"))
    logger = CSVLogger(tmp_path, name="mine")
    trainer = L.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=data, ckpt_path=str(ckpt))[0]
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = dict(zip(header, rows[1].split(","), strict=True))
    assert int(values["step"]) == 4
    assert float(values["val/loss"]) == pytest.approx(metrics["val/loss"], abs=1e-6)
