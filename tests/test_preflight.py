"""Preflight (`dpo_lightning.stages.preflight`): what fails or warns before any weights load, as functions and
through the real CLI, with the model loader replaced by one that fails loudly if reached."""

import warnings
from pathlib import Path

import pytest
from chat_data import save_tokenizer, ultrachat_rows, ultrafeedback_rows, write_jsonl
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

import dpo_lightning.models.loading
from dpo_lightning.cli import DPOLightningCLI, cli_main
from dpo_lightning.data import KTODataModule, PreferenceDataModule, SFTDataModule
from dpo_lightning.data.errors import DataError
from dpo_lightning.stages.preflight import (
    check_chat_template,
    check_packing_attention,
    check_strategy,
    trained_weights_dtype,
    update_resolution_warning,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """The stage's model loader, replaced: any test that reaches it fails, and says so."""
    calls = []

    def load_model(*args, **kwargs):
        calls.append(args)
        raise ModelLoaded("the model was loaded: the preflight did not stop the run first")

    monkeypatch.setattr(dpo_lightning.models.loading, "load_model", load_model)
    return calls


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ of the CLI lands here
    return {
        "base": str(save_tokenizer(tmp_path / "base_tokenizer", chat_template=False)),
        "chat": str(save_tokenizer(tmp_path / "chat_tokenizer")),
        "pairs": str(write_jsonl(tmp_path / "pairs.jsonl", ultrafeedback_rows(6))),
        "conversations": str(write_jsonl(tmp_path / "conversations.jsonl", ultrachat_rows(6))),
        "text_pairs": str(write_jsonl(tmp_path / "text.jsonl", [
            {"prompt": "hello", "chosen": " good", "rejected": " bad"} for _ in range(4)
        ])),
    }


# ------------------------------------------------------------------------------- chat template vs rows


def test_conversations_without_a_chat_template_fail_through_the_cli_before_the_model_loads(inputs, no_model):
    with pytest.raises(DataError) as err:
        cli_main(["fit", "--config", TINY, "--data.tokenizer", inputs["base"], "--data.dataset", inputs["pairs"]])
    message = str(err.value)
    assert "\n" not in message
    assert inputs["base"] in message and inputs["pairs"] in message  # names the tokenizer and the dataset
    assert "no chat_template" in message and "Llama-2-7b-chat-hf" in message  # and the fix
    assert no_model == []
    assert not (Path("runs") / "tiny").exists()  # no run folder claimed for a run that never started


def test_the_chat_template_check_covers_sft_and_kto_data(inputs):
    with pytest.raises(DataError, match="no chat_template"):
        check_chat_template(SFTDataModule, {"tokenizer": inputs["base"], "dataset": inputs["conversations"]})
    with pytest.raises(DataError, match="no chat_template"):  # KTO: the pairs read as unpaired examples
        check_chat_template(KTODataModule, {"tokenizer": inputs["base"], "dataset": inputs["pairs"]})
    # With a chat template, or with plain-text rows (no template needed), nothing to say.
    check_chat_template(SFTDataModule, {"tokenizer": inputs["chat"], "dataset": inputs["conversations"]})
    check_chat_template("dpo_lightning.data.PreferenceDataModule", {"tokenizer": inputs["chat"],
                                                                    "dataset": inputs["pairs"]})
    check_chat_template(PreferenceDataModule, {"tokenizer": inputs["base"], "dataset": inputs["text_pairs"]})
    check_chat_template(PreferenceDataModule, {"tokenizer": "synthetic:sort", "dataset": "synthetic:sort"})


def test_bad_rows_fail_in_the_preflight_with_the_data_paths_own_error(inputs, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "chosen": [{"role": "robot", "content": "x"}],
                                                "rejected": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"row 0, field 'chosen'.*role 'robot'"):
        check_chat_template(PreferenceDataModule, {"tokenizer": inputs["chat"], "dataset": str(bad)})


# ------------------------------------------------------------------------------- FSDP1


@pytest.mark.parametrize("strategy", [
    "fsdp", "fsdp_cpu_offload", FSDPStrategy, "lightning.pytorch.strategies.FSDPStrategy",
    {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"sharding_strategy": "FULL_SHARD"}},
])
def test_fsdp1_is_refused_in_one_line(strategy):
    with pytest.raises(ValueError) as err:
        check_strategy(strategy)
    message = str(err.value)
    assert "\n" not in message and message.startswith("trainer.strategy=")
    assert "ModelParallelStrategy" in message and "docs/scale_out.md" in message and "exported" in message


@pytest.mark.parametrize("strategy", [None, "auto", "ddp", "ddp_spawn", DDPStrategy(), ModelParallelStrategy,
                                      {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}])
def test_other_strategies_pass(strategy):
    check_strategy(strategy)


def test_fsdp1_is_refused_through_the_cli_before_the_model_loads(inputs, no_model, capsys):
    with pytest.raises(ValueError, match=r"^trainer.strategy=fsdp is FSDP1"):
        cli_main(["fit", "--config", TINY, "--trainer.strategy", "fsdp"])
    assert no_model == []
    # The console command ends with that one line and status 1, not a traceback.
    from dpo_lightning.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", TINY, "--trainer.strategy", "fsdp"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "dpo_lightning: error: trainer.strategy=fsdp is FSDP1" in err and "Traceback" not in err
    assert no_model == []


def test_a_misspelt_collator_is_refused_when_the_command_line_is_parsed(inputs, no_model, capsys):
    from dpo_lightning.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", TINY, "--data.collator", "shared"])
    assert exited.value.code != 0 and no_model == []
    err = capsys.readouterr().err
    assert "collator" in err and "share" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- packing x attention


@pytest.mark.parametrize("collator", ["pack", "share"])
@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn3"])
def test_packing_with_a_kernel_that_ignores_the_4d_mask_is_refused(kernel, collator):
    with pytest.raises(ValueError, match="attend to each other") as err:
        check_packing_attention(collator, kernel)
    assert kernel in str(err.value) and collator in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("collator", "kernel"), [("pack", None), ("pack", "sdpa"), ("pack", "eager"),
                                                  ("share", "sdpa"), ("pad", "flash_attention_2"), ("pad", None)])
def test_packing_with_mask_kernels_and_padding_with_any_kernel_pass(collator, kernel):
    check_packing_attention(collator, kernel)


def test_packing_with_flash_attention_is_refused_through_the_cli(inputs, no_model):
    with pytest.raises(ValueError, match="data.collator=pack with model.attn_implementation=flash_attention_2"):
        cli_main(["fit", "--config", TINY, "--data.collator", "pack", "--model.attn_implementation",
                  "flash_attention_2"])
    assert no_model == []


# ------------------------------------------------------------------------------- bf16 update resolution


def test_adam_steps_below_bf16_resolution_are_warned_about():
    """bf16 keeps 8 significant bits: a weight of 1e-2 lies in [2**-7, 2**-6), where bf16 numbers are
    2**-14 = 6.1e-5 apart; a step under half that (3.05e-5) rounds away, and 1e-2 * 2**-9 = 1.95e-5 is
    the floor for any weight of at least 1e-2. Adam moves a weight by ~lr, so lr 5e-7 stalls, 1e-4 does not."""
    message = update_resolution_warning("bf16-true", 5e-7, optimizer="torch.optim.AdamW")
    assert message and "bf16-true" in message and "lr=5e-07" in message and "2.0e-05" in message
    assert "bf16-mixed" in message and "fsdp_mixed_precision" in message
    assert update_resolution_warning("bf16-true", 1e-4) is None
    assert update_resolution_warning("bf16-true", 1.9e-5) and update_resolution_warning("bf16-true", 2e-5) is None
    # bf16 weights from model.dtype, whatever the precision flag (mixed precision autocasts compute, not weights).
    assert update_resolution_warning("32-true", 5e-7, "bfloat16")
    assert update_resolution_warning("bf16-mixed", 5e-7, "torch.bfloat16")
    # fp32 master weights, LoRA's float32 adapters, a non-Adam optimizer: nothing to say.
    assert update_resolution_warning("bf16-mixed", 5e-7, "float32") is None
    assert update_resolution_warning("32-true", 5e-7, "float32") is None
    assert update_resolution_warning("bf16-mixed", 5e-6, "bfloat16", lora=True) is None
    assert update_resolution_warning("bf16-true", 5e-7, optimizer="torch.optim.SGD") is None
    assert update_resolution_warning("bf16-true", None)  # the stage's default AdamW, lr 1e-6
    # fp16: 11 significant bits, floor 1e-2 * 2**-12 = 2.4e-6.
    assert update_resolution_warning("16-true", 1e-6) and update_resolution_warning("16-true", 5e-6) is None
    assert trained_weights_dtype("bf16-true", "float32", lora=True) == "bfloat16"  # the plugin converts adapters too


class StopAfterPreflight(DPOLightningCLI):
    def instantiate_classes(self) -> None:
        raise SystemExit(0)


def test_the_cli_warns_about_bf16_steps_before_anything_is_built(inputs):
    args = ["fit", "--config", TINY, "--trainer.precision", "bf16-true", "--model.optimizer.init_args.lr", "5e-7"]
    with pytest.warns(UserWarning, match=r"trainer.precision=bf16-true .* lr=5e-07"), pytest.raises(SystemExit):
        cli_main(args, cli_class=StopAfterPreflight)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        cli_main(["fit", "--config", TINY], cli_class=StopAfterPreflight)  # fp32 weights, lr 1e-3
    assert not [w for w in caught if "round away" in str(w.message)]


def test_weights_loaded_in_bf16_without_model_dtype_are_warned_about_before_the_first_step(tmp_path):
    """Issue #30 item 4: with ``model.dtype`` unset, transformers 5 loads a checkpoint in its own dtype (bf16 for
    Qwen2.5); under ``bf16-mixed`` AdamW at lr 1e-6 then updates bf16 weights and most steps round away, which
    the configuration check could not see (no dtype in it). A tiny Llama saved in bf16 and loaded back with no
    dtype, trained one step through the CLI: warned once the weights are loaded, naming model.dtype and the
    precision; with ``--model.dtype float32`` (fp32 master weights) nothing is said."""
    import torch

    from dpo_lightning.data.synthetic import build_tokenizer
    from dpo_lightning.models.loading import load_causal_lm

    from tiny import tiny_config

    saved = tmp_path / "bf16_policy"
    load_causal_lm(None, config={**tiny_config(), "vocab_size": len(build_tokenizer())}).to(torch.bfloat16) \
        .save_pretrained(saved)
    args = ["fit", "--config", TINY, "--model.model", str(saved), "--model.model_config", "null",
            "--trainer.precision", "bf16-mixed", "--model.optimizer.init_args.lr", "1e-6", "--trainer.max_steps",
            "1", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
            "false", "--data.batch_size", "8", "--data.val_split", "null"]

    def warned(*extra: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = cli_main([*args, *extra])
        assert cli.trainer.global_step == 1
        return [str(w.message) for w in caught if "round away" in str(w.message)]

    (message,) = warned()
    assert "model.dtype unset (the weights loaded in the checkpoint's bfloat16)" in message
    assert "trainer.precision=bf16-mixed" in message and "lr=1e-06" in message and "model.dtype float32" in message
    assert warned("--model.dtype", "float32") == []


def test_the_python_api_refuses_fsdp1_and_packing_under_flash_attention_at_setup():
    """Without the CLI: the stage's setup runs the same checks before anything trains."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from dpo_lightning import DPOModule
    from dpo_lightning.stages.preflight import ConfigError

    module = DPOModule(model_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32})
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=None)  # as Trainer(strategy="fsdp")
    with pytest.raises(ValueError, match="FSDP1"):
        module.setup("fit")

    class PackedData:
        batch_format = "pairs"
        collator_name = "pack"

        def choose_collator(self, reason, attention_cost=None):
            return "pack", "data.collator"

    module.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2.*would not compute what padded rows compute"):
        module.choose_fast_paths(PackedData())


# ------------------------------------------------------------------------------- sliding-window attention

MISTRAL = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)


def test_a_4d_mask_skips_the_sliding_window_so_packing_would_not_be_exact():
    """Why the check below exists: transformers applies a 4D mask as given, in sliding-window layers too.
    A Mistral with window 8 scores 20-token sequences differently packed and padded; window 64 agrees."""
    import torch

    from dpo_lightning import DPOModule
    from dpo_lightning.data.collate import PaddingCollator
    from dpo_lightning.data.packing import PackingCollator

    feats = [{"chosen_input_ids": list(range(1, 21)), "chosen_response_start": 4,
              "rejected_input_ids": list(range(3, 23)), "rejected_response_start": 4}]
    for window, same in ((8, False), (64, True)):
        torch.manual_seed(0)
        module = DPOModule(model_config={**MISTRAL, "sliding_window": window, "vocab_size": 32})
        padded = module.sequence_logps(module.model, PaddingCollator(pad_token_id=0)(feats)).logps
        packed = module.sequence_logps(module.model, PackingCollator(pad_token_id=0)(feats)).logps
        assert torch.allclose(padded, packed, atol=1e-5) is same


@pytest.mark.parametrize(("window", "collator", "outcome"), [
    (8, "auto", "pad"), (8, "share", "refused"), (8, "pack", "refused"), (64, "auto", "share"), (None, "auto", "share"),
])
def test_sliding_window_models_pad_unless_no_sequence_outgrows_the_window(window, collator, outcome, caplog):
    """data.max_length 64: a window of 8 makes auto pad (saying why) and an explicit packed collator refused
    before the first step; a window of 64 (no sequence longer) or none keeps the shared rows."""
    import logging

    import lightning as L

    from dpo_lightning import DPOModule, PreferenceDataModule
    from dpo_lightning.data.synthetic import generate_pairs
    from dpo_lightning.stages.preflight import ConfigError

    data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=generate_pairs(16, 0), val_split=None,
                                max_length=64, batch_size=4, collator=collator)
    module = DPOModule(model_config={**MISTRAL, "sliding_window": window, "vocab_size": data.vocab_size},
                       tokenizer=data.tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    if outcome == "refused":
        with pytest.raises(ConfigError, match=r"sliding-window attention \(window 8\).*max_length=64"):
            trainer.fit(module, datamodule=data)
        assert trainer.global_step == 0
        return
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=data)
    assert data.collator_name == outcome
    if outcome == "pad":
        assert "batches: pad (data.collator auto: the model's sliding-window attention (window 8)" in caplog.text


# ------------------------------------------------------------------------------- ALiBi / no position_ids

ALIBI = {
    "mpt": dict(model_type="mpt", d_model=32, n_layers=2, n_heads=4, max_seq_len=128),
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4),
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
}


@pytest.mark.parametrize("arch", sorted(ALIBI))
def test_models_whose_positions_do_not_come_from_position_ids_pad(arch, caplog):
    """MPT and Bloom take no position_ids (ALiBi from the row: MPT's packed log-probs were 8e-2 nats off, Bloom
    crashed), Falcon with alibi ignores them: auto pads and says why, an explicit share is refused."""
    import logging

    import lightning as L

    from dpo_lightning import DPOModule, PreferenceDataModule
    from dpo_lightning.data.synthetic import generate_pairs
    from dpo_lightning.stages.preflight import ConfigError

    def fit(collator: str):
        data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=generate_pairs(8, 0), val_split=None,
                                    max_length=64, batch_size=4, collator=collator)
        module = DPOModule(model_config={**ALIBI[arch], "vocab_size": data.vocab_size}, tokenizer=data.tokenizer,
                           attn_implementation="eager")
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
        return data, trainer

    with caplog.at_level(logging.INFO):
        data, trainer = fit("auto")
    assert data.collator_name == "pad" and trainer.global_step == 1
    assert "position_ids" in caplog.text.split("batches: pad", 1)[1].split("\n")[0]
    with pytest.raises(ConfigError, match="data.collator=share: .*position_ids"):
        fit("share")
