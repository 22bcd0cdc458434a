"""Offline stand-ins for the 7B/8B recipes' inputs: a tiny word-level tokenizer (with or without a chat
template) saved to a folder, and rows in the recipes' data shapes (UltraFeedback binarized pairs,
UltraChat conversations). Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the quick brown fox jumps over a lazy dog while answer question hello world how are you today i am "
    "fine thank what is two plus four it six sure here go can help with that no sorry please tell me about "
    "cats dogs birds weather rain sun yes maybe never always good bad . ? ,"
).split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# Zephyr-like: every turn opens with its role and closes with <|end|>; the generation prompt opens the assistant's.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def save_tokenizer(path: Path, chat_template: bool = True) -> Path:
    """A word-level tokenizer over `WORDS` saved to ``path`` (EOS ``</s>``, no pad token), with
    `CHAT_TEMPLATE` or with no chat template at all (as a base model's)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[:-3]) for _ in range(n))


def ultrafeedback_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like UltraFeedback binarized: a string ``prompt``; ``chosen`` / ``rejected`` the whole
    conversation (the prompt's user turn, then the assistant's answer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _sentence(rng, rng.randint(3, 8))
        sides = [_sentence(rng, rng.randint(2, 10)) for _ in range(2)]
        rows.append({"prompt": prompt, **{
            side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            for side, answer in zip(("chosen", "rejected"), sides)
        }})
    return rows


def ultrachat_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like UltraChat 200k: ``prompt``, ``prompt_id`` and the whole conversation in ``messages``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = [m for _ in range(rng.randint(1, 2)) for m in (
            {"role": "user", "content": _sentence(rng, rng.randint(3, 6))},
            {"role": "assistant", "content": _sentence(rng, rng.randint(2, 8))},
        )]
        rows.append({"prompt": turns[0]["content"], "prompt_id": f"p{i}", "messages": turns})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
