"""UltraFeedback-binarized rows load as they are: ``chosen`` / ``rejected`` are whole conversations that
repeat the prompt, next to columns nothing reads (``prompt_id``, ``messages``, scores).

The fixtures are local JSON-lines files with the exact shape of the Hub datasets (nothing is
downloaded): HuggingFaceH4/ultrafeedback_binarized (a string ``prompt``) and
trl-lib/ultrafeedback_binarized (no ``prompt``: the implicit-prompt layout). TRL 1.16 fails on the
first; here both give the same token ids as the plain conversational rows they stand for.
"""

from __future__ import annotations

import hashlib
import logging

import pytest

from dpo_lightning.data import DataError, KTODataModule, PreferenceDataModule

QUESTIONS = [
    ("what is two plus four?", "it is six", "it is nine"),
    ("how are you today?", "I am fine thank you", "no"),
    ("tell me about cats", "sure here you go: cats are good", "sorry I can not help with that"),
    ("is it rain today?", "maybe, the weather is bad", "never"),
]
EXTRA_COLUMNS = ["prompt_id", "messages", "score_chosen", "score_rejected"]


def turn(role: str, content: str) -> dict[str, str]:
    return {"content": content, "role": role}  # the Hub rows list "content" first


def h4_row(prompt: str, good: str, bad: str) -> dict:
    """One row of HuggingFaceH4/ultrafeedback_binarized (train_prefs), field for field."""
    chosen = [turn("user", prompt), turn("assistant", good)]
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "chosen": chosen,
        "rejected": [turn("user", prompt), turn("assistant", bad)],
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 5.5,
    }


def trl_row(prompt: str, good: str, bad: str) -> dict:
    """One row of trl-lib/ultrafeedback_binarized: the same conversations, no prompt column."""
    row = h4_row(prompt, good, bad)
    return {k: row[k] for k in ("chosen", "rejected", "score_chosen", "score_rejected")}


def plain_row(prompt: str, good: str, bad: str) -> dict:
    """The conversational row (TRL's format) that an UltraFeedback row stands for."""
    return {"prompt": [turn("user", prompt)], "chosen": [turn("assistant", good)], "rejected": [turn("assistant", bad)]}


def make(tokenizer, dataset, cls=PreferenceDataModule, **kwargs) -> PreferenceDataModule | KTODataModule:
    kwargs.setdefault("max_length", 96)
    kwargs.setdefault("max_prompt_length", 48)
    kwargs.setdefault("val_split", None)
    dm = cls(tokenizer, dataset, **kwargs)
    dm.setup("fit")
    return dm


def ignored_warnings(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [line for line in lines if "ignoring column" in line]


@pytest.mark.parametrize(
    ("shape", "reads"),
    [(h4_row, "explicit_prompt layout reads only prompt, chosen, rejected"),
     (trl_row, "implicit_prompt layout reads only chosen, rejected")],
    ids=["HuggingFaceH4", "trl-lib"],
)  # fmt: skip
def test_ultrafeedback_rows_load_as_they_are(chat_tokenizer, rows_writer, cache_dir, caplog, shape, reads):
    path = rows_writer("ultrafeedback.jsonl", [shape(*q) for q in QUESTIONS])
    with caplog.at_level(logging.WARNING):
        dm = make(chat_tokenizer, str(path), cache_dir=cache_dir)
    train = dm.splits["train"]
    expected = make(chat_tokenizer, [plain_row(*q) for q in QUESTIONS]).splits["train"]
    assert train[:] == expected[:]  # the same ids and boundaries as the conversational rows
    ids, start = train[0]["chosen_input_ids"], train[0]["chosen_response_start"]
    assert chat_tokenizer.decode(ids[:start]) == "<s><|user|>\nwhat is two plus four?<|end|>\n<|assistant|>\n"
    assert chat_tokenizer.decode(ids[start:]) == "it is six<|end|>\n"  # the prompt is not trained on twice
    extra = [c for c in EXTRA_COLUMNS if c in shape(*QUESTIONS[0])]
    assert ignored_warnings(caplog) == [  # one warning, naming every unread column
        f"{path}: ignoring column(s) {extra} of split 'train'; the {reads} (list them in drop_columns to drop "
        "them without this warning)"
    ]


def test_ultrafeedback_extra_columns_one_warning_for_all_splits(
    chat_tokenizer, rows_writer, tmp_path, cache_dir, caplog
):
    folder = tmp_path / "uf"
    folder.mkdir()
    rows_writer("uf/train.jsonl", [h4_row(*q) for q in QUESTIONS])
    rows_writer("uf/test.jsonl", [h4_row(*q) for q in QUESTIONS[:2]])
    with caplog.at_level(logging.WARNING):
        dm = make(chat_tokenizer, str(folder), test_split="test", cache_dir=cache_dir)
    assert len(dm.splits["train"]) == 4 and len(dm.splits["test"]) == 2
    assert ignored_warnings(caplog) == [
        f"{folder}: ignoring column(s) {EXTRA_COLUMNS} of splits ['train', 'test']; the explicit_prompt layout "
        "reads only prompt, chosen, rejected (list them in drop_columns to drop them without this warning)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dropped = make(chat_tokenizer, str(folder), test_split="test", cache_dir=cache_dir, drop_columns=EXTRA_COLUMNS)
    assert ignored_warnings(caplog) == []  # listed in drop_columns: dropped without a word
    assert dropped.splits["train"][:] == dm.splits["train"][:]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make(chat_tokenizer, str(folder), test_split="test", cache_dir=cache_dir, drop_columns=["messages"])
    assert ignored_warnings(caplog) == [
        f"{folder}: ignoring column(s) ['prompt_id', 'score_chosen', 'score_rejected'] of splits ['train', 'test']; "
        "the explicit_prompt layout reads only prompt, chosen, rejected (list them in drop_columns to drop them "
        "without this warning)"
    ]


def test_message_list_prompt_repeated_by_the_sides(chat_tokenizer, rows_writer, cache_dir):
    """The other layout: ``prompt`` itself a message list, which chosen and rejected start with."""
    system = turn("system", "be brief")
    rows = []
    for q in QUESTIONS:
        prompt = [system, turn("user", q[0])]
        rows.append({"prompt": prompt, "chosen": [*prompt, turn("assistant", q[1])],
                     "rejected": [*prompt, turn("assistant", q[2])]})  # fmt: skip
    plain = [{**plain_row(*q), "prompt": [system, turn("user", q[0])]} for q in QUESTIONS]
    train = make(chat_tokenizer, str(rows_writer("repeat.jsonl", rows)), cache_dir=cache_dir).splits["train"]
    assert train[:] == make(chat_tokenizer, plain).splits["train"][:]


def test_multi_turn_string_prompt(chat_tokenizer):
    """H4's multi-turn sets (a string ``prompt`` that opens a longer conversation): the prompt is the
    conversation the sides share, the response only the last assistant turn."""
    shared = [turn("user", "hello"), turn("assistant", "hi"), turn("user", "how are you?")]
    chosen, rejected = [*shared, turn("assistant", "fine")], [*shared, turn("assistant", "bad")]
    row = {"prompt": "hello", "chosen": chosen, "rejected": rejected}
    side = make(chat_tokenizer, [row, row]).splits["train"][0]
    ids, start = side["chosen_input_ids"], side["chosen_response_start"]
    assert chat_tokenizer.decode(ids[:start]).endswith("<|user|>\nhow are you?<|end|>\n<|assistant|>\n")
    assert chat_tokenizer.decode(ids[start:]) == "fine<|end|>\n"


def test_repeated_user_turn_must_equal_the_prompt(chat_tokenizer, rows_writer, cache_dir):
    rows = [h4_row(*q) for q in QUESTIONS]
    rows[2]["rejected"][0]["content"] = "tell me about dogs"
    path = rows_writer("uf.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"uf\.jsonl \(split 'train'\), row 2, field 'rejected': its user turn differs from 'prompt' "
        r"\(first difference at character 14: 'dogs' versus 'cats'\)",
    ):
        make(chat_tokenizer, str(path), cache_dir=cache_dir)
    rows[2]["rejected"][0]["content"] = rows[2]["chosen"][0]["content"] = "tell me about cats "
    path = rows_writer("uf2.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2, field 'chosen': the user turn it shares with 'rejected' differs"):
        make(chat_tokenizer, str(path), cache_dir=cache_dir)


def test_identical_ultrafeedback_pair_is_dropped_and_counted(chat_tokenizer, caplog):
    rows = [h4_row(*q) for q in QUESTIONS] + [h4_row("hello", "same", "same")]
    with caplog.at_level(logging.WARNING):
        dm = make(chat_tokenizer, rows)
    assert len(dm.splits["train"]) == 4
    assert "dropped 1 of 5 pairs whose chosen equals rejected" in caplog.text


def test_ultrafeedback_rows_unpaired_for_kto(chat_tokenizer):
    dm = make(chat_tokenizer, [h4_row(*q) for q in QUESTIONS], cls=KTODataModule, batch_size=2)
    assert dm.label_counts() == (4, 4)
    first = dm.splits["train"][0]
    assert chat_tokenizer.decode(first["input_ids"][first["response_start"]:]) == "it is six<|end|>\n"
