"""Output folders of ``generate`` and ``iterate``: one run at a time, and the settings behind their files.

`FolderLock` keeps a second run out of a folder a run is using: an exclusive ``fcntl.flock`` on
``<folder>/.lock``, which the kernel releases when its process ends, however it ends (``kill -9``
included), so a killed run's lock is simply taken over by the next one. The holder writes its host,
pid, start time and command into the file, and a refused run names them. Where the file system has
no ``flock`` (Lustre mounted without ``-o flock``, some FUSE file systems) the lock is a file
created with ``O_CREAT | O_EXCL`` (``.lock.owner``) instead, taken over only when its holder is a
process of this host that no longer runs; one left by another host must be removed by hand.

Records (`read_record`, `write_record`): small JSON files written atomically (temporary file, fsync,
rename) that say with which settings a folder's files were made, so that whether a stage is done is
decided from its outputs and those settings, never from the presence of one file; `differences`
names the settings that changed, for the one-line refusal (`FolderError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dpo_lightning.training.checkpoint import _alive, atomic_write, fsync_dir

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"  # of `write_atomically`'s temporary files: ".<name>.<random>.tmp"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"  # the O_EXCL lock, where flock is not supported
# flock errors meaning "not supported here" (not "held by another process")
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}


class FolderError(ValueError):
    """An output folder this run cannot use as it is (in use, or made with other settings); the CLI
    prints its one line and exits 1."""


def _host() -> str:
    return socket.gethostname()


def _holder() -> dict[str, Any]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("dpo_lightning/__main__.py", "dpo_lightning\\__main__.py")):
        argv[0] = "python -m dpo_lightning"
    return {"host": _host(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(argv)[:500]}


def _describe(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "another process (which has not written who it is yet)"
    return (f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command') or '?'})")


def _parse_holder(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


class FolderLock:
    """An exclusive lock on ``folder`` for this process; `acquire` raises `FolderError` naming the
    holder when another run has it. A context manager; `release` is idempotent."""

    def __init__(self, folder: str | Path, command: str = "this command") -> None:
        self.folder = Path(folder)
        self.command = command
        self._fd: int | None = None
        self._owner_file: Path | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise self._in_use(holder) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_FLOCK:
                raise
            log.warning("%s: the file system does not support flock (%s); locking with %s instead", self.folder,
                        os.strerror(err.errno), OWNER_FILE)
            return self._acquire_owner_file()
        previous = _parse_holder(os.pread(fd, 4096, 0))
        if previous:  # a holder that ended normally empties the file: this one was killed
            log.warning("%s: taking over the lock of %s, which ended without releasing it", self.folder,
                        _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd
        return self

    def _in_use(self, holder: Mapping[str, Any] | None) -> FolderError:
        return FolderError(f"{self.folder} is in use by {_describe(holder)}; wait for that run to end (or stop it), "
                           f"or give {self.command} another output folder")

    def _acquire_owner_file(self) -> FolderLock:
        path = self.folder / OWNER_FILE
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = _parse_holder(path.read_bytes()) if path.exists() else None
                stale = holder and holder.get("host") == _host() and not _alive(int(holder.get("pid", -1)))
                if not stale:
                    err = self._in_use(holder)
                    raise FolderError(f"{err} (if no such run is alive, remove {path})") from None
                log.warning("%s: taking over the lock of %s, which no longer runs", self.folder, _describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            self._owner_file = path
            return self
        raise self._in_use(None)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # an empty lock file: its last holder ended normally
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._owner_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owner_file.unlink()
            self._owner_file = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._owner_file is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ records


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when there is none; `FolderError` when it does not parse."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FolderError(f"{path}: not a JSON record ({err}); it is written atomically, so it was edited or "
                          "damaged: restore it or use a new output folder") from None
    if not isinstance(record, dict):
        raise FolderError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def write_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """``record`` as JSON at ``path``, atomically (the old record or the new one, never a mix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, [(json.dumps(plain(record), indent=1, sort_keys=True) + "\n").encode()])


def write_atomically(path: Path, lines: Iterable[bytes]) -> None:
    """Write ``lines`` to ``path`` through a temporary file in the same folder, fsync, ``os.replace``
    (`checkpoint.atomic_write`): ``path`` is either its old self or entirely new, never partial. The temporary
    file never outlives a failure."""
    atomic_write(path, lambda f: f.writelines(lines), prefix=f".{path.name}.", suffix=TEMP_SUFFIX)


def plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, namespaces dicts), for comparing."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str, allow_nan=True))


def differences(recorded: Any, current: Any, prefix: str = "", label: str = "recorded") -> list[str]:
    """``key: old (recorded) -> new (now)`` for each setting (dotted key, nested dicts walked) whose value differs."""
    recorded, current = plain(recorded), plain(current)
    if isinstance(recorded, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(recorded) | set(current)):
            missing = "(not set)"
            lines += differences(recorded.get(key, missing), current.get(key, missing), f"{prefix}{key}.", label)
        return lines
    if recorded == current:
        return []
    return [f"{prefix.rstrip('.') or 'value'}: {recorded!r} ({label}) -> {current!r} (now)"]


def say_differences(lines: list[str], most: int = 3) -> str:
    """The first ``most`` of `differences`' lines on one line, with how many more there are."""
    more = f" (and {len(lines) - most} more)" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more


__all__ = [
    "FolderError", "FolderLock", "differences", "fsync_dir", "plain", "read_record", "say_differences",
    "write_atomically", "write_record",
]
