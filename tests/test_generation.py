"""Generation through trainer.predict: N samples per prompt, seeded, batched left-padded greedy ==
one prompt at a time, prompts from every layout, judged pairs on disk, and a killed run re-run
without duplicates or gaps."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer, sort_reward
from dpo_lightning.generation.module import GenerationModule
from dpo_lightning.generation.writer import JudgedSamplesWriter
from dpo_lightning.stages.export import export_hf

from tiny import save_sort_policy, sort_prompts, tiny_config

SORT = "function:dpo_lightning.data.synthetic:sort_reward"


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return save_sort_policy(tmp_path_factory.mktemp("policy") / "export")


def _trainer(*callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks))


def _sample(policy: str, data: PromptDataModule, **kwargs) -> list[dict]:
    module = GenerationModule(model=policy, tokenizer=data.tokenizer, max_new_tokens=10, **kwargs)
    return [r for batch in _trainer().predict(module, datamodule=data) for r in batch]


def test_n_samples_per_prompt_deterministic_under_a_seed(policy):
    first = _sample(policy, sort_prompts(), num_samples=4, seed=1)
    assert [r["index"] for r in first] == list(range(6))
    assert all(len(r["responses"]) == 4 for r in first)
    assert _sample(policy, sort_prompts(), num_samples=4, seed=1) == first
    other = _sample(policy, sort_prompts(), num_samples=4, seed=2)
    assert [r["responses"] for r in other] != [r["responses"] for r in first]


def test_left_padded_batches_give_the_tokens_of_one_prompt_at_a_time(policy):
    """Greedy: prompts of 3..8 digits padded on the left in batches of 3 decode exactly as each alone."""
    batched = _sample(policy, sort_prompts(batch_size=3), num_samples=1, do_sample=False)
    alone = _sample(policy, sort_prompts(batch_size=1), num_samples=1, do_sample=False)
    assert len({len(r["prompt"]) for r in batched}) > 1  # prompts of different lengths, so padding happened
    assert [r["responses"] for r in batched] == [r["responses"] for r in alone]


def test_responses_continue_the_prompt_as_the_data_modules_tokenize_it(policy):
    """A response is the text that follows the prompt: prompt + response re-tokenizes to the sampled ids
    (the word-level tokenizer's space before the first word is kept)."""
    tokenizer = build_tokenizer()
    for record in _sample(policy, sort_prompts(), num_samples=2, seed=3):
        for response in record["responses"]:
            assert response == "" or response.startswith(" ")
            ids = tokenizer(record["prompt"] + response)["input_ids"]
            assert 0 not in ids  # no <unk>: no word glued to the prompt's "="


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}], "sort: 3 1 ="),
        ([{"chosen": "sort: 2 1 = 1 2", "rejected": "sort: 2 1 = 2 1"}], "sort: 2 1 ="),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
         [{"role": "user", "content": "hi"}]),
    ],
    ids=["prompt-column", "implicit-pair", "messages"],
)
def test_prompts_come_from_every_layout(rows, expected):
    data = PromptDataModule(tokenizer="synthetic:sort", dataset=rows, drop_columns=None)
    if isinstance(expected, list):
        data.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    assert json.loads(data.prompts[0]["prompt"]) == expected


def _generate(policy: str, out, data: PromptDataModule, *, extra=()) -> None:
    module = GenerationModule(model=policy, tokenizer=data.tokenizer, num_samples=4, max_new_tokens=10, seed=5)
    writer = JudgedSamplesWriter(output_dir=str(out), judge=SORT, pairing="best_vs_worst")
    _trainer(writer, *extra).predict(module, datamodule=data, return_predictions=False)


def test_judged_pairs_are_written_and_load_as_preference_data(policy, tmp_path):
    _generate(policy, tmp_path / "out", sort_prompts())
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and len({s["prompt_id"] for s in samples}) == 6
    for s in samples:
        assert s["scores"] == [sort_reward(s["prompt"], r) for r in s["responses"]]
        assert s["settings"]["num_samples"] == 4 and "sort_reward" in s["settings"]["judge"]
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    for p in pairs:
        assert p["score_chosen"] > p["score_rejected"]
    if pairs:
        data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=str(tmp_path / "out" / "pairs.jsonl"),
                                    val_split=None, max_length=64)
        assert len(data.splits["train"]) <= len(pairs)


class _KillAfter(L.Callback):
    """Interrupts the run after `batches` batches were written (the writer runs first)."""

    def __init__(self, batches: int) -> None:
        self.batches, self.seen = batches, 0

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        self.seen += 1
        if self.seen == self.batches:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("killed_after", [1, 3], ids=["mid-run", "after-the-last-batch"])
def test_a_killed_run_rerun_has_no_duplicate_and_no_gap(policy, tmp_path, killed_after):
    """6 prompts in batches of 2; killed after 1 batch (2 prompts written) or after all 3 (before the
    merge): the re-run samples only what is missing and writes every prompt once, in source order."""
    out = tmp_path / "out"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _generate(policy, out, sort_prompts(batch_size=2), extra=(_KillAfter(killed_after),))
    assert not (out / "samples.jsonl").exists()
    written = sum(len(p.read_text().splitlines()) for p in out.glob("samples.part*.jsonl"))
    assert written == 2 * killed_after
    _generate(policy, out, sort_prompts(batch_size=2))
    ids = [json.loads(line)["prompt_id"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert ids == list(sort_prompts().prompts["prompt_id"])  # every prompt once, in source order
    assert (out / "pairs.jsonl").exists() and not list(out.glob("samples.part*.jsonl"))


def test_the_generate_command_runs_the_recipe(policy, tmp_path, monkeypatch):
    """`python -m dpo_lightning generate --config recipes/tiny_generate.yaml`, pointed at a tiny policy and
    20 prompts: samples and pairs on disk; a second run of the same command samples nothing new."""
    from pathlib import Path

    from dpo_lightning.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_generate.yaml"
    out = tmp_path / "gen"
    args = ["generate", "--config", str(recipe), "--model.model", policy, "--data.tokenizer", policy,
            "--data.limit", "20", "--output.output_dir", str(out)]
    main(args)
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 20 and all(len(json.loads(s)["responses"]) == 8 for s in samples)
    assert (out / "pairs.jsonl").exists()
    main(args)  # everything done: nothing sampled, the files stay as they were
    assert (out / "samples.jsonl").read_text().splitlines() == samples


def test_generate_refuses_a_folder_written_with_other_settings(policy, tmp_path):
    out = tmp_path / "out"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _generate(policy, out, sort_prompts(batch_size=2), extra=(_KillAfter(1),))
    module = GenerationModule(model=policy, tokenizer=build_tokenizer(), num_samples=2, max_new_tokens=10, seed=5)
    writer = JudgedSamplesWriter(output_dir=str(out), judge=SORT)
    with pytest.raises(ValueError, match="other settings.*num_samples"):
        _trainer(writer).predict(module, datamodule=sort_prompts(batch_size=2), return_predictions=False)


def test_two_processes_write_each_prompt_once(policy, tmp_path):
    """11 prompts over 2 DDP ranks (6 and 5: no padding, so no prompt is sampled twice): the merged
    samples hold every prompt exactly once, in source order, and the part files are gone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "tests" / "scripts" / "generate_dist_check.py"
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(script), "--policy", policy, "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [json.loads(line)["prompt_id"] for line in (out / "samples.jsonl").read_text().splitlines()]
    expected = sort_prompts(limit=11, tokenizer=policy).prompts["prompt_id"]
    assert ids == list(expected)
    assert not list(out.glob("samples.part*.jsonl")) and (out / "pairs.jsonl").exists()


def test_policy_from_a_training_checkpoint_and_a_reward_model_judge(tmp_path):
    """The policy read from a DPO stage's .ckpt samples like its model does; a RewardModule export judges
    the samples (reward_model:<folder>); the progress bar shows prompts and tokens/s."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from dpo_lightning import DPOModule, RewardModule

    tokenizer = build_tokenizer()
    config = {**tiny_config(), "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    dpo = DPOModule(model_config=config, tokenizer=tokenizer)
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(dpo)
    trainer.save_checkpoint(tmp_path / "policy.ckpt")
    rm = RewardModule(model_config=config, tokenizer=tokenizer)
    export_hf(rm.model, tokenizer, tmp_path / "rm")

    data = sort_prompts(tokenizer=tokenizer, limit=4)
    module = GenerationModule(model=str(tmp_path / "policy.ckpt"), tokenizer=tokenizer, num_samples=1,
                              max_new_tokens=6, do_sample=False)
    for a, b in zip(module.model.state_dict().values(), dpo.model.state_dict().values()):
        assert torch.equal(a, b)
    writer = JudgedSamplesWriter(output_dir=str(tmp_path / "out"), judge=f"reward_model:{tmp_path / 'rm'}")
    bar = TQDMProgressBar()
    L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, callbacks=[writer, bar]).predict(
        module, datamodule=data, return_predictions=False)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(isinstance(s["scores"][0], float) for s in samples)
    assert "reward_model" in samples[0]["settings"]["judge"]
    assert bar.predict_progress_bar.postfix and "tokens_per_s" in bar.predict_progress_bar.postfix


def test_a_failing_judge_row_is_counted_and_the_run_goes_on(policy, tmp_path, caplog):
    """A judge function that raises on some responses: those scores are null, the others are written,
    and one warning counts the failures."""
    import logging

    data = sort_prompts(limit=4)
    module = GenerationModule(model=policy, tokenizer=data.tokenizer, num_samples=3, max_new_tokens=10, seed=5)
    writer = JudgedSamplesWriter(output_dir=str(tmp_path / "out"), judge="function:tests.judge_fixtures:picky")
    with caplog.at_level(logging.WARNING):
        _trainer(writer).predict(module, datamodule=data, return_predictions=False)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    scores = [s for record in samples for s in record["scores"]]
    failed = sum(s is None for s in scores)
    assert len(samples) == 4 and 0 < failed < len(scores)
    assert any(f"{failed} of {len(scores)} responses could not be scored" in r.getMessage() for r in caplog.records)


def test_prompt_ids_are_the_training_prompt_ids_for_strings_and_chat_templates():
    """What the policy is asked is what training conditioned on: the prompt ids of PromptDataModule equal
    the prompt part (ids before the response start) of PreferenceDataModule's rows, for string prompts and
    for message-list prompts through a chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'user' %}= {% endif %}{% endfor %}"
    )
    strings = [{"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"},
               {"prompt": "sort: 5 2 9 =", "chosen": " 2 5 9", "rejected": " 9 5 2"}]
    messages = [{"prompt": [{"role": "user", "content": "sort: 3 1"}],
                 "chosen": [{"role": "assistant", "content": "1 3"}],
                 "rejected": [{"role": "assistant", "content": "3 1"}]}]
    for rows in (strings, messages):
        pairs = PreferenceDataModule(tokenizer=tokenizer, dataset=rows, val_split=None, max_length=64).splits["train"]
        prompts = PromptDataModule(tokenizer=tokenizer, dataset=rows).prompts
        for pair, prompt in zip(pairs, prompts):
            assert prompt["input_ids"] == pair["chosen_input_ids"][: pair["chosen_response_start"]]
            assert prompt["input_ids"][0] == tokenizer.bos_token_id


def test_bf16_true_keeps_the_float32_buffers_and_greedy_output_of_a_bf16_model(policy):
    """Issue #30 item 1: ``trainer.precision: bf16-true`` casts the whole module, RoPE's ``inv_freq`` included,
    and generation (unlike the training stages) did not put the float32 buffers back: the rotary phases were
    off at long positions, and greedy decoding followed another model. Now the buffers are
    float32 during and after predict, and the greedy responses equal those of the policy loaded in bf16
    (weights bf16, buffers float32) and run without a cast."""
    data = sort_prompts(limit=4, batch_size=2)

    def greedy(precision: str, **kwargs) -> tuple[GenerationModule, list[dict]]:
        module = GenerationModule(model=policy, tokenizer=data.tokenizer, num_samples=1, do_sample=False,
                                  max_new_tokens=24, **kwargs)
        trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        return module, [r for batch in trainer.predict(module, datamodule=data) for r in batch]

    cast, got = greedy("bf16-true")
    assert cast.model.dtype == torch.bfloat16
    buffers = {name: b.dtype for name, b in cast.model.named_buffers()}
    assert buffers and set(buffers.values()) == {torch.float32}, buffers
    loaded, want = greedy("32-true", dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16 and loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert [r["responses"] for r in got] == [r["responses"] for r in want]
