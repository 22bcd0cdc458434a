"""Is a checkpoint whole? `check_checkpoint` tells a damaged or truncated checkpoint (file or sharded folder) from a
good one before anything loads it: ``torch.load`` returns wrong weights from a file with flipped bytes without a word.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message names the path and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing at the checkpoint path (also a ``FileNotFoundError``, what Lightning raises there)."""


# Files of Lightning's sharded checkpoint folders: torch.distributed.checkpoint's own index,
# and the non-tensor part Lightning saves last (``lightning.fabric.utilities.load``).
DCP_METADATA = ".metadata"
SHARDED_META = "meta.pt"


def is_training_checkpoint(spec: str) -> bool:
    """Whether a model spec names a training checkpoint rather than a model: a ``.ckpt`` file, or a folder
    with no ``config.json`` that holds ``.distcp`` shards (a sharded FSDP2 checkpoint)."""
    folder = Path(spec)
    return spec.endswith(".ckpt") or (
        folder.is_dir() and not (folder / "config.json").exists() and any(folder.glob("*.distcp"))
    )


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
