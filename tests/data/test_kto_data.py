"""Unpaired (KTO) data: prompt/completion/label rows and pairs split in two, through `KTODataModule`, and the
KTO collator's mismatched KL rows."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.data import (
    DataError,
    KTOCollator,
    KTODataModule,
    Layout,
    PreferenceDataModule,
    PreferenceExample,
    UnpairedExample,
    to_example,
    unpair,
)
from dpo_lightning.data.errors import RowRef

UNPAIRED_ROWS = [
    {"prompt": "Question: what is two plus four? Answer:", "completion": " six", "label": True},
    {"prompt": "Question: hello world how are you?", "completion": " I am fine thank you", "label": True},
    {"prompt": "Question: tell me about cats", "completion": " no sorry", "label": False},
    {"prompt": "Question: is it rain today?", "completion": " maybe", "label": False},
    {"prompt": "Question: can you help?", "completion": " sure here you go", "label": True},
]


def make(tokenizer, dataset, **kwargs) -> KTODataModule:
    kwargs.setdefault("max_length", 64)
    kwargs.setdefault("max_prompt_length", 32)
    dm = KTODataModule(tokenizer, dataset, **kwargs)
    dm.setup("fit")
    return dm


def test_unpaired_standard_rows_load(bpe_tokenizer, rows_writer, cache_dir):
    path = rows_writer("kto.jsonl", UNPAIRED_ROWS)
    dm = make(bpe_tokenizer, str(path), batch_size=2, cache_dir=cache_dir)
    train = dm.splits["train"]
    assert train.column_names == ["input_ids", "response_start", "desirable"]
    assert train["desirable"] == [True, True, False, False, True]
    assert dm.label_counts() == (3, 2)
    for row, example in zip(train, UNPAIRED_ROWS):
        ids, start = row["input_ids"], row["response_start"]
        assert bpe_tokenizer.decode(ids[:start]) == example["prompt"]
        assert bpe_tokenizer.decode(ids[start:]) == example["completion"] + "<|endoftext|>"  # EOS added
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {
        "input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels", "desirable",
    }  # fmt: skip
    assert batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == batch["desirable"].shape[0] == 2


def test_unpaired_conversational_rows_load(chat_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hello"}],
            "completion": [{"role": "assistant", "content": "good"}],
            "label": True,
        },
        {
            "prompt": [{"role": "system", "content": "ok"}, {"role": "user", "content": "hello"}],
            "completion": [{"role": "assistant", "content": "bad"}],
            "label": False,
        },
    ]
    dm = make(chat_tokenizer, rows, batch_size=2)
    train = dm.splits["train"]
    assert train["desirable"] == [True, False]
    first = train[0]
    ids, start = first["input_ids"], first["response_start"]
    assert chat_tokenizer.decode(ids[:start]) == "<s><|user|>\nhello<|end|>\n<|assistant|>\n"
    assert chat_tokenizer.decode(ids[start:]) == "good<|end|>\n"  # the template's end of turn, no extra EOS


def test_paired_rows_are_unpaired(bpe_tokenizer, standard_rows):
    """Each pair becomes (prompt, chosen, desirable), (prompt, rejected, undesirable), tokenized exactly as the
    pairwise path tokenizes the two sides."""
    unpaired = make(bpe_tokenizer, standard_rows).splits["train"]
    paired = PreferenceDataModule(bpe_tokenizer, standard_rows, max_length=64, max_prompt_length=32)
    paired.setup("fit")
    pairs = paired.splits["train"]
    assert len(unpaired) == 2 * len(pairs) == 16
    assert unpaired["desirable"] == [True, False] * 8
    for k, pair in enumerate(pairs):
        chosen, rejected = unpaired[2 * k], unpaired[2 * k + 1]
        assert chosen["input_ids"] == pair["chosen_input_ids"]
        assert chosen["response_start"] == pair["chosen_response_start"]
        assert rejected["input_ids"] == pair["rejected_input_ids"]
        assert rejected["response_start"] == pair["rejected_response_start"]


def test_label_counts_of_a_held_out_split(bpe_tokenizer, standard_rows):
    """val_fraction leaves index mappings over one table: the counts are those of each split, not the table."""
    dm = make(bpe_tokenizer, standard_rows, val_fraction=0.25)
    train, val = dm.splits["train"], dm.splits["validation"]
    assert sum(dm.label_counts()) == len(train) == 12 and sum(dm.label_counts("validation")) == len(val) == 4
    assert dm.label_counts() == (sum(train["desirable"]), len(train) - sum(train["desirable"]))


def test_unpair_and_identical_pairs():
    example = PreferenceExample("p", " a", " b")
    assert unpair(example) == (UnpairedExample("p", " a", True), UnpairedExample("p", " b", False))


def test_identical_pairs_are_dropped_when_unpairing(bpe_tokenizer, standard_rows, caplog):
    rows = [*standard_rows, {"prompt": "Question: hello", "chosen": " same", "rejected": " same"}]
    assert len(make(bpe_tokenizer, rows).splits["train"]) == 16
    assert "dropped 1 of 9 pairs whose chosen equals rejected" in caplog.text


@pytest.mark.parametrize(
    ("rows", "where", "problem"),
    [
        ([{"prompt": "p", "completion": " c", "label": 1}], "row 0, field 'label'", "expected a bool.*got 1"),
        (
            [{"prompt": "p", "completion": " c", "label": True}] * 2
            + [{"prompt": "p", "completion": " c", "label": None}],
            "row 2, field 'label'",
            "expected a bool.*got None",
        ),
        ([{"prompt": "p", "completion": " c", "label": "True"}], "row 0, field 'label'", "expected a bool.*got 'True'"),
        ([{"prompt": "p", "completion": "", "label": True}], "row 0, field 'completion'", "is empty"),
    ],
)
def test_bad_unpaired_rows(bpe_tokenizer, rows, where, problem):
    with pytest.raises(DataError, match=rf"<list of {len(rows)} rows> \(split 'train'\), {where}: {problem}"):
        make(bpe_tokenizer, rows)


def test_bad_conversational_completion():
    ref = RowRef("kto.jsonl", "train", 4)
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}
    with pytest.raises(DataError, match=r"row 4, field 'completion': roles out of order"):
        to_example({**row, "label": False}, Layout.UNPAIRED, ref)
    with pytest.raises(DataError, match=r"row 4, field 'completion': expected a list of messages"):
        to_example({**row, "completion": "x", "label": False}, Layout.UNPAIRED, ref)


def test_collator_settings_are_checked(bpe_tokenizer, standard_rows):
    with pytest.raises(ValueError, match=r"unknown collator 'pack'; choose one of \['auto', 'kto', 'pad'\]"):
        KTODataModule(bpe_tokenizer, standard_rows, collator="pack")
    with pytest.raises(ValueError, match=r"collator='kto': unpaired \(KTO\) data is KTODataModule now"):
        PreferenceDataModule(bpe_tokenizer, standard_rows, collator="kto")


def test_the_preference_module_refuses_the_old_unpaired_flag_naming_its_successor(bpe_tokenizer, standard_rows):
    """``unpaired=True`` chose KTO examples before `KTODataModule`; in Python it is one line naming the class."""
    with pytest.raises(ValueError, match=r"^unpaired=True: unpaired \(KTO\) data is KTODataModule now"):
        PreferenceDataModule(bpe_tokenizer, standard_rows, unpaired=True)
    assert PreferenceDataModule(bpe_tokenizer, standard_rows, unpaired=False).batch_format == "pairs"


def test_kto_batches_need_two_examples(bpe_tokenizer, standard_rows):
    with pytest.raises(ValueError, match="KTO needs batches of 2 or more examples"):
        KTODataModule(bpe_tokenizer, standard_rows, batch_size=1)
    with pytest.raises(ValueError, match="eval_batch_size=1"):
        KTODataModule(bpe_tokenizer, standard_rows, eval_batch_size=1)


# ---------------------------------------------------------------------------------------------------------
# the collator


def test_collator_worked_example():
    """The docstring's example: prompts [1 2 3] / [7 8], completions [4 5] / [9]; KL rows swap completions."""
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "response_start": 3, "desirable": True},
        {"input_ids": [7, 8, 9], "response_start": 2, "desirable": False},
    ]
    batch = KTOCollator(pad_token_id=0)(features)
    expected = {
        "input_ids": [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]],
        "attention_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]],
        "labels": [[-100, -100, -100, 4, 5], [-100, -100, 9, -100, -100]],
        "kl_input_ids": [[1, 2, 3, 9], [7, 8, 4, 5]],
        "kl_attention_mask": [[1, 1, 1, 1], [1, 1, 1, 1]],
        "kl_labels": [[-100, -100, -100, 9], [-100, -100, 4, 5]],
        "desirable": [True, False],
    }
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].tolist() == value, key
    assert batch["input_ids"].dtype == batch["kl_labels"].dtype == torch.long
    assert batch["desirable"].dtype == torch.bool

    padded = KTOCollator(pad_token_id=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == padded["kl_input_ids"].shape == (2, 8)
    assert padded["kl_labels"][:, 4:].eq(-100).all() and padded["kl_attention_mask"][:, 4:].eq(0).all()


def test_kl_rows_pair_prompt_i_with_completion_i_plus_1():
    """Three examples with distinct token ranges: KL row i = prompt i + completion (i + 1) mod 3."""
    prompts = [[10, 11], [20], [30, 31, 32]]
    completions = [[12], [21, 22], [33, 34]]  # rows of 3, 3, 5 tokens; KL rows of 4, 3, 4: none is cut
    features = [
        {"input_ids": p + c, "response_start": len(p), "desirable": i % 2 == 0}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    batch = KTOCollator(pad_token_id=0)(features)
    for i in range(3):
        expected = prompts[i] + completions[(i + 1) % 3]
        row, mask, labels = batch["kl_input_ids"][i], batch["kl_attention_mask"][i], batch["kl_labels"][i]
        assert row[: len(expected)].tolist() == expected
        assert mask.sum() == len(expected)
        assert labels[labels != -100].tolist() == completions[(i + 1) % 3]
    # one example: its KL row is the example itself
    single = KTOCollator(pad_token_id=0)(features[:1])
    assert torch.equal(single["kl_input_ids"], single["input_ids"])


def test_kl_rows_are_cut_to_the_batch_width():
    """Prompt 0 is long and completion 1 is long: their KL row (3 + 4 = 7 tokens) is cut to the longest
    example row (5 tokens), losing the end of the completion, and keeps at least one completion token."""
    features = [
        {"input_ids": [1, 2, 3, 4], "response_start": 3, "desirable": True},
        {"input_ids": [5, 6, 7, 8, 9], "response_start": 1, "desirable": False},
    ]
    batch = KTOCollator(pad_token_id=0)(features)
    assert batch["kl_input_ids"].tolist() == [[1, 2, 3, 6, 7], [5, 4, 0, 0, 0]]
    assert batch["kl_labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, 4, -100, -100, -100]]


def test_loader_batches_carry_mismatched_rows(bpe_tokenizer):
    """Through the shuffled training loader: KL row i is example i's prompt + example (i + 1)'s completion
    (cut to the batch's width T)."""
    dm = make(bpe_tokenizer, UNPAIRED_ROWS, batch_size=3, seed=1)
    for batch in dm.train_dataloader():
        n, width = batch["input_ids"].shape
        starts = (batch["labels"] != -100).long().argmax(dim=1)  # (N,) first completion token
        prompts = [ids[:start] for ids, start in zip(batch["input_ids"], starts)]
        completions = [ids[lab != -100] for ids, lab in zip(batch["input_ids"], batch["labels"])]
        for i in range(n):
            expected = torch.cat((prompts[i], completions[(i + 1) % n]))[:width]
            assert batch["kl_input_ids"][i, : len(expected)].tolist() == expected.tolist()
            assert batch["kl_attention_mask"][i].sum() == len(expected)
