"""`load_source`: the one place a dataset spec becomes a `DatasetDict` of raw rows.

Specs: a `Dataset` / `DatasetDict` / list of row dicts (programmatic use); ``synthetic:<name>``
(the bundled offline task); a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, also
gzip-compressed (``.jsonl.gz``); a folder written by ``save_to_disk`` or holding data files; or a
Hugging Face Hub dataset name (with an optional config) through ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, TypeAlias

import datasets
from datasets import Dataset, DatasetDict, Features, Value

from .errors import DataError

DatasetSpec: TypeAlias = str | Dataset | DatasetDict | list[dict[str, Any]]

SYNTHETIC_PREFIX = "synthetic:"
# File suffix -> datasets builder; datasets itself decompresses gzip (.jsonl.gz, .csv.gz).
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz",)


def describe(spec: DatasetSpec) -> str:
    """A short name of the source for messages."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, list):
        return f"<list of {len(spec)} rows>"
    return f"<in-memory {type(spec).__name__}>"


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def find_json_error(path: Path) -> DataError | None:
    """The first malformed JSON line of a JSON Lines file (or the error in a JSON document), if any."""
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON document
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg})")
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return DataError(f"{path}, line {lineno}: malformed JSON line ({err.msg})")
    return None


def _csv_options(path: Path) -> dict[str, Any]:
    """CSV holds only text: keep " 6" a string (not the number 6) and "" an empty string (not null)."""
    with _open_text(path) as f:
        header = next(csv.reader(f), [])
    features = Features({name: Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


# Columns whose values must be text or message lists; a JSON column mixing types is checked here,
# because datasets stores it as a `Json` feature that decodes values unreliably (" 6" -> 6).
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")


def _iter_json_rows(path: Path):
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        yield from ((None, row) for row in json.loads(text))
    else:
        yield from (
            (n, json.loads(line)) for n, line in enumerate(text.splitlines(), start=1) if line.strip()
        )


def check_json_types(path: Path, data: DatasetDict) -> None:
    """Name the first row whose text column holds neither a string nor a list of messages."""
    columns = {
        name
        for split in data.values()
        for name, feature in split.features.items()
        if name in TEXT_COLUMNS and type(feature).__name__ == "Json"
    }
    if not columns:
        return
    for index, (lineno, row) in enumerate(_iter_json_rows(path)):
        for name in sorted(columns):
            value = row.get(name) if isinstance(row, dict) else None
            if value is not None and not isinstance(value, (str, list)):
                where = f", line {lineno}" if lineno is not None else ""
                raise DataError(
                    f"{path}{where}, row {index}, field {name!r}: expected a string or a list of "
                    f"{{'role', 'content'}} messages, got {type(value).__name__}"
                )


def _load_file(path: Path, split: str, cache_dir: str | None) -> DatasetDict:
    builder = _builder_for(path)
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use one of {sorted(BUILDERS)} (optionally .gz)")
    options = _csv_options(path) if builder == "csv" else {}
    try:
        data = datasets.load_dataset(builder, data_files={split: str(path)}, cache_dir=cache_dir, **options)
    except Exception as err:
        located = find_json_error(path) if builder == "json" else None
        if located is not None:
            raise located from err
        raise DataError(f"{path}: could not read the {builder} file: {err}") from err
    if builder == "json":
        check_json_types(path, data)
    return data


def _load_folder(path: Path, split: str, cache_dir: str | None) -> DatasetDict:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk
        data = datasets.load_from_disk(str(path))
        return data if isinstance(data, DatasetDict) else DatasetDict({split: data})
    # A folder of data files: datasets infers the splits from the file names (train.jsonl, ...).
    try:
        return datasets.load_dataset(str(path), cache_dir=cache_dir)
    except Exception as err:
        raise DataError(f"{path}: could not load the folder as a dataset: {err}") from err


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or _builder_for(Path(spec)) is not None


def load_source(
    spec: DatasetSpec,
    config: str | None = None,
    *,
    default_split: str = "train",
    seed: int = 42,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Raw rows of every split of a source.

    Args:
        spec: the source (see the module docstring).
        config: the Hub dataset's configuration name (``load_dataset(name, config)``).
        default_split: the split name for a source that has no splits (a file, a list, a `Dataset`).
        seed: passed to ``synthetic`` sources.
        cache_dir: where ``datasets`` caches prepared files (its default when None).
    """
    if isinstance(spec, DatasetDict):
        return spec
    if isinstance(spec, Dataset):
        return DatasetDict({default_split: spec})
    if isinstance(spec, list):
        try:
            return DatasetDict({default_split: Dataset.from_list(spec)})
        except Exception as err:  # arrow cannot build one column type from mixed values
            raise DataError(f"{describe(spec)}: cannot build a dataset from the rows: {err}") from err
    if spec.startswith(SYNTHETIC_PREFIX):
        from . import synthetic  # lazy: only the synthetic task needs it

        return synthetic.load_dataset(spec, seed=seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, default_split, cache_dir)
    if path.is_file():
        return _load_file(path, default_split, cache_dir)
    if _looks_local(spec):
        raise DataError(f"{spec}: no such file or folder")
    try:
        data = datasets.load_dataset(spec, config, cache_dir=cache_dir)
    except Exception as err:
        raise DataError(f"{spec}: could not load the dataset from the Hugging Face Hub: {err}") from err
    return data if isinstance(data, DatasetDict) else DatasetDict({default_split: data})
