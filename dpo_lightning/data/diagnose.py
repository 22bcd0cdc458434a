"""Where raw input is broken: the file, line, row and field that ``datasets`` leaves out.

``datasets`` and arrow read local files fast, but a bad one surfaces as an error that names no
file (`UnicodeDecodeError`, `gzip.BadGzipFile`, an arrow parse error), as a log line, or not at
all: the JSON reader accepts bytes that are not UTF-8 (the failure comes later, mid-tokenization),
and a column mixing strings with message lists is stored as ``Json``, which decodes a string such
as ``" 6"`` to the number 6. The checks here run only when loading failed or the loaded table
says something is off, so a good file costs nothing extra; each returns a `DataError` (or None).
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import DatasetDict

from .errors import DataError

# Columns whose values must be text or message lists.
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
STRING, MESSAGES = "a string", "a list of messages"
_CHUNK = 1 << 20
_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError; a cut-off file, EOFError


def open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def find_gzip_error(path: Path) -> DataError | None:
    """A ``.gz`` file that gzip cannot open (``datasets`` raises a bare `BadGzipFile` naming no file)."""
    if path.suffix != ".gz":
        return None
    try:
        with gzip.open(path, "rb") as f:
            f.read(1)
    except _GZIP_ERRORS as err:
        return DataError(f"{path}: not a gzip file, although its name ends in .gz ({err})")
    return None


def find_encoding_error(path: Path) -> DataError | None:
    """The first line (of the decompressed text) that is not UTF-8, read in chunks, never whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        with open_bytes(path) as f:
            while chunk := f.read(_CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:  # err.object: the chunk, after a partial character
                    line += err.object.count(b"\n", 0, err.start)
                    byte = err.object[err.start]
                    return DataError(
                        f"{path}, line {line}: not UTF-8 text (byte 0x{byte:02x}: {err.reason}); "
                        "save the file as UTF-8"
                    )
                line += chunk.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        return DataError(f"{path}, line {line}: not UTF-8 text (the file ends inside a character: {err.reason})")
    except _GZIP_ERRORS as err:
        return DataError(f"{path}: corrupt gzip data ({err})")
    return None


def find_empty_error(path: Path) -> DataError | None:
    """A file with no rows: nothing but whitespace after decompression (``datasets`` fails on it with an
    empty message), or a JSON document that is an empty list."""
    try:
        with open_bytes(path) as f:
            while chunk := f.read(_CHUNK):
                if chunk.strip():
                    break
            else:
                return DataError(f"{path}: the file is empty (no rows)")
    except _GZIP_ERRORS:
        return None  # find_gzip_error names it
    return None


def find_json_error(path: Path) -> DataError | None:
    """The first malformed JSON line of a JSON Lines file (or the error in a JSON document), if any."""
    with open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON document
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            return DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg})")
        return DataError(f"{path}: the file holds an empty list (no rows)") if document == [] else None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return DataError(f"{path}, line {lineno}: malformed JSON line ({err.msg})")
    return None


def find_parquet_error(path: Path) -> DataError | None:
    try:
        for _ in pq.ParquetFile(path).iter_batches():
            pass
    except (pa.ArrowException, OSError) as err:
        return DataError(f"{path}: unreadable Parquet file ({err})")
    return None


def diagnose_file(path: Path, builder: str) -> DataError | None:
    """The first problem of a local data file read by ``builder`` (json, csv, parquet), or None."""
    if error := find_gzip_error(path):
        return error
    if builder == "parquet":
        return find_parquet_error(path)
    return find_empty_error(path) or find_encoding_error(path) or (find_json_error(path) if builder == "json" else None)


def diagnose_files(files: Iterable[tuple[Path, str]]) -> DataError | None:
    """The first problem among ``(path, builder)`` files, e.g. those of a folder."""
    return next((error for path, builder in files if (error := diagnose_file(path, builder))), None)


def diagnose_saved(folder: Path) -> DataError | None:
    """A ``save_to_disk`` folder: its JSON metadata must parse and its arrow files must read."""
    for file in sorted(folder.rglob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return DataError(f"{file}: malformed JSON metadata of a save_to_disk folder ({err})")
    for file in sorted(folder.rglob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError) as err:
            return DataError(f"{file}: unreadable arrow file of a save_to_disk folder ({err})")
    return None


def table_error(data: DatasetDict) -> pa.ArrowException | None:
    """Why arrow finds the loaded tables invalid (text that is not UTF-8 above all), if it does."""
    try:
        for split in data.values():
            split.data.table.validate(full=True)
    except pa.ArrowException as err:
        return err
    return None


# -- one kind of value per text column ------------------------------------------------------------


def json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of a JSON Lines file or JSON document; ``where`` names file, line, row."""
    with open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        yield from ((f"{path}, row {i}", row) for i, row in enumerate(json.loads(text)))
        return
    lines = ((n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip())
    yield from ((f"{path}, line {n}, row {i}", json.loads(line)) for i, (n, line) in enumerate(lines))


def value_kind(value: Any) -> str:
    """What a text field holds: a string, a list of messages, or (wrongly) something else."""
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        return MESSAGES
    return type(value).__name__


def decoded_kind(value: Any) -> str:
    """`value_kind` of a value decoded from a ``Json`` column, where ``" 6"`` came back as 6: only a
    list is known to have been a list of messages."""
    return MESSAGES if isinstance(value, (list, tuple)) else STRING


def find_mixed_kinds(
    rows: Iterable[tuple[str, Any]],
    columns: Sequence[str] = TEXT_COLUMNS,
    kind: Callable[[Any], str] = value_kind,
) -> DataError | None:
    """The first row whose text field holds neither a string nor a list of messages, else the first
    whose field holds another kind than most rows of that column (a list among strings, or a string
    among lists). Arrow holds one type per column, so the odd row is named here, not blamed on row 0."""
    seen: list[tuple[str, dict[str, str]]] = []
    counts: dict[str, Counter[str]] = {c: Counter() for c in columns}
    for where, row in rows:
        if not isinstance(row, Mapping):
            continue
        kinds = {c: kind(row[c]) for c in columns if row.get(c) is not None}
        for column, found in kinds.items():
            if found not in (STRING, MESSAGES):
                return DataError(
                    f"{where}, field {column!r}: expected a string or a list of "
                    f"{{'role', 'content'}} messages, got {found}"
                )
            counts[column][found] += 1
        seen.append((where, kinds))
    usual = {c: counter.most_common(1)[0] for c, counter in counts.items() if counter}
    for where, kinds in seen:
        for column, found in kinds.items():
            common, n = usual[column]
            if found != common:
                total = sum(counts[column].values())
                return DataError(
                    f"{where}, field {column!r}: holds {found} while {n} of {total} rows hold {common}; "
                    "every row of a column must hold the same kind (all strings, or all message lists)"
                )
    return None


def mixed_columns(data: DatasetDict, columns: Sequence[str] = TEXT_COLUMNS) -> list[str]:
    """Text columns that ``datasets`` stored as ``Json`` because their rows mix value types."""
    return sorted(
        {
            name
            for split in data.values()
            for name, feature in split.features.items()
            if name in columns and type(feature).__name__ == "Json"
        }
    )
