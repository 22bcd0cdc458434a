"""Benchmark inputs: HH preference strings, a BPE tokenizer trained on them, synthetic pairs, a saved model.

Everything both sides consume goes through a folder: ``model/`` (random-init weights + tokenizer,
saved once) and ``pairs.jsonl`` (explicit ``prompt``/``chosen``/``rejected`` strings). Both
libraries tokenize those same strings; ``keep_pairs`` drops the pairs that could not be compared
token for token (identical sides, a prompt that fills ``max_length``, a BPE merge across the
prompt/response boundary that gives the two sides different prompt tokens).
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from dpo_lightning.data import PreferenceExample, TokenizeConfig, render, tokenize_pairs
from dpo_lightning.data.formats import split_implicit_text

EOS = "<|endoftext|>"


def load_hh(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """HH rows (whole conversations) -> explicit prompt/chosen/rejected strings, via our formats code."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt, chosen, rejected = split_implicit_text(row["chosen"], row["rejected"])
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``; EOS doubles as padding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per word ``t<i>``: synthetic strings tokenize to exactly the ids they were made from."""
    vocab = {EOS: 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def synthetic_pairs(n: int, length: int, vocab_size: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs whose prompt + response + EOS is exactly ``length`` tokens (prompt = a quarter), random ids."""
    rng = random.Random(seed)
    words = lambda k: "".join(f" t{rng.randrange(1, vocab_size)}" for _ in range(k))  # noqa: E731
    prompt_len = length // 4
    response_len = length - prompt_len - 1  # room for EOS
    return [
        {"prompt": words(prompt_len).lstrip(), "chosen": words(response_len), "rejected": words(response_len)}
        for _ in range(n)
    ]


def shaped_pairs(n: int, prompt: int, response: int, vocab_size: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs with a prompt of ``prompt // 2 .. prompt`` random tokens and responses of ``response // 2 ..
    response`` tokens (+ EOS), for a word-level tokenizer (one id per word)."""
    rng = random.Random(seed)
    words = lambda k: "".join(f" t{rng.randrange(1, vocab_size)}" for _ in range(k))  # noqa: E731
    length = lambda k: rng.randint(k // 2, k)  # noqa: E731
    return [
        {"prompt": words(length(prompt)).lstrip(), "chosen": words(length(response)),
         "rejected": words(length(response))}
        for _ in range(n)
    ]


def keep_pairs(rows: list[dict[str, str]], tokenizer, max_length: int) -> list[dict[str, str]]:
    """The rows both libraries tokenize identically and can train on (see the module docstring)."""
    cfg = TokenizeConfig(max_length=max_length, max_prompt_length=None)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    sides = tokenize_pairs([render(e, tokenizer, None) for e in examples], tokenizer, cfg)
    kept = []
    for row, (chosen, rejected) in zip(rows, sides):
        same_prompt = chosen.input_ids[: chosen.response_start] == rejected.input_ids[: rejected.response_start]
        if row["chosen"] != row["rejected"] and same_prompt and chosen.response_length and rejected.response_length:
            kept.append(row)
    return kept


def llama_config(vocab_size: int, max_length: int, layers: int = 4, hidden: int = 256, heads: int = 4,
                 kv_heads: int | None = None, intermediate: int | None = None) -> AutoConfig:
    return AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max(max_length, 2048),
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def write_inputs(folder: Path, rows: list[dict[str, str]], tokenizer, config, seed: int = 0) -> None:
    """Save the random-init model and tokenizer to ``folder/model`` and the pairs to ``folder/pairs.jsonl``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def mixed_pairs(n: int, batch_size: int, long_length: int, vocab_size: int, short_length: int = 128,
                seed: int = 0) -> list[dict[str, str]]:
    """Pairs of ``short_length`` tokens, except the first chosen response of every batch, which makes
    its sequence ``long_length`` tokens: padding to the longest row then costs ``2 B long_length``
    token slots for about ``long_length + (2 B - 1) short_length`` real tokens."""
    rng = random.Random(seed)
    words = lambda k: "".join(f" t{rng.randrange(1, vocab_size)}" for _ in range(k))  # noqa: E731
    prompt_len = 32
    short, long = short_length - prompt_len - 1, long_length - prompt_len - 1  # room for EOS
    return [
        {"prompt": words(prompt_len).lstrip(), "chosen": words(long if i % batch_size == 0 else short),
         "rejected": words(short)}
        for i in range(n)
    ]
