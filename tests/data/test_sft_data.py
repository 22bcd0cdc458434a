"""`SFTDataModule`: the three SFT layouts, their labels, truncation and drops, the errors that name
the row, the pad and pack batches, and SFT on the chosen side of preference pairs.

Hand-derived ids use the synthetic sort tokenizer (`synthetic.build_tokenizer`): ``<s>`` 1, ``</s>`` 2,
``sort:`` 4, ``=`` 5, digit d is 6 + d; whitespace splits words, BOS is added, EOS is not.
"""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict

from dpo_lightning.data import DataError, PreferenceDataModule, SFTDataModule
from dpo_lightning.data.sft_collate import SFTPackingCollator, SFTPaddingCollator
from dpo_lightning.data.synthetic import build_tokenizer

SORT = build_tokenizer()
IGNORE = -100


def make(tokenizer, dataset, **kwargs) -> SFTDataModule:
    kwargs.setdefault("val_split", None)
    dm = SFTDataModule(tokenizer, dataset, **kwargs)
    dm.setup("fit")
    return dm


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def warnings_with(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive labelled positions, as token ids."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token  # labels are the ids themselves, unshifted
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


# -- layouts and their labels ------------------------------------------------------------------------


def test_prompt_completion_strings():
    """``"sort: 3 1 ="`` + ``" 1 3"``: the whole text is ``<s> sort: 3 1 = 1 3`` + EOS =
    [1, 4, 9, 7, 5, 7, 9, 2]; the prompt alone is [1, 4, 9, 7, 5], so the completion starts at 5 and
    the labels are [-100] * 5 + [7, 9, 2] (the completion and EOS): 3 loss tokens."""
    dm = make(SORT, [{"prompt": "sort: 3 1 =", "completion": " 1 3"}])
    row = dm.splits["train"][0]
    assert dm.splits["train"].column_names == ["input_ids", "labels", "loss_tokens"]
    assert row == {"input_ids": [1, 4, 9, 7, 5, 7, 9, 2], "labels": [IGNORE] * 5 + [7, 9, 2], "loss_tokens": 3}


def test_completion_only_loss_false_labels_every_token():
    """Every token but position 0 (nothing predicts it): [-100, 4, 9, 7, 5, 7, 9, 2], 7 loss tokens."""
    dm = make(SORT, [{"prompt": "sort: 3 1 =", "completion": " 1 3"}], completion_only_loss=False)
    assert dm.splits["train"][0]["labels"] == [IGNORE, 4, 9, 7, 5, 7, 9, 2]
    assert dm.splits["train"][0]["loss_tokens"] == 7


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_text_rows_train_on_every_token(completion_only_loss):
    """``"sort: 3 1 = 1 3"``: BOS prepended, EOS appended, every token but BOS labelled, either way."""
    dm = make(SORT, [{"text": "sort: 3 1 = 1 3"}], completion_only_loss=completion_only_loss)
    assert dm.splits["train"][0] == {
        "input_ids": [1, 4, 9, 7, 5, 7, 9, 2], "labels": [IGNORE, 4, 9, 7, 5, 7, 9, 2], "loss_tokens": 7,
    }  # fmt: skip


def test_text_rows_without_bos(bpe_tokenizer):
    """A GPT-2-style tokenizer adds no BOS: the text's first token is position 0, so it is not a label
    (nothing predicts it); EOS is appended and labelled."""
    row = make(bpe_tokenizer, [{"text": "hello world"}]).splits["train"][0]
    assert bpe_tokenizer.decode(row["input_ids"]) == "hello world<|endoftext|>"
    assert row["labels"][0] == IGNORE and row["labels"][1:] == row["input_ids"][1:]


def test_prompt_completion_messages(chat_tokenizer):
    """Message lists are rendered as unpaired examples are: the completion's labels are the assistant
    turn and the template's end of turn, ``"fine<|end|>\\n"``, nothing else."""
    rows = [{"prompt": [turn("user", "hello")], "completion": [turn("assistant", "fine")]}]
    row = make(chat_tokenizer, rows).splits["train"][0]
    assert chat_tokenizer.decode(row["input_ids"]) == "<s><|user|>\nhello<|end|>\n<|assistant|>\nfine<|end|>\n"
    assert [chat_tokenizer.decode(s) for s in labelled_spans(row["input_ids"], row["labels"])] == ["fine<|end|>\n"]


CONVERSATION = [
    turn("system", "be brief"),
    turn("user", "hello"),
    turn("assistant", "hi"),
    turn("user", "how are you"),
    turn("assistant", "I am fine"),
]


def test_multi_turn_only_assistant_turns_are_labelled(chat_tokenizer):
    """The template renders ``<s>`` then ``<|role|>\\ncontent<|end|>\\n`` per message. The labels are
    exactly the two assistant turns' contents with their end of turn, ``"hi<|end|>\\n"`` and
    ``"I am fine<|end|>\\n"``; the ``<|assistant|>\\n`` headers (the generation prompt) and every
    system/user token are not."""
    row = make(chat_tokenizer, [{"messages": CONVERSATION}]).splits["train"][0]
    ids, labels = row["input_ids"], row["labels"]
    assert chat_tokenizer.decode(ids) == (
        "<s><|system|>\nbe brief<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\nhi<|end|>\n"
        "<|user|>\nhow are you<|end|>\n<|assistant|>\nI am fine<|end|>\n"
    )
    spans = labelled_spans(ids, labels)
    assert [chat_tokenizer.decode(s) for s in spans] == ["hi<|end|>\n", "I am fine<|end|>\n"]
    assert row["loss_tokens"] == sum(len(s) for s in spans)
    # each span starts right after a generation prompt and ends where the next header (or the end) begins
    header = chat_tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    for span in spans:
        start = next(i for i in range(len(ids)) if ids[i : i + len(span)] == span)
        assert ids[start - len(header) : start] == header
        assert start + len(span) == len(ids) or chat_tokenizer.decode(ids[start + len(span)]) == "<|user|>"


def test_multi_turn_completion_only_loss_false(chat_tokenizer):
    row = make(chat_tokenizer, [{"messages": CONVERSATION}], completion_only_loss=False).splits["train"][0]
    assert row["labels"] == [IGNORE] + row["input_ids"][1:]


def test_layout_order_messages_first_then_prompt_completion(caplog):
    """``messages`` wins over prompt/completion, which wins over text; the other columns are named once."""
    rows = [{"prompt": "sort: 3 =", "completion": " 3", "text": "sort: 1 = 1"}]
    with caplog.at_level(logging.WARNING):
        row = make(SORT, rows).splits["train"][0]
    assert row["input_ids"] == [1, 4, 9, 5, 9, 2]
    assert warnings_with(caplog, "ignoring column") == [
        "<list of 1 rows>: ignoring column(s) ['text'] of split 'train'; the prompt_completion layout reads only "
        "prompt, completion (list them in drop_columns to drop them without this warning)"
    ]


def test_columns_map_sft_fields(chat_tokenizer):
    rows = [{"conversation": CONVERSATION, "id": 3}]
    dm = make(chat_tokenizer, rows, columns={"messages": "conversation"}, drop_columns=["id"])
    assert dm.splits["train"][0] == make(chat_tokenizer, [{"messages": CONVERSATION}]).splits["train"][0]


# -- truncation and drops --------------------------------------------------------------------------


def test_truncation_prompt_first_then_end(caplog):
    """Prompt [1, 4, 9, 7, 5] (``<s> sort: 3 1 =``) cut to max_prompt_length=3, keeping BOS and its end:
    [1, 7, 5] (2 cut); then [1, 7, 5, 7, 9, 2] cut to max_length=5 keeping its start: [1, 7, 5, 7, 9]."""
    with caplog.at_level(logging.WARNING):
        dm = make(SORT, [{"prompt": "sort: 3 1 =", "completion": " 1 3"}], max_prompt_length=3, max_length=5)
    assert dm.splits["train"][0] == {"input_ids": [1, 7, 5, 7, 9], "labels": [IGNORE] * 3 + [7, 9], "loss_tokens": 2}
    assert warnings_with(caplog, "truncation cut") == [
        "<list of 1 rows> (split 'train'): truncation cut the prompt of 1 of 1 rows to max_prompt_length=3 tokens "
        "(truncation_mode=keep_end) and 1 of 1 rows to fit max_length=5 tokens"
    ]


def test_rows_without_loss_tokens_are_dropped_and_counted(caplog):
    """max_length=5: row 0's prompt fills it (``<s> sort: 3 1 =``: no completion token left, dropped);
    row 1 ``<s> sort: 2 = 2 </s>`` (6) loses EOS (cut, kept); row 2 ``<s> sort: = 1 </s>`` (5) fits."""
    rows = [
        {"prompt": "sort: 3 1 =", "completion": " 1 3"},
        {"prompt": "sort: 2 =", "completion": " 2"},
        {"prompt": "sort: =", "completion": " 1"},
    ]
    with caplog.at_level(logging.WARNING):
        dm = make(SORT, rows, max_length=5)
    assert dm.splits["train"]["input_ids"] == [[1, 4, 8, 5, 8], [1, 4, 5, 7, 2]]
    assert dm.splits["train"]["loss_tokens"] == [1, 2]
    assert warnings_with(caplog, "dropped") == [
        "<list of 3 rows> (split 'train'): dropped 1 of 3 rows left with no token to train on (every label cut by "
        "truncation, max_length=5, max_prompt_length=None, or a text of one token)"
    ]
    assert warnings_with(caplog, "truncation cut") == [
        "<list of 3 rows> (split 'train'): truncation cut 1 of 2 rows to fit max_length=5 tokens"
    ]


def test_conversation_cut_before_its_assistant_turn_is_dropped(chat_tokenizer, caplog):
    short = [turn("user", "hi"), turn("assistant", "ok")]
    long = [turn("user", " ".join(["the quick brown fox"] * 8)), turn("assistant", "ok")]
    with caplog.at_level(logging.WARNING):
        dm = make(chat_tokenizer, [{"messages": short}, {"messages": long}], max_length=16)
    assert len(dm.splits["train"]) == 1
    assert len(warnings_with(caplog, "dropped 1 of 2 rows left with no token to train on")) == 1


def test_max_prompt_length_ignored_by_layouts_without_a_prompt_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        make(SORT, [{"text": "sort: 1 = 1"}], max_prompt_length=4)
    assert warnings_with(caplog, "max_prompt_length=4 is ignored") == [
        "<list of 1 rows> (split 'train'): max_prompt_length=4 is ignored: the text layout has no separate prompt "
        "(only prompt/completion rows have one); max_length still applies"
    ]


def test_nothing_left_is_an_error():
    with pytest.raises(DataError, match=r"\(split 'train'\): no rows left: all 1 have no token to train on"):
        make(SORT, [{"prompt": "sort: 3 1 =", "completion": " 1 3"}], max_length=5)


# -- bad input: every error names the row ------------------------------------------------------------


GOOD = {"messages": [turn("user", "a"), turn("assistant", "b")]}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD, {"messages": [turn("user", "b"), turn("user", "c")]}],
         r"row 1, field 'messages': roles out of order: message 1 has role 'user' after 'user'"),
        ([GOOD, {"messages": [turn("user", "c")]}],
         r"row 1, field 'messages': has no assistant turn"),
        ([{"messages": []}], r"row 0, field 'messages': is an empty list of messages"),
        ([{"prompt": "p", "completion": " c"}, {"prompt": "p", "completion": ""}],
         r"row 1, field 'completion': is empty"),
        ([{"prompt": "p", "completion": None}], r"row 0, field 'completion': value is missing \(null\)"),
        ([{"prompt": [turn("user", "p")], "completion": [turn("user", "c")]}],
         r"row 0, field 'completion': roles out of order"),
        ([{"text": "a"}, {"text": None}], r"row 1, field 'text': value is missing \(null\)"),
        ([{"text": "a"}, {"text": ""}], r"row 1, field 'text': is empty"),
        ([{"text": [turn("user", "a")]}], r"row 0, field 'text': expected a string, got list"),
    ],
    ids=["role-order", "no-assistant", "empty-conversation", "empty-completion", "null-completion",
         "completion-not-assistant", "null-text", "empty-text", "messages-as-text"],
)  # fmt: skip
def test_bad_rows_name_the_row(chat_tokenizer, rows, message):
    with pytest.raises(DataError, match=r"<list of \d rows> \(split 'train'\), " + message):
        make(chat_tokenizer, rows)


def test_messages_without_chat_template_name_the_row(bos_tokenizer):
    with pytest.raises(DataError, match=r"row 0, field 'messages': is a list of messages but the tokenizer has no"):
        make(bos_tokenizer, [{"messages": CONVERSATION}])


def test_messages_as_a_string_column(chat_tokenizer):
    with pytest.raises(DataError, match=r"row 0, field 'messages': expected a list of .* messages, got str"):
        make(chat_tokenizer, [{"messages": "hello"}])


TEMPLATE_MARKING_THE_LAST = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if loop.last and m['role'] in ROLES %}!{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        # Every last message gets "!": rendered before assistant message 2, the conversation ends in
        # "hello!", which the whole conversation does not have, so the turn's start cannot be found.
        # "<s><|system|>\nbe brief<|end|>\n<|user|>\nhello" is 3 + 10 + 1 + 8 + 7 + 1 + 8 + 1 + 5 = 44 characters.
        ("['user', 'assistant']", r"renders messages 0\.\.1 with the generation prompt differently once later "
         r"turns follow \(not a prefix of the whole conversation's rendering: first difference at character 44: "
         r"'!<\|end\|>"),
        # Only a last assistant message gets "!" (as templates that keep only the last turn's reasoning do):
        # rendered up to message 2 the turn ends in "hi!", so its end cannot be found: at 44 + len("<|end|>\n"
        # "<|assistant|>\nhi") = 44 + 8 + 14 + 2 = 68.
        ("['assistant']", r"renders messages 0\.\.2 differently once later turns follow \(not a prefix of the whole "
         r"conversation's rendering: first difference at character 68: '!<\|end\|>"),
    ],
    ids=["last-message", "last-assistant-turn"],
)  # fmt: skip
def test_template_that_rerenders_earlier_turns_is_refused(chat_tokenizer, roles, message):
    chat_tokenizer.chat_template = TEMPLATE_MARKING_THE_LAST.replace("ROLES", roles)
    with pytest.raises(
        DataError, match=r"row 0, field 'messages': the chat template " + message + r".*so the tokens of assistant "
        r"message 2 cannot be found; set completion_only_loss=False",
    ):
        make(chat_tokenizer, [{"messages": CONVERSATION}])
    # Training on every token needs no turn boundaries: the same rows load.
    assert len(make(chat_tokenizer, [{"messages": CONVERSATION}], completion_only_loss=False).splits["train"]) == 1


def test_unknown_columns_and_preference_rows():
    with pytest.raises(DataError, match=r"cannot tell the SFT data format from the columns \['foo'\]; expected one"):
        make(SORT, [{"foo": "x"}])
    with pytest.raises(DataError, match=r"preference pairs, which are not an SFT layout: to train on the chosen "
                       r"responses, set columns: \{completion: chosen\} and drop_columns: \[rejected\]$"):
        make(SORT, [{"prompt": "sort: 1 =", "chosen": " 1", "rejected": " 2"}])
    with pytest.raises(DataError, match=r"set columns: \{text: chosen\} \(strings\) or \{messages: chosen\}"):
        make(SORT, [{"chosen": "sort: 1 = 1", "rejected": "sort: 1 = 2"}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"collator": "kto"}, r"unknown collator 'kto'; choose one of \['auto', 'pack', 'pad'\]"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"max_prompt_length": 0}, "max_prompt_length must be positive"),
        ({"truncation_mode": "middle"}, "truncation_mode must be one of"),
        ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\)"),
        ({"batch_size": 0}, "batch sizes must be positive"),
        ({"columns": {"chosen": "good"}}, r"unknown field\(s\) \['chosen'\], expected some of \['messages', 'prompt'"),
        ({"completion_only_loss": "yes"}, "completion_only_loss must be a bool"),
    ],
)
def test_bad_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTDataModule(SORT, [{"text": "sort: 1 = 1"}], **kwargs)


# -- batches ------------------------------------------------------------------------------------------


FEATURES = [
    {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "window_tokens": 4},
    {"input_ids": [3, 4, 9], "labels": [IGNORE, 4, 9], "window_tokens": 4},
]


def test_padding_collator_worked_example():
    batch = SFTPaddingCollator(pad_token_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [3, 4, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 4, 9, IGNORE]]
    assert batch["window_tokens"].dim() == 0 and batch["window_tokens"].dtype == torch.long
    assert int(batch["window_tokens"]) == 4
    assert set(batch) == {"input_ids", "attention_mask", "labels", "window_tokens"}
    assert SFTPaddingCollator(pad_token_id=0, pad_to_multiple_of=8)(FEATURES)["labels"].shape == (2, 8)


def test_packing_collator_worked_example():
    batch = SFTPackingCollator(pad_token_id=0, max_tokens_per_row=7)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 3, 4, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8, IGNORE, 4, 9]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert batch["num_sequences"] == 2 and int(batch["window_tokens"]) == 4
    assert batch["attention_mask"].shape == (1, 1, 7, 7)
    assert set(batch) == {
        "input_ids", "position_ids", "labels", "sequence_ids", "num_sequences", "attention_mask", "window_tokens",
    }  # fmt: skip


def test_a_batch_across_windows_is_refused():
    with pytest.raises(ValueError, match="several accumulation windows"):
        SFTPaddingCollator(pad_token_id=0)([FEATURES[0], {**FEATURES[1], "window_tokens": 5}])


def test_pad_and_pack_train_on_the_same_tokens(chat_tokenizer):
    """Same rows through both collators: the same multiset of labels and, per sequence, the same number
    of loss tokens (the packed row's sequence k is padded row k), so the same ``window_tokens``."""
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[:3]}]
    dm = make(chat_tokenizer, rows, batch_size=3)
    features = [dm.splits["train"][i] for i in range(3)]
    padded = SFTPaddingCollator(pad_token_id=0)(features)
    packed = SFTPackingCollator(pad_token_id=0, max_tokens_per_row=200)(features)
    assert packed["input_ids"].shape[0] == 1  # all three in one row

    def real(labels):
        return Counter(labels[labels != IGNORE].tolist())

    assert real(padded["labels"]) == real(packed["labels"])
    per_row = (padded["labels"] != IGNORE).sum(dim=1).tolist()
    per_sequence = [int(((packed["sequence_ids"] == k) & (packed["labels"] != IGNORE)).sum()) for k in range(3)]
    assert per_row == per_sequence == [f["loss_tokens"] for f in features]
    batches = {c: next(iter(make(chat_tokenizer, rows, batch_size=3, collator=c).train_dataloader()))
               for c in ("pad", "pack")}  # fmt: skip
    assert int(batches["pad"]["window_tokens"]) == int(batches["pack"]["window_tokens"]) == sum(per_row)


def test_eval_loader_on_two_ranks_weights_padding_per_sequence():
    """5 validation rows on 2 ranks: rank 1 gets rows 1, 3 and a weight-0 repeat of row 0; eval batches
    carry no window_tokens."""
    rows = [{"text": f"sort: {d} = {d}"} for d in range(8)]
    splits = DatasetDict({"train": Dataset.from_list(rows[:3]), "validation": Dataset.from_list(rows[3:])})
    data = SFTDataModule(SORT, splits, batch_size=2)
    assert all("weight" not in b and "window_tokens" not in b for b in data.val_dataloader())
    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    for collator in ("pad", "pack"):
        data.hparams.collator = collator
        batches = list(data.val_dataloader())
        assert [b["weight"].tolist() for b in batches] == [[1.0, 1.0], [0.0]]
        assert "window_tokens" not in batches[0]


def test_val_fraction_holds_out_rows_and_counts_duplicates(caplog):
    rows = [{"text": "sort: 1 = 1"}] * 10
    with caplog.at_level(logging.WARNING):
        dm = make(SORT, rows, val_fraction=0.2)
    assert len(dm.splits["train"]) == 8 and len(dm.splits["validation"]) == 2
    assert warnings_with(caplog, "validation rows held out by val_fraction=0.2 also occur in the train split")


# -- SFT on preference pairs' chosen side: the tiny SFT recipe's route ---------------------------------


def test_synthetic_sort_chosen_side_as_completion():
    """``columns: {completion: chosen}, drop_columns: [rejected]`` turns the bundled sort pairs into
    prompt/completion rows: each row is exactly the pair's chosen side (same ids, labels from its
    response start), with nothing ignored and nothing dropped."""
    kwargs = dict(max_length=32, batch_size=4, val_split="validation")
    sft = SFTDataModule("synthetic:sort", "synthetic:sort", columns={"completion": "chosen"},
                        drop_columns=["rejected"], **kwargs)  # fmt: skip
    sft.setup("fit")
    pairs = PreferenceDataModule("synthetic:sort", "synthetic:sort", **kwargs)
    pairs.setup("fit")
    for split in ("train", "validation"):
        assert len(sft.splits[split]) == len(pairs.splits[split])
        for i in (0, 1, len(pairs.splits[split]) - 1):
            row, pair = sft.splits[split][i], pairs.splits[split][i]
            start = pair["chosen_response_start"]
            assert row["input_ids"] == pair["chosen_input_ids"]
            assert row["labels"] == [IGNORE] * start + pair["chosen_input_ids"][start:]
    row = sft.splits["train"][0]
    words = SORT.convert_ids_to_tokens(row["input_ids"])
    assert words[0] == "<s>" and words[1] == "sort:" and words[-1] == "</s>"
    batch = next(iter(sft.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "window_tokens"}
    assert int(batch["window_tokens"]) == int((batch["labels"] != IGNORE).sum())  # accumulate 1: its own tokens
