"""What a checkpoint holds beyond weights and optimizer state, and how it reaches the disk.

* :class:`AtomicCheckpointIO` writes each checkpoint file to a temporary file in the same
  folder, flushes it to disk and renames it over the final name, so a crash mid-save leaves
  either the old checkpoint or the new one under that name, never a truncated file.
* :func:`check_checkpoint` tells a damaged checkpoint from a good one before anything loads it:
  ``torch.load`` returns wrong weights from a file with flipped bytes without a word.
* :func:`resume_state` / :func:`restore_resume_state` carry what Lightning does not save itself
  and an exact resume needs: the RNG streams of every rank (dropout) and the training metrics'
  running window (sums since the last log), so a resumed run logs and trains as if never stopped.
  Data order is the sampler's job (``dpo_lightning/data/sampler.py``).
* When checkpoints are written (``last.ckpt`` periodically, on preemption) is
  ``dpo_lightning/training/callbacks.py``'s business.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchmetrics import Metric

from dpo_lightning.training.metrics import RunningMeans

RESUME_KEY = "dpo_resume"

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
        # Same folder as the target: os.replace is only atomic within one filesystem.
        # The writer's host and pid in the name: a later run can tell a dead writer's file at once.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_WRITER}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # and the rename itself survives a power cut

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        check_checkpoint(path)  # an error naming the file, not an unpickling traceback or wrong weights
        if map_location is None:  # the parent's default keeps tensors where they were saved
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
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
    _fsync_dir(path.parent)


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


# ---------------------------------------------------------------------------- integrity


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message names the path and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing at the checkpoint path (also a ``FileNotFoundError``, what Lightning raises there)."""


# Files of Lightning's sharded checkpoint folders: torch.distributed.checkpoint's own index,
# and the non-tensor part Lightning saves last (``lightning.fabric.utilities.load``).
DCP_METADATA = ".metadata"
SHARDED_META = "meta.pt"


def check_checkpoint(path: str | Path, *, verify_crc: bool = True) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, uncorrupted Lightning checkpoint.

    ``torch.load`` reads only the zip directory and the records it needs: a truncated file fails
    with an unpickling error that names no file, and a flipped byte inside tensor data loads as
    a silently wrong weight. ``torch.save`` stores a CRC32 for every record of its zip archive,
    so one sequential read through ``zipfile`` verifies every byte (docs/reliability.md has the
    measured speed). A folder is a sharded (FSDP2, distributed) checkpoint: its ``.metadata``
    must exist, the shard files it names must be long enough, and Lightning's ``meta.pt`` is
    checked as a file. Remote paths (``s3://`` ...) are not checked. ``verify_crc=False`` checks
    the archive's structure only (its directory at the end), without reading the data.
    """
    if "://" in str(path):
        return
    path = Path(path)
    what = f"checkpoint {path}"
    if not path.exists():
        raise CheckpointNotFoundError(f"{what}: no such file or folder")
    if path.is_dir():
        _check_sharded(path, what, verify_crc)
        return
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{what}: cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"{what}: empty: an interrupted save?")
    if path.suffix == ".safetensors" or _is_safetensors(head, size):
        raise CheckpointError(
            f"{what}: a safetensors weights file, not a training checkpoint: "
            "give it as the model, e.g. --model.model <folder>"
        )
    if not head.startswith(b"PK"):
        raise CheckpointError(f"{what}: not a zip archive, so not a checkpoint torch.save wrote (or a pre-1.6 one)")
    _check_zip(path, what, verify_crc)


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with the length of its JSON header (u64, little-endian), then ``{``."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _check_zip(path: Path, what: str, verify_crc: bool) -> None:
    try:
        with zipfile.ZipFile(path) as archive:  # parses the directory at the end: a cut-off file fails here
            if not verify_crc:
                return
            records = [r for r in archive.infolist() if r.file_size]
            if records and all(r.CRC == 0 for r in records):
                # Saved under torch.serialization.set_crc32_options(False): nothing to verify against.
                log.warning("%s was saved without CRC32 checksums: its data cannot be verified", what)
                return
            bad = archive.testzip()  # reads every record and compares its CRC32
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{what}: truncated or damaged, not a complete zip archive ({e})") from None
    except (EOFError, zlib.error) as e:
        raise CheckpointError(f"{what}: damaged zip archive ({e}): the file is corrupt") from None
    except OSError as e:
        raise CheckpointError(f"{what}: cannot be read: {e.strerror or e}") from None
    if bad is not None:
        raise CheckpointError(f"{what}: record {bad} fails its CRC check: the file is corrupt")


def _check_sharded(path: Path, what: str, verify_crc: bool) -> None:
    if (path / "config.json").is_file() or any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"{what}: a Hugging Face model folder, not a training checkpoint: "
            "give it as the model, e.g. --model.model <folder>"
        )
    if not (path / DCP_METADATA).is_file():
        raise CheckpointError(f"{what}: a folder without {DCP_METADATA}: not a sharded checkpoint, or a broken save")
    try:
        with (path / DCP_METADATA).open("rb") as f:
            metadata = pickle.load(f)  # as torch.distributed.checkpoint.FileSystemReader reads it
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # whatever fails to unpickle, the index is unusable
        raise CheckpointError(f"{what}: {DCP_METADATA} cannot be read ({type(e).__name__}): it is corrupt") from None
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{what}: shard {name} named in {DCP_METADATA} is missing")
        if shard.stat().st_size < end:
            raise CheckpointError(f"{what}: shard {name} is truncated ({shard.stat().st_size} of {end} bytes)")
    if not (path / SHARDED_META).is_file():
        raise CheckpointError(f"{what}: no {SHARDED_META}: the save was interrupted before its last file")
    check_checkpoint(path / SHARDED_META, verify_crc=verify_crc)


# ---------------------------------------------------------------------------- resume state


def resume_state(metrics: RunningMeans) -> dict[str, Any]:
    """RNG states and ``metrics``' window of every rank, and the window synced across ranks.

    Runs on every rank (``on_save_checkpoint`` does): it uses collectives.
    """
    rng = _collect_rng_states(include_cuda=torch.cuda.is_available())
    # NumPy's key array would need weights_only=False to load: store it as a list of ints.
    rng["numpy"] = tuple(v.tolist() if isinstance(v, np.ndarray) else v for v in rng["numpy"])
    own = {"rng": rng, "metrics": {k: _local_states(m) for k, m in metrics.means.items()}}
    if _world_size() > 1:
        gathered: list[Any] = [None] * _world_size()
        dist.all_gather_object(gathered, own)
        per_rank = gathered
    else:
        per_rank = [own]
    return {
        "rng_per_rank": [r["rng"] for r in per_rank],
        "metrics_per_rank": [r["metrics"] for r in per_rank],
        # For a resume on another number of ranks, which cannot split the window back per rank.
        "metrics": {k: _synced_states(m) for k, m in metrics.means.items()},
    }


def restore_resume_state(rank: int, metrics: RunningMeans, state: dict[str, Any]) -> dict[str, Any]:
    """Put the metric window back; return the RNG states this rank must restore.

    The RNG is returned, not set: Lightning draws from the global RNG between loading the
    checkpoint and the first batch (the DataLoader's base seed), so the caller sets it at the
    first ``on_train_batch_start``, the same point in the stream the saving run was at.
    """
    per_rank = state["rng_per_rank"]
    window = state.get("metrics_per_rank")
    if window is not None and len(window) == _world_size():
        # Same ranks: each takes its own window back, so the next cross-rank sum adds the same
        # numbers in the same order as the uninterrupted run's (bitwise equal logs).
        for key, saved in window[rank].items():
            _load_states(metrics.means[key], saved, keep=True)
    else:
        # Another number of ranks (or an older checkpoint): the window saved as sums over all
        # ranks goes to rank 0, the others hold zeros; the next cross-rank sum is the same value
        # up to float rounding of the changed summation order.
        for key, saved in state["metrics"].items():
            _load_states(metrics.means[key], saved, keep=rank == 0)
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`resume_state` collected for this rank."""
    name, keys, *rest = states["numpy"]
    _set_rng_states({**states, "numpy": (name, np.asarray(keys, dtype=np.uint32), *rest)})


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local_states(metric: Metric) -> dict[str, Any]:
    states = {name: getattr(metric, name).detach().clone().cpu() for name in metric._defaults}
    return {"states": states, "update_count": metric._update_count}


def _synced_states(metric: Metric) -> dict[str, Any]:
    names = list(metric._defaults)
    with metric.sync_context(should_sync=_world_size() > 1):
        states = {name: getattr(metric, name).detach().clone().cpu() for name in names}
    return {"states": states, "update_count": metric._update_count}


def _load_states(metric: Metric, saved: dict[str, Any], *, keep: bool) -> None:
    for name, value in saved["states"].items():
        current = getattr(metric, name)
        # Ranks that do not keep the window start empty: the metric's default (0 for sums, inf for a min).
        value = value if keep else torch.as_tensor(metric._defaults[name]).expand_as(value).clone()
        setattr(metric, name, value.to(current.device, current.dtype))
    # Same count on every rank: ``has_updates`` decides whether all ranks enter the synced compute.
    metric._update_count = saved["update_count"]
    metric._computed = None
