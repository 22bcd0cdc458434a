"""The prompt/response boundary, special tokens and truncation, checked with tokenizers trained here."""

from __future__ import annotations

import logging
import random

import pytest

from dpo_lightning.data import PreferenceDataModule, PreferenceExample, TokenizeConfig, render, tokenize_pairs
from dpo_lightning.data.errors import RowRef
from dpo_lightning.data.tokenize import TokenizedSide, common_prefix_length, truncate

REF = RowRef("test", "train", 0)


def sides(tokenizer, prompt, chosen, rejected=" no", **config) -> tuple[TokenizedSide, TokenizedSide]:
    rendered = render(PreferenceExample(prompt, chosen, rejected), tokenizer, REF)
    return tokenize_pairs([rendered], tokenizer, TokenizeConfig(**config))[0]


def split_text(tokenizer, side: TokenizedSide) -> tuple[str, str]:
    return tokenizer.decode(side.input_ids[: side.response_start]), tokenizer.decode(
        side.input_ids[side.response_start :]
    )


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([1, 2, 3], [1, 5, 3, 4]) == 1
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([9], [1]) == 0


def test_truncate_hand_made():
    """Prompt 0..5 (6 tokens), response 6..9 (4). max_prompt_length=4 cuts 2 prompt tokens; then
    max_length=7 leaves room for 3 of the 4 response tokens: 1 cut. The last two fields count the cuts."""
    ids, start = list(range(10)), 6
    keep_end = TokenizeConfig(max_length=7, max_prompt_length=4, truncation_mode="keep_end")
    assert truncate(ids, start, keep_end) == ([2, 3, 4, 5, 6, 7, 8], 4, 2, 1)
    assert truncate(ids, start, keep_end, keep_first=1) == ([0, 3, 4, 5, 6, 7, 8], 4, 2, 1)  # BOS stays first
    keep_start = keep_end._replace(truncation_mode="keep_start")
    assert truncate(ids, start, keep_start) == ([0, 1, 2, 3, 6, 7, 8], 4, 2, 1)
    # No prompt limit: max_length=6 is filled by the prompt and the whole response (4 tokens) goes.
    assert truncate(ids, start, TokenizeConfig(max_length=6, max_prompt_length=None)) == ([0, 1, 2, 3, 4, 5], 6, 0, 4)
    assert truncate(ids, start, TokenizeConfig(max_length=10, max_prompt_length=6)) == (ids, 6, 0, 0)


def random_rows(words: list[str], n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompts ending in words, punctuation, a space or a newline; responses with and without a space."""
    rng = random.Random(seed)
    endings = ["?", ":", "\n\nAssistant:", " Answer:", ".", "\n"]
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(words, k=rng.randint(1, 12))) + rng.choice(endings)
        responses = [
            rng.choice([" ", "", "\n"])
            + " ".join(rng.choices(words, k=rng.randint(1, 8)))
            + rng.choice(["", "."])
            for _ in range(2)
        ]
        rows.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
    return rows


EDGE_ROWS = [
    # The response starts without a space after punctuation: the boundary is a token boundary.
    {"prompt": "\n\nHuman: hello?\n\nAssistant:", "chosen": "sure", "rejected": "no"},
    {"prompt": "Question: two plus four Answer:", "chosen": "six", "rejected": "\nsix"},
    # The prompt ends in a space, which byte-level BPE merges into the next word (handled below).
    {"prompt": "Question: hello ", "chosen": "world", "rejected": "dog"},
]


def test_labels_decode_to_the_response(bpe_tokenizer, words):
    """Through the real pipeline and collator: for every row and side, the label tokens decode to
    the response (+ EOS), the prompt tokens to the prompt; nothing is lost or duplicated."""
    rows = EDGE_ROWS + random_rows(words, 80)
    dm = PreferenceDataModule(
        bpe_tokenizer, rows, max_length=256, max_prompt_length=128, batch_size=len(rows)
    )
    dm.setup("fit")
    batch = dm.collate_fn([dm.splits["train"][i] for i in range(len(rows))])
    eos = bpe_tokenizer.eos_token
    for i, row in enumerate(rows * 2):
        response = row["chosen"] if i < len(rows) else row["rejected"]
        labels, mask = batch["labels"][i], batch["attention_mask"][i].bool()
        prompt_ids = batch["input_ids"][i][mask & (labels == -100)]
        decoded_prompt, decoded_response = (
            bpe_tokenizer.decode(prompt_ids),
            bpe_tokenizer.decode(labels[labels != -100]),
        )
        assert decoded_prompt + decoded_response == row["prompt"] + response + eos
        if row["prompt"].endswith(" ") and not response.startswith(" "):
            # "hello " + "world" is [hello, Ġworld]: the space is predicted with the first response token.
            assert (decoded_prompt, decoded_response) == (row["prompt"][:-1], " " + response + eos)
        else:
            assert decoded_response == response + eos, row


def test_edge_rows_token_level(bpe_tokenizer):
    chosen, rejected = sides(bpe_tokenizer, "Question: hello ", "world", "dog")
    assert split_text(bpe_tokenizer, chosen) == ("Question: hello", " world<|endoftext|>")
    assert bpe_tokenizer.convert_ids_to_tokens(chosen.input_ids[chosen.response_start :]) == [
        "Ġworld",
        "<|endoftext|>",
    ]
    chosen, _ = sides(bpe_tokenizer, "\n\nHuman: hello?\n\nAssistant:", "sure")
    assert split_text(bpe_tokenizer, chosen) == ("\n\nHuman: hello?\n\nAssistant:", "sure<|endoftext|>")


def test_merge_inside_a_word(bpe_tokenizer):
    """A response that continues the prompt's last word: the merged token belongs to the response."""
    chosen, _ = sides(bpe_tokenizer, "hello wor", "ld")
    prompt, response = split_text(bpe_tokenizer, chosen)
    assert prompt + response == "hello world<|endoftext|>"
    assert response.endswith("ld<|endoftext|>") and "hello wor".startswith(prompt)


def test_bos_once_and_eos_appended(bos_tokenizer):
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    chosen, rejected = sides(bos_tokenizer, "hello", " world", " dog</s>")
    for side in (chosen, rejected):
        assert side.input_ids[0] == bos and side.input_ids.count(bos) == 1
        assert side.input_ids[-1] == eos and side.input_ids.count(eos) == 1  # not twice when already there
    assert split_text(bos_tokenizer, chosen) == ("<s>hello", " world</s>")


def test_no_bos_for_gpt2_style(bpe_tokenizer):
    chosen, _ = sides(bpe_tokenizer, "hello", " world")
    assert bpe_tokenizer.eos_token_id not in chosen.input_ids[:-1]


def test_chat_template_boundary_and_single_bos(chat_tokenizer):
    """The template writes BOS and the tokenizer would add one too: exactly one remains. The response
    is the assistant turn as the template renders it, end-of-turn included, no extra EOS."""
    example = PreferenceExample(
        [{"role": "user", "content": "hello"}],
        [{"role": "assistant", "content": "fine"}],
        [{"role": "assistant", "content": "bad"}],
    )
    chosen, rejected = tokenize_pairs(
        [render(example, chat_tokenizer, REF)], chat_tokenizer, TokenizeConfig()
    )[0]
    assert chosen.input_ids.count(chat_tokenizer.bos_token_id) == 1
    assert chosen.input_ids[0] == chat_tokenizer.bos_token_id
    assert split_text(chat_tokenizer, chosen) == (
        "<s><|user|>\nhello<|end|>\n<|assistant|>\n",
        "fine<|end|>\n",
    )
    assert split_text(chat_tokenizer, rejected)[1] == "bad<|end|>\n"


def test_template_rendering_the_prompt_differently(chat_tokenizer):
    """A template whose generation prompt differs from how it renders the assistant header inside a
    conversation: the response starts where the token sequences diverge, and nothing is lost."""
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    example = PreferenceExample(
        [{"role": "user", "content": "hello"}],
        [{"role": "assistant", "content": "fine"}],
        [{"role": "assistant", "content": "bad"}],
    )
    chosen, _ = tokenize_pairs([render(example, chat_tokenizer, REF)], chat_tokenizer, TokenizeConfig())[0]
    prompt, response = split_text(chat_tokenizer, chosen)
    assert prompt == "<s><|user|>hello<|end|><|assistant|>"
    assert response == "fine<|end|>"


@pytest.mark.parametrize(
    ("mode", "expected_prompt"),
    [("keep_end", "<s> the lazy dog"), ("keep_start", "<s>the quick brown")],
)
def test_prompt_truncation_modes(bos_tokenizer, mode, expected_prompt):
    prompt = "the quick brown fox jumps over the lazy dog"
    n_prompt = len(bos_tokenizer(prompt)["input_ids"])  # BOS included
    assert n_prompt > 4
    chosen, _ = sides(bos_tokenizer, prompt, " yes", max_length=64, max_prompt_length=4, truncation_mode=mode)
    assert chosen.response_start == 4
    assert split_text(bos_tokenizer, chosen) == (expected_prompt, " yes</s>")


def test_max_length_cuts_the_response_end(bpe_tokenizer):
    chosen, _ = sides(bpe_tokenizer, "hello", " the quick brown fox jumps", max_length=4, max_prompt_length=2)
    assert len(chosen.input_ids) == 4 and chosen.response_start == 1  # the EOS went with the cut end
    assert split_text(bpe_tokenizer, chosen) == ("hello", " the quick brown")


def test_empty_responses_are_dropped_and_counted(bpe_tokenizer, words, caplog):
    long_prompt = " ".join(words[:20])
    rows = [
        {"prompt": "hello", "chosen": " yes", "rejected": " no"},
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
        {"prompt": long_prompt + " dog", "chosen": " yes", "rejected": " no"},
    ]
    dm = PreferenceDataModule(bpe_tokenizer, rows, max_length=8, max_prompt_length=None, val_split=None)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.splits["train"]) == 1
    messages = [r.getMessage() for r in caplog.records if "empty after truncation" in r.getMessage()]
    assert len(messages) == 1 and "dropped 2 of 3 pairs" in messages[0]
