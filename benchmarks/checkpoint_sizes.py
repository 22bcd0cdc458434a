"""Checkpoint and export sizes of the 7B/8B recipes, computed from parameter counts (no GPU, no download).

    python benchmarks/checkpoint_sizes.py      # prints the table of docs/recipes.md

Checkpoint policy (dpo_lightning/training/checkpoint.py): a full-parameter checkpoint holds the fp32 trained weights
(4 B/param) and AdamW's exp_avg and exp_avg_sq in fp32 (8 B/param): 12 B/param. The frozen reference is not
stored (it is rebuilt from its source), except a TR-DPO reference (``reference: {sync_steps: ...}``), which
moves and is stored in bf16 (+2 B/param). ``best`` is a hard link to a checkpoint already on disk. A LoRA
checkpoint holds the adapters (float32) and their AdamW state: 12 B per adapter parameter. The end-of-fit
export is written in the training compute dtype, bf16 (2 B/param); LoRA's is merged into the base weights.

Parameter counts follow from the architectures' dimensions (`llama_params`, `lora_params`);
tests/test_recipe_sizes.py checks them against transformers models built on the meta device.
"""

from __future__ import annotations

from typing import NamedTuple

GB = 1e9
TRAINED_BYTES = 4 + 8  # fp32 weights + AdamW exp_avg, exp_avg_sq (fp32)
SYNCED_REFERENCE_BYTES = 2  # TR-DPO's moving reference, bf16
EXPORT_BYTES = 2  # bf16


class Llama(NamedTuple):
    """The dimensions that fix a Llama's parameter count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False


LLAMA2_7B = Llama(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA31_8B = Llama(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
# recipes/llama7b_lora.yaml: r 16 on every linear layer of the decoder (PEFT's all-linear leaves out the LM head).
LORA_R, LORA_TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_shapes(m: Llama) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder layer's linear layers."""
    kv = m.hidden // m.heads * m.kv_heads
    return {
        "q_proj": (m.hidden, m.hidden), "k_proj": (m.hidden, kv), "v_proj": (m.hidden, kv),
        "o_proj": (m.hidden, m.hidden),
        "gate_proj": (m.hidden, m.intermediate), "up_proj": (m.hidden, m.intermediate),
        "down_proj": (m.intermediate, m.hidden),
    }


def llama_params(m: Llama, head: str = "lm") -> int:
    """Parameters of a Llama: embeddings, per layer the attention and MLP weights (no biases) and two RMSNorm
    weights, the final norm, and the head: ``lm`` (vocab x hidden unless tied) or ``score`` (one output, the
    reward model's ``AutoModelForSequenceClassification(num_labels=1)``)."""
    layer = sum(i * o for i, o in _linear_shapes(m).values()) + 2 * m.hidden
    heads = {"lm": 0 if m.tied else m.vocab * m.hidden, "score": m.hidden}
    return m.vocab * m.hidden + m.layers * layer + m.hidden + heads[head]


def lora_params(m: Llama, r: int = LORA_R, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear layer: r x (in + out) parameters."""
    shapes = _linear_shapes(m)
    return m.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


class Row(NamedTuple):
    recipe: str
    what: str
    trained: int  # parameters whose weights and optimizer state a checkpoint holds
    checkpoint_bytes: int
    export_bytes: int


def rows() -> list[Row]:
    p7, p8 = llama_params(LLAMA2_7B), llama_params(LLAMA31_8B)
    rm, lora = llama_params(LLAMA2_7B, head="score"), lora_params(LLAMA2_7B)
    full = [
        ("llama7b.yaml", "DPO, Llama-2-7B-chat", p7),
        ("llama7b_multinode.yaml", "DPO, Llama-2-7B-chat, 16 ranks", p7),
        ("llama7b_sft.yaml", "SFT, Llama-2-7B", p7),
        ("llama7b_rm.yaml", "reward model, Llama-2-7B-chat (score head)", rm),
        ("llama3_8b.yaml", "DPO, Llama-3.1-8B-Instruct", p8),
    ]
    out = [Row(r, w, n, TRAINED_BYTES * n, EXPORT_BYTES * n) for r, w, n in full]
    out.append(Row("llama7b.yaml + TR-DPO", "reference: {sync_steps: N} (reference stored, bf16)", p7,
                   (TRAINED_BYTES + SYNCED_REFERENCE_BYTES) * p7, EXPORT_BYTES * p7))
    out.append(Row("llama7b_lora.yaml", f"LoRA r={LORA_R}, all linear layers", lora, TRAINED_BYTES * lora,
                   EXPORT_BYTES * p7))
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}e9" if n >= 1e9 else f"{n / 1e6:.1f}e6"


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / GB:.2f} GB"


def table() -> str:
    lines = [
        "| recipe | what | trained params | checkpoint | export (bf16) |",
        "|---|---|---|---|---|",
    ]
    for r in rows():
        lines.append(
            f"| `{r.recipe}` | {r.what} | {_count(r.trained)} | {_size(r.checkpoint_bytes)} | {_size(r.export_bytes)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"Llama-2-7B: {llama_params(LLAMA2_7B):,} params; Llama-3.1-8B: {llama_params(LLAMA31_8B):,}")
    print(table())
