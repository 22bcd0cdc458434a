"""`folders.FolderLock`: one run per output folder; a killed holder's lock is taken over, a live one named;
the O_EXCL fallback where the file system has no flock. `differences` names what changed."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import dpo_lightning.training.folders as folders
from dpo_lightning.training.folders import OWNER_FILE, FolderError, FolderLock, differences, read_record, write_record

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from dpo_lightning.training.folders import FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(120)")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_is_refused_naming_the_holder_and_a_killed_holders_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(FolderError, match=rf"{tmp_path} is in use by process {holder.pid} on host "
                                              rf"{socket.gethostname()} \(started .*-c"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: the kernel releases its flock
        holder.wait()
    with caplog.at_level(logging.WARNING), FolderLock(tmp_path) as lock:
        assert lock.held
        assert f"taking over the lock of process {holder.pid}" in caplog.text
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""  # released normally: nothing to take over next time
    caplog.clear()
    with caplog.at_level(logging.WARNING), FolderLock(tmp_path):
        assert "taking over" not in caplog.text


def test_without_flock_an_exclusive_owner_file_locks(tmp_path, monkeypatch, caplog):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING):
        first = FolderLock(tmp_path).acquire()
    assert "does not support flock" in caplog.text and (tmp_path / OWNER_FILE).exists()
    with pytest.raises(FolderError, match=rf"in use by process {os.getpid()}.*if no such run is alive, remove"):
        FolderLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / OWNER_FILE).exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    caplog.clear()
    with caplog.at_level(logging.WARNING), FolderLock(tmp_path):
        assert f"taking over the lock of process {dead.pid}" in caplog.text
    (tmp_path / OWNER_FILE).write_text(json.dumps({"host": "another-host", "pid": dead.pid}))
    with pytest.raises(FolderError, match="on host another-host"):  # cannot tell whether it runs: refused
        FolderLock(tmp_path).acquire()


def test_unexpected_flock_errors_are_not_taken_for_missing_support(tmp_path, monkeypatch):
    def broken(fd, operation):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(folders.fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        FolderLock(tmp_path).acquire()


def test_differences_name_nested_settings_and_records_round_trip(tmp_path):
    recorded = {"config": {"model": {"lr": 1e-4, "betas": (0.9, 0.999)}, "seed": 0}, "inputs": {"model": "a1"}}
    now = {"config": {"model": {"lr": 2e-4, "betas": [0.9, 0.999]}, "seed": 0}, "inputs": {"model": "b2"}}
    assert differences(recorded, now) == ["config.model.lr: 0.0001 (recorded) -> 0.0002 (now)",
                                          "inputs.model: 'a1' (recorded) -> 'b2' (now)"]
    assert differences(recorded, recorded) == []
    write_record(tmp_path / "stage.json", recorded)
    assert differences(read_record(tmp_path / "stage.json"), recorded) == []  # tuples read back as lists
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FolderError, match="bad.json: not a JSON record"):
        read_record(tmp_path / "bad.json")
