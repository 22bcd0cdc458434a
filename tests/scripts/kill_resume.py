"""kill -9 at random moments of a real CLI run, resume with ``--ckpt_path last``, compare bitwise.

    python tests/scripts/kill_resume.py --trials 20 --seed 0 --out /tmp/kill_resume

Each trial runs ``python -m dpo_lightning fit --config recipes/tiny.yaml`` (small overrides, one
of :data:`VARIANTS`: with or without validation, a DataLoader worker, gradient accumulation across
short epochs) in a subprocess of its own session, sends SIGKILL to the whole process group at a
random moment, then re-runs the same command with ``--ckpt_path last`` until it exits 0. Kill
moments (:data:`MODES`):

* ``training``: after the first ``last.ckpt`` appears, a random delay up to the reference run's
  remaining time (so also during validation, the last save and the end-of-fit export);
* ``mid-save``: the moment the k-th checkpoint temporary file (``.<name>.ckpt.<random>.tmp``) is
  seen, i.e. during a checkpoint write;
* ``anywhere``: a random time from the start (imports, data, model build, ...) to the expected end.

Some trials kill the first resumed run too (``--second-kill``), so a resume resumes a resume. The
resumed run starts at once (``--restart-delay 0``), as a restart loop would start it.

Per trial it checks: every ``*.ckpt`` in the trial folder passes
:func:`dpo_lightning.training.integrity.check_checkpoint` after every kill and at the end; no temporary
file or folder (checkpoint ``.tmp``, ``.hf_export.*``) is left once the resumed run finished; the
final ``last.ckpt`` (policy and reference weights, optimizer and scheduler state, step, RNG and
metric window) and the ``hf_export`` safetensors equal, bitwise (``torch.equal``), those of an
uninterrupted run of the same command (one per variant, run first and cached for the invocation).

Prints one line per trial and the summary line
``kill -9 trials: N, resumed bitwise identical: K, corrupt checkpoints: C``; exits 1 unless every
trial is identical, with no corrupt checkpoint and no leftover temporary. Each trial's folder under
``--out`` keeps the logs of every attempt (``attempt_N.log``) for a post-mortem.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout, not an installed copy

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dpo_lightning.training.integrity import CheckpointError, check_checkpoint  # noqa: E402

STEPS = 24
BASE = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--data.batch_size", "8",
    "--checkpoint.save_every_n_steps", "3",
    "--checkpoint.save_every_minutes", "null",
]
# Overrides per variant, on top of recipes/tiny.yaml and BASE.
VARIANTS: dict[str, list[str]] = {
    # No validation data: only the periodic saves (steps 3, 6, ...) and the end of fit write last.ckpt.
    "noval": ["--data.val_split", "null"],
    # Validation every 4 batches (2 batches of it): last.ckpt and a top-1 step*-acc*.ckpt at each.
    "val": ["--data.val_split", "validation", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2"],
    # A DataLoader worker process, killed with the trainer (same process group).
    "workers": ["--data.val_split", "null", "--data.num_workers", "1"],
    # 2 batches per optimizer step, epochs of 10 batches: kills mid-accumulation and across epochs.
    "accum": [
        "--data.val_split", "null", "--trainer.accumulate_grad_batches", "2", "--trainer.limit_train_batches", "10",
    ],
}
MODES = ("training", "training", "training", "mid-save", "anywhere")  # drawn uniformly: 60/20/20

RESUMING = re.compile(r"Resuming from (\S+) \(optimizer step (\d+), epoch (\d+)\)")
EXPORTED = re.compile(r"Hugging Face export of the policy: (\S+)")
CKPT_TMP = re.compile(r"^\..+\.ckpt\..+\.tmp$")  # AtomicCheckpointIO's temporary files
CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "dpo_resume")


def command(variant: str, trial_dir: Path, resume: bool) -> list[str]:
    args = [
        sys.executable, "-m", "dpo_lightning", "fit", "--config", str(ROOT / "recipes" / "tiny.yaml"),
        *BASE, *VARIANTS[variant],
        "--trainer.default_root_dir", str(trial_dir),
        "--trainer.logger.init_args.save_dir", str(trial_dir / "runs"),
    ]
    return args + (["--ckpt_path", "last"] if resume else [])


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    # A session of its own: the kill reaches the DataLoader workers too, as a scheduler's would.
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def temporaries(folder: Path) -> list[Path]:
    """Checkpoint temporaries and export temporaries (``.hf_export.<random>``, ``.hf_export.old.<random>``)."""
    found = [p for p in folder.rglob(".*") if CKPT_TMP.match(p.name) or p.name.startswith(".hf_export.")]
    return sorted(found)


def checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ckpt") if not p.name.startswith("."))


def corrupt(folder: Path) -> list[str]:
    bad = []
    for path in checkpoints(folder):
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            bad.append(str(e))
    return bad


# ---------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    wall: float  # seconds from start to exit
    first_ckpt: float  # seconds from start to the first last.ckpt
    saves: int  # checkpoint temporaries seen (a lower bound on the number of saves)
    checkpoint: dict[str, Any]
    export: dict[str, torch.Tensor]


def run_reference(variant: str, folder: Path) -> Reference:
    folder.mkdir(parents=True)
    proc = start(command(variant, folder, resume=False), folder, folder / "attempt_0.log")
    t0 = time.monotonic()
    first, seen = None, set()
    while proc.poll() is None:
        if first is None and any(folder.rglob("last.ckpt")):
            first = time.monotonic() - t0
        seen.update(p.name for p in folder.glob("runs/*/version_*/checkpoints/.*.tmp"))
        time.sleep(0.002)
    wall = time.monotonic() - t0
    log = (folder / "attempt_0.log").read_text()
    if proc.returncode != 0:
        sys.exit(f"reference run {variant} failed (exit {proc.returncode}):\n{log[-3000:]}")
    checkpoint, export = final_state(log)
    return Reference(wall, first if first is not None else wall, len(seen), checkpoint, export)


def final_state(log: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The final run's last.ckpt and hf_export weights, found from the export line of its log."""
    match = EXPORTED.search(log)
    if match is None:
        raise RuntimeError("no 'Hugging Face export of the policy' line in the final run's log")
    export_dir = Path(match.group(1))
    checkpoint = torch.load(export_dir.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: checkpoint.get(k) for k in CHECKPOINT_KEYS}, load_file(export_dir / "model.safetensors")


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which ``a`` and ``b`` differ (tensors bitwise, with ``torch.equal``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys {sorted(set(a) ^ set(b))})"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}" if where else str(k))]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


# ---------------------------------------------------------------------------------------- trials


@dataclass
class Trial:
    index: int
    variant: str
    mode: str
    kills: list[str] = field(default_factory=list)  # "6.42s" per kill, with what it hit
    resumed_from: list[str] = field(default_factory=list)  # "step 9 (epoch 0)" or "nothing (new run)"
    corrupt: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    attempts: int = 0
    wall: float = 0.0

    @property
    def identical(self) -> bool:
        return not self.differs

    @property
    def policy_identical(self) -> bool:
        """The policy weights, in last.ckpt and in the export (False if no run finished)."""
        return not any(d.startswith(("state_dict.model.", "hf_export", "no resumed run")) for d in self.differs)

    @property
    def ok(self) -> bool:
        return self.identical and not self.corrupt and not self.leftovers


def wait_and_kill(
    proc: subprocess.Popen, folder: Path, mode: str, ref: Reference, rng: random.Random, shrink: float = 1.0
) -> str | None:
    """Kill ``proc`` at a moment drawn for ``mode`` (from ranges scaled by ``shrink``); None if it exited first."""
    t0 = time.monotonic()
    deadline: float | None = None
    delay = target = 0
    seen: set[str] = set()
    if mode == "anywhere":
        deadline = t0 + rng.uniform(0.0, ref.wall * shrink)
    elif mode == "training":
        delay = rng.uniform(0.0, max(ref.wall - ref.first_ckpt, 0.0) * shrink)
    else:  # mid-save: the k-th temporary seen
        target = rng.randint(1, max(int(ref.saves * shrink), 1))
    while proc.poll() is None:
        now = time.monotonic()
        if mode == "training" and deadline is None and any(folder.rglob("last.ckpt")):
            deadline = now + delay
        if mode == "mid-save":
            tmp = {p.name for p in folder.glob("runs/*/version_*/checkpoints/.*.tmp")}
            seen |= tmp
            if len(seen) >= target and tmp:
                time.sleep(rng.uniform(0.0, 0.03))  # somewhere in the write (the tiny model's takes ~10 ms)
                still = any(p.exists() for p in folder.glob("runs/*/version_*/checkpoints/.*.tmp"))
                kill(proc)
                return f"{time.monotonic() - t0:.2f}s ({'in' if still else 'just after'} save {len(seen)})"
        elif deadline is not None and now >= deadline:
            kill(proc)
            return f"{now - t0:.2f}s"
        time.sleep(0.001 if mode == "mid-save" else 0.005)
    return None


def run_trial(index: int, variant: str, mode: str, second_kill: bool, folder: Path, ref: Reference,
              rng: random.Random, restart_delay: float = 0.0) -> Trial:
    trial = Trial(index, variant, mode)
    t_start = time.monotonic()
    for retry in range(5):  # the run may finish before the drawn moment: draw again, earlier, in a fresh folder
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        proc = start(command(variant, folder, resume=False), folder, folder / "attempt_0.log")
        killed = wait_and_kill(proc, folder, mode, ref, rng, shrink=0.6**retry)
        if killed is not None:
            break
        if proc.returncode != 0:  # not a kill: the run itself failed
            log = (folder / "attempt_0.log").read_text()
            raise RuntimeError(f"trial {index}: the run failed (exit {proc.returncode}), not killed:\n{log[-3000:]}")
    else:
        raise RuntimeError(f"trial {index}: the run finished before every drawn kill moment")
    trial.kills.append(killed)
    trial.corrupt += corrupt(folder)  # what the kill left
    # Resume until a run exits 0; the first resumed run may be killed too.
    attempt = 1
    while True:
        time.sleep(restart_delay)
        log_path = folder / f"attempt_{attempt}.log"
        proc = start(command(variant, folder, resume=True), folder, log_path)
        killed = wait_and_kill(proc, folder, "training", ref, rng) if second_kill and attempt == 1 else None
        if killed is None:
            proc.wait()
        log = log_path.read_text()
        match = RESUMING.search(log)
        if match:
            trial.resumed_from.append(f"step {match.group(2)} (epoch {match.group(3)})")
        else:
            trial.resumed_from.append("nothing (new run)" if "no last.ckpt under" in log else "? (killed before)")
        trial.corrupt += [c for c in corrupt(folder) if c not in trial.corrupt]
        if killed is not None:
            trial.kills.append(killed + " (resumed run)")
        elif proc.returncode == 0:
            break
        else:  # a resume that fails by itself is a failure, not something to retry
            trial.differs.append(f"no resumed run exited 0 (exit {proc.returncode}, see {log_path})")
            break
        attempt += 1
    trial.attempts = attempt
    trial.leftovers = [str(p.relative_to(folder)) for p in temporaries(folder)]
    if not trial.differs:
        checkpoint, export = final_state(log)
        trial.differs += differences(checkpoint, ref.checkpoint)
        trial.differs += [f"hf_export:{k}" for k in differences(export, ref.export)]
    trial.wall = time.monotonic() - t_start
    return trial


def report(trial: Trial) -> str:
    line = (
        f"trial {trial.index:02d} [{trial.variant:7s} {trial.mode:8s}] kill -9 at {', '.join(trial.kills)}; "
        f"resumed from {', '.join(trial.resumed_from)}; "
        f"policy bitwise equal: {'yes' if trial.policy_identical else 'no'}; "
        f"full checkpoint equal: {'yes' if trial.identical else 'no'}"
    )
    if trial.differs:
        more = f", ... ({len(trial.differs)} in all)" if len(trial.differs) > 6 else ""
        shown = ", ".join(trial.differs[:6]) + more
        line += f"\n    differs: {shown}"
    if trial.corrupt:
        line += "\n    corrupt: " + "; ".join(trial.corrupt)
    if trial.leftovers:
        line += "\n    temporaries left: " + ", ".join(trial.leftovers)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder for the runs")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                        help="config variants, taken in turn by the trials")
    parser.add_argument("--modes", nargs="+", choices=sorted(set(MODES)),
                        help="kill moments, taken in turn by the trials (default: drawn at random, "
                        "training 60%%, mid-save 20%%, anywhere 20%%)")
    parser.add_argument("--second-kill", type=float, default=0.3,
                        help="probability that the first resumed run is killed too")
    parser.add_argument("--restart-delay", type=float, default=0.0,
                        help="seconds between a kill and the resumed run (0: at once, as a restart loop would)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty")
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    references: dict[str, Reference] = {}
    trials = []
    for i in range(args.trials):
        variant = args.variants[i % len(args.variants)]
        if variant not in references:
            references[variant] = ref = run_reference(variant, out / "reference" / variant)
            print(f"reference {variant}: {ref.wall:.1f}s, first last.ckpt at {ref.first_ckpt:.1f}s", flush=True)
        mode = args.modes[i % len(args.modes)] if args.modes else rng.choice(MODES)
        second = rng.random() < args.second_kill
        trial = run_trial(i, variant, mode, second, out / f"trial_{i:02d}", references[variant], rng,
                          args.restart_delay)
        trials.append(trial)
        print(report(trial), flush=True)
    identical = sum(t.identical for t in trials)
    n_corrupt = sum(len(t.corrupt) for t in trials)
    leftovers = sum(len(t.leftovers) for t in trials)
    print(f"kill -9 trials: {len(trials)}, resumed bitwise identical: {identical}, corrupt checkpoints: {n_corrupt}")
    print(f"temporaries left after the resumed runs: {leftovers}; wall time {time.monotonic() - t0:.0f}s")
    return 0 if all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
