"""PrefixSharingCollator: the worked example, the layout's invariants, and exactness against padding.

The contract: a pair's prompt is forwarded once, and still per-sequence log-probs, losses, rewards and
gradients equal those of the same pairs right-padded (1e-5, fp32), on Llama, GPT-2 and Qwen2, with one
pair per row and several per row, with full logits and the lean path; a branch never sees the other.
Log-probs alone are checked on thirteen more families.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_packing import EXAMPLE  # the worked example both collators' docstrings lay out

from dpo_lightning.data import build_collator
from dpo_lightning.data.collate import PaddingCollator
from dpo_lightning.data.packing import PackingCollator
from dpo_lightning.data.prefix_sharing import PrefixSharingCollator, shared_length
from dpo_lightning.stages import DPOModule
from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.stages.options import MemoryOptions

VOCAB = 64
CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB),
    "qwen2": dict(
        model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB,
    ),
}


def features(n_pairs: int, seed: int = 0) -> list[dict]:
    """Pairs of every kind the tokenizer makes: a common prompt of 1..12 tokens (most pairs); prompts
    that differ in their last token (a BPE merge across the join) or are one token longer on one side;
    an empty prompt; responses of 1..20 tokens that may start alike."""
    rng = random.Random(seed)
    out = []
    for i in range(n_pairs):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))]
        prompts = {"chosen": prompt, "rejected": prompt}
        kind = i % 5
        if kind == 1:  # the last prompt token merged differently on each side
            prompts["rejected"] = prompt[:-1] + [(prompt[-1] % (VOCAB - 1)) + 1]
        elif kind == 2:  # one side's boundary a token later
            prompts["chosen"] = prompt + [rng.randrange(1, VOCAB)]
        elif kind == 3:
            prompts = {"chosen": [], "rejected": []}
        opening = [rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 3))]  # responses that start alike
        sides = {}
        for side in ("chosen", "rejected"):
            response = opening + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 17))]
            sides[f"{side}_input_ids"] = prompts[side] + response
            sides[f"{side}_response_start"] = len(prompts[side])
        out.append(sides)
    return out


def test_worked_example():
    batch = PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=16)(EXAMPLE)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 6, 9, 3, 4, 3, 4, 4, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 9, -100, 4, -100, 4, 4, 2]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 1, 1, 3, 3, 3, 3]]
    assert batch["num_sequences"] == 4 and batch["num_tokens"] == 13
    allowed = (batch["attention_mask"] == 0)[0, 0].int()  # (12, 12): query row, key column
    assert batch["attention_mask"].shape == (1, 1, 12, 12)
    assert allowed[:6, :6].tolist() == [  # pair 0: shared [5], chosen [6, 7, 8], rejected [6, 9]
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],  # the rejected branch sees the shared prompt and itself, not the chosen branch
        [1, 0, 0, 0, 1, 1],
    ]
    assert allowed[6:, 6:].tolist() == [  # pair 1 shares nothing: two independent sequences
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1],
    ]
    assert not allowed[6:, :6].any() and not allowed[:6, 6:].any()  # pairs do not see each other


def test_shared_length():
    assert shared_length([1, 2, 3, 4], 3, [1, 2, 3, 5], 3) == 2  # prompt [1, 2, 3]: its last token not shared
    assert shared_length([1, 2, 3, 4], 3, [1, 2, 9, 5], 3) == 1  # the prompts part at their last token
    assert shared_length([1, 2, 3, 4], 3, [1, 2, 3, 4, 5], 4) == 2  # boundaries differ: the shorter prompt
    assert shared_length([1, 2, 3, 4], 3, [1, 2, 3, 4], 3) == 2  # responses alike: still only the prompt
    assert shared_length([7, 2], 0, [7, 3], 0) == 0 and shared_length([1, 2], 1, [3, 2], 1) == 0


def test_registered_rows_keep_every_token_and_fit_the_budget():
    feats = features(10, seed=1)
    collator = build_collator("share", pad_token_id=0, pad_to_multiple_of=8)
    assert isinstance(collator, PrefixSharingCollator) and collator(feats)["input_ids"].shape[1] % 8 == 0
    for budget in (None, 40, 1000):
        batch = PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=budget)(feats)
        ids, seq, pos = batch["input_ids"], batch["sequence_ids"], batch["position_ids"]
        blocks = [len(f["chosen_input_ids"]) + len(f["rejected_input_ids"])
                  - shared_length(f["chosen_input_ids"], f["chosen_response_start"],
                                  f["rejected_input_ids"], f["rejected_response_start"]) for f in feats]
        assert int((seq >= 0).sum(dim=1).max()) <= max(budget or 0, max(blocks))
        assert int((seq >= 0).sum()) == sum(blocks)  # each prompt once
        assert batch["num_tokens"] == sum(len(f[k]) for f in feats for k in ("chosen_input_ids", "rejected_input_ids"))
        for k, f in enumerate(feats):
            # chosen: the shared prefix and the chosen branch, in order, at positions 0..n-1
            assert ids[seq == k].tolist() == f["chosen_input_ids"]
            assert pos[seq == k].tolist() == list(range(len(f["chosen_input_ids"])))
            # rejected: its branch continues from where the shared prefix stops
            rejected = f["rejected_input_ids"]
            first = len(rejected) - int((seq == len(feats) + k).sum())
            assert ids[seq == len(feats) + k].tolist() == rejected[first:]
            assert pos[seq == len(feats) + k].tolist() == list(range(first, len(rejected)))
            assert rejected[:first] == f["chosen_input_ids"][:first]


def _module(config: dict, attn: str, lean: bool) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(model_config=config, attn_implementation=attn, memory=MemoryOptions(lean_logprobs=lean))
    with torch.no_grad():  # a policy different from the reference, so rewards are not all 0
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return module


def _run(module: DPOModule, batch: dict) -> tuple:
    out, policy, ref = module(batch)
    grads = torch.autograd.grad(out.losses.mean(), list(module.model.parameters()))
    return out, policy, ref, grads


@pytest.mark.parametrize(
    ("arch", "attn", "lean"),
    [("llama", "sdpa", False), ("llama", "eager", False), ("llama", "sdpa", True), ("gpt2", "sdpa", False),
     ("gpt2", "sdpa", True), ("qwen2", "sdpa", False), ("qwen2", "sdpa", True)],
    ids=["llama-sdpa", "llama-eager", "llama-sdpa-lean", "gpt2-sdpa", "gpt2-sdpa-lean", "qwen2-sdpa",
         "qwen2-sdpa-lean"],
)
def test_shared_equals_padded(arch, attn, lean):
    """Padded vs shared (one pair per row) vs shared and packed (several pairs per row): log-probs, token
    counts, the mean logit, reference log-probs, losses, rewards and every gradient, 1e-5 (fp32)."""
    module = _module(CONFIGS[arch], attn, lean)
    feats = features(10, seed=2)
    padded = PaddingCollator(pad_token_id=0)(feats)
    packed = PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=100)(feats)
    assert packed["input_ids"].shape[0] < 10
    # fewer token positions than the padded rows (and than packing, which forwards each prompt twice)
    assert int((packed["sequence_ids"] >= 0).sum()) < int(padded["attention_mask"].sum())

    want_out, want_pol, want_ref, want_grads = _run(module, padded)
    for name, batch in (("one pair per row", None), ("packed", packed)):
        if batch is None:  # each pair collated alone: one block per row
            outs = [module(PrefixSharingCollator(pad_token_id=0)([f])) for f in feats]
            logps = torch.stack([pol.logps for _, pol, _ in outs])  # (B, 2): chosen, rejected
            out = type(want_out)(*[torch.cat([getattr(o, f) for o, _, _ in outs]) for f in want_out._fields])
            pol = type(want_pol)(*[torch.stack([getattr(p, f) for _, p, _ in outs]).T.reshape(-1)
                                   for f in want_pol._fields])
            ref = torch.stack([r for _, _, r in outs]).T.reshape(-1)
            assert torch.equal(logps.T.reshape(-1), pol.logps)
            grads = torch.autograd.grad(out.losses.mean(), list(module.model.parameters()))
        else:
            out, pol, ref, grads = _run(module, batch)
        torch.testing.assert_close(pol.logps, want_pol.logps, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(pol.n_tokens, want_pol.n_tokens) and torch.equal(pol.n_correct, want_pol.n_correct)
        torch.testing.assert_close(pol.logits_sum, want_pol.logits_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref, want_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.losses, want_out.losses, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.chosen_rewards, want_out.chosen_rewards, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.rejected_rewards, want_out.rejected_rewards, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_branches_do_not_see_each_other():
    """Changing every chosen response token of pair 0 changes its chosen log-prob and nothing else: not its
    rejected branch (same row, same prompt), not the other pairs in the row."""
    module = _module(CONFIGS["llama"], "sdpa", False)
    feats = [f for f in features(10, seed=3) if f["chosen_response_start"] > 0][:4]
    collator = PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=1000)  # everything in one row
    before = module.sequence_logps(module.model, collator(feats)).logps
    changed = [dict(f) for f in feats]
    start, ids = feats[0]["chosen_response_start"], feats[0]["chosen_input_ids"]
    changed[0]["chosen_input_ids"] = ids[:start] + [(t % (VOCAB - 1)) + 1 for t in (x + 7 for x in ids[start:])]
    batch = collator(changed)
    assert batch["input_ids"].shape[0] == 1
    after = module.sequence_logps(module.model, batch).logps
    others = torch.arange(8) != 0
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0], before[0])


def test_fewer_positions_than_packing_on_shared_prompts():
    """What sharing saves: with prompts of 12 tokens and responses of 1..20, packing forwards 2B prompts,
    sharing B (plus one token per pair)."""
    rng = random.Random(0)
    feats = []
    for _ in range(8):
        prompt = [rng.randrange(1, VOCAB) for _ in range(12)]
        feats.append({f"{s}_input_ids": prompt + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))]
                      for s in ("chosen", "rejected")}
                     | {"chosen_response_start": 12, "rejected_response_start": 12})
    packed = PackingCollator(pad_token_id=0)(feats)
    shared = PrefixSharingCollator(pad_token_id=0)(feats)
    assert int((packed["sequence_ids"] >= 0).sum()) - int((shared["sequence_ids"] >= 0).sum()) == 8 * 11


def test_attention_cost_of_known_configs():
    """Compute per query-key pair over compute per position elsewhere in a layer, ``4 q / (2 P)``.

    Llama-2-7B (LlamaConfig's defaults): q = 4096, P = 4096 * (2 * 4096 + 2 * 4096) + 3 * 4096 * 11008
    = 67,108,864 + 135,266,304 = 202,375,168 -> 16384 / 404,750,336 = 1 / 24,704.
    GPT-2 small: q = 768, P = 768 * 3072 + 2 * 768 * 3072 (no gate) = 7,077,888 -> 3072 / 14,155,776 = 1 / 4,608.
    """
    from transformers import GPT2Config, LlamaConfig

    from dpo_lightning.data.prefix_sharing import attention_cost, layout_cost

    assert 1 / attention_cost(LlamaConfig()) == pytest.approx(24704)
    assert 1 / attention_cost(GPT2Config()) == pytest.approx(4608)
    assert layout_cost(rows=3, width=100, attention_cost=0.01) == 3 * 100 * (1 + 1)


def _pairs(prompt: int, response: int, n: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(1, VOCAB) for _ in range(prompt)]
        sides = {f"{s}_input_ids": p + [rng.randrange(1, VOCAB) for _ in range(rng.randint(response // 2, response))]
                 for s in ("chosen", "rejected")}
        out.append(sides | {"chosen_response_start": prompt, "rejected_response_start": prompt})
    return out


def test_with_an_attention_cost_each_batch_takes_the_cheaper_layout():
    """Long prompts: the shared layout is cheaper and used. Short prompts and long responses under a costly
    attention: plain packing (every sequence whole) is cheaper and used. Both exact against padding."""
    from dpo_lightning.data.prefix_sharing import layout_costs

    module = _module(CONFIGS["llama"], "sdpa", False)
    cost = 1 / 64
    for feats, shares in ((_pairs(prompt=40, response=12), True), (_pairs(prompt=2, response=60), False)):
        shared_cost, packed_cost = layout_costs(feats, cost)
        assert (shared_cost < packed_cost) is shares
        batch = PrefixSharingCollator(pad_token_id=0, attention_cost=cost)(feats)
        whole = sum(len(f[k]) for f in feats for k in ("chosen_input_ids", "rejected_input_ids"))
        assert batch["num_tokens"] == whole
        assert (int((batch["sequence_ids"] >= 0).sum()) < whole) is shares
        want = module.sequence_logps(module.model, PaddingCollator(pad_token_id=0)(feats))
        got = module.sequence_logps(module.model, batch)
        torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.n_tokens, want.n_tokens)
    # without an attention cost (an explicit data.collator: share) the second batch is shared all the same
    batch = PrefixSharingCollator(pad_token_id=0)(_pairs(prompt=2, response=60))
    assert int((batch["sequence_ids"] >= 0).sum()) < batch["num_tokens"]


@pytest.mark.parametrize(("collator", "expected"), [("auto", "model"), ("share", None)])
def test_auto_gives_the_collator_the_models_attention_cost(collator, expected):
    import lightning as L

    from dpo_lightning import PreferenceDataModule
    from dpo_lightning.data.prefix_sharing import attention_cost
    from dpo_lightning.data.synthetic import generate_pairs

    data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=generate_pairs(16, 0), val_split=None,
                                max_length=64, batch_size=4, collator=collator)
    module = DPOModule(model_config={**CONFIGS["llama"], "vocab_size": data.vocab_size}, tokenizer=data.tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    collate = data.collate_fn
    assert isinstance(collate, PrefixSharingCollator) and data.collator_name == "share"
    want = attention_cost(module.model.config) if expected == "model" else None
    assert collate.attention_cost == want
    assert want is None or want == pytest.approx(4 * 32 / (2 * (32 * (64 + 32) + 3 * 32 * 64)))


_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, vocab_size=VOCAB)
MORE_ARCHITECTURES = {
    "gemma": (dict(model_type="gemma", head_dim=8, **_BASE), "sdpa"),
    "gemma2": (dict(model_type="gemma2", head_dim=8, sliding_window=4096, **_BASE), "eager"),  # eager only
    "gemma3_text": (dict(model_type="gemma3_text", head_dim=8, sliding_window=4096, **_BASE), "sdpa"),
    "qwen3": (dict(model_type="qwen3", head_dim=8, **_BASE), "sdpa"),
    "mistral": (dict(model_type="mistral", **_BASE), "sdpa"),
    "olmo2": (dict(model_type="olmo2", **_BASE), "sdpa"),
    "granite": (dict(model_type="granite", **_BASE), "sdpa"),
    "cohere": (dict(model_type="cohere", **_BASE), "sdpa"),
    "stablelm": (dict(model_type="stablelm", **_BASE), "sdpa"),
    "starcoder2": (dict(model_type="starcoder2", **_BASE), "sdpa"),
    "gpt_neox": (dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=256, vocab_size=VOCAB), "sdpa"),
    "phi": (dict(model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, vocab_size=VOCAB), "sdpa"),
    "falcon": (dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=VOCAB, alibi=False, new_decoder_architecture=False, multi_query=True), "sdpa"),
}


@pytest.mark.parametrize("arch", sorted(MORE_ARCHITECTURES))
def test_shared_log_probs_equal_padded_across_architectures(arch):
    """Forward only, the families a user is likely to bring (their packing path takes position_ids and a 4D
    mask; ALiBi models pad instead, tests/test_preflight.py): per-sequence log-probs 1e-5."""
    config, attn = MORE_ARCHITECTURES[arch]
    module = _module(config, attn, False)
    assert CausalLMModule.packing_unsupported(module) is None
    feats = features(6, seed=2)
    with torch.no_grad():
        want = module.sequence_logps(module.model, PaddingCollator(pad_token_id=0)(feats))
        got = module.sequence_logps(module.model, PrefixSharingCollator(pad_token_id=0, max_tokens_per_row=100)(feats))
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.n_tokens, want.n_tokens)
