"""PackingCollator: the worked example, row budgets, and equality with the padded path on a tiny Llama.

Equality is the contract: per-sequence log-probs, losses and gradients of a packed batch equal those
of the same pairs right-padded (1e-5, fp32), and a sequence's log-prob does not depend on the other
sequences sharing its row.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpo_lightning.data import build_collator
from dpo_lightning.data.collate import PaddingCollator
from dpo_lightning.data.packing import PackingCollator, block_causal_mask, first_fit_decreasing
from dpo_lightning.stages import DPOModule
from dpo_lightning.stages.options import MemoryOptions

VOCAB = 64
LLAMA = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB,
)
GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB)

EXAMPLE = [
    {"chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
     "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2},
    {"chosen_input_ids": [3, 4], "chosen_response_start": 1,
     "rejected_input_ids": [3, 4, 4, 2], "rejected_response_start": 1},
]


def features(n_pairs: int, seed: int = 0) -> list[dict]:
    """Pairs with a shared prompt of 1..8 tokens and responses of 1..20 tokens (ids >= 1)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_pairs):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
        sides = {}
        for side in ("chosen", "rejected"):
            response = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))]
            sides[f"{side}_input_ids"] = prompt + response
            sides[f"{side}_response_start"] = len(prompt)
        out.append(sides)
    return out


def test_worked_example():
    batch = PackingCollator(pad_token_id=0, max_tokens_per_row=7)(EXAMPLE)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 5, 6, 9], [3, 4, 4, 2, 3, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, -100, 9], [-100, 4, 4, 2, -100, 4, -100]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 2], [3, 3, 3, 3, 1, 1, -1]]
    assert batch["num_sequences"] == 4
    allowed = batch["attention_mask"] == 0  # (R, 1, L, L)
    assert batch["attention_mask"].shape == (2, 1, 7, 7)
    assert allowed[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding sees only itself (no all -inf row, no NaN)
    ]


def test_registered_by_name_and_default_budget_is_longest_sequence():
    collator = build_collator("pack", pad_token_id=0, pad_to_multiple_of=4)
    assert isinstance(collator, PackingCollator)
    feats = features(6)
    batch = collator(feats)
    longest = max(len(f[k]) for f in feats for k in ("chosen_input_ids", "rejected_input_ids"))
    assert batch["input_ids"].shape[1] == -(-longest // 4) * 4
    assert batch["input_ids"].shape[0] < 12  # fewer rows than the padded 2B


@pytest.mark.parametrize("budget", [16, 40, 1000])
def test_rows_respect_budget_and_keep_every_token(budget):
    feats = features(8, seed=1)
    batch = PackingCollator(pad_token_id=0, max_tokens_per_row=budget)(feats)
    real = batch["sequence_ids"] >= 0
    longest = max(len(f[k]) for f in feats for k in ("chosen_input_ids", "rejected_input_ids"))
    assert int(real.sum(dim=1).max()) <= max(budget, longest)
    total = sum(len(f[k]) for f in feats for k in ("chosen_input_ids", "rejected_input_ids"))
    assert int(real.sum()) == total
    for k, f in enumerate(feats):  # every sequence intact and in order, whatever its row
        for side, idx in (("chosen", k), ("rejected", len(feats) + k)):
            assert batch["input_ids"][batch["sequence_ids"] == idx].tolist() == f[f"{side}_input_ids"]


def test_first_fit_decreasing_and_mask_helpers():
    assert first_fit_decreasing([4, 2, 3, 4], 7) == [[0, 2], [3, 1]]
    mask = block_causal_mask(torch.tensor([[0, 0, 1, -1]]))
    assert (mask == 0)[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def _modules(config: dict, attn: str, lean: bool = False) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(model_config=config, attn_implementation=attn, memory=MemoryOptions(lean_logprobs=lean))
    with torch.no_grad():  # a policy different from the reference, so rewards are not all 0
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return module


@pytest.mark.parametrize(
    ("config", "attn", "lean"),
    [(LLAMA, "sdpa", False), (LLAMA, "eager", False), (LLAMA, "sdpa", True), (GPT2, "sdpa", False)],
    ids=["llama-sdpa", "llama-eager", "llama-sdpa-lean", "gpt2-sdpa"],
)
def test_packed_equals_padded(config, attn, lean):
    module = _modules(config, attn, lean)
    feats = features(5, seed=2)
    padded = PaddingCollator(pad_token_id=0)(feats)
    packed = PackingCollator(pad_token_id=0, max_tokens_per_row=48)(feats)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    out_pad, pol_pad, ref_pad = module(padded)
    grads_pad = torch.autograd.grad(out_pad.losses.mean(), list(module.model.parameters()))
    out_pack, pol_pack, ref_pack = module(packed)
    grads_pack = torch.autograd.grad(out_pack.losses.mean(), list(module.model.parameters()))

    torch.testing.assert_close(pol_pack.logps, pol_pad.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pol_pack.logits_sum, pol_pad.logits_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(pol_pack.n_tokens, pol_pad.n_tokens)
    torch.testing.assert_close(ref_pack, ref_pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pack.losses, out_pad.losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pack.chosen_rewards, out_pad.chosen_rewards, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_pack, grads_pad):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_does_not_leak_between_packed_sequences():
    module = _modules(LLAMA, "sdpa")
    feats = features(4, seed=3)
    collator = PackingCollator(pad_token_id=0, max_tokens_per_row=1000)  # everything in one row
    before = module.sequence_logps(module.model, collator(feats)).logps
    # Change every token of pair 0's chosen sequence (same length, so the packing layout is unchanged).
    changed = [dict(f) for f in feats]
    changed[0]["chosen_input_ids"] = [(t % (VOCAB - 1)) + 1 for t in (x + 7 for x in feats[0]["chosen_input_ids"])]
    batch = collator(changed)
    assert batch["input_ids"].shape[0] == 1
    after = module.sequence_logps(module.model, batch).logps
    others = torch.arange(8) != 0
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0], before[0])
