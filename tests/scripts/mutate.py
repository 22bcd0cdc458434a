"""Mutation check: wiring mistakes that must make the default test suite fail (issues #19, #29).

    .venv/bin/python tests/scripts/mutate.py [--only NAME ...] [--all] [--keep]

Copies the working tree (everything but ``.venv``) to a temporary folder, then, one at a time, applies
each mutation of ``MUTATIONS`` to the copy by exact string replacement and runs a subset of the default
suite there (``python -m pytest -x -q TESTS`` with ``PYTHONPATH`` set to the copy, after checking that
this imports the copy's ``dpo_lightning``). Each mutation must make the suite fail; the unmutated copy,
run first, must pass. A mutation whose target text is not found exactly once stops the script: the code
moved, and the mutation must follow it. One line per mutation::

    mutation beta_fixed: suite FAILED (as it must) in 1 tests (first: tests/test_module_wiring.py::...)

Exits non-zero if the clean copy fails or any mutation survives. ``--all`` runs without ``-x``, so N counts
every failing test, and lists them (slower). Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
# The tests a mutation must break: fast ones first, so -x stops early; the 2-process KTO test last.
TESTS = ["tests/test_module_wiring.py", "tests/test_metrics.py", "tests/test_pipeline_wiring.py",
         "tests/test_kto_distributed.py"]


class Mutation(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str


_CALL = "loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing, loss_kwargs=loss_kwargs"
_REDUCE = """        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
"""

DPO = "dpo_lightning/stages/dpo.py"

MUTATIONS = [
    # DPOModule passes a fixed beta, or drops a setting, on the way to check_loss_config/compute_loss.
    Mutation("beta_fixed", DPO, _CALL, _CALL.replace("beta=beta", "beta=0.1")),
    Mutation("loss_weights_dropped", DPO, _CALL, _CALL.replace("loss_weights=loss_weights, ", "")),
    Mutation(
        "label_smoothing_dropped", DPO, _CALL, _CALL.replace("label_smoothing=label_smoothing, ", "")
    ),
    Mutation("loss_kwargs_dropped", DPO, _CALL, _CALL.replace(", loss_kwargs=loss_kwargs", "")),
    # The metrics log one side's values under the other side's name.
    Mutation(
        "rewards_rejected_is_chosen", "dpo_lightning/training/metrics.py",
        '"rewards/rejected": rejected_rewards,', '"rewards/rejected": chosen_rewards,',
    ),
    Mutation(
        "logits_rejected_is_chosen", "dpo_lightning/training/metrics.py",
        '("logits/rejected", rejected_logits_sum, rejected_tokens),',
        '("logits/rejected", chosen_logits_sum, chosen_tokens),',
    ),
    # KTO's reference point z0: without the cross-rank sum, or counting an eval shard's padding rows.
    Mutation("kto_no_cross_rank_sum", "dpo_lightning/stages/kto.py", _REDUCE, ""),
    Mutation(
        "kto_eval_padding_counted", "dpo_lightning/stages/kto.py",
        'kto_kl_estimate(kl_policy, kl_ref, batch.get("weight"))', "kto_kl_estimate(kl_policy, kl_ref, None)",
    ),
    # Generation (issue #29): every prompt's responses drawn from the same random streams, whatever the prompt.
    Mutation(
        "seed_ignores_prompt", "dpo_lightning/generation/module.py",
        'response_seed(hp.seed, pid, k) for pid in batch["prompt_id"]',
        'response_seed(hp.seed, "", k) for pid in batch["prompt_id"]',
    ),
    # A prompt's samples taken from the wrong rows of generate's (B * N, T) output.
    Mutation(
        "samples_wrong_prompt", "dpo_lightning/generation/module.py",
        "for row in new[i * n : (i + 1) * n].tolist():", "for row in new[i : i + n].tolist():",
    ),
    Mutation(
        "sample_cut_after_eos", "dpo_lightning/generation/sampling.py",
        "return ids[: ids.index(eos) + 1]", "return ids[: ids.index(eos) + 2]",
    ),
    # The pipeline's report: the KL with the reference on both sides (always 0), or always against SFT.
    Mutation(
        "report_kl_reference_both_sides", "dpo_lightning/pipeline/evaluation.py",
        'kls += (response_logps(models["policy"], row["prompt_ids"], ids)',
        'kls += (response_logps(models["reference"], row["prompt_ids"], ids)',
    ),
    Mutation(
        "report_kl_against_sft", "dpo_lightning/pipeline/report.py",
        'ref = initial if reference == "initial" or r == 0 else policies[r - 1]', "ref = initial",
    ),
    # Each round samples its pairs from the SFT model instead of the previous round's policy.
    Mutation(
        "rounds_sample_from_sft", "dpo_lightning/pipeline/rounds.py",
        "_run_generate_stage(generate, policies[-1], ", "_run_generate_stage(generate, initial, ",
    ),
    # A precomputed reference's tables saved in checkpoints but not read back: a resume recomputes them.
    Mutation(
        "precomputed_tables_ignored_on_resume", "dpo_lightning/references/precomputed.py",
        "self._tables = dict(checkpoint.get(REF_TABLES_KEY, {}))", "self._tables = {}",
    ),
    # The reward-model judge refuses a row of exactly its length limit.
    Mutation(
        "judge_limit_off_by_one", "dpo_lightning/generation/judges/reward_model.py",
        "len(side.input_ids) > self.limit:", "len(side.input_ids) >= self.limit:",
    ),
]


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def copy_tree(dest: Path) -> None:
    """``tar --exclude=./.venv -cf - . | tar -xf - -C dest`` (no rsync here); no bytecode caches."""
    pack = subprocess.Popen(
        ["tar", "--exclude=./.venv", "--exclude=__pycache__", "-cf", "-", "."], cwd=ROOT, stdout=subprocess.PIPE
    )
    unpack = subprocess.run(["tar", "-xf", "-", "-C", str(dest)], stdin=pack.stdout)
    pack.stdout.close()
    # tar exits 1 for "file changed as we read it" (someone editing): a warning, the copy is still usable.
    if pack.wait() > 1 or unpack.returncode != 0:
        sys.exit(f"copying {ROOT} to {dest} failed (tar exit codes {pack.returncode}, {unpack.returncode})")


def env_for(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}


def check_imports_copy(copy: Path) -> None:
    proc = subprocess.run(
        [python(), "-c", "import dpo_lightning, os; print(os.path.realpath(dpo_lightning.__file__))"],
        cwd=copy, env=env_for(copy), capture_output=True, text=True,
    )
    imported = proc.stdout.strip()
    if proc.returncode != 0 or not imported.startswith(str(copy.resolve()) + os.sep):
        sys.exit(f"the copy's tests would not import the copy: dpo_lightning from {imported!r}\n{proc.stderr}")


class Result(NamedTuple):
    returncode: int
    failed: list[str]  # test ids
    summary: str  # pytest's last line
    seconds: float
    output: str


def run_suite(copy: Path, tests: list[str], stop_first: bool) -> Result:
    start = time.monotonic()
    args = [python(), "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:warnings", *tests]
    proc = subprocess.run(args, cwd=copy, env=env_for(copy), capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return Result(proc.returncode, failed, lines[-1] if lines else "", time.monotonic() - start, output)


def apply(copy: Path, mutation: Mutation) -> str:
    """Apply ``mutation`` to the copy; returns the file's original text (to restore it)."""
    path = copy / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        sys.exit(
            f"mutation {mutation.name}: {mutation.path} contains its target {count} times (expected exactly once); "
            f"the code moved, update the mutation. Target:\n{mutation.old}"
        )
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[m.name for m in MUTATIONS])
    parser.add_argument("--all", action="store_true", help="run without -x: count every failing test")
    parser.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    parser.add_argument("--tests", nargs="+", default=TESTS, help=f"tests to run (default: {' '.join(TESTS)})")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]

    copy = Path(tempfile.mkdtemp(prefix="dpo_mutate_"))
    try:
        copy_tree(copy)
        check_imports_copy(copy)
        print(f"copy of {ROOT} in {copy}; tests: {' '.join(args.tests)}", flush=True)
        for mutation in mutations:  # every target is there before anything runs
            (copy / mutation.path).write_text(apply(copy, mutation))

        clean = run_suite(copy, args.tests, stop_first=not args.all)
        if clean.returncode != 0:
            print(clean.output[-6000:])
            print(f"clean copy: suite FAILED ({clean.summary}); the mutation results would mean nothing")
            return 1
        print(f"clean copy: suite PASSED ({clean.summary}) in {clean.seconds:.0f} s", flush=True)

        survived = []
        for mutation in mutations:
            original = apply(copy, mutation)
            try:
                result = run_suite(copy, args.tests, stop_first=not args.all)
            finally:
                (copy / mutation.path).write_text(original)
            if result.returncode == 1 and result.failed:
                first = result.failed[0]
                print(f"mutation {mutation.name}: suite FAILED (as it must) in {len(result.failed)} tests "
                      f"(first: {first}; {result.seconds:.0f} s)", flush=True)
                if args.all:
                    print("".join(f"    {test}\n" for test in result.failed), end="", flush=True)
            else:
                survived.append(mutation.name)
                why = "passed" if result.returncode == 0 else f"pytest exit {result.returncode}, no test failed"
                print(f"mutation {mutation.name}: SURVIVED ({why}: {result.summary})", flush=True)
                if result.returncode != 0:
                    print(result.output[-4000:])
        if survived:
            print(f"{len(survived)} of {len(mutations)} mutations survived: {', '.join(survived)}")
            return 1
        print(f"all {len(mutations)} mutations caught")
        return 0
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
