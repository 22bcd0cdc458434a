"""The parameter counts behind docs/recipes.md's checkpoint and export sizes (benchmarks/checkpoint_sizes.py),
against transformers models built on the meta device (no memory, no download)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("checkpoint_sizes", ROOT / "benchmarks" / "checkpoint_sizes.py")
sizes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sizes)


def _config(m) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=m.hidden, intermediate_size=m.intermediate, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, vocab_size=m.vocab,
        tie_word_embeddings=m.tied, num_labels=1,
    )


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), [("LLAMA2_7B", 6_738_415_616), ("LLAMA31_8B", 8_030_261_248)])
def test_parameter_counts_match_transformers_llama(name, expected):
    """6.74e9 (Llama-2-7B) and 8.03e9 (Llama-3.1-8B, 8 KV heads, 128k vocabulary, untied head)."""
    m = getattr(sizes, name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(m))
    assert _numel(model) == sizes.llama_params(m) == expected


def test_reward_model_count_matches_the_sequence_classifier():
    """The reward model drops the LM head (32000 x 4096) for a one-output score head (4096)."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(_config(sizes.LLAMA2_7B))
    assert _numel(model) == sizes.llama_params(sizes.LLAMA2_7B, head="score") == 6_738_415_616 - 32000 * 4096 + 4096


def test_lora_count_matches_peft():
    """r 16 on q, k, v, o (4096 -> 4096: 16 x 8192 each) and gate, up, down (4096 <-> 11008: 16 x 15104 each),
    32 layers: 32 x (4 x 131072 + 3 x 241664) = 39,976,960 adapter parameters."""
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(sizes.LLAMA2_7B))
    model = get_peft_model(model, LoraConfig(r=sizes.LORA_R, target_modules=list(sizes.LORA_TARGETS)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sizes.lora_params(sizes.LLAMA2_7B) == 32 * (4 * 131072 + 3 * 241664)


def test_the_table_applies_the_checkpoint_policy():
    """12 B per trained parameter (fp32 weights + two fp32 AdamW moments), +2 B/param for a stored TR-DPO
    reference, 2 B/param for the bf16 export: 6.74e9 x 12 = 80.9 GB, 8.03e9 x 12 = 96.4 GB."""
    rows = {r.recipe: r for r in sizes.rows()}
    assert round(rows["llama7b.yaml"].checkpoint_bytes / 1e9, 1) == 80.9
    assert round(rows["llama3_8b.yaml"].checkpoint_bytes / 1e9, 1) == 96.4
    assert round(rows["llama7b.yaml + TR-DPO"].checkpoint_bytes / 1e9, 1) == 94.3
    assert round(rows["llama7b.yaml"].export_bytes / 1e9, 1) == 13.5
    assert round(rows["llama7b_lora.yaml"].checkpoint_bytes / 1e9, 2) == 0.48
    recipes = {p.name for p in (ROOT / "recipes").glob("llama*.yaml")} - {"llama7b_generate.yaml"}
    assert recipes <= {r.split()[0] for r in rows}, "every 7B/8B training recipe has a row"
    table = sizes.table()
    assert (ROOT / "docs" / "recipes.md").read_text().count(table) == 1, "docs/recipes.md shows the printed table"
