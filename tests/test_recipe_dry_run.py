"""Every 7B/8B training recipe, as written, trains 2 optimizer steps on CPU with a tiny random-init Llama and
writes last.ckpt and the Hugging Face export (tests/scripts/recipe_dry_run.py lists what is overridden:
devices, the model, tokenizer and data, lengths, precision). FSDP2 recipes run on 2 processes (gloo).

The default suite runs recipes/llama7b.yaml; the others are marked slow (``pytest -m slow``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "recipe_dry_run.py"
# Training recipes for 7B/8B models (generate and iterate recipes are parsed by tests/test_cli.py and test_pipeline.py).
RECIPES = sorted(
    p for p in (ROOT / "recipes").glob("llama*.yaml")
    if "python -m dpo_lightning fit --config" in p.read_text()
)
DEFAULT = "llama7b.yaml"


def dry_run(recipe: Path, work: Path, *extra: str) -> dict:
    config = yaml.safe_load(recipe.read_text())
    devices = min(int(config["trainer"].get("devices", 1)), 2)
    # A launcher's variables left in this process (an in-process distributed run) would make the script
    # think it is a re-launched rank: start from a clean slate.
    launched = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPT), str(recipe), "--work", str(work), "--devices", str(devices)]
    proc = subprocess.run(
        [*command, *(["--", *extra] if extra else [])],
        cwd=work, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((work / "result.json").read_text())
    result["devices"] = devices
    return result


def check(result: dict, recipe: Path) -> None:
    assert result["global_step"] == 2
    assert result["world_size"] == result["devices"]
    if "ModelParallelStrategy" in recipe.read_text():
        assert result["strategy"] == "ModelParallelStrategy"
    assert result["last_ckpt"], "no last.ckpt"
    assert "config.json" in result["export"] and "model.safetensors" in result["export"]
    assert "tokenizer_config.json" in result["export"]
    # The recipe's gradient_clip_val: 1.0 ran on every optimizer step and left min(norm, 1) behind.
    clip = yaml.safe_load(recipe.read_text())["trainer"]["gradient_clip_val"]
    assert clip == 1.0 and len(result["norms"]) == 2
    for before, after, clip_val in result["norms"]:
        assert clip_val == clip and after == pytest.approx(min(before, clip), rel=1e-4)


def _params(recipes):
    return [pytest.param(r, id=r.name, marks=() if r.name == DEFAULT else pytest.mark.slow) for r in recipes]


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_recipe_dry_runs_on_cpu(recipe, tmp_path):
    check(dry_run(recipe, tmp_path), recipe)


@pytest.mark.slow
def test_gradient_clipping_bites_under_fsdp2(tmp_path):
    """Lightning 2.6 clips FSDP2's sharded (DTensor) gradients by their global norm: with a clip value below
    the norm, the norm after clipping (gathered over both ranks) is the clip value."""
    result = dry_run(ROOT / "recipes" / DEFAULT, tmp_path, "--trainer.gradient_clip_val", "0.001")
    assert result["strategy"] == "ModelParallelStrategy" and result["world_size"] == 2
    for before, after, _ in result["norms"]:
        assert before > 0.001 and after == pytest.approx(0.001, rel=1e-4)


def test_every_7b_8b_recipe_is_dry_run():
    names = {r.name for r in RECIPES}
    assert {"llama7b.yaml", "llama7b_sft.yaml", "llama7b_rm.yaml", "llama7b_lora.yaml", "llama7b_multinode.yaml",
            "llama3_8b.yaml"} == names
