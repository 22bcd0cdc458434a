"""`load_source` for every kind of source, and its errors (malformed JSON with file and line)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from datasets import Dataset, DatasetDict

import dpo_lightning.data as data_pkg
from dpo_lightning.data import DataError, load_source, load_tokenizer


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json", "rows.parquet", "rows.csv"])
def test_local_files(rows_writer, standard_rows, cache_dir, name):
    path = rows_writer(name, standard_rows)
    data = load_source(str(path), cache_dir=cache_dir)
    assert list(data) == ["train"]
    assert data["train"].to_list() == standard_rows


def test_file_split_name(rows_writer, standard_rows, cache_dir):
    path = rows_writer("rows.jsonl", standard_rows)
    assert list(load_source(str(path), default_split="train_prefs", cache_dir=cache_dir)) == ["train_prefs"]


def test_conversational_jsonl(rows_writer, cache_dir):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go"}],
        }
    ]
    data = load_source(str(rows_writer("conv.jsonl", rows)), cache_dir=cache_dir)
    assert data["train"][0]["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_save_to_disk_folders(tmp_path, standard_rows):
    Dataset.from_list(standard_rows).save_to_disk(str(tmp_path / "one"))
    assert list(load_source(str(tmp_path / "one"))) == ["train"]
    DatasetDict(
        {"train": Dataset.from_list(standard_rows), "test": Dataset.from_list(standard_rows[:2])}
    ).save_to_disk(str(tmp_path / "dict"))
    data = load_source(str(tmp_path / "dict"))
    assert sorted(data) == ["test", "train"] and len(data["test"]) == 2


def test_folder_of_files_gives_splits_by_name(tmp_path, standard_rows, cache_dir):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, rows in (("train", standard_rows[:5]), ("validation", standard_rows[5:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_source(str(folder), cache_dir=cache_dir)
    assert sorted(data) == ["train", "validation"] and len(data["validation"]) == 3


def test_in_memory_sources(standard_rows):
    assert load_source(standard_rows)["train"].to_list() == standard_rows
    dataset = Dataset.from_list(standard_rows)
    assert load_source(dataset, default_split="x")["x"] is dataset
    dataset_dict = DatasetDict({"train": dataset})
    assert load_source(dataset_dict) is dataset_dict


def test_synthetic_delegates_lazily(monkeypatch, standard_rows):
    calls = []
    fake = types.ModuleType("dpo_lightning.data.synthetic")

    def load_dataset(name: str, seed: int) -> DatasetDict:
        calls.append((name, seed))
        return DatasetDict(
            {"train": Dataset.from_list(standard_rows), "validation": Dataset.from_list(standard_rows)}
        )

    def build_tokenizer(name: str):
        calls.append(name)
        return "tokenizer-object"

    fake.load_dataset, fake.build_tokenizer = load_dataset, build_tokenizer
    monkeypatch.setitem(sys.modules, "dpo_lightning.data.synthetic", fake)
    monkeypatch.setattr(data_pkg, "synthetic", fake, raising=False)
    for user in ("sources", "tokenizer"):  # patched where it is used (both import the module at the top)
        monkeypatch.setattr(f"dpo_lightning.data.{user}.synthetic", fake)
    assert sorted(load_source("synthetic:sort", seed=3)) == ["train", "validation"]
    monkeypatch.setattr("dpo_lightning.data.tokenizer.ensure_pad_token", lambda t: t)
    assert load_tokenizer("synthetic:sort") == "tokenizer-object"
    assert calls == [("synthetic:sort", 3), "synthetic:sort"]  # the whole spec is the name


def test_malformed_json_line_names_file_and_line(tmp_path, cache_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": "a", "chosen": "b", "rejected": \n'
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    )
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_source(str(path), cache_dir=cache_dir)


def test_malformed_gzipped_json_line(tmp_path, cache_dir):
    import gzip

    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", chosen}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz, line 2: malformed JSON"):
        load_source(str(path), cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [("./nowhere/rows.jsonl", "no such file"), ("missing.parquet", "no such file")],
)
def test_missing_local_paths(spec, problem):
    with pytest.raises(DataError, match=problem):
        load_source(spec)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"rows\.txt: unsupported file type"):
        load_source(str(path))


def test_mixed_types_in_a_list_of_rows():
    with pytest.raises(DataError, match=r"<list of 2 rows>"):
        load_source(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": 5, "rejected": {}}]
        )


def test_hub_names_go_through_load_dataset(monkeypatch, standard_rows):
    seen = []

    def fake_load_dataset(name, config=None, **kwargs):
        seen.append((name, config, kwargs))
        return DatasetDict({"train_prefs": Dataset.from_list(standard_rows)})

    monkeypatch.setattr("dpo_lightning.data.sources.datasets.load_dataset", fake_load_dataset)
    data = load_source("trl-lib/ultrafeedback_binarized", "default", cache_dir="/tmp/x")
    assert list(data) == ["train_prefs"]
    assert seen == [("trl-lib/ultrafeedback_binarized", "default", {"cache_dir": "/tmp/x"})]
