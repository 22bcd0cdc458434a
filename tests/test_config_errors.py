"""Config mistakes in one or two lines (issue #25): the option, the reason, the fix; "did you mean" for a
misspelling, the option here for TRL's name. Through the real CLI: a subprocess for the line counts (what a
user sees on stderr), in-process for the rest of the cases."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def _stderr(capsys, *args: str) -> list[str]:
    """``main`` in-process; the error lines it printed (it must exit non-zero)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code not in (0, None)
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("Seed set to")]


def test_the_migration_docs_examples_are_what_the_cli_prints(tmp_path):
    """docs/migrating_from_trl.md shows two mistakes and their messages; run each as a user would (its own
    process) and compare stderr line for line: two lines each, where jsonargparse printed ~80."""
    doc = (ROOT / "docs" / "migrating_from_trl.md").read_text()
    block = re.search(r"```text\n(\s*\$ python -m dpo_lightning fit.*?)```", doc, flags=re.S).group(1)
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    examples = []
    for line in lines:
        if line.startswith("$ "):
            examples.append((line[2:].split()[3:], []))  # after `python -m dpo_lightning`
        else:
            examples[-1][1].append(line)
    assert len(examples) == 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "dpo_lightning", *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, _ in examples]
    for proc, (_, expected) in zip(procs, examples):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert [line.strip() for line in err.splitlines()] == expected


def test_a_config_file_mistake_names_the_option_and_the_fix(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("trainer:\n  max_step: 10\n")
    assert _stderr(capsys, "fit", "--config", TINY, "--config", str(recipe)) == [
        "dpo_lightning: error: --trainer.max_step: no such option", "  did you mean --trainer.max_steps?"]
    recipe.write_text("model:\n  learning_rate: 1.0e-5\n")
    out = _stderr(capsys, "fit", "--config", TINY, "--config", str(recipe))
    assert out[0] == "dpo_lightning: error: --model.learning_rate: not an option of DPOModule"
    assert "TRL's learning_rate is --model.optimizer.init_args.lr here" in out[1] and len(out) == 2
    recipe.write_text("model:\n  optimizer:\n    init_args:\n      lr: abc\n")  # the value and the type it wants
    assert _stderr(capsys, "fit", "--config", TINY, "--config", str(recipe)) == [
        "dpo_lightning: error: --model.optimizer.init_args.lr: expected float or torch.Tensor, got 'abc'"]


@pytest.mark.parametrize("command", [["fit", "--config", TINY], ["generate"], ["iterate"]])
def test_a_prefix_of_an_option_on_the_command_line_is_a_typo_not_that_option(capsys, command):
    """argparse took a unique prefix (`--trainer.max_step 3`) for the option (`max_steps`) silently."""
    option = {"iterate": "--round", "generate": "--output.output_di"}.get(command[0], "--trainer.max_step")
    out = _stderr(capsys, *command, option, "3")
    assert out[0].startswith("dpo_lightning: error:") and option in out[0], out


@pytest.mark.parametrize(("args", "first", "fix"), [
    (["--model.max_grad_norm", "1.0"], "--model.max_grad_norm: not an option of DPOModule",
     "TRL's max_grad_norm is --trainer.gradient_clip_val here"),
    (["--per_device_train_batch_size", "4"], "--per_device_train_batch_size: no such option",
     "TRL's per_device_train_batch_size is --data.batch_size here"),
    (["--checkpoint.save_stepss", "3"], "--checkpoint.save_stepss: no such option",
     "TRL's save_steps is --checkpoint.save_every_n_steps here"),
    (["--data.collator", "packk"], "--data.collator: 'packk' is not one of auto, share, pack, pad, kto",
     "did you mean --data.collator pack?"),
    (["--model.memory.lean_logprob", "false"], "--model.memory.lean_logprob: not an option of MemoryOptions",
     "did you mean --model.memory.lean_logprobs?"),
    (["--model.optimizer.init_args.lrr", "0.1"], "--model.optimizer.init_args.lrr: not an option of AdamW",
     "did you mean --model.optimizer.init_args.lr?"),
    (["--model.class_path", "dpo_lightning.SFTModul"], "--model.class_path: no class dpo_lightning.SFTModul",
     "did you mean dpo_lightning.SFTModule?"),
    # TRL names (user trial 2: each was answered with an unrelated option, or nothing): the exact name first
    (["--model.use_weighting", "true"], "--model.use_weighting: not an option of DPOModule",
     "TRL's use_weighting (WPO) is not supported: "),
    (["--model.ld_alpha", "0.5"], "--model.ld_alpha: not an option of DPOModule",
     "TRL's ld_alpha (LD-DPO) is not supported: "),
    (["--model.f_divergence_type", "js_divergence"], "--model.f_divergence_type: not an option of DPOModule",
     "TRL's f_divergence_type (f-DPO) is not supported: "),
    (["--model.cpo_alpha", "1.0"], "--model.cpo_alpha: not an option of DPOModule",
     "TRL's cpo_alpha is --model.loss_kwargs.cpo_alpha with --model.loss_type cpo (TRL's loss_type sigmoid), or "
     "--model.loss_weights '[1.0, ALPHA]' with --model.loss_type '[simpo, sft]' (TRL's simpo) here"),
    (["--model.simpo_gamma", "0.5"], "--model.simpo_gamma: not an option of DPOModule",
     "TRL's simpo_gamma is --model.loss_kwargs.simpo_gamma (with --model.loss_type simpo) here"),
    (["--model.reference_free", "true"], "--model.reference_free: not an option of DPOModule",
     "TRL's reference_free is --model.loss_type cpo --model.loss_kwargs.cpo_alpha 0 "),
    (["--model.betta", "0.2"], "--model.betta: not an option of DPOModule", "did you mean --model.beta?"),
    # TRL's names without an option here are config fields, never an optimizer's argument (nor a misspelt one)
    (["--model.optimizer.init_args.alpha", "0.5"], "--model.optimizer.init_args.alpha: not an option of AdamW",
     "AdamW takes: "),
    (["--model.beta", "abc"], "--model.beta: expected float, got 'abc'", None),
    # a value inside the optimizer's init_args (user trial: the line stopped at `Parser key "lr":`)
    (["--model.optimizer.init_args.lr", "abc"], "--model.optimizer.init_args.lr: expected float or torch.Tensor, "
                                                "got 'abc'", None),
    (["--model.optimizer.init_args.weight_decay", "x"], "--model.optimizer.init_args.weight_decay: expected float, "
                                                        "got 'x'", None),
])
def test_parse_mistakes(capsys, args, first, fix):
    out = _stderr(capsys, "fit", "--config", TINY, *args)
    assert out[0] == f"dpo_lightning: error: {first}"
    assert (out[1:] == []) if fix is None else (len(out) == 2 and fix in out[1])


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.loss_type", "sigmod"], "model (DPOModule): Unknown loss_type 'sigmod' (did you mean 'sigmoid'?)."),
    (["--model.reference", "precomputd"], "model (DPOModule): unknown reference 'precomputd' (did you mean "
                                          "'precomputed'?): use one of"),
    (["--model.lora.r", "0"], "model (DPOModule): lora.r must be >= 1, got 0"),  # an option group's own check
])
def test_a_class_refusing_its_settings_is_one_line(capsys, args, expected):
    """Raised while the stage is built (before any weights load), wrapped by jsonargparse: one line."""
    out = _stderr(capsys, "fit", "--config", TINY, "--trainer.logger", "false", *args)
    assert len(out) == 1 and out[0].startswith(f"dpo_lightning: error: {expected}"), out


def test_iterate_and_generate_errors_are_short_too(capsys):
    pipeline = str(ROOT / "recipes" / "pipeline_tiny.yaml")
    assert _stderr(capsys, "iterate", "--config", pipeline, "--roundz", "2") == [
        "dpo_lightning: error: --roundz: no such option", "  did you mean --rounds?"]
    generate = str(ROOT / "recipes" / "tiny_generate.yaml")
    assert _stderr(capsys, "generate", "--config", generate, "--model.temprature", "0.7") == [
        "dpo_lightning: error: --model.temprature: no such option", "  did you mean --model.temperature?"]


def test_a_stage_given_the_other_stages_data_module_is_one_line(capsys):
    out = _stderr(capsys, "fit", "--config", TINY, "--trainer.logger", "false", "--data.class_path",
                  "dpo_lightning.SFTDataModule")
    assert len(out) == 1 and out[0].startswith("dpo_lightning: error: DPOModule trains on 'pairs' batches")


def test_a_bug_while_building_keeps_its_traceback(tmp_path, monkeypatch):
    """Only a class's ValueError is a config mistake: anything else (a bug) is raised as it was."""
    import dpo_lightning.stages.dpo as dpo

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a setting")

    monkeypatch.setattr(dpo, "check_loss_config", broken)
    with pytest.raises(ValueError) as info:
        main(["fit", "--config", TINY, "--trainer.logger", "false"])
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, RuntimeError)
