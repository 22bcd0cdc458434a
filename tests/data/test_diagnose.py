"""Broken input files, injected on purpose: each gives a `DataError` naming the file (and the line,
row and field where they exist), never a bare decoder, gzip or arrow error or a log line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from dpo_lightning.data import DataError, PreferenceDataModule, load_source

MESSAGES = [{"role": "assistant", "content": "x"}]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json", "bad.csv", "bad.jsonl.gz"])
def test_not_utf8_names_file_and_line(tmp_path, rows_writer, standard_rows, cache_dir, name):
    """Byte 0xff (never valid UTF-8) in row 4: line 5 of JSON lines, line 6 of CSV (after the
    header), line 1 of a one-line JSON document. The JSON lines reader accepts the bytes, so
    without the check the failure would come mid-tokenization, naming no file."""
    rows = [dict(r) for r in standard_rows]
    rows[4]["prompt"] = "MARK"
    path = rows_writer(name, rows)
    if name.endswith(".gz"):
        import gzip

        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).replace(b"MARK", b"M\xffRK")))
    else:
        path.write_bytes(path.read_bytes().replace(b"MARK", b"M\xffRK"))
    line = {"bad.json": 1, "bad.csv": 6}.get(name, 5)
    with pytest.raises(DataError, match=rf"{re.escape(name)}, line {line}: not UTF-8 text \(byte 0xff"):
        load_source(str(path), cache_dir=cache_dir)


def test_truncated_utf8_character_at_the_end(tmp_path, cache_dir):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xc3')
    with pytest.raises(DataError, match=r"cut\.jsonl, line 2: not UTF-8 text"):
        load_source(str(path), cache_dir=cache_dir)


@pytest.mark.parametrize("name", ["plain.jsonl.gz", "plain.csv.gz"])
def test_gz_that_is_not_gzip(tmp_path, standard_rows, cache_dir, name):
    path = tmp_path / name
    path.write_bytes(jsonl(standard_rows))  # not compressed
    with pytest.raises(DataError, match=rf"{re.escape(name)}: not a gzip file"):
        load_source(str(path), cache_dir=cache_dir)


def test_corrupt_gzip_stream(tmp_path, standard_rows, cache_dir):
    import gzip

    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(standard_rows * 50))[:200])  # the header reads, the rest is missing
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: corrupt gzip data"):
        load_source(str(path), cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [("chosen", MESSAGES, "a list of messages"), ("prompt", [{"role": "user", "content": "q"}], "a list")],
)
def test_message_list_among_strings_names_row_5(rows_writer, standard_rows, cache_dir, field, value, kind):
    """Row 0 holds chosen " 6", which datasets' Json column would decode to the number 6 and blame."""
    rows = [dict(r) for r in standard_rows]
    rows[5][field] = value
    for name in ("mixed.jsonl", "mixed.json"):
        path = rows_writer(name, rows)
        where = re.escape(name) + (", line 6" if name.endswith("jsonl") else "")
        with pytest.raises(DataError, match=rf"{where}, row 5, field '{field}': holds {kind}"):
            load_source(str(path), cache_dir=cache_dir)
    with pytest.raises(DataError, match=rf"<list of 8 rows>, row 5, field '{field}': holds {kind}"):
        load_source(rows)


def test_string_among_message_lists_names_row_5(rows_writer, cache_dir):
    rows = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": MESSAGES, "rejected": MESSAGES[::-1]}
        for i in range(8)
    ]
    rows[5] = {**rows[5], "rejected": "a string"}
    path = rows_writer("conv.jsonl", rows)
    pattern = r"conv\.jsonl, line 6, row 5, field 'rejected': holds a string while 7 of 8 rows hold a list"
    with pytest.raises(DataError, match=pattern):
        load_source(str(path), cache_dir=cache_dir)


def test_implicit_prompt_blames_the_odd_side(rows_writer, cache_dir):
    """Only chosen/rejected: row 5's chosen is the odd one; rejected, a string like every other, is not."""
    prompts = [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(8)]
    rows = [{"chosen": p + " a", "rejected": p + " b"} for p in prompts]
    rows[5]["chosen"] = [{"role": "user", "content": "q5"}, *MESSAGES]
    with pytest.raises(DataError, match=r"hh\.jsonl, line 6, row 5, field 'chosen'"):
        load_source(str(rows_writer("hh.jsonl", rows)), cache_dir=cache_dir)


def test_mixed_json_column_of_an_in_memory_dataset(standard_rows):
    """A Hub or in-memory dataset whose column datasets stored as Json: decoded, only lists are known."""
    rows = [dict(r) for r in standard_rows]
    rows[5]["chosen"] = MESSAGES
    dataset = Dataset.from_list(rows, on_mixed_types="use_json")
    with pytest.raises(DataError, match=r"<in-memory Dataset> \(split 'train'\), row 5, field 'chosen'"):
        load_source(dataset)


def test_malformed_file_in_a_folder_of_files(tmp_path, standard_rows, cache_dir):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl(standard_rows))
    (folder / "validation.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"pairs/validation\.jsonl, line 2: malformed JSON"):
        load_source(str(folder), cache_dir=cache_dir)


def test_not_utf8_file_in_a_folder_of_files(tmp_path, standard_rows, cache_dir):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl(standard_rows).replace(b'"Question', b'"\xfeQuestion', 1))
    with pytest.raises(DataError, match=r"pairs/train\.jsonl, line 1: not UTF-8 text \(byte 0xfe"):
        load_source(str(folder), cache_dir=cache_dir)


@pytest.fixture
def saved(tmp_path: Path, standard_rows) -> Path:
    folder = tmp_path / "saved"
    splits = {"train": Dataset.from_list(standard_rows), "validation": Dataset.from_list(standard_rows)}
    DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_save_to_disk_with_a_cut_arrow_file(saved):
    arrow = next((saved / "validation").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{arrow.name}: unreadable arrow file") as info:
        load_source(str(saved))
    assert str(arrow) in str(info.value)


def test_save_to_disk_with_malformed_metadata(saved):
    (saved / "train" / "state.json").write_text("{bad")
    with pytest.raises(DataError, match=r"saved/train/state\.json: malformed JSON metadata"):
        load_source(str(saved))


def test_save_to_disk_with_a_missing_file(saved):
    shutil.rmtree(saved / "validation")
    with pytest.raises(DataError, match=r"saved: could not load the save_to_disk folder"):
        load_source(str(saved))


def test_not_utf8_in_a_source_not_checked_on_loading(bpe_tokenizer, tmp_path):
    """A save_to_disk folder is arrow already; bad bytes show up during tokenization, named by split."""
    import pyarrow as pa
    from datasets.table import InMemoryTable

    table = pa.table({"prompt": pa.array(["a", "b"]), "chosen": ["c", "d"], "rejected": ["e", "f"]})
    chosen = pa.StringArray.from_buffers(2, table["chosen"].chunk(0).buffers()[1], pa.py_buffer(b"\xff\xfed"))
    dataset = Dataset(InMemoryTable(table.set_column(1, "chosen", chosen)))
    dm = PreferenceDataModule(bpe_tokenizer, dataset, max_length=32)
    with pytest.raises(DataError, match=r"<in-memory Dataset> \(split 'train'\): text that is not UTF-8"):
        dm.setup()
