"""`load_source`: the one place a dataset spec becomes a `DatasetDict` of raw rows.

Specs: a `Dataset` / `DatasetDict` / list of row dicts (programmatic use); ``synthetic:<name>``
(the bundled offline task); a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, also
gzip-compressed (``.jsonl.gz``); a folder written by ``save_to_disk`` or holding data files; or a
Hugging Face Hub dataset name (with an optional config) through ``datasets.load_dataset``.

Local files that ``datasets`` cannot read, or reads into something wrong, are named with the line
(`diagnose`): not gzip, not UTF-8, malformed JSON, a column mixing strings with message lists.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, TypeAlias

import datasets
from datasets import Dataset, DatasetDict, Features, Value

from . import synthetic
from .diagnose import (
    decoded_kind,
    diagnose_file,
    diagnose_files,
    diagnose_saved,
    find_gzip_error,
    find_mixed_kinds,
    json_rows,
    mixed_columns,
    open_text,
    table_error,
)
from .errors import DataError, warn

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


def _csv_options(path: Path) -> dict[str, Any]:
    """CSV holds only text: keep " 6" a string (not the number 6) and "" an empty string (not null)."""
    with open_text(path) as f:
        header = next(csv.reader(f), [])
    features = Features({name: Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _check_loaded(data: DatasetDict, where: str, files: list[tuple[Path, str]]) -> None:
    """What loading let through: text that is not UTF-8 (the JSON reader accepts it; tokenization
    would fail later naming no file) and text columns mixing strings with message lists."""
    if invalid := table_error(data):
        raise diagnose_files(files) or DataError(f"{where}: invalid data after loading ({invalid})")
    if mixed := mixed_columns(data):
        rows = (row for path, builder in files if builder == "json" for row in json_rows(path))
        if error := find_mixed_kinds(rows, mixed):
            raise error


def _load_file(path: Path, split: str, cache_dir: str | None) -> DatasetDict:
    builder = _builder_for(path)
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use one of {sorted(BUILDERS)} (optionally .gz)")
    if error := find_gzip_error(path):
        raise error
    try:
        options = _csv_options(path) if builder == "csv" else {}
        data = datasets.load_dataset(builder, data_files={split: str(path)}, cache_dir=cache_dir, **options)
    except Exception as err:
        located = diagnose_file(path, builder)
        raise located or DataError(f"{path}: could not read the {builder} file: {_reason(err)}") from err
    _check_loaded(data, str(path), [(path, builder)])
    return data


def _reason(err: BaseException) -> str:
    """The error and its causes: ``datasets`` wraps the informative one ("An error occurred while
    generating the dataset")."""
    reasons = [str(err)]
    while (err := err.__cause__ or err.__context__) is not None and len(reasons) < 4:
        reasons.append(f"{type(err).__name__}: {err}")
    return "; ".join(reasons)


def _data_files(folder: Path) -> list[tuple[Path, str]]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("."))
    return [(p, builder) for p in files if (builder := _builder_for(p)) is not None]


def _load_folder(path: Path, split: str, cache_dir: str | None) -> DatasetDict:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as err:
            located = diagnose_saved(path)
            raise located or DataError(f"{path}: could not load the save_to_disk folder: {_reason(err)}") from err
        return data if isinstance(data, DatasetDict) else DatasetDict({split: data})
    # A folder of data files: datasets infers the splits from the file names (train.jsonl, ...).
    try:
        data = datasets.load_dataset(str(path), cache_dir=cache_dir)
    except Exception as err:
        located = diagnose_files(_data_files(path))
        raise located or DataError(f"{path}: could not load the folder as a dataset: {_reason(err)}") from err
    _check_loaded(data, str(path), _data_files(path))
    return data


def _from_rows(spec: list[dict[str, Any]], split: str) -> DatasetDict:
    try:
        return DatasetDict({split: Dataset.from_list(spec)})
    except Exception as err:  # arrow cannot build one column type from mixed values
        rows = ((f"{describe(spec)}, row {i}", row) for i, row in enumerate(spec))
        located = find_mixed_kinds(rows)
        raise located or DataError(f"{describe(spec)}: cannot build a dataset from the rows: {err}") from err


def check_decoded(data: DatasetDict, source: str) -> DatasetDict:
    """A Hub or in-memory dataset whose text column mixes kinds: its ``Json`` values are decoded
    (lossily), so only list versus non-list can be told apart."""
    for name, split in data.items():
        if columns := mixed_columns(DatasetDict({name: split})):
            where = f"{source} (split {name!r}), row"
            rows = ((f"{where} {i}", row) for i, row in enumerate(split.select_columns(columns)))
            if error := find_mixed_kinds(rows, columns, kind=decoded_kind):
                raise error
    return data


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or _builder_for(Path(spec)) is not None


def _is_hub_name(spec: DatasetSpec) -> bool:
    if not isinstance(spec, str) or spec.startswith(SYNTHETIC_PREFIX):
        return False
    return not Path(spec).expanduser().exists() and not _looks_local(spec)


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
    if config is not None and not _is_hub_name(spec):
        warn("dataset_config=%r is ignored: it names a configuration of a Hub dataset, not %s", config, describe(spec))
    if isinstance(spec, DatasetDict):
        return check_decoded(spec, describe(spec))
    if isinstance(spec, Dataset):
        return check_decoded(DatasetDict({default_split: spec}), describe(spec))
    if isinstance(spec, list):
        return _from_rows(spec, default_split)
    if spec.startswith(SYNTHETIC_PREFIX):

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
    return check_decoded(data if isinstance(data, DatasetDict) else DatasetDict({default_split: data}), spec)
