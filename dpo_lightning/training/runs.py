"""Run folders: which ``version_N`` a new run writes to, and where ``--ckpt_path last`` resumes from.

Lightning's loggers pick ``version_N`` as one past the highest folder they see, so two runs
started together chose the same folder and wrote into each other's checkpoints; and Lightning's
``ckpt_path="last"`` looks in the *new* run's folder, finds nothing and silently restarts from step
0. Here a new run claims its folder atomically (``mkdir`` fails if another run got there first),
and ``last`` means the newest ``last.ckpt`` among the runs of the same name. A run refused after it claimed its
folder (a setting a stage refuses while it is built) gives the folder back while it is still empty
(`claims_released_on_failure`), so the next run gets that ``version_N``, as recipes that name
``runs/<name>/version_0`` expect.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dpo_lightning._moved import import_module

_VERSION = re.compile(r"version_(\d+)$")
# The version_N folders claim_version created, with the id of the process that created each.
_CLAIMED: list[tuple[Path, int]] = []


class LastCheckpoint(NamedTuple):
    path: Path  # last.ckpt: a file, or a folder for a sharded (FSDP2) checkpoint
    version: int | None  # the run's version_N, when it lives in a logger's run folder


def claim_version(root: str | Path) -> int:
    """Create ``root/version_N`` for the first free N and return N; safe against concurrent runs."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            _CLAIMED.append((root / f"version_{version}", os.getpid()))
            return version
        except FileExistsError:  # another run claimed it between our listing and our mkdir
            version += 1


@contextlib.contextmanager
def claims_released_on_failure() -> Iterator[None]:
    """When the body raises (a refused setting, `SystemExit`, Ctrl-C), each ``version_N`` folder `claim_version`
    created inside it, in this process, is removed if it is still empty; any other folder, and one holding a file,
    stays as it is. The claims are forgotten when the body ends either way."""
    start = len(_CLAIMED)
    try:
        yield
    except BaseException:
        for path, pid in _CLAIMED[start:]:
            if pid == os.getpid():
                with contextlib.suppress(OSError):  # not empty (or gone): not ours to remove
                    path.rmdir()  # removes an empty folder only
        raise
    finally:
        del _CLAIMED[start:]


def find_last_checkpoint(root: str | Path | None, dirpath: str | Path | None = None) -> LastCheckpoint | None:
    """The newest ``last.ckpt`` in ``dirpath``, or in ``root/version_*/checkpoints``; None if there is none."""
    if dirpath is not None:
        path = Path(dirpath) / "last.ckpt"
        return LastCheckpoint(path, None) if path.exists() else None
    if root is None or not Path(root).is_dir():
        return None
    found = []
    for run in Path(root).iterdir():
        match = _VERSION.match(run.name)
        path = run / "checkpoints" / "last.ckpt"
        if match and path.exists():
            found.append((path.stat().st_mtime, int(match.group(1)), path))
    if not found:
        return None
    _, version, path = max(found)
    return LastCheckpoint(path, version)


def version_of(ckpt_path: str | Path) -> int | None:
    """N when ``ckpt_path`` is ``.../version_N/checkpoints/<file>``: the run folder a resume continues in."""
    parent = Path(ckpt_path).resolve().parent
    match = _VERSION.match(parent.parent.name) if parent.name == "checkpoints" else None
    return int(match.group(1)) if match else None


def read_checkpoint_header(ckpt_path: str | Path) -> dict[str, Any]:
    """Step, epoch and hyper-parameters of a single-file checkpoint, without reading its tensors.

    ``mmap=True`` maps the file instead of loading it: a 7B checkpoint costs no memory here. Of a
    sharded checkpoint (a folder) only its small ``meta.pt`` is read; ``{}`` when it has none.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return {}
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    keys = ("global_step", "epoch", "hyper_parameters", "datamodule_hyper_parameters",
            "dpo_lightning_optimizer_settings")
    return {k: ckpt[k] for k in keys if k in ckpt}


def changed_hparams(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """``prefix.key: saved -> current`` for each key whose value differs (keys only one side has are skipped)."""
    lines = []
    for key in sorted(set(saved) & set(current)):
        if key.startswith("_"):
            continue
        old, new = saved[key], current[key]
        if _plain(old) != _plain(new):
            lines.append(f"{prefix}.{key}: {old!r} (checkpoint) -> {new!r} (now)")
    return lines


def _qualified(class_path: str) -> str:
    """The defining module's name of a class named by any import path (``dpo_lightning.CopyReference`` and
    ``dpo_lightning.references.copy.CopyReference`` are one class); the path as given when it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    """Namespaces and tuples as dicts and lists, so a parsed config compares equal to a saved one."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        plain = {k: _plain(v) for k, v in value.items()}
        if isinstance(plain.get("class_path"), str):
            plain["class_path"] = _qualified(plain["class_path"])
        return plain
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
