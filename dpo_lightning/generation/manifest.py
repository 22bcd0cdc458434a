"""The manifest of a generate output folder (``manifest.json``): what made its samples and pairs, checked
before a run samples into the folder (`check_manifest`) and written first (`write_manifest`, atomic).

It holds the records' settings, the prompt list's fingerprint (`prompt_keys`, `fingerprint`) and data
settings, and, once ``pairs.jsonl`` is written, the pairing settings and pair count (docs/generate.md,
Output files and re-runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpo_lightning.data.errors import warn
from dpo_lightning.training.folders import FolderError, differences, plain, read_record, say_differences, write_record

MANIFEST_FILE = "manifest.json"


def prompt_keys(prompt_ids: Sequence[str], input_ids: Sequence[Sequence[int]]) -> list[str]:
    """One string per prompt, its id and the token ids it is sampled from, for `fingerprint`."""
    return [f"{pid}:{','.join(map(str, ids))}" for pid, ids in zip(prompt_ids, input_ids)]


def fingerprint(keys: Sequence[str]) -> str:
    """sha256 of a prompt list's `prompt_keys`, in order: the same prompts, tokenized the same way."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def check_manifest(
    out_dir: str | Path, samples: Mapping[str, Any], keys: Sequence[str], data: Mapping[str, Any],
    pairs: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest a run writes to ``out_dir / "manifest.json"`` before it samples, after checking the
    folder's (the folder's format: docs/generate.md, Output files and re-runs).

    ``samples``: the settings every record carries (model, sampling, seed, judge); ``keys``: the run's
    `prompt_keys`; ``data``: the data settings, to name in a refusal; ``pairs``: the pairing settings.
    A `FolderError` naming the settings when the folder's samples were made with other ``samples``
    settings, or of other prompts; prompts that extend the folder's (its prompts are the first of
    this run's, e.g. a larger ``limit``) are fine: the others are sampled. The folder's pairs stay
    valid (``"pairs"`` kept) only when made with these ``pairs`` settings from these prompts.
    """
    out_dir = Path(out_dir)
    prompts = {"count": len(keys), "sha256": fingerprint(keys), "data": plain(dict(data))}
    new = {"format": 1, "samples": plain(dict(samples)), "prompts": prompts, "pairs": None}
    old = read_record(out_dir / MANIFEST_FILE)
    if old is None:
        return new
    where = f"{out_dir / MANIFEST_FILE}"
    if changed := differences(old.get("samples"), new["samples"]):
        raise FolderError(f"{out_dir}: its samples were made with other settings ({say_differences(changed)}); use "
                          f"another output folder, or the settings recorded in {where}")
    was = old.get("prompts") or {}
    if was.get("sha256") != prompts["sha256"]:
        count = int(was.get("count", 0))
        if not (count < len(keys) and fingerprint(keys[:count]) == was.get("sha256")):
            named = differences(was.get("data"), prompts["data"])
            why = say_differences(named) if named else "same data settings: the source or the tokenizer changed"
            raise FolderError(f"{out_dir}: its samples are of {count} prompts, this run has {len(keys)} that "
                              f"{'are not the same' if count >= len(keys) else 'do not start with them'} ({why}); "
                              "a folder holds the samples of one prompt list (a longer list that starts with it is "
                              f"fine): use another output folder, or the data settings recorded in {where}")
        warn(f"{out_dir}: its {count} prompts are the first {count} of this run's {len(keys)}; sampling the "
             f"other {len(keys) - count}, and the pairs again")
    elif (old.get("pairs") or {}).get("settings") == plain(dict(pairs)):
        new["pairs"] = old["pairs"]
    return new


def write_manifest(out_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """``manifest`` to ``out_dir / "manifest.json"``, atomically."""
    write_record(Path(out_dir) / MANIFEST_FILE, manifest)


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, None when it has none."""
    return read_record(Path(out_dir) / MANIFEST_FILE)
