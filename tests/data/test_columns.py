"""``columns`` (our field names -> the dataset's) and ``drop_columns``: other column names read as they
are, without a conversion script; settings that cannot work are refused."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset, DatasetDict

from dpo_lightning.data import DataError, KTODataModule, PreferenceDataModule


def make(tokenizer, dataset, cls=PreferenceDataModule, **kwargs) -> PreferenceDataModule | KTODataModule:
    kwargs.setdefault("max_length", 64)
    kwargs.setdefault("max_prompt_length", 32)
    kwargs.setdefault("val_split", None)
    dm = cls(tokenizer, dataset, **kwargs)
    dm.setup("fit")
    return dm


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(k, k): v for k, v in row.items()} for row in rows]


QA = {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad"}


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_columns_map_other_names(bpe_tokenizer, rows_writer, standard_rows, cache_dir, caplog, suffix):
    path = rows_writer(f"qa.{suffix}", [{**row, "id": str(i)} for i, row in enumerate(renamed(standard_rows, QA))])
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, str(path), columns=QA, drop_columns=["id"], cache_dir=cache_dir)
    assert dm.splits["train"][:] == make(bpe_tokenizer, standard_rows).splits["train"][:]
    assert dm.hparams.columns == QA and dm.hparams.drop_columns == ["id"]
    assert "ignoring column" not in caplog.text


def test_columns_partial_mapping_and_every_split(bpe_tokenizer, standard_rows):
    """Only the fields whose names differ are mapped; validation and test splits are renamed too."""
    names = {"chosen": "good", "rejected": "bad"}
    rows = renamed(standard_rows, names)
    data = DatasetDict({s: Dataset.from_list(rows) for s in ("train", "validation", "test")})
    dm = make(bpe_tokenizer, data, columns=names, val_split="validation", test_split="test")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 8, "validation": 8, "test": 8}


def test_columns_for_implicit_and_unpaired_layouts(bpe_tokenizer):
    hh = [{"good": "\n\nHuman: hi\n\nAssistant: hello", "bad": "\n\nHuman: hi\n\nAssistant: go away"}] * 2
    side = make(bpe_tokenizer, hh, columns={"chosen": "good", "rejected": "bad"}).splits["train"][0]
    assert bpe_tokenizer.decode(side["chosen_input_ids"][side["chosen_response_start"]:]) == " hello<|endoftext|>"
    kto = [{"question": "hi?", "answer": f" {w}", "thumbs_up": w == "yes"} for w in ("yes", "no", "maybe")]
    dm = make(
        bpe_tokenizer, kto, KTODataModule, columns={"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    )
    assert dm.label_counts() == (1, 2)


def test_drop_columns_can_reveal_another_layout(chat_tokenizer):
    """Dropping UltraFeedback's string ``prompt`` leaves chosen/rejected: the implicit-prompt layout."""
    def turn(role, content):
        return {"role": role, "content": content}

    rows = [{"prompt": f"hi {i}", "chosen": [turn("user", f"hi {i}"), turn("assistant", "hello")],
             "rejected": [turn("user", f"hi {i}"), turn("assistant", "no")]} for i in range(3)]  # fmt: skip
    kept = make(chat_tokenizer, rows).splits["train"]
    assert make(chat_tokenizer, rows, drop_columns=["prompt"]).splits["train"][:] == kept[:]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"columns": {"question": "prompt"}}, r"unknown field\(s\) \['question'\], expected some of \['prompt'"),
        ({"columns": {"prompt": ""}}, "non-empty strings"),
        ({"columns": {"chosen": "answer", "rejected": "answer"}}, "two fields to the same dataset column"),
        ({"columns": {"prompt": "q"}, "drop_columns": ["q"]}, r"\['q'\] are both read \(columns\) and dropped"),
    ],
)
def test_bad_column_settings(bpe_tokenizer, standard_rows, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        PreferenceDataModule(bpe_tokenizer, standard_rows, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (
            {"columns": {"prompt": "question"}},
            r"<list of 8 rows> \(split 'train'\): columns maps 'prompt' to 'question', but there is no column "
            r"'question' \(columns: \['prompt', 'chosen', 'rejected'\]\)",
        ),
        (
            {"columns": {"prompt": "chosen", "chosen": "rejected", "rejected": "prompt"}},
            None,  # a rotation is a valid mapping
        ),
        (
            {"drop_columns": ["score"]},
            r"<list of 8 rows>: drop_columns names column\(s\) \['score'\] that the data does not have",
        ),
    ],
)
def test_column_settings_the_data_does_not_fit(bpe_tokenizer, standard_rows, kwargs, problem):
    if problem is None:
        make(bpe_tokenizer, standard_rows, drop_identical=False, **kwargs)
        return
    with pytest.raises(DataError, match=problem):
        make(bpe_tokenizer, standard_rows, **kwargs)


def test_mapped_column_clashes_with_an_existing_one(bpe_tokenizer, standard_rows):
    rows = [{**row, "question": row["prompt"] + " Really?"} for row in standard_rows]
    with pytest.raises(DataError, match=r"the data also has a 'prompt' column; add 'prompt' to drop_columns"):
        make(bpe_tokenizer, rows, columns={"prompt": "question"})
    dm = make(bpe_tokenizer, rows, columns={"prompt": "question"}, drop_columns=["prompt"])
    first = dm.splits["train"][0]
    assert bpe_tokenizer.decode(first["chosen_input_ids"][: first["chosen_response_start"]]).endswith("Really?")


def test_columns_through_jsonargparse(bpe_tokenizer, tmp_path, rows_writer, standard_rows, cache_dir):
    from jsonargparse import ArgumentParser

    bpe_tokenizer.save_pretrained(tmp_path / "tok")
    path = rows_writer("qa.jsonl", renamed(standard_rows, QA))
    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceDataModule, "data")
    help_text = parser.format_help()
    assert "Our field names -> the dataset's columns" in help_text and "drop_columns" in help_text
    cfg = parser.parse_args(
        [
            f"--data.tokenizer={tmp_path / 'tok'}",
            f"--data.dataset={path}",
            "--data.columns={prompt: question, chosen: answer_good, rejected: answer_bad}",
            "--data.drop_columns=[]",
            f"--data.cache_dir={cache_dir}",
        ]
    )
    dm = parser.instantiate_classes(cfg).data
    assert dm.hparams.columns == QA
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8


def test_renamed_column_mixing_kinds_is_named(bpe_tokenizer, rows_writer, standard_rows, cache_dir):
    """A renamed text column is checked after renaming: a list among strings names its row."""
    rows = renamed(standard_rows, QA)
    rows[5]["answer_good"] = [{"role": "assistant", "content": "six"}]
    path = rows_writer("mixed.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"mixed\.jsonl \(split 'train'\), row 5, field 'chosen': holds a list of messages while 7 of 8 rows "
        r"hold a string.*\(the fields as named by columns=\{'prompt': 'question'",
    ):
        make(bpe_tokenizer, str(path), columns=QA, cache_dir=cache_dir)


def test_renaming_keeps_the_preprocessing_cache(bpe_tokenizer, rows_writer, standard_rows, cache_dir):
    path = str(rows_writer("qa.jsonl", [{**row, "id": "x"} for row in renamed(standard_rows, QA)]))
    first, second = (make(bpe_tokenizer, path, columns=QA, cache_dir=cache_dir).splits["train"] for _ in range(2))
    assert first.cache_files and first.cache_files == second.cache_files
