"""The real CLI: every recipe parses; --help and --print_config work; the tiny recipe trains,
logs to TensorBoard and exports a model that loads back with from_pretrained."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dpo_lightning.cli import DPOLightningCLI, GenerateCLI, cli_main, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


class ParseOnlyCLI(DPOLightningCLI):
    """Parses and validates a config against every signature and runs the settings preflight (FSDP1,
    packing + flash attention, bf16 steps), but reads no data and builds nothing (no downloads)."""

    def check_data(self, config) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


class ParseOnlyGenerateCLI(GenerateCLI):
    """The `generate` command, parse only: the judge's files need not exist, nothing is built."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse(*args: str) -> dict:
    """The config `python -m dpo_lightning fit ARGS` would run with."""
    return cli_main(["fit", *args], cli_class=ParseOnlyCLI).config["fit"]


GENERATE_RECIPES = [r for r in RECIPES if "dpo_lightning generate --config" in r.read_text()]
# `iterate` recipes name stage recipes; tests/test_pipeline.py parses them and the recipes they name.
ITERATE_RECIPES = [r for r in RECIPES if "dpo_lightning iterate --config" in r.read_text()]  # (torchrun -m too)
FIT_RECIPES = [r for r in RECIPES if r not in GENERATE_RECIPES + ITERATE_RECIPES]


@pytest.mark.parametrize("recipe", FIT_RECIPES, ids=lambda r: r.name)
def test_every_recipe_parses_through_the_real_cli(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe opens with a comment: launch command, hardware, memory"
    assert "python -m dpo_lightning fit --config" in recipe.read_text()
    config = parse("--config", str(recipe))
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert data["tokenizer"] == model["tokenizer"]  # linked, given once
    assert data["max_length"] == model["max_length"]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "dpo_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_lists_options_with_their_docstrings(capsys):
    def _run(*args: str) -> SimpleNamespace:  # in process: one import, not one per help page (60 s -> 10 s)
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=exit_info.value.code or 0, stdout=out.out, stderr=out.err)

    out = _run("fit", "--help")
    assert out.returncode == 0, out.stderr
    assert "--model.help" in out.stdout and "--data.help" in out.stdout
    # The stage's own options (the recipe's model.class_path chooses the stage; DPOModule by default).
    for stage, option, doc in [
        ("DPOModule", "--model.beta", "Strength of the KL penalty"),
        ("KTOModule", "--model.desirable_weight", "Weight of desirable examples"),
        ("SFTModule", "--model.memory", "Memory knobs"),
        ("RewardModule", "--model.center_rewards_coefficient", "keeps rewards centred"),
    ]:
        out = _run("fit", "--model.help", stage)
        assert out.returncode == 0, out.stderr
        assert option in out.stdout and doc in out.stdout and "--model.lora" in out.stdout
    # The data module's options (data.class_path chooses it; PreferenceDataModule by default).
    for data, option, doc in [
        ("PreferenceDataModule", "--data.max_prompt_length", "Longest prompt in tokens"),
        ("PreferenceDataModule", "--data.drop_identical", "Drop pairs whose chosen equals rejected"),
        ("SFTDataModule", "--data.completion_only_loss", "Train on the completion"),
        # the settings every data module shares, declared once (TokenizedDataModule.__init__)
        ("SFTDataModule", "--data.val_fraction", "Fraction of the train split held out"),
        ("KTODataModule", "--data.max_length", "Longest sequence (prompt + response) in tokens"),
        ("KTODataModule", "--data.collator", "N padded example rows and N KL rows"),
    ]:
        out = _run("fit", "--data.help", data)
        assert out.returncode == 0, out.stderr
        assert option in out.stdout and doc in " ".join(out.stdout.split())  # the help wraps lines
    assert _run("--help").returncode == 0


def test_print_config_is_complete_and_rerunnable(tmp_path):
    out = _run("fit", "--config", "recipes/tiny.yaml", "--print_config")
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["model"]["init_args"]["beta"] is not None
    assert config["data"]["init_args"]["tokenizer"] == "synthetic:sort"
    (tmp_path / "printed.yaml").write_text(out.stdout)
    reparsed = parse("--config", str(tmp_path / "printed.yaml"))
    assert reparsed["model"]["init_args"]["beta"] == config["model"]["init_args"]["beta"]
    assert reparsed["data"]["init_args"]["dataset"] == "synthetic:sort"


def test_tiny_recipe_trains_logs_and_exports(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    cli = cli_main(
        [
            "fit", "--config", str(ROOT / "recipes/tiny.yaml"),
            "--trainer.max_steps", "120", "--trainer.val_check_interval", "60",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["val/rewards/accuracies"] > 0.75  # chance is 0.5 and step 0 is 0 (all ties)

    run_dir = Path(cli.trainer.log_dir)
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {run_dir}"
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert "val/rewards/accuracies" in acc.Tags()["scalars"]
    assert "train/loss" in acc.Tags()["scalars"]

    export = run_dir / "hf_export"
    assert (export / "model.safetensors").exists() and (export / "generation_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(export).eval()
    module = cli.model.eval()
    ids = torch.tensor([[1, 4, 8, 9, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits)

    # Any checkpoint exports later, through the same command a user runs.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    main(["export", str(ckpt), str(tmp_path / "from_ckpt")])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, module.model(ids).logits)


@pytest.mark.parametrize("recipe", GENERATE_RECIPES, ids=lambda r: r.name)
def test_every_generate_recipe_parses_through_the_generate_cli(recipe):
    """`generate` recipes: every key checked against GenerationModule, PromptDataModule and the writer."""
    from dpo_lightning.cli import generate_main

    assert recipe.read_text().startswith("#")
    config = generate_main(["--config", str(recipe)], cli_class=ParseOnlyGenerateCLI).config["predict"]
    assert config["model"]["tokenizer"] == config["data"]["tokenizer"]  # linked
    assert config["output"]["judge"] and config["return_predictions"] is False
