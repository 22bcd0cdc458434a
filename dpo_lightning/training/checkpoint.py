"""How a checkpoint reaches the disk: atomically, linked rather than copied, orphans of crashed saves cleaned up.

* :class:`AtomicCheckpointIO` writes each checkpoint file to a temporary file in the same
  folder, flushes it to disk and renames it over the final name, so a crash mid-save leaves
  either the old checkpoint or the new one under that name, never a truncated file
  (:func:`atomic_write`, which ``folders.write_atomically`` uses too).
* Whether a checkpoint is whole is `integrity.check_checkpoint`'s business; what an exact resume needs
  besides (RNG streams, metric windows) is `resume`'s; data order is the sampler's
  (``dpo_lightning/data/sampler.py``).
* When checkpoints are written (``last.ckpt`` periodically, on preemption) is
  ``dpo_lightning/training/callbacks.py``'s business.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dpo_lightning.training.integrity import check_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing on local filesystems, and whose loads
    check the file first (:func:`check_checkpoint`).

    Use it with ``Trainer(plugins=[AtomicCheckpointIO()])`` (or the YAML ``trainer.plugins``).
    Remote paths (``s3://`` ...) fall back to the parent's write: object stores already make
    an upload visible only once complete. Sharded checkpoints of ``ModelParallelStrategy``
    (folders) do not go through ``CheckpointIO`` at all.

    A process killed mid-save leaves its temporary file (``.<name>.ckpt.<random>.tmp``) behind:
    the first save into a folder removes those older than this process, with a warning.
    Saved files get the permissions of any new file (``0o666`` less the umask), not the
    ``0o600`` of ``mkstemp``, so a shared run folder stays as readable as the user set it up.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()  # folders already cleaned of orphaned temporary files

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent.resolve()
        if folder not in self._swept:
            self._swept.add(folder)
            remove_orphaned_temporaries(folder)
        # The writer's host and pid in the name: a later run can tell a dead writer's file at once.
        atomic_write(path, lambda f: torch.save(checkpoint, f), prefix=f".{path.name}.{_WRITER}.")

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        check_checkpoint(path)  # an error naming the file, not an unpickling traceback or wrong weights
        if map_location is None:  # the parent's default keeps tensors where they were saved
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, prefix: str, suffix: str = ".tmp") -> None:
    """Make ``path`` what ``write(file)`` writes, all or nothing: into a temporary file
    ``<prefix><random><suffix>`` in ``path``'s folder (``os.replace`` is only atomic within one file system),
    flushed and fsync-ed, given the permissions of any new file (``0o666`` less the umask, not ``mkstemp``'s
    ``0o600``), renamed over ``path``, and the folder fsync-ed. ``path`` is its old self or entirely new, never
    partial; the temporary file never outlives a failure."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # and the rename itself survives a power cut


def fsync_dir(folder: Path) -> None:
    """Make a new, renamed or removed entry of ``folder`` durable (POSIX; a no-op where unsupported, e.g.
    Windows cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, briefly
    os.umask(mask)
    return mask


# Lightning names checkpoints ``*.ckpt``; the writer (host-pid) follows; mkstemp adds 8 characters of [a-z0-9_].
_ORPHAN = re.compile(r"^\..+\.ckpt\.(?:(?P<host>[^.]+)-(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")
# A sharded checkpoint moved aside by :func:`replace_atomically`'s fallback, to be deleted once replaced.
_ASIDE = re.compile(r"^\.(?P<name>.+\.ckpt)\.old\.[0-9a-f]{8}$")
_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
_WRITER = f"{_HOST}-{os.getpid()}"
_IMPORTED_AT = time.time()


def _process_start_time() -> float:
    """When this process started (Linux: from ``/proc``), else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after "(comm)"
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        # btime has whole seconds: a second early, so no file of this process is ever older.
        return min(boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0, _IMPORTED_AT)
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporary files and folders a checkpoint save left in ``folder`` when killed mid-save.

    Only names of its own pattern (``.<name>.ckpt.<host>-<pid>.<random>.tmp``: a file, or the
    folder of a sharded save) are removed, and only when their writer is gone: on this host, a
    writer pid that no longer runs; from another host (a shared file system), or in the older
    unnamed pattern, one last modified before this process started (a save in progress keeps
    writing, so it is newer). A sharded checkpoint moved aside while being replaced
    (``.<name>.ckpt.old.<random>``) is deleted when ``<name>.ckpt`` exists, and put back under its
    name when the replacement never arrived. Returns the names removed, logged as a warning.
    """
    folder = Path(folder)
    started = _process_start_time()
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            aside = _ASIDE.match(entry.name)
            if aside and entry.is_dir(follow_symlinks=False):
                _settle_aside(folder, Path(entry.path), aside["name"], removed)
                continue
            match = _ORPHAN.match(entry.name)
            if not match or entry.is_symlink():
                continue
            try:
                if match["host"] == _HOST:
                    orphaned = int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
                else:
                    orphaned = entry.stat(follow_symlinks=False).st_mtime < started
                if orphaned:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError:  # removed meanwhile, or not ours to delete: never fail the save for it
                continue
    if removed:
        log.warning(
            "Removed %d temporary file(s) left in %s by an interrupted checkpoint save: %s",
            len(removed), folder, ", ".join(sorted(removed)),
        )
    return removed


def _settle_aside(folder: Path, aside: Path, name: str, removed: list[str]) -> None:
    target = folder / name
    try:
        if target.exists():
            shutil.rmtree(aside)
            removed.append(aside.name)
        else:
            aside.rename(target)
            log.warning("Restored %s from %s: a save replacing it was interrupted", target, aside.name)
    except OSError:
        pass


def temporary_path(path: str | Path) -> Path:
    """A fresh name beside ``path`` to write it under first: ``.<name>.<host>-<pid>.<random>.tmp``
    (:func:`remove_orphaned_temporaries` knows it); nothing is created."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_WRITER}.{secrets.token_hex(4)}.tmp")


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the OS or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def replace_atomically(tmp: str | Path, path: str | Path) -> None:
    """Give the finished checkpoint ``tmp`` (a file or a sharded folder) the name ``path``.

    A file replaces a file in one rename. A folder takes ``path``'s place in one atomic exchange
    where the file system allows it (Linux local file systems), after which the old checkpoint is
    deleted; elsewhere the old one is first renamed aside (``.<name>.old.<random>``) and deleted
    last: a crash in between leaves it there, and :func:`remove_orphaned_temporaries` puts it back.
    """
    tmp, path = Path(tmp), Path(path)
    if not path.exists() or (tmp.is_file() and path.is_file()):
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        _remove(tmp)  # now the old checkpoint
    else:
        aside = path.with_name(f".{path.name}.old.{secrets.token_hex(4)}")
        path.rename(aside)
        tmp.rename(path)
        _remove(aside)
    fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def link_checkpoint(source: str | Path, path: str | Path) -> bool:
    """Make ``path`` the same checkpoint as ``source`` with hard links (a file, or every file of a
    sharded folder), atomically: no second copy is written. False, with nothing changed, where
    the file system has no hard links (the caller then saves a copy)."""
    source, path = Path(source), Path(path)
    tmp = temporary_path(path)
    try:
        if source.is_dir():
            for root, _, files in os.walk(source):
                target = tmp / Path(root).relative_to(source)
                target.mkdir(parents=True, exist_ok=True)
                for name in files:
                    os.link(os.path.join(root, name), target / name)
        else:
            os.link(source, tmp)
    except OSError as e:
        log.warning("cannot hard-link %s to %s (%s): saving a copy", source, path, e.strerror or e)
        if tmp.exists():
            _remove(tmp)
        return False
    replace_atomically(tmp, path)
    return True
