"""The lean log-prob path (hidden states -> chunked LM head) against the plain full-logits path.

Equal in value and in gradient w.r.t. the hidden states, the LM head weight and its bias; with
the logit transforms some architectures apply; through DPOModule; and it never keeps a
``(N, T, V)`` tensor for backward.
"""

import pytest
import torch
from transformers import AutoConfig

from dpo_lightning.models.lm_head import backbone_and_head, lean_sequence_logps, logit_transform
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.logprobs import sequence_logps, sequence_logps_from_hidden
from dpo_lightning.stages import DPOModule
from dpo_lightning.stages.options import MemoryOptions

from tiny import random_batch, tiny_config

V = 300  # larger than any activation width of the tiny configs, so (N, T, V) is the biggest tensor

# Architectures that post-process their logits, with small transforms so the test notices a mistake.
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, vocab_size=V)
TRANSFORM_CONFIGS = {
    "gemma2": dict(model_type="gemma2", head_dim=8, final_logit_softcapping=2.0, **_SMALL),
    "cohere": dict(model_type="cohere", logit_scale=0.5, **_SMALL),
}


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_elements", [1, 7 * V, 1 << 26])
@pytest.mark.parametrize(("with_bias", "scale", "softcap"), [(False, 1.0, None), (True, 0.5, None), (True, 2.0, 3.0)])
def test_from_hidden_matches_plain(chunk_elements, with_bias, scale, softcap):
    batch = random_batch(b=3, t=10, vocab=V)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 10, 16, generator=g, requires_grad=True)
    weight = torch.randn(V, 16, generator=g).requires_grad_(True)
    bias = torch.randn(V, generator=g).requires_grad_(True) if with_bias else None

    logits = torch.nn.functional.linear(hidden, weight, bias) * scale  # (N, T, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    plain = sequence_logps(logits, batch["labels"])
    lean = sequence_logps_from_hidden(
        hidden, weight, batch["labels"], lm_head_bias=bias, logit_scale=scale, logit_softcap=softcap,
        chunk_elements=chunk_elements,
    )
    torch.testing.assert_close(lean.logps, plain.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean.logits_sum, plain.logits_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean.entropy_sum, plain.entropy_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(lean.n_tokens, plain.n_tokens) and torch.equal(lean.n_correct, plain.n_correct)

    w = torch.linspace(-1, 2, 6)  # distinct per-sequence weights exercise every row's gradient
    for got, want in zip(_grads((lean.logps * w).sum(), [hidden, weight, bias]),
                         _grads((plain.logps * w).sum(), [hidden, weight, bias])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_from_hidden_gradcheck_float64():
    batch = random_batch(b=1, t=6, vocab=11)
    hidden = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)

    def fn(h, w, b):
        out = sequence_logps_from_hidden(h, w, batch["labels"], lm_head_bias=b, logit_scale=0.7, logit_softcap=2.0,
                                         chunk_elements=3 * 11)
        return out.logps

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "cohere"])
def test_model_lean_matches_plain(arch):
    """Value and gradients of every parameter (LM head included, tied to the embeddings on gpt2)."""
    config = TRANSFORM_CONFIGS[arch] if arch in TRANSFORM_CONFIGS else tiny_config(arch, vocab_size=V)
    model = load_causal_lm(None, config=config, attn_implementation="eager").train()
    for module in model.modules():  # dropout would make the two forwards differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = random_batch(b=3, t=12, vocab=V)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = [p for p in model.parameters() if p.requires_grad]

    plain = sequence_logps(model(**inputs).logits, batch["labels"])
    plain_grads = torch.autograd.grad(plain.logps.sum(), params)
    lean = lean_sequence_logps(model, inputs, batch["labels"], chunk_elements=5 * V)
    lean_grads = torch.autograd.grad(lean.logps.sum(), params)

    torch.testing.assert_close(lean.logps, plain.logps, rtol=1e-5, atol=1e-5)
    for got, want in zip(lean_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert backbone_and_head(model)[1].weight.grad is None  # autograd.grad, nothing accumulated


def _largest_saved(fn) -> int:
    """Run ``fn`` and return the numel of the largest tensor autograd saved for backward."""
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return largest


def test_no_logits_sized_tensor_is_saved():
    model = load_causal_lm(None, config=tiny_config("llama", vocab_size=V)).train()
    batch = random_batch(b=3, t=12, vocab=V)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    n, t = batch["input_ids"].shape

    plain = _largest_saved(lambda: sequence_logps(model(**inputs).logits, batch["labels"]).logps.sum().backward())
    lean = _largest_saved(lambda: lean_sequence_logps(model, inputs, batch["labels"]).logps.sum().backward())
    assert plain >= n * t * V  # the plain path keeps the logits for backward
    assert lean <= V * model.config.hidden_size  # the lean path keeps at most the LM head weight
    assert lean < n * t * V


def test_module_lean_option_matches_plain():
    batch = random_batch(b=2, t=10, vocab=V)
    torch.manual_seed(0)
    plain_module = DPOModule(model_config=tiny_config("llama", vocab_size=V))
    torch.manual_seed(0)
    lean_module = DPOModule(model_config=tiny_config("llama", vocab_size=V), memory=MemoryOptions(lean_logprobs=True))
    lean_module.model.load_state_dict(plain_module.model.state_dict())
    lean_module.ref_model.load_state_dict(plain_module.ref_model.state_dict())
    (plain_out, plain_policy, _), (lean_out, lean_policy, _) = plain_module(batch), lean_module(batch)
    torch.testing.assert_close(lean_policy.logps, plain_policy.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_out.losses, plain_out.losses, rtol=1e-5, atol=1e-5)


def test_logit_transforms_detected_and_refused():
    gemma2 = AutoConfig.for_model("gemma2", final_logit_softcapping=30.0)
    assert logit_transform(gemma2) == (1.0, 30.0)
    cohere = AutoConfig.for_model("cohere", logit_scale=0.0625)
    assert logit_transform(cohere) == (0.0625, None)
    granite = AutoConfig.for_model("granite", logits_scaling=8.0)
    assert logit_transform(granite) == (0.125, None)
    assert logit_transform(AutoConfig.for_model("llama")) == (1.0, None)
    falcon_h1 = AutoConfig.for_model("falcon_h1", lm_head_multiplier=0.5)
    with pytest.raises(NotImplementedError, match="lm_head_multiplier"):
        logit_transform(falcon_h1)
