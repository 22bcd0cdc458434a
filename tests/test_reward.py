"""RewardModule: the Bradley-Terry loss by hand, TRL RewardTrainer parity, export round trip, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dpo_lightning import PreferenceDataModule, RewardModule
from dpo_lightning.data.synthetic import generate_pairs
from dpo_lightning.losses import bradley_terry_loss
from dpo_lightning.stages.export import export_hf
from dpo_lightning.training.metrics import RewardMetrics

from tiny import tiny_config

TINY = {**tiny_config(), "max_position_embeddings": 64}
TINY.pop("vocab_size")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_two_pair_loss_by_hand():
    """r_chosen = [2, 0], r_rejected = [0, 1]: -log s(d) = log(1 + e^-d), d = [2, -1]
    -> [log(1 + e^-2), log(1 + e^1)] = [0.126928, 1.313262]."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    losses = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(losses, torch.tensor([softplus(-2.0), softplus(1.0)]))
    assert losses[0].item() == pytest.approx(0.126928, abs=1e-6)
    assert losses[1].item() == pytest.approx(1.313262, abs=1e-6)


def test_margin_column_shifts_the_difference():
    """margin m = [1, 0]: d - m = [1, -1] -> [log(1 + e^-1), log(1 + e^1)] = [0.313262, 1.313262]."""
    losses = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(losses, torch.tensor([0.313262, 1.313262]), atol=1e-6, rtol=0)


def test_centering_adds_the_squared_sum():
    """c = 0.1: + 0.1 * (r_c + r_r)^2 = + [0.1 * 4, 0.1 * 1] = + [0.4, 0.1]; zero-sum rewards pay nothing."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    losses = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1)
    torch.testing.assert_close(losses, bradley_terry_loss(chosen, rejected) + torch.tensor([0.4, 0.1]))
    balanced = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([-1.0]), center_rewards_coefficient=5.0)
    torch.testing.assert_close(balanced, torch.tensor([softplus(-2.0)]))


def test_metrics_count_a_tie_as_wrong_and_skip_padding():
    metrics = RewardMetrics("val")
    metrics.update(
        losses=torch.tensor([0.1, 0.7, 9.0]),
        chosen_rewards=torch.tensor([1.0, 0.5, -50.0]),
        rejected_rewards=torch.tensor([0.0, 0.5, 50.0]),
        weight=torch.tensor([1.0, 1.0, 0.0]),  # the third pair is an eval shard's padding
    )
    out = metrics.compute()
    assert out["val/accuracy"] == pytest.approx(0.5)  # 1 > 0 right, 0.5 == 0.5 a tie: wrong
    assert out["val/margin"] == pytest.approx(0.5)
    assert out["val/loss"] == pytest.approx(0.4)
    assert out["val/min_reward"] == 0.0 and out["val/max_reward"] == 1.0  # padding's +-50 left out
    assert out["val/mean_reward"] == pytest.approx(0.5)


def _data(rows, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(tokenizer="synthetic:sort", dataset=rows, val_split=None, max_length=64, **kwargs)


def test_gradients_reach_every_weight_and_the_score_head_is_new(tmp_path):
    """A causal LM checkpoint (e.g. an SFT export) loads with its body and a new score head."""
    torch.manual_seed(0)
    dm = _data(generate_pairs(8, 0), batch_size=4)
    lm = AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.for_model(**TINY, vocab_size=len(dm.tokenizer))
    )
    lm.save_pretrained(tmp_path / "lm")
    rm = RewardModule(model=str(tmp_path / "lm"), tokenizer=dm.tokenizer)
    assert type(rm.model).__name__ == "LlamaForSequenceClassification" and rm.model.config.num_labels == 1
    torch.testing.assert_close(rm.model.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    batch = next(iter(dm.train_dataloader()))
    rm.step(batch, rm.train_metrics).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rm.model.parameters())


@pytest.mark.trl
@pytest.mark.parametrize("coefficient", [None, 0.01])
def test_validation_metrics_equal_trl_reward_trainer_evaluate(tmp_path, coefficient):
    """Same weights, same token ids: val loss, accuracy, margin and mean reward equal TRL 1.16's
    ``RewardTrainer.evaluate()`` (1e-5 relative). 12 pairs in 3 batches of 4, so TRL's mean of
    per-batch means is the mean over pairs. (TRL's min/max_reward are means of per-batch minima and
    maxima; ours are the minimum and maximum over the window, so they are not compared.)"""
    trl = pytest.importorskip("trl")
    import datasets

    torch.manual_seed(0)
    dm = _data(generate_pairs(12, 3), batch_size=4)
    rm = RewardModule(model_config=TINY, tokenizer=dm.tokenizer, center_rewards_coefficient=coefficient).eval()
    train = dm.splits["train"]
    tokenized = datasets.Dataset.from_dict(
        {"chosen_ids": train["chosen_input_ids"], "rejected_ids": train["rejected_input_ids"]}
    )
    args = trl.RewardConfig(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
        center_rewards_coefficient=coefficient, max_length=None,
    )
    theirs = trl.RewardTrainer(
        model=rm.model, args=args, train_dataset=tokenized, eval_dataset=tokenized, processing_class=dm.tokenizer
    ).evaluate()
    with torch.no_grad():
        for batch in dm._loader(train, 4, shuffle=False):
            rm.step(batch, rm.val_metrics)
    ours = rm.val_metrics.compute()
    for name in ("loss", "accuracy", "margin", "mean_reward"):
        assert ours[f"val/{name}"].item() == pytest.approx(theirs[f"eval_{name}"], rel=1e-5, abs=1e-7), name


def test_export_loads_as_sequence_classification_with_the_same_scores(tmp_path):
    torch.manual_seed(0)
    dm = _data(generate_pairs(6, 1), batch_size=6)
    rm = RewardModule(model_config=TINY, tokenizer=dm.tokenizer).eval()
    with torch.no_grad():  # move the score head off its init so the check is not trivial
        rm.model.score.weight.normal_()
    batch = next(iter(dm._loader(dm.splits["train"], 6, shuffle=False)))
    with torch.no_grad():
        ours = rm(batch)
    export_hf(rm.model, rm.tokenizer, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert not (tmp_path / "rm" / "generation_config.json").exists()
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"center_rewards_coefficient": -1.0}, "center_rewards_coefficient must be >= 0"),
        ({"memory": {"lean_logprobs": True}}, "lean_logprobs"),
    ],
)
def test_config_mistakes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardModule(model_config={**TINY, "pad_token_id": 0}, **kwargs)


def test_a_model_without_a_pad_token_id_is_refused_up_front():
    with pytest.raises(ValueError, match="give tokenizer"):
        RewardModule(model_config=TINY)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "llama-lora"])
def test_packed_and_shared_rows_score_as_padded_rows(arch):
    """The score at each sequence's last token, from padded rows (the model's own pooling), packed rows and
    prefix-shared rows (several pairs per row): rewards, loss and every gradient agree (1e-5, fp32); with
    LoRA too (adapters and PEFT's trainable copy of the score head)."""
    from dpo_lightning import LoraOptions
    from dpo_lightning.data.collate import PaddingCollator
    from dpo_lightning.data.packing import PackingCollator
    from dpo_lightning.data.prefix_sharing import PrefixSharingCollator

    torch.manual_seed(0)
    lora = LoraOptions(r=4, target_modules=["q_proj", "v_proj"]) if arch.endswith("-lora") else None
    rm = RewardModule(model_config={**tiny_config(arch.removesuffix("-lora"), vocab_size=64), "pad_token_id": 0},
                      lora=lora)
    with torch.no_grad():  # adapters that change the output (PEFT starts B at 0)
        for name, p in rm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    import random

    rng = random.Random(0)
    feats = []
    for _ in range(6):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randint(1, 10))]
        feats.append({f"{s}_input_ids": prompt + [rng.randrange(1, 64) for _ in range(rng.randint(1, 15))]
                      for s in ("chosen", "rejected")} | {"chosen_response_start": len(prompt),
                                                          "rejected_response_start": len(prompt)})
    results = []
    for collate in (PaddingCollator(pad_token_id=0), PackingCollator(pad_token_id=0, max_tokens_per_row=60),
                    PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=60)):
        batch = collate(feats)
        rewards = rm(batch)
        loss = rm.step(batch, rm.train_metrics)
        trained = [p for p in rm.model.parameters() if p.requires_grad]
        results.append((rewards, loss, torch.autograd.grad(loss, trained)))
    assert results[2][0].shape == (12,)
    (want_r, want_l, want_g) = results[0]
    for rewards, loss, grads in results[1:]:
        torch.testing.assert_close(rewards, want_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, want_l, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, want_g):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_auto_shares_rows_and_fsdp2_pads(monkeypatch):
    """auto gives a reward model prefix-shared rows; under FSDP2 (ModelParallelStrategy) the stage says it cannot
    take them (auto then pads), and an explicit share with such a reason is refused before the first step."""
    from types import SimpleNamespace

    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    dm = _data(generate_pairs(8, 0), batch_size=4)
    rm = RewardModule(model_config=TINY, tokenizer=dm.tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(rm, datamodule=dm)
    assert dm.collator_name == "share" and trainer.global_step == 1

    rm = RewardModule(model_config=TINY, tokenizer=dm.tokenizer)
    rm._trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    reason = rm.packing_unsupported()
    assert "FSDP2" in reason

    monkeypatch.setattr(RewardModule, "packing_unsupported", lambda self: reason)
    explicit = _data(generate_pairs(8, 0), batch_size=4, collator="share")
    rm = RewardModule(model_config=TINY, tokenizer=explicit.tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="data.collator=share: under FSDP2"):
        trainer.fit(rm, datamodule=explicit)
    assert trainer.global_step == 0


def test_lora_trains_adapters_and_the_new_score_head_and_exports_merged(tmp_path):
    from dpo_lightning import LoraOptions

    torch.manual_seed(0)
    dm = _data(generate_pairs(4, 2), batch_size=4)
    rm = RewardModule(model_config=TINY, tokenizer=dm.tokenizer,
                      lora=LoraOptions(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in rm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)  # PEFT's SEQ_CLS task keeps the new head trainable
    batch = next(iter(dm._loader(dm.splits["train"], 4, shuffle=False)))
    rm.step(batch, rm.train_metrics).backward()
    rm.eval()
    with torch.no_grad():
        ours = rm(batch)
    export_hf(rm.model, rm.tokenizer, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_end_of_fit_export_of_a_reward_model_says_so(tmp_path, caplog):
    """It said "Hugging Face export of the policy" for a reward model (user trial 2)."""
    from pathlib import Path

    from dpo_lightning.cli import cli_main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_rm.yaml"
    with caplog.at_level("INFO"):
        cli_main(["fit", "--config", str(recipe), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                  "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert "Hugging Face export of the reward model: " in caplog.text
    assert "export of the policy" not in caplog.text
