"""kill -9 ``python -m dpo_lightning generate`` at chosen moments, re-run it, compare bytes with an uninterrupted run.

    python tests/scripts/kill_generate.py --policy FOLDER --out DIR [--trials 7] [--modes ...]

Each trial runs the real command (``recipes/tiny_generate.yaml`` on ``--policy``, 24 prompts in
batches of 4, 4 samples each) in a subprocess of its own session, sends SIGKILL to its process group
at one of these moments (:data:`MODES`), then runs the same command again (``--resume-batch-size``:
with another ``data.batch_size``) until it exits 0:

* ``startup``: a random time before the first sample record is written (imports, model, prompts);
* ``sampling``: once k of the 24 records are written (k drawn; a batch's records are written one at
  a time, so the kill can fall between two records of one batch); ``sampling-twice`` kills the first
  re-run in the same way too;
* ``before-merge``: every record written, ``samples.jsonl`` not yet;
* ``mid-merge``: ``samples.jsonl`` in place, the part files not yet removed;
* ``between-files``: ``samples.jsonl`` in place, ``pairs.jsonl`` not yet written;
* ``after-pairs``: ``pairs.jsonl`` written, the manifest not yet updated to say so.

The last four moments are made to last: the killed run (only it) runs with a pause around the
writes of ``samples.jsonl`` and ``pairs.jsonl`` (this script's ``--child`` mode wraps
``samples_io._write_atomically``; the library is not changed) and announces them with marker files.

Per trial it checks that the finished folder's ``samples.jsonl`` and ``pairs.jsonl`` are byte for
byte those of an uninterrupted run of the same command, its ``manifest.json`` the same, and that no
part file or temporary file is left. Prints one line per trial and the summary line
``generate kill -9 trials: N, byte-identical: K``; exits 1 unless every trial is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODES = ("startup", "sampling", "sampling-twice", "before-merge", "mid-merge", "between-files", "after-pairs")
# mode -> the marker the paused child writes at that moment
MARKERS = {"before-merge": "before_samples.jsonl", "mid-merge": "after_samples.jsonl",
           "between-files": "before_pairs.jsonl", "after-pairs": "after_pairs.jsonl"}
PROMPTS, BATCH, SAMPLES = 24, 4, 4


def command(policy: Path, out: Path, markers: Path | None, batch_size: int = BATCH) -> list[str]:
    args = ["--config", str(ROOT / "recipes" / "tiny_generate.yaml"), "--model.model", str(policy),
            "--data.tokenizer", str(policy), "--data.limit", str(PROMPTS), "--data.batch_size", str(batch_size),
            "--model.num_samples", str(SAMPLES), "--output.output_dir", str(out),
            "--trainer.enable_progress_bar", "false"]
    child = [sys.executable, str(Path(__file__).resolve()), "--child"]
    return child + (["--markers", str(markers)] if markers else []) + ["--", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=log.parent, env=environment(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def records_written(out: Path) -> int:
    """Complete lines in the part files."""
    count = 0
    for part in out.glob("samples.part*.jsonl"):
        try:
            count += part.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return count


def wait_and_kill(proc: subprocess.Popen, out: Path, markers: Path, mode: str, rng: random.Random,
                  first_record: float) -> str | None:
    """Kill ``proc`` at the moment of ``mode``; what it hit, or None if it exited first."""
    t0 = time.monotonic()
    deadline = t0 + rng.uniform(0.0, first_record) if mode == "startup" else None
    target = rng.randint(1, PROMPTS - 1) if mode.startswith("sampling") else None
    while proc.poll() is None:
        now = time.monotonic()
        if deadline is not None and (now >= deadline or records_written(out) > 0):
            kill(proc)
            return f"{now - t0:.2f}s, {records_written(out)} records written"
        if target is not None and (done := records_written(out)) >= target:
            kill(proc)
            return f"{done} of {PROMPTS} records written"
        if mode in MARKERS and (markers / MARKERS[mode]).exists():
            kill(proc)
            files = sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock"))
            return f"at {MARKERS[mode]}: folder {files}"
        time.sleep(0.002)
    return None


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("samples.part") or p.name.endswith(".tmp"))


@dataclass
class Trial:
    index: int
    mode: str
    kills: list[str] = field(default_factory=list)
    attempts: int = 0
    differs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differs


def compare(out: Path, reference: Path) -> list[str]:
    differs = []
    for name in ("samples.jsonl", "pairs.jsonl"):
        if not (out / name).exists():
            differs.append(f"{name} missing")
        elif (out / name).read_bytes() != (reference / name).read_bytes():
            a, b = (out / name).read_bytes().splitlines(), (reference / name).read_bytes().splitlines()
            lines = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
            differs.append(f"{name} differs ({lines} lines)")
    if json.loads((out / "manifest.json").read_text()) != json.loads((reference / "manifest.json").read_text()):
        differs.append("manifest.json differs")
    differs += [f"left: {name}" for name in leftovers(out)]
    return differs


def run_trial(index: int, mode: str, policy: Path, folder: Path, reference: Path, first_record: float,
              rng: random.Random, resume_batch_size: int) -> Trial:
    trial = Trial(index, mode)
    for _ in range(5):  # the run may end before the drawn moment: draw again in a fresh folder
        if folder.exists():
            shutil.rmtree(folder)
        markers = folder / "markers"
        markers.mkdir(parents=True)
        out = folder / "out"
        proc = start(command(policy, out, markers if mode in MARKERS else None), folder / "attempt_0.log")
        killed = wait_and_kill(proc, out, markers, mode, rng, first_record)
        if killed is not None:
            break
        if proc.returncode != 0:
            log = (folder / "attempt_0.log").read_text()
            raise RuntimeError(f"trial {index}: the run failed by itself:\n{log[-3000:]}")
    else:
        raise RuntimeError(f"trial {index}: the run ended before every drawn kill moment")
    trial.kills.append(killed)
    attempt = 1
    while True:
        log = folder / f"attempt_{attempt}.log"
        proc = start(command(policy, out, None, resume_batch_size), log)
        again = None
        if mode == "sampling-twice" and attempt == 1:
            again = wait_and_kill(proc, out, folder / "markers", "sampling", rng, first_record)
        if again is not None:
            trial.kills.append(again + " (re-run)")
        else:
            proc.wait()
            if proc.returncode != 0:
                trial.differs.append(f"the re-run failed (exit {proc.returncode}, see {log})")
                break
            break
        attempt += 1
    trial.attempts = attempt
    if not trial.differs:
        trial.differs = compare(out, reference)
    return trial


def child(argv: list[str]) -> None:
    """The generate command in this process; with ``--markers``, paused and announced around the writes of
    samples.jsonl and pairs.jsonl."""
    markers = None
    if argv[:1] == ["--markers"]:
        markers, argv = Path(argv[1]), argv[2:]
    argv = argv[1:] if argv[:1] == ["--"] else argv
    sys.path.insert(0, str(ROOT))
    if markers is not None:
        import dpo_lightning.generation.samples_io as samples_io

        original = samples_io._write_atomically

        def paused(path: Path, lines) -> None:
            watched = path.name in ("samples.jsonl", "pairs.jsonl")
            if watched:
                (markers / f"before_{path.name}").touch()
                time.sleep(30)
            original(path, lines)
            if watched:
                (markers / f"after_{path.name}").touch()
                time.sleep(30)

        samples_io._write_atomically = paused
    from dpo_lightning.cli import main as cli_main

    cli_main(["generate", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, required=True, help="an export folder (tests/test_kill_generate.py "
                        "makes a tiny random one)")
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder for the runs")
    parser.add_argument("--trials", type=int, default=len(MODES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="taken in turn by the trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume-batch-size", type=int, default=BATCH,
                        help="data.batch_size of the re-runs (the killed run and the reference use 4)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty")
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    reference = out / "reference"
    reference.mkdir(parents=True)
    proc = start(command(args.policy.resolve(), reference / "out", None), reference / "attempt_0.log")
    first_record = None
    while proc.poll() is None:
        if first_record is None and records_written(reference / "out") > 0:
            first_record = time.monotonic() - t0
        time.sleep(0.002)
    if proc.returncode != 0:
        sys.exit(f"the reference run failed:\n{(reference / 'attempt_0.log').read_text()[-3000:]}")
    print(f"reference: {time.monotonic() - t0:.1f}s, first record at {first_record:.1f}s", flush=True)
    trials = []
    for i in range(args.trials):
        mode = args.modes[i % len(args.modes)]
        trial = run_trial(i, mode, args.policy.resolve(), out / f"trial_{i:02d}", reference / "out",
                          first_record or 1.0, rng, args.resume_batch_size)
        trials.append(trial)
        verdict = "byte-identical" if trial.ok else "DIFFERS: " + "; ".join(trial.differs)
        print(f"trial {i:02d} [{mode:14s}] kill -9 at {'; '.join(trial.kills)}; {trial.attempts} re-run(s): {verdict}",
              flush=True)
    identical = sum(t.ok for t in trials)
    wall = time.monotonic() - t0
    print(f"generate kill -9 trials: {len(trials)}, byte-identical: {identical}; wall time {wall:.0f}s")
    return 0 if identical == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
