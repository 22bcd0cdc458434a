"""recipes/pipeline_tiny_rm.yaml: iterative DPO whose pairs are judged by a reward-model export while the report
scores every round with the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from dpo_lightning import PreferenceDataModule, RewardModule
from dpo_lightning.data.synthetic import generate_pairs, sort_reward
from dpo_lightning.generation.judges import RewardModelJudge
from dpo_lightning.stages.export import export_hf

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pipeline_tiny_rm.yaml"
RM_IN_RECIPE = "runs/tiny_rm/version_0/hf_export"


def test_the_recipe_parses_judges_with_the_reward_model_and_reports_the_ground_truth():
    from jsonargparse import ActionConfigFile, ArgumentParser
    from test_cli import ParseOnlyCLI, ParseOnlyGenerateCLI

    import dpo_lightning.cli as cli
    from dpo_lightning.pipeline import iterate

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(iterate, as_positional=False)
    config = parser.parse_args(["--config", str(RECIPE)])
    assert config.rounds == 3 and config.evaluation.judge == "function:dpo_lightning.data.synthetic:sort_reward"
    for stage in (config.sft, config.dpo):
        cli.cli_main(["fit", "--config", str(ROOT / stage.config), *stage.args], cli_class=ParseOnlyCLI)
    generate = cli.generate_main(["--config", str(ROOT / config.generate.config), *config.generate.args],
                                 cli_class=ParseOnlyGenerateCLI).config["predict"]
    assert generate["output"]["judge"] == f"reward_model:{RM_IN_RECIPE}"
    assert generate["output"]["judge_options"] == {"batch_size": 256}


def _reward_model(folder: Path) -> Path:
    """A tiny random-init reward model (score head moved off its init, so its scores differ), exported."""
    data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=generate_pairs(2, 0), val_split=None,
                                max_length=64)
    torch.manual_seed(0)
    rm = RewardModule(model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64},
                      tokenizer=data.tokenizer)
    with torch.no_grad():
        rm.model.score.weight.normal_()
    export_hf(rm.model, rm.tokenizer, folder)
    return folder


def test_reward_model_judged_pipeline_runs_and_reports_the_ground_truth(tmp_path):
    """One short round of the recipe (stages cut to a few steps and prompts): the round's samples carry the
    reward model's scores (recomputed here with RewardModelJudge: equal to 1e-5, so the judge the recipe names
    is the one that ran), its pairs prefer the higher reward-model score, and the report's reward is the ground
    truth's (in [0, 1], from the evaluation judge, not the reward model's unbounded scores)."""
    from dpo_lightning.pipeline import Evaluation, evaluate_policy, main

    rm = _reward_model(tmp_path / "rm")
    recipe = yaml.safe_load(RECIPE.read_text())
    gen_args = [a.replace(RM_IN_RECIPE, str(rm)) for a in recipe["generate"]["args"]]
    rows = main(["--config", str(RECIPE), "--output_dir", str(tmp_path / "pipe"), "--rounds", "1",
                 "--sft.config", str(ROOT / "recipes/tiny_sft.yaml"),
                 "--sft.args", json.dumps(["--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]),
                 "--generate.config", str(ROOT / "recipes/tiny_generate.yaml"),
                 "--generate.args", json.dumps([*gen_args, "--data.limit", "16", "--model.num_samples", "4"]),
                 "--dpo.config", str(ROOT / "recipes/tiny.yaml"),
                 "--dpo.args", json.dumps(["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]),
                 "--evaluation.limit", "8", "--evaluation.num_samples", "2"])
    generated = tmp_path / "pipe" / "round_1" / "generate"
    records = [json.loads(line) for line in (generated / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 16 and {r["settings"]["judge"] for r in records} == {f"reward_model:{rm}"}
    judge = RewardModelJudge(str(rm), device="cpu")
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    responses = [s for r in records for s in r["responses"]]
    written = [s for r in records for s in r["scores"]]
    again = judge.score(prompts, responses)
    for w, a in zip(written, again):
        assert (w is None) == (a is None) and (w is None or abs(w - a) < 1e-5)
    assert any(s is not None and not 0 <= s <= 1 for s in written)  # not a reward in [0, 1]: the RM's logits
    pairs = [json.loads(line) for line in (generated / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert [r["round"] for r in rows] == [0, 1] and all(0 <= r["reward"] <= 1 for r in rows)
    # The report's reward is the ground truth's: round 1 measured again with sort_reward as the judge.
    truth = evaluate_policy(rows[1]["policy"], rows[0]["policy"], rows[0]["policy"],
                            Evaluation(judge=f"function:{sort_reward.__module__}:sort_reward", limit=8, num_samples=2))
    assert truth["reward"] == rows[1]["reward"]
