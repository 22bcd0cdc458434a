"""Follow README.md as a newcomer does: a fresh clone, a fresh virtual environment, then every command of
README's ```bash blocks, in order, from the clone's root; each must exit 0.

    python tests/scripts/readme_commands.py                  # a new temporary folder, removed after
    python tests/scripts/readme_commands.py --dest DIR       # DIR/main (the clone), DIR/venv; kept
    python tests/scripts/readme_commands.py --list           # print the commands, run nothing

The first block holds the install line, so the environment is exactly what the README installs: nothing
is added, and ``PYTHONPATH`` and user site-packages are kept out. The clone is of the repository's
committed ``HEAD`` (uncommitted changes are not in it; the script says so). A ``../shared`` folder beside
the repository is linked beside the clone, as the recipes that read ``../shared/data`` expect.

Commands that serve until stopped (``SERVERS``: ``tensorboard --logdir ...``) pass when they are still
running after ``--serve_seconds`` and are then stopped; one that exits before that fails. A block with a
``# doc-test: skip (reason)`` line is skipped, with its reason (the same marker ``tests/test_docs.py``
reads). Each command's output goes to ``DIR/logs/NN.log``; a failure prints its last lines. CI runs this
first (``.ci/run``); it takes the README's test command (``python -m pytest``) with it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*(\S*)")
SKIP_MARK = re.compile(r"doc-test:\s*skip\s*\((?P<reason>.+)\)")
# Commands that serve until stopped, by their first word: what "passes" means for each.
SERVERS = {"tensorboard": "a server: passes when it is still serving after --serve_seconds, then is stopped"}


def readme_commands(readme: Path) -> list[tuple[int, str, str | None]]:
    """``(line, command, skip reason)`` for every command of the file's bash blocks, in order: one per
    logical line (``\\`` continuations joined; comment and blank lines dropped)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    commands: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if lang in ("bash", "sh", "shell"):
            body = lines[i + 1:j]
            marker = next((SKIP_MARK.search(line) for line in body if SKIP_MARK.search(line)), None)
            pending, start = "", 0
            for n, line in enumerate(body, start=i + 2):
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                start = start if pending else n
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                commands.append((start, (pending + line).strip(), marker["reason"] if marker else None))
                pending = ""
        i = j + 1
    return commands


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"  # only what the README installed
    return env


def _server(words: list[str]) -> bool:
    return bool(words) and Path(words[0]).name in SERVERS


def run(command: str, cwd: Path, env: dict[str, str], log: Path, timeout: float, serve_seconds: float) -> str | None:
    """Run one README command in bash; None when it passed, else why it did not."""
    words = shlex.split(command, comments=True)
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        wait = serve_seconds if _server(words) else timeout
        try:
            code = proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None if _server(words) else f"still running after {timeout:.0f} s"
    if _server(words):
        return f"exited ({code}) within {serve_seconds:.0f} s; it should serve until stopped"
    return None if code == 0 else f"exit status {code}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="repository to clone (its committed HEAD)")
    parser.add_argument("--dest", type=Path, help="folder for the clone (DIR/main), venv and logs; kept")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the venv")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one command may take")
    parser.add_argument("--serve_seconds", type=float, default=20, help="how long a server must keep serving")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)

    commands = readme_commands(args.repo / "README.md")
    if args.list:
        for line, command, skip in commands:
            print(f"README.md:{line}: {command}" + (f"   [skipped: {skip}]" if skip else ""))
        return 0
    dest = args.dest or Path(tempfile.mkdtemp(prefix="readme_commands_"))
    dest.mkdir(parents=True, exist_ok=True)
    clone, venv, logs = dest / "main", dest / "venv", dest / "logs"
    for path in (clone, venv, logs):
        shutil.rmtree(path, ignore_errors=True)
    logs.mkdir()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=args.repo,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"note: {args.repo} has uncommitted changes; the clone holds its committed HEAD only")
    subprocess.run(["git", "clone", "--quiet", str(args.repo), str(clone)], check=True)
    shared = (args.repo / ".." / "shared").resolve()
    if shared.is_dir() and not (dest / "shared").exists():
        (dest / "shared").symlink_to(shared)
    subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
    env = _env(venv)

    started = time.perf_counter()
    passed, failed = 0, []
    for k, (line, command, skip) in enumerate(commands, start=1):
        if skip:
            print(f"[skip] README.md:{line}: {command}  ({skip})", flush=True)
            continue
        log = logs / f"{k:02d}.log"
        t0 = time.perf_counter()
        why = run(command, clone, env, log, args.timeout, args.serve_seconds)
        took = time.perf_counter() - t0
        print(f"[{'ok' if why is None else 'FAIL'}] {took:7.1f} s  README.md:{line}: {command}", flush=True)
        passed += why is None
        if why is not None:
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print(f"  {why}; last lines of {log}:\n    " + "\n    ".join(tail), flush=True)
            failed.append(command)
            break  # later commands build on this one's output
    total = time.perf_counter() - started
    skipped = sum(1 for *_, skip in commands if skip)
    print(f"{passed} of {len(commands)} README commands passed ({skipped} skipped"
          f"{', stopped at the first failure' if failed else ''}) in {total:.0f} s (clone: {clone}, venv: {venv})")
    if args.dest is None and not failed:
        shutil.rmtree(dest, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
