"""Generating responses from a causal LM for a list of prompts (batched, left-padded, new tokens only).

The shared piece the stages' evaluations use (the SFT recipe's greedy solve rate, a judge's input);
sampling N responses per prompt for preference pairs builds on it with `RowSeededSampler`: each
response draws from a random stream of its own, seeded from (run seed, prompt id, sample index), so
what a prompt gets does not depend on the batch it is in, the batch size, or what ran before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def decode_response(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text of ``new_ids`` as it continues the prompt: ``decode(prompt + new)`` minus ``decode(prompt)``.

    Decoding the new ids alone loses what joins them to the prompt (a word-level tokenizer drops the
    space before the first word; byte-level BPE may split a character across the boundary), and the
    response must re-tokenize after the prompt as it was sampled. Special tokens (EOS, padding) are
    dropped. Falls back to the new ids alone when the prompt does not decode to a prefix.
    """
    full = tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(list(new_ids), skip_special_tokens=True)


def until_eos(ids: list[int], eos: int | None, pad: int | None) -> list[int]:
    """The sampled ids up to and including the first EOS (what follows is padding)."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and pad is not None and ids[-1] == pad and pad != eos:
        ids = ids[:-1]
    return ids


def response_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The seed of one response's random stream: 63 bits of sha256(run seed, prompt id, sample index)."""
    digest = hashlib.sha256(f"{int(seed)}:{prompt_id}:{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowSeededSampler(LogitsProcessor):
    """Samples the next token of every row from the row's own random stream; give it to ``generate``
    with ``do_sample=False``.

    Row i's t-th new token is drawn by inverse CDF with the t-th uniform of a ``torch.Generator``
    seeded with ``seeds[i]`` (`response_seed`): the first token whose cumulative probability
    reaches ``u * total``, u in (0, 1], under the row's scores after the model's own processors
    and then temperature, top-k and top-p (transformers' warpers, in ``generate``'s order). The
    distribution is the one ``do_sample=True`` samples from; only the random numbers differ: the
    process's global RNG is neither read nor advanced, and a row's tokens depend on its seed and its
    own logits alone, not on the rows beside it. The returned scores are 0 at the chosen token and
    -inf elsewhere, so greedy decoding emits it. (A token of probability 0 is never chosen: u > 0.)
    """

    def __init__(
        self, seeds: Sequence[int], prompt_width: int, max_new_tokens: int, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0,
    ) -> None:
        self.start = prompt_width  # input length before the first new token
        # (R, max_new_tokens): row i's t-th token uses uniforms[i, t], in (0, 1]
        self.uniforms = torch.stack([
            1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds
        ])
        warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start
        scores = self.warpers(input_ids, scores)  # (R, V)
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)  # (R, V), non-decreasing
        u = self.uniforms[:, step].to(cdf.device)[:, None] * cdf[:, -1:]  # (R, 1), in (0, total]
        tokens = torch.searchsorted(cdf, u).clamp_(max=scores.shape[-1] - 1)  # (R, 1): first cdf >= u
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """One response per prompt: the new tokens as text (`decode_response`), in prompt order.

    Greedy by default. Prompts are tokenized as the data modules tokenize a standard prompt (BOS when
    the tokenizer adds one) and left-padded in batches of ``batch_size``; generation stops at EOS.
    The model is put in eval mode for the call and back in its former mode after.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            ids = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **sampling,
            )  # (b, prompt + new)
            width = batch["input_ids"].shape[1]
            for row, mask, sampled in zip(batch["input_ids"], batch["attention_mask"], ids[:, width:]):
                out.append(decode_response(tokenizer, row[mask.bool()].tolist(), sampled.tolist()))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


__all__ = ["RowSeededSampler", "decode_response", "generate", "response_seed", "until_eos"]
