"""Generating responses from a causal LM for a list of prompts (batched, left-padded, new tokens only).

The shared piece the stages' evaluations use (the SFT recipe's greedy solve rate, a judge's input);
sampling N responses per prompt for preference pairs builds on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


__all__ = ["decode_response", "generate"]
