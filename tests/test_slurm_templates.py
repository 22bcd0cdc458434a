"""The SLURM templates (recipes/slurm/*.sbatch, issue #30 item 5): each names recipes that exist, asks for one
task per GPU the recipe trains on (`--ntasks-per-node` = `trainer.devices`, `--nodes` = `trainer.num_nodes`;
otherwise Lightning refuses the launch or waits for ranks that never come), launches through srun, resumes
with the same command, and requeues the job when the command was preempted (exit 143). Every GPU recipe's
header points to a template that fits it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "recipes" / "slurm").glob("*.sbatch"))


def _sbatch(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), re.M))


def _recipes_named(path: Path) -> list[tuple[str, str]]:
    """(command, recipe) of the default launch and of every example in the header."""
    text = path.read_text()
    default = (re.search(r"COMMAND=\$\{COMMAND:-(\w+)\}", text)[1], re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text)[1])
    named = [default]
    for line in re.findall(r"^#\s+sbatch .*$", text, re.M):
        config = re.search(r"CONFIG=(\S+?)[ ,]", line)
        if config:
            command = re.search(r"COMMAND=(\w+)", line)
            named.append((command[1] if command else "fit", config[1]))
    return named


def _trainers(command: str, recipe: str) -> list[dict]:
    """The trainer settings each process of the launch runs with (iterate: each stage's recipe's)."""
    config = yaml.safe_load((ROOT / recipe).read_text())
    if command != "iterate":
        return [config["trainer"]]
    stages = [config[s]["config"] for s in ("sft", "generate", "dpo")]
    return [yaml.safe_load((ROOT / s).read_text())["trainer"] for s in stages]


def test_there_are_templates_for_one_node_and_many():
    assert {p.name for p in TEMPLATES} == {"single_node.sbatch", "multi_node.sbatch"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_each_template_names_existing_recipes_with_one_task_per_gpu(template):
    options = _sbatch(template)
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert {"mem", "time", "signal", "cpus-per-task"} <= options.keys() and "#SBATCH --requeue" in template.read_text()
    named = _recipes_named(template)
    assert len(named) >= 1
    for command, recipe in named:
        assert (ROOT / recipe).is_file(), f"{template.name} names {recipe}, which does not exist"
        for trainer in _trainers(command, recipe):
            assert trainer["accelerator"] == "gpu", recipe
            assert trainer["devices"] == int(options["ntasks-per-node"]), f"{template.name}: {recipe}"
            assert trainer.get("num_nodes", 1) == int(options["nodes"]), f"{template.name}: {recipe}"


def test_every_gpu_recipe_header_points_to_a_template_that_fits_it():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        config = yaml.safe_load(recipe.read_text())
        trainer = config.get("trainer") or _trainers("iterate", f"recipes/{recipe.name}")[0]
        if trainer.get("accelerator") != "gpu":
            continue
        header = "".join(line for line in recipe.read_text().splitlines(True) if line.startswith("#"))
        pointed = re.findall(r"recipes/slurm/(\w+\.sbatch)", header)
        assert pointed, f"{recipe.name}'s header names no recipes/slurm template"
        if trainer["devices"] == 1:
            continue  # one GPU: `python -m ...` as the header says, or srun with one task
        options = _sbatch(ROOT / "recipes" / "slurm" / pointed[0])
        assert int(options["ntasks-per-node"]) == trainer["devices"], recipe.name
        assert int(options["nodes"]) == trainer.get("num_nodes", 1), recipe.name


@pytest.mark.parametrize("exit_status, requeued", [(143, True), (0, False), (1, False)])
def test_the_launch_line_resumes_and_a_preempted_command_requeues_the_job(tmp_path, exit_status, requeued):
    """The template run by bash with srun and scontrol stubbed: srun gets the command (fit resumes from
    `--ckpt_path last`, so the requeued job continues), and exit 143 (a preempted command) requeues the job."""
    calls = tmp_path / "calls"
    for name, status in (("srun", exit_status), ("scontrol", 0)):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\nexit {status}\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    env.pop("CONFIG", None)
    env.pop("COMMAND", None)
    done = subprocess.run(["bash", str(ROOT / "recipes/slurm/single_node.sbatch"), "--trainer.max_steps", "10"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == exit_status
    lines = calls.read_text().splitlines()
    assert lines[0] == ("srun python -m dpo_lightning fit --config recipes/llama7b.yaml --ckpt_path last "
                        "--trainer.max_steps 10")
    assert lines[1:] == (["scontrol requeue 4242"] if requeued else [])
