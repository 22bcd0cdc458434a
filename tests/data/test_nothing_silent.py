"""Nothing lost, nothing silent: what preprocessing drops, cuts or ignores is counted in one
WARNING per split (the level shown by default), on global rank 0 only."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from dpo_lightning.data import DataError, KTODataModule, PreferenceDataModule, load_source
from dpo_lightning.data.holdout import count_in


def make(tokenizer, dataset, cls=PreferenceDataModule, **kwargs) -> PreferenceDataModule | KTODataModule:
    kwargs.setdefault("max_length", 64)
    kwargs.setdefault("max_prompt_length", 32)
    dm = cls(tokenizer, dataset, **kwargs)
    dm.setup("fit")
    return dm


def warnings_with(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def late_difference(n: int) -> list[dict[str, str]]:
    """Pairs whose responses share 40 words and differ only in the last: past max_length=32."""
    common = " " + " ".join(["the quick brown fox"] * 10)
    return [{"prompt": f"Question: {i}?", "chosen": common + " yes", "rejected": common + " no"} for i in range(n)]


def test_pairs_identical_after_truncation_are_dropped_and_counted(bpe_tokenizer, standard_rows, caplog):
    rows = standard_rows + late_difference(4)
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, rows, max_length=32, max_prompt_length=16)
    assert len(dm.splits["train"]) == 8
    lines = warnings_with(caplog, "same tokens after truncation")
    assert lines == [
        "<list of 12 rows> (split 'train'): dropped 4 of 12 pairs whose chosen and rejected are the same tokens "
        "after truncation (max_length=32, max_prompt_length=16): they differ only past the limits, so they "
        "carry no training signal"
    ]
    kept = make(bpe_tokenizer, rows, max_length=32, max_prompt_length=16, drop_identical=False)
    assert len(kept.splits["train"]) == 12  # drop_identical=False keeps them, as it keeps identical pairs


def test_all_pairs_identical_after_truncation(bpe_tokenizer):
    with pytest.raises(
        DataError, match=r"no pairs left after filtering 12 rows \(.*12 with chosen == rejected after truncation\)"
    ):
        make(bpe_tokenizer, late_difference(12), max_length=32, max_prompt_length=16)


def test_unpaired_from_pairs_identical_after_truncation(bpe_tokenizer, standard_rows, caplog):
    """KTO: such a pair would be the same completion labelled desirable and undesirable; both go."""
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, standard_rows + late_difference(2), KTODataModule, max_length=32, max_prompt_length=16)
    assert len(dm.splits["train"]) == 16
    assert "dropped 4 of 20 examples whose chosen and rejected" in caplog.text


def test_truncation_is_counted_once_per_split(bpe_tokenizer, standard_rows, caplog):
    """One prompt of 60 kB cut to 32 tokens, one chosen response cut to fit 64 (prompt + response):
    1 of 10 prompts and 1 of 20 responses, in one line per split, not one per row."""
    huge = "hello world " * 5_000  # 60 kB: ~10k tokens, fast enough for a unit test
    rows = [
        *standard_rows,
        {"prompt": huge + "Answer:", "chosen": " yes", "rejected": " no"},
        {"prompt": "Answer:", "chosen": " " + huge, "rejected": " no"},
    ]
    data = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[-3:])})
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, data)
    assert len(dm.splits["train"]) == 10
    lines = warnings_with(caplog, "truncation cut")
    assert lines == [
        f"<in-memory DatasetDict> (split {split!r}): truncation cut the prompt of 1 of {n} pairs to "
        f"max_prompt_length=32 tokens (truncation_mode=keep_end) and 1 of {2 * n} responses to fit "
        "max_length=64 tokens"
        for split, n in (("train", 10), ("validation", 3))
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, standard_rows)
    assert not warnings_with(caplog, "truncation cut")  # nothing cut, nothing said


def test_val_fraction_counts_pairs_also_in_train(bpe_tokenizer, words, caplog):
    rows = [{"prompt": f"{w}?", "chosen": " yes", "rejected": f" {w}"} for w in words[:20]] * 2  # every pair twice
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, rows, val_fraction=0.25, seed=3)
    train, val = dm.splits["train"], dm.splits["validation"]
    pairs = {(tuple(r["chosen_input_ids"]), tuple(r["rejected_input_ids"])) for r in train}
    expected = sum((tuple(r["chosen_input_ids"]), tuple(r["rejected_input_ids"])) in pairs for r in val)
    assert 0 < expected <= 10 and count_in(val, train) == expected
    assert warnings_with(caplog, "also occur in the train split") == [
        f"<list of 40 rows>: {expected} of 10 validation pairs held out by val_fraction=0.25 also occur in the "
        "train split (same token ids after truncation), so their validation metrics measure memorisation; "
        "deduplicate the data to avoid it"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, rows[:20], val_fraction=0.25, seed=3)
    assert not warnings_with(caplog, "also occur in the train split")


def test_missing_validation_split_is_a_warning(bpe_tokenizer, standard_rows, caplog):
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, standard_rows)
    assert dm.splits["validation"] is None
    (line,) = warnings_with(caplog, "no validation data")
    assert "<list of 8 rows> has no 'validation' split (it has ['train'])" in line
    assert "no validation metrics; checkpoints come from the periodic checkpoint setting" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, standard_rows, val_split=None)  # asked for no validation: nothing to say
    assert not warnings_with(caplog, "no validation data")


def test_only_global_rank_zero_warns(bpe_tokenizer, standard_rows, caplog, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    rows = standard_rows + [{"prompt": "p", "chosen": " same", "rejected": " same"}]
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, rows)
    assert not [r for r in caplog.records if r.name.startswith("dpo_lightning.data")]


# -- settings and columns that would otherwise be ignored silently ------------------------------------


def test_ignored_columns_are_named(bpe_tokenizer, standard_rows, caplog):
    rows = [{**r, "system": "be brief", "score": 1.0} for r in standard_rows]
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, rows)
    assert warnings_with(caplog, "ignoring column") == [
        "<list of 8 rows>: ignoring column(s) ['system', 'score'] of split 'train'; the explicit_prompt layout "
        "reads only prompt, chosen, rejected (list them in drop_columns to drop them without this warning)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, rows, drop_columns=["system", "score"])
    assert not warnings_with(caplog, "ignoring column")  # asked for: nothing to say


def test_val_split_unused_with_val_fraction(bpe_tokenizer, standard_rows, caplog):
    data = DatasetDict({"train": Dataset.from_list(standard_rows), "validation": Dataset.from_list(standard_rows[:3])})
    with caplog.at_level(logging.WARNING):
        make(bpe_tokenizer, data, val_fraction=0.25)
    assert warnings_with(caplog, "is not used") == [
        "<in-memory DatasetDict>: its 'validation' split (3 rows) is not used: val_fraction=0.25 holds out part "
        "of 'train' for validation instead"
    ]


def test_dataset_config_of_a_local_source(rows_writer, standard_rows, cache_dir, caplog):
    path = rows_writer("pairs.jsonl", standard_rows)
    with caplog.at_level(logging.WARNING):
        load_source(str(path), "default", cache_dir=cache_dir)
    assert warnings_with(caplog, "dataset_config='default' is ignored")


def test_truncation_mode_without_a_prompt_limit(bpe_tokenizer, standard_rows, caplog):
    with caplog.at_level(logging.WARNING):
        PreferenceDataModule(bpe_tokenizer, standard_rows, max_prompt_length=None, truncation_mode="keep_start")
    assert warnings_with(caplog, "truncation_mode='keep_start' is ignored")
