"""The logs of a short DPO run next to TRL 1.16's DPOTrainer on the same schedule (issue #25): the step each
row is logged at (train and validation), the fractional epoch, the learning rate each step applied, and the
metric names. Both runs: 22 pairs in batches of 4 (6 batches an epoch, the last one short), accumulation 2
(3 optimizer steps an epoch), 2 epochs, a log every step, validation every 2 steps, cosine decay after
ceil(6 x 0.25) = 2 warmup steps. Values of the metrics themselves are compared batch by batch against TRL's
code in ``test_losses_vs_trl.py``; here the two runs see their batches in different orders."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tiny import ListLogger

pytestmark = pytest.mark.trl
trl = pytest.importorskip("trl")


class AllKeys(ListLogger):
    def log_metrics(self, metrics, step=None) -> None:
        self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})


def test_logged_steps_epochs_and_learning_rates_equal_trls(tmp_path):
    from datasets import Dataset, DatasetDict
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_lightning import DPOModule, PreferenceDataModule
    from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs

    tokenizer = build_tokenizer("synthetic:sort")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = generate_pairs(30, seed=0)
    data = DatasetDict({"train": Dataset.from_list(rows[:22]), "validation": Dataset.from_list(rows[22:])})
    lr, warmup = 1e-3, 0.25

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup,
        logging_steps=1, eval_strategy="steps", eval_steps=2, gradient_checkpointing=False, max_length=64,
        dataloader_drop_last=False, seed=0,
    )
    theirs = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "model"), args=args,
                            train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer)
    theirs.train()
    trl_train = [e for e in theirs.state.log_history if "loss" in e]
    trl_eval = [e for e in theirs.state.log_history if "eval_loss" in e]

    logger = AllKeys()
    dm = PreferenceDataModule(tokenizer=str(tmp_path / "model"), dataset=data, max_length=64, batch_size=4)
    module = DPOModule(model=str(tmp_path / "model"), tokenizer=dm.tokenizer, warmup_ratio=warmup,
                       lr_decay="cosine", optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, accumulate_grad_batches=2, log_every_n_steps=1, logger=logger,
        val_check_interval=4, check_val_every_n_epoch=None,  # 2 optimizer steps of 2 batches, TRL's eval_steps=2
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.num_training_batches == 6 and trainer.global_step == 6
    ours_train = {s: r for s, r in logger.rows.items() if "train/loss" in r}
    ours_val = {s: r for s, r in logger.rows.items() if "val/loss" in r}

    assert [e["step"] for e in trl_train] == sorted(ours_train) == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in trl_eval] == sorted(ours_val) == [2, 4, 6]
    for entry in trl_train:
        ours = ours_train[entry["step"]]
        assert ours["epoch"] == pytest.approx(entry["epoch"], abs=1e-12), entry["step"]
        assert ours["train/lr"] == pytest.approx(entry["learning_rate"], rel=1e-9, abs=1e-15), entry["step"]
    assert [e["learning_rate"] for e in trl_train][:2] == [0.0, lr / 2]  # the warmup: ceil, from 0
    for entry in trl_eval:
        assert ours_val[entry["step"]]["epoch"] == pytest.approx(entry["epoch"], abs=1e-12), entry["step"]
    # Every metric TRL logs, under its name with the split prefix (learning_rate is train/lr).
    trl_names = set(trl_train[0]) - {"epoch", "step", "learning_rate"}
    assert {n.removeprefix("train/") for n in ours_train[1]} >= trl_names
    assert {"entropy", "mean_token_accuracy"} <= trl_names
    trl_eval_names = {n.removeprefix("eval_") for n in trl_eval[0]} - {"epoch", "step", "runtime", "samples_per_second",
                                                                       "steps_per_second", "num_tokens"}
    assert {n.removeprefix("val/") for n in ours_val[2]} >= trl_eval_names
