"""Crash-safe output of the sample-and-judge stage: sample records as JSON lines, merging, and pairs.

An output folder holds::

    samples.part{rank}.jsonl   each rank appends one record per prompt as the prompt finishes
                               (`SampleWriter`: write, flush, fsync: durable once written)
    samples.jsonl              every record once, in the source's prompt order (`merge_parts`, atomic);
                               the part files are removed once it is in place
    pairs.jsonl                the preference pairs (`write_pairs`, atomic)
    manifest.json              what made them (`manifest.check_manifest`, `write_manifest`, atomic, written first):
                               the records' settings, the prompt list's fingerprint and data settings,
                               and, once pairs.jsonl is written, the pairing settings and pair count

One *sample record* per prompt (a JSON object on one line)::

    {"prompt_id": "3f2a9c0e5b7d1a64", "prompt": "sort: 3 1 2 =", "responses": [" 1 2 3", " 3 1 2"],
     "scores": [1.0, 0.0], "settings": {"model": "...", "judge": "function:...", "seed": 0}}

``prompt`` is a string or a message list (docs/data.md, Formats), ``responses`` the generated strings,
``scores`` one finite number or null (the judge could not score it) per response, ``settings`` whatever
the caller passes (model, judge spec, sampling options, seed). Other keys are kept as they are.

Re-runs. `prompt_id` depends only on the prompt and its index in the source, so a re-run of the same
config maps each prompt to the same id, and `done_prompt_ids` says which prompts a killed run finished:
every complete line of the part files and of the merged file. A line a killed process left half
written is not complete: it is not counted as done, and `SampleWriter` cuts it off before appending.

`write_pairs` turns the merged samples into preference rows with any pairing strategy, so pairs can
be re-derived (another strategy, another margin) without generating again.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from dpo_lightning.data.errors import warn
from dpo_lightning.data.prompts import prompt_id
from dpo_lightning.generation.judges import as_completion
from dpo_lightning.generation.manifest import (
    MANIFEST_FILE,
    check_manifest,
    fingerprint,
    prompt_keys,
    read_manifest,
    write_manifest,
)
from dpo_lightning.generation.pairing import PairingTotals, Strategy, check_strategy, make_pairs
from dpo_lightning.training.folders import TEMP_SUFFIX as _TEMP_SUFFIX
from dpo_lightning.training.folders import FolderError
from dpo_lightning.training.folders import fsync_dir as _fsync_dir
from dpo_lightning.training.folders import write_atomically as _write_atomically

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
PART_GLOB = "samples.part*.jsonl"
RECORD_KEYS = ("prompt_id", "prompt", "responses", "scores", "settings")


def part_path(out_dir: str | Path, rank: int) -> Path:
    """The part file rank ``rank`` appends its records to: ``out_dir / f"samples.part{rank}.jsonl"``."""
    return Path(out_dir) / f"samples.part{int(rank)}.jsonl"


def sample_record(
    prompt: Any, index: int, responses: Sequence[str], scores: Sequence[float | None], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The record of one prompt (its id from `prompt_id`), checked by `check_record`."""
    record = {"prompt_id": prompt_id(prompt, index), "prompt": prompt, "responses": list(responses),
              "scores": list(scores), "settings": dict(settings)}
    return check_record(record, "sample_record")


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` itself when it is a sample record (see the module docstring); ValueError naming
    ``where`` and the field otherwise."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: a sample record is a JSON object, got {type(record).__name__}")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: the record has no {', '.join(missing)} (a sample record has "
                         f"{', '.join(RECORD_KEYS)})")
    if not isinstance(record["prompt_id"], str) or not record["prompt_id"]:
        raise ValueError(f"{where}: prompt_id must be a non-empty string, got {record['prompt_id']!r}")
    if not isinstance(record["prompt"], (str, list)):
        kind = type(record["prompt"]).__name__
        raise ValueError(f"{where}: prompt must be a string or a list of messages, got {kind}")
    responses, scores = record["responses"], record["scores"]
    if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
        raise ValueError(f"{where}: responses and scores must be lists of equal length, got "
                         f"{_describe(responses)} and {_describe(scores)}")
    for k, response in enumerate(responses):
        if not isinstance(response, (str, list)):
            raise ValueError(f"{where}: response {k} is a {type(response).__name__}; expected a string")
    for k, score in enumerate(scores):
        number = isinstance(score, numbers.Real) and not isinstance(score, bool)
        if score is not None and not (number and math.isfinite(score)):
            raise ValueError(f"{where}: score {k} is {score!r}; expected a finite number, or null when not scored")
    if not isinstance(record["settings"], Mapping):
        raise ValueError(f"{where}: settings must be an object, got {type(record['settings']).__name__}")
    return dict(record)


def _describe(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


def _line(record: Mapping[str, Any]) -> bytes:
    # json.dumps escapes newlines inside strings: one record is always one line.
    return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _complete_end(path: Path) -> tuple[int, int]:
    """(size, end of the last complete line) of ``path``: the byte after its last newline, 0 if none."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return size, start + newline + 1
            end = start
    return size, 0


def read_records(path: str | Path, *, partial_last_line: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each record of a JSON-lines file, blank lines skipped.

    With ``partial_last_line=True`` (files being written: part files) a last line without its newline is
    what a killed writer left and is skipped; with False (a finished file, e.g. one written by hand) it is
    read like any other. A line that is not a sample record is a ValueError naming the file and line.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n") and partial_last_line:
                return
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{where}: not a JSON record ({err})") from None
            yield lineno, check_record(record, where)


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a finished samples file (e.g. ``samples.jsonl``), checked."""
    return [record for _, record in read_records(path, partial_last_line=False)]


class SampleWriter:
    """Appends sample records to one JSON-lines file, each durable as soon as `write` returns.

    Each record is one line, written, flushed and ``os.fsync``-ed. On opening, a partial last line (the
    process was killed mid-write) is cut off, with a warning giving the bytes removed (``truncated``);
    its prompt is then not done and is generated again. One writer per file: each rank has its own
    (`part_path`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        size, end = (0, 0) if new else _complete_end(self.path)
        self.truncated = size - end  # bytes of a partial last line removed on opening
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close() / the context manager
        if self.truncated:
            self._file.truncate(end)
            self._file.flush()
            os.fsync(self._file.fileno())
            log.warning("%s: removed a partial last line (%d bytes) left by a run killed while writing; its prompt "
                        "will be generated again", self.path, self.truncated)
        if new:
            _fsync_dir(self.path.parent)
        self.written = 0

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (checked by `check_record`) as one line; durable when this returns."""
        data = _line(check_record(record, str(self.path)))
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _sources(out_dir: Path) -> list[Path]:
    parts = sorted(out_dir.glob(PART_GLOB), key=lambda p: (len(p.name), p.name))  # part2 before part10
    merged = out_dir / SAMPLES_FILE
    return [*parts, merged] if merged.exists() else parts


def _normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(value, allow_nan=False))


def done_prompt_ids(out_dir: str | Path, settings: Mapping[str, Any] | None = None) -> set[str]:
    """The ids of the prompts with a complete record in ``out_dir`` (its part files and ``samples.jsonl``).

    With ``settings``, a record made with other settings is a ValueError: the folder belongs to another
    run, whose samples must not be mixed with this one's.
    """
    out_dir = Path(out_dir)
    expected = None if settings is None else _normal(dict(settings))
    done: set[str] = set()
    for path in _sources(out_dir):
        for lineno, record in read_records(path):
            if expected is not None and record["settings"] != expected:
                keys = sorted(k for k in set(expected) | set(record["settings"])
                              if expected.get(k) != record["settings"].get(k))
                raise FolderError(f"{path}:{lineno}: this record was made with other settings (differing: "
                                  f"{', '.join(keys)}); use a new output folder, or the settings it was made with")
            done.add(record["prompt_id"])
    return done


def write_jsonl_atomically(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """``rows`` as JSON lines at ``path``, all or nothing (`_write_atomically`)."""
    _write_atomically(path, (_line(row) for row in rows))


def _stale_temps(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*{_TEMP_SUFFIX}"))


def merge_parts(out_dir: str | Path, order: Sequence[str]) -> Path:
    """Write ``out_dir / "samples.jsonl"``: the record of each id of ``order`` (the prompt order of the
    source), once, atomically; then remove the part files. Returns its path.

    Reads the part files and an earlier ``samples.jsonl``. A record found twice with the same content
    (from a resumed run) is written once; twice with different content is a ValueError naming both
    places, as is an id of ``order`` without a record, a record whose id is not in ``order`` (the folder
    holds another run's prompts), or an id twice in ``order``. Nothing is written or removed then.
    """
    out_dir = Path(out_dir)
    order = list(order)
    if len(set(order)) != len(order):
        twice = sorted({pid for pid in order if order.count(pid) > 1})
        raise ValueError(f"merge_parts: {len(twice)} prompt id(s) occur more than once in order (first: {twice[0]})")
    for stale in _stale_temps(out_dir, SAMPLES_FILE):  # left by a merge that was killed
        log.warning("%s: removing a temporary file left by an interrupted merge", stale)
        stale.unlink()
    records: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    sources = _sources(out_dir)
    for path in sources:
        for lineno, record in read_records(path):
            pid, where = record["prompt_id"], f"{path}:{lineno}"
            if pid not in records:
                records[pid], origin[pid] = record, where
            elif records[pid] != record:
                raise ValueError(f"prompt {pid}: {origin[pid]} and {where} hold different records (a re-run with other "
                                 "settings, or sampling that is not deterministic?); remove one and merge again")
    missing = [pid for pid in order if pid not in records]
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} of {len(order)} prompts have no record (first: {missing[0]}); run "
                         "the generation again to finish them")
    extra = sorted(set(records) - set(order))
    if extra:
        raise ValueError(f"{out_dir}: {len(extra)} record(s) are of prompts not in this run's prompts (first: "
                         f"{extra[0]} at {origin[extra[0]]}); the folder holds another run's samples: use a new one")
    merged = out_dir / SAMPLES_FILE
    _write_atomically(merged, (_line(records[pid]) for pid in order))
    for path in sources:
        if path != merged:
            path.unlink()
    _fsync_dir(out_dir)
    return merged


def write_pairs(
    samples_path: str | Path, out_path: str | Path, strategy: Strategy, min_margin: float = 0.0
) -> PairingTotals:
    """Preference pairs from a samples file (`pairing.make_pairs` per prompt), written atomically to
    ``out_path`` as JSON lines in the explicit-prompt format, in prompt order, then pair order::

        {"prompt": ..., "chosen": ..., "rejected": ..., "score_chosen": 1.0, "score_rejected": 0.5,
         "prompt_id": "3f2a9c0e5b7d1a64"}

    ``chosen``/``rejected`` are the response strings after a string prompt, one assistant message
    (``[{"role": "assistant", "content": ...}]``) after a message-list prompt. Empty responses are left
    out before pairing. What was left out (ties, pairs below ``min_margin``, unscored and empty
    responses) is counted in one warning. Returns the totals.
    """
    check_strategy(strategy, min_margin)
    samples_path, out_path = Path(samples_path), Path(out_path)
    totals = PairingTotals()

    def rows() -> Iterator[bytes]:
        for _, record in read_records(samples_path, partial_last_line=False):
            prompt, responses, scores = record["prompt"], record["responses"], record["scores"]
            # An empty response (EOS sampled first) has no text a pair can train on (the data modules
            # refuse it): left out before pairing, and counted.
            empty = sum(r == "" and s is not None for r, s in zip(responses, scores))
            scores = [None if r == "" else s for r, s in zip(responses, scores)]
            pairing = make_pairs(scores, strategy, min_margin)
            totals.add(pairing, len(responses), empty=empty)
            for c, r in pairing.pairs:
                yield _line({
                    "prompt": prompt,
                    "chosen": as_completion(prompt, responses[c]),
                    "rejected": as_completion(prompt, responses[r]),
                    "score_chosen": scores[c],
                    "score_rejected": scores[r],
                    "prompt_id": record["prompt_id"],
                })

    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_path, rows())
    summary = f"pairs {out_path}: {totals.summary(strategy, min_margin)}"
    if totals.dropped or not totals.pairs:
        warn("%s", summary)
    else:
        log.info("%s", summary)
    return totals


__all__ = [
    "MANIFEST_FILE",
    "PAIRS_FILE",
    "PART_GLOB",
    "RECORD_KEYS",
    "SAMPLES_FILE",
    "SampleWriter",
    "check_manifest",
    "check_record",
    "done_prompt_ids",
    "fingerprint",
    "merge_parts",
    "part_path",
    "prompt_id",
    "prompt_keys",
    "read_manifest",
    "read_records",
    "read_samples",
    "sample_record",
    "write_pairs",
    "write_jsonl_atomically",
    "write_manifest",
]
