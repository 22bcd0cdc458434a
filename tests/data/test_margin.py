"""The optional ``margin`` column of pair data (reward-model training, as TRL's RewardTrainer reads it):
kept through preprocessing, checked row by row, batched as ``margin`` (B,) float32 by the pad and pack
collators; unpaired (KTO) data does not read it and names it among the ignored columns."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

from dpo_lightning.data import TOKENIZED_FIELDS, DataError, KTODataModule, PreferenceDataModule
from dpo_lightning.data.collate import PaddingCollator
from dpo_lightning.data.packing import PackingCollator


def make(tokenizer, dataset, cls=PreferenceDataModule, **kwargs) -> PreferenceDataModule | KTODataModule:
    kwargs.setdefault("max_length", 64)
    kwargs.setdefault("max_prompt_length", 32)
    kwargs.setdefault("val_split", None)
    dm = cls(tokenizer, dataset, **kwargs)
    dm.setup("fit")
    return dm


def ignored(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ignoring" in r.getMessage()]


def with_margins(rows: list[dict], margins: list) -> list[dict]:
    return [{**row, "margin": m} for row, m in zip(rows, margins)]


MARGINS = [0.5, 1, 2.25, 0.0, -1.5, 3, 4.75, 8]  # ints and floats: Arrow reads the column as float


def test_margin_is_kept_and_batched(bpe_tokenizer, standard_rows, caplog):
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, with_margins(standard_rows, MARGINS), batch_size=3)
    train = dm.splits["train"]
    assert train.column_names == [*TOKENIZED_FIELDS, "margin"]
    assert train["margin"] == [float(m) for m in MARGINS]
    assert ignored(caplog) == []  # read, not ignored
    plain = make(bpe_tokenizer, standard_rows).splits["train"]
    assert train.remove_columns("margin")[:] == plain[:]  # the ids are those of the same pairs without it
    batch = dm.collate_fn([train[i] for i in (4, 0, 2)])
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [-1.5, 0.5, 2.25]
    shuffled = list(dm.train_dataloader())
    assert sorted(x for b in shuffled for x in b["margin"].tolist()) == sorted(float(m) for m in MARGINS)


def test_margin_in_pad_and_pack_batches():
    """One value per pair, in pair order, whatever the rows look like: (B,) float32."""
    features = [
        {"chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
         "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2, "margin": 1.0},
        {"chosen_input_ids": [3, 4], "chosen_response_start": 1,
         "rejected_input_ids": [3, 4, 4, 2], "rejected_response_start": 1, "margin": 0.25},
    ]  # fmt: skip
    for collator in (PaddingCollator(pad_token_id=0), PackingCollator(pad_token_id=0, max_tokens_per_row=7)):
        batch = collator(features)
        assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.0, 0.25]
        assert "margin" not in collator([{k: v for k, v in f.items() if k != "margin"} for f in features])


def test_margin_follows_the_pairs_that_are_kept(bpe_tokenizer, standard_rows):
    """Row 2 has chosen == rejected and is dropped: the margins of rows 0, 1, 3 stay with their pairs."""
    rows = with_margins(standard_rows[:4], [1.0, 2.0, 3.0, 4.0])
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}
    dm = make(bpe_tokenizer, rows, collator="pack")
    assert dm.splits["train"]["margin"] == [1.0, 2.0, 4.0]
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["margin"].tolist()) == [1.0, 2.0, 4.0]


def test_margin_mapped_through_columns(bpe_tokenizer, standard_rows):
    rows = [{**row, "score_gap": m} for row, m in zip(standard_rows, MARGINS)]
    dm = make(bpe_tokenizer, rows, columns={"margin": "score_gap"})
    assert dm.splits["train"]["margin"] == [float(m) for m in MARGINS]


def test_margin_kept_for_implicit_prompt_pairs(bpe_tokenizer):
    prompt = "\n\nHuman: hello\n\nAssistant:"
    rows = [{"chosen": prompt + " hi", "rejected": prompt + " go away", "margin": m} for m in (0.5, 1.5)]
    assert make(bpe_tokenizer, rows).splits["train"]["margin"] == [0.5, 1.5]


@pytest.mark.parametrize(
    ("margins", "message"),
    [
        ([1.0, None, 2.0], r"row 1, field 'margin': value is missing \(null\)"),
        (["0.5", "1", "2"], r"row 0, field 'margin': expected a number, got str '0.5'"),
        ([1.0, 2.0, float("nan")], r"row 2, field 'margin': expected a finite number, got nan"),
        ([float("-inf"), 1.0, 2.0], r"row 0, field 'margin': expected a finite number, got -inf"),
        ([True, False, True], r"row 0, field 'margin': expected a number, got bool True"),
    ],
    ids=["null", "string", "nan", "inf", "bool"],
)
def test_bad_margins_name_the_row(bpe_tokenizer, standard_rows, margins, message):
    rows = Dataset.from_list(with_margins(standard_rows[:3], margins))
    with pytest.raises(DataError, match=r"<in-memory Dataset> \(split 'train'\), " + message):
        make(bpe_tokenizer, rows)


def test_csv_margins_are_strings_and_refused(bpe_tokenizer, rows_writer, standard_rows, cache_dir):
    """CSV reads every column as a string: the margin column must come from JSON lines or Parquet."""
    path = rows_writer("pairs.csv", with_margins(standard_rows, MARGINS))
    with pytest.raises(DataError, match=r"pairs.csv \(split 'train'\), row 0, field 'margin': expected a number"):
        make(bpe_tokenizer, str(path), cache_dir=cache_dir)
    path = rows_writer("pairs.jsonl", with_margins(standard_rows, MARGINS))
    assert make(bpe_tokenizer, str(path), cache_dir=cache_dir).splits["train"]["margin"][:2] == [0.5, 1.0]


def test_unpaired_data_does_not_read_margin(bpe_tokenizer, standard_rows, caplog):
    """KTO: pairs split in two keep no margin; the column is named among the ignored ones, and a bad value
    there is not an error (nothing reads it)."""
    rows = with_margins(standard_rows, MARGINS)
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, rows, cls=KTODataModule, batch_size=4)
    assert dm.splits["train"].column_names == ["input_ids", "response_start", "desirable"]
    assert "margin" not in next(iter(dm.train_dataloader()))
    assert ignored(caplog) == [
        "<list of 8 rows>: ignoring column(s) ['margin'] of split 'train'; the explicit_prompt layout reads only "
        "prompt, chosen, rejected (list them in drop_columns to drop them without this warning)"
    ]
    kto_rows = [{"prompt": "hi?", "completion": f" {w}", "label": w == "yes", "margin": None} for w in ("yes", "no")]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, kto_rows, cls=KTODataModule, batch_size=2)
    assert ignored(caplog) == [
        "<list of 2 rows>: ignoring column(s) ['margin'] of split 'train'; the unpaired layout reads only prompt, "
        "completion, label (list them in drop_columns to drop them without this warning)"
    ]
