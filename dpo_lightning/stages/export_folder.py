"""Where an export goes, and only there: the checks before an export replaces a folder, the marker every
export carries, the atomic move into place, and the clean-up of what a killed export left beside it.

An export replaces its output folder as a whole, so it only goes where nothing else can be lost
(:func:`check_export_destination`): a new or empty folder, or a previous export, recognised by the
marker file :data:`EXPORT_MARKER`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from dpo_lightning._version import __version__
from dpo_lightning.training.checkpoint import _HOST, _alive, _process_start_time, current_umask
from dpo_lightning.training.integrity import DCP_METADATA

log = logging.getLogger(__name__)

AdapterExport = Literal["merged", "adapter"]

# A small JSON file in every export: what wrote it, when, from what. Its presence is what allows
# a later export to replace the folder.
EXPORT_MARKER = ".dpo_lightning_export"


class ExportError(ValueError):
    """An export refused, before it replaced anything; the one-line message says why."""


def check_export_destination(output_dir: str | Path, keep: Iterable[str | Path] = ()) -> None:
    """Raise :class:`ExportError` unless an export may replace ``output_dir``.

    An export deletes whatever was in its folder, so the folder must not exist, be empty, or be a
    previous export (it holds :data:`EXPORT_MARKER`). It may never be the current folder or one of
    its parents, a folder holding checkpoints (``*.ckpt``, sharded checkpoint folders), or a
    folder that is or holds a path in ``keep`` (the checkpoint being exported, the run's
    checkpoint folder), which need not exist yet.
    """
    out = Path(output_dir)
    what = f"export folder {out}"
    where = out.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise ExportError(f"{what}: the current folder or one of its parents, which the export would replace")
    for path in keep:
        if "://" in str(path):
            continue
        kept = Path(path).resolve()
        if kept == where:
            raise ExportError(f"{what}: is {path} itself (a checkpoint, or the run's checkpoint folder)")
        if where in kept.parents:
            raise ExportError(f"{what}: holds {path}, which the export would delete")
    if out.is_symlink():
        raise ExportError(f"{what}: a symbolic link; give the folder it points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{what}: exists and is not a folder")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if EXPORT_MARKER not in names:
        # Top level only: this folder may be a home directory, too large to walk.
        ckpts = [n for n in names if n.endswith(".ckpt") or (out / n / DCP_METADATA).is_file()]
        shown = ckpts or names
        held = ("checkpoints: " if ckpts else "") + ", ".join(shown[:3]) + (", ..." if shown[3:] else "")
        raise ExportError(
            f"{what}: not empty (holds {held}) and not a previous export (no {EXPORT_MARKER}): "
            "refusing to replace it; give a new or empty folder"
        )
    found = _find_checkpoint(out)
    if found is not None:
        raise ExportError(f"{what}: holds a checkpoint ({found}); refusing to replace it")


def _find_checkpoint(folder: Path) -> Path | None:
    for root, dirs, files in os.walk(folder):
        if DCP_METADATA in files:  # a sharded checkpoint folder
            return Path(root)
        for name in (*files, *dirs):
            if name.endswith(".ckpt"):
                return Path(root) / name
    return None


def _write_marker(folder: Path, *, source: str | None, adapter: AdapterExport) -> None:

    marker = {
        "dpo_lightning": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "adapter": adapter,
    }
    (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _honour_umask(folder: Path) -> None:
    """Give the export the permissions of any new folder and file (``0o777`` / ``0o666`` less the
    umask): ``mkdtemp`` made the folder ``0o700``, and transformers writes safetensors ``0o600``."""
    umask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def remove_orphaned_exports(output_dir: str | Path) -> list[str]:
    """Delete what a killed export of ``output_dir`` left beside it; returns the names (logged as a warning).

    - ``.<name>.<host>-<pid>.<random>``: an unfinished export; removed when its writer, on this host, is
      gone (from another host, or in the older unnamed ``.<name>.<random>`` pattern: when it was last
      modified before this process started);
    - ``.<name>.old.<random>``: a replaced export whose deletion was cut short; removed only when a
      complete export (with its marker) stands at ``output_dir``: otherwise it may be the only copy.
    """
    out = Path(output_dir)
    if not out.parent.is_dir():
        return []
    name = re.escape(out.name)
    unfinished = re.compile(rf"^\.{name}\.(?:(?P<host>[^.]+)-(?P<pid>\d+)\.)?[a-z0-9_]{{8}}$")
    replaced = re.compile(rf"^\.{name}\.old\.[0-9a-f]{{8}}$")
    complete = (out / EXPORT_MARKER).is_file()
    started = _process_start_time()
    removed = []
    for entry in out.parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        match = unfinished.match(entry.name)
        try:
            if match and match["host"] == _HOST:
                orphaned = int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
            elif match:
                orphaned = entry.stat().st_mtime < started
            else:
                orphaned = complete and bool(replaced.match(entry.name))
        except OSError:
            continue
        if orphaned:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        log.warning("Removed %d folder(s) left beside %s by an interrupted export: %s",
                    len(removed), out, ", ".join(sorted(removed)))
    return removed


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export ``tmp`` to ``out``.

    A previous export there is renamed aside first and deleted last: a crash at any point leaves
    the old export or the new one under a name (``out``, or ``.<name>.old.<random>`` beside it),
    never neither.
    """
    if out.is_dir() and any(out.iterdir()):
        aside = out.with_name(f".{out.name}.old.{secrets.token_hex(4)}")
        out.rename(aside)
        try:
            tmp.rename(out)
        except BaseException:
            aside.rename(out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()  # empty: fails, keeping everything, if something appeared in it meanwhile
    tmp.rename(out)


__all__ = ["EXPORT_MARKER", "AdapterExport", "ExportError", "check_export_destination", "remove_orphaned_exports"]
