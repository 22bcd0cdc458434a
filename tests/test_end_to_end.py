"""PreferenceDataModule + DPOModule: a few steps end to end on CPU, as in the README snippet."""

import json
import math

import lightning as L
import torch

from dpo_lightning import DPOModule
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.synthetic import generate_pairs

from tiny import tiny_config


def test_datamodule_and_module_fit_a_few_steps(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in generate_pairs(64, seed=3)))
    data = PreferenceDataModule(
        tokenizer="synthetic:sort", dataset=str(path), val_fraction=0.25, max_length=32, batch_size=4, seed=1
    )
    module = DPOModule(
        model_config=tiny_config("llama", vocab_size=data.vocab_size),
        tokenizer=data.tokenizer,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert abs(before["val/loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert after["val/loss"] != before["val/loss"]
    assert after["val/rewards/margins"] != 0.0
    assert module.model.config.pad_token_id == data.pad_token_id
