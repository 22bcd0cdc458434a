"""Fixtures for the data tests: small BPE tokenizers trained here on local text, data-file writers.

Nothing is downloaded. The byte-level BPE merges spaces into the following word (GPT-2 style), so
the prompt/response boundary cases the tests check are the ones real tokenizers produce.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the quick brown fox jumps over a lazy dog while answer question hello world how are you today "
    "I am fine thank you what is two plus four it is six sure here you go can help with that no sorry "
    "Human Assistant please tell me about cats dogs birds weather rain sun yes maybe never always "
    "system user assistant role content ok good bad prompt chosen rejected response"
).split()


def corpus() -> list[str]:
    """Deterministic local text: every word in many contexts, HH-style turns and punctuation."""
    lines = []
    for i, word in enumerate(WORDS):
        nxt = WORDS[(i * 7 + 3) % len(WORDS)]
        lines += [
            f"{word} {nxt}. {nxt}, {word}? {word}:{nxt}",
            f"\n\nHuman: {word} {nxt}?\n\nAssistant: {nxt} {word}.",
            f"Question: {word} Answer: {nxt}",
        ]
    return lines * 3


def _train(special_tokens: list[str]) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


@pytest.fixture
def words() -> list[str]:
    """The vocabulary of the training text, for building rows."""
    return list(WORDS)


@pytest.fixture(scope="session")
def _gpt2_like() -> str:
    return _train(["<|endoftext|>"])


@pytest.fixture(scope="session")
def _llama_like() -> str:
    return _train(["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])


@pytest.fixture
def bpe_tokenizer(_gpt2_like: str) -> PreTrainedTokenizerFast:
    """GPT-2 style: BOS == EOS == <|endoftext|>, never added; no pad token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_gpt2_like),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture
def bos_tokenizer(_llama_like: str) -> PreTrainedTokenizerFast:
    """Llama style: encoding puts <s> in front; EOS </s>; no pad token."""
    backend = Tokenizer.from_str(_llama_like)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer(bos_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The Llama-style tokenizer with a small chat template that writes BOS itself."""
    bos_tokenizer.chat_template = CHAT_TEMPLATE
    return bos_tokenizer


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the format the file name asks for (.jsonl, .json, .jsonl.gz, .parquet, .csv)."""
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        from datasets import Dataset

        dataset = Dataset.from_list(rows)
        dataset.to_parquet(str(path)) if name.endswith(".parquet") else dataset.to_csv(str(path), index=False)
    return path


@pytest.fixture
def rows_writer(tmp_path: Path) -> Callable[[str, list[dict[str, Any]]], Path]:
    return lambda name, rows: write_rows(tmp_path / name, rows)


@pytest.fixture
def standard_rows() -> list[dict[str, str]]:
    """Eight well-formed standard rows, no two sides equal."""
    pairs = [(2, 4), (1, 1), (3, 5), (7, 2), (6, 6), (9, 1), (4, 8), (5, 5)]
    return [
        {
            "prompt": f"Question: what is {a} plus {b}? Answer:",
            "chosen": f" {a + b}",
            "rejected": f" {a * b + a + b + 1}",
        }
        for a, b in pairs
    ]


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    """A private datasets cache, so tests neither read nor fill the user's."""
    return str(tmp_path / "hf_cache")
