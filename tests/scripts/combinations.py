"""Features that combine: each cell of stage x reference x LoRA x collator x accumulation (with a model source
and a checkpoint kind), validation on, trained through the real CLI and resumed from a checkpoint written
mid-way through the second epoch.

    python tests/scripts/combinations.py --out /tmp/combos            # the pairwise cells (18)
    python tests/scripts/combinations.py --out /tmp/combos --full     # the product of the core factors (96)
    python tests/scripts/combinations.py --out /tmp/combos --all      # every factor's product (384)
    python tests/scripts/combinations.py --out /tmp/combos --cell dpo-trdpo-lora-pad-acc2-path-steps

A cell either trains and resumes exactly, or is refused before any weights load with a message that
names the fix (:func:`expected_refusal`). Per cell, two runs of ``python -m dpo_lightning fit --config
fit.yaml`` in this process, through ``dpo_lightning.cli.main`` (so LightningCLI parses the YAML):

1. the uninterrupted run: 2 epochs of 5 batches (an odd number, so with accumulation 2 the second epoch's
   windows start off the first's grid), validation on. :class:`SnapshotAfterEpoch2Save` copies its run
   folder at the first training batch after a checkpoint written mid-way through epoch 2 (every save and
   log line of that moment done, event files flushed): what a run killed there leaves on disk;
2. the run folder replaced by that copy (the uninterrupted one moved aside), ``--ckpt_path last``.

Outcome ``exact``: run 2 ends with the ``state_dict`` of run 1's final ``last.ckpt`` (policy, LoRA,
reference) and its Hugging Face export bitwise, and the event files of the copy + run 2 hold the same
scalars at the same steps as run 1's: every ``(tag, step)`` of one is in the other with the identical
value, and a value logged twice (before the interruption and again after the resume) is the same both
times. Otherwise the outcome names what differs. A refusal (an exception, or a non-zero exit) before the
first weights load has outcome ``refused: <message>``; one after has ``refused late: <message>``, a
failure.

The checkpoint kinds (``save``): ``val`` writes checkpoints at each validation, every 2 batches (with
accumulation 2 those of the second epoch fall mid-accumulation); ``steps`` every 2 optimizer steps
(``checkpoint.every_n_train_steps``, TRL's ``save_steps``), validation every 4 batches. Both keep every
checkpoint (``save_top_k: -1``); train metrics are logged every 2 optimizer steps. Model sources
(``source``): ``config`` (``model_config``, random init: checkpoints hold the reference and the LoRA base)
or ``path`` (a saved folder: checkpoints leave out what the folder rebuilds).

:func:`pairwise` is a covering array (every pair of factor values that some valid cell holds is in a chosen
cell; deterministic greedy choice, checked by :func:`uncovered_pairs`); :func:`full_product` the product of
:data:`CORE_FACTORS`, the other factors chosen to cover their pairs too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[2]

# Each factor's values; ``reference`` applies to the stages that compare against one (DPO, KTO): for SFT
# and the reward model it is "na".
FACTORS: dict[str, tuple[Any, ...]] = {
    "stage": ("dpo", "kto", "sft", "rm"),
    "reference": ("copy", "trdpo", "adapter", "precomputed", "none"),
    "lora": ("full", "lora"),
    "collator": ("auto", "pad"),
    "accumulate": (1, 2),
    "source": ("config", "path"),  # model_config (random init) or a saved folder (model: PATH)
    "save": ("val", "steps"),
}
CORE_FACTORS = ("stage", "reference", "lora", "collator", "accumulate")  # the product issue #25 asks for
REFERENCE_STAGES = ("dpo", "kto")
NO_REFERENCE = "na"

STAGES = {  # stage -> (model class, data class, extra data args)
    "dpo": ("dpo_lightning.DPOModule", "dpo_lightning.PreferenceDataModule", {}),
    "kto": ("dpo_lightning.KTOModule", "dpo_lightning.KTODataModule", {}),
    "sft": ("dpo_lightning.SFTModule", "dpo_lightning.SFTDataModule",
            {"columns": {"completion": "chosen"}, "drop_columns": ["rejected"]}),
    "rm": ("dpo_lightning.RewardModule", "dpo_lightning.PreferenceDataModule", {}),
}
TRAIN_ROWS, VAL_ROWS = 20, 8  # pairs; KTO makes two examples of each
BATCH = {"dpo": 4, "kto": 8, "sft": 4, "rm": 4}  # 5 training batches per epoch for every stage
EPOCHS = 2
VAL_EVERY = {"val": 2, "steps": 4}  # batches between validations
SAVE_EVERY_STEPS = 2  # save == "steps": checkpoint.every_n_train_steps
LOG_EVERY = 2
MODEL = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
LORA = {"r": 4, "alpha": 8}


@dataclass(frozen=True)
class Cell:
    """One combination; its name (``dpo-trdpo-lora-pad-acc2-path-steps``) is its test id and folder."""

    stage: str
    reference: str
    lora: str
    collator: str
    accumulate: int
    source: str
    save: str

    @property
    def name(self) -> str:
        return "-".join(str(v) if k != "accumulate" else f"acc{v}" for k, v in asdict(self).items())

    @classmethod
    def parse(cls, name: str) -> Cell:
        stage, reference, lora, collator, acc, source, save = name.split("-")
        return cls(stage, reference, lora, collator, int(acc.removeprefix("acc")), source, save)


# ---------------------------------------------------------------------------------------- the cells


def product(factors: Iterable[str] = tuple(FACTORS)) -> list[Cell]:
    """Every valid combination of ``factors``' values, in a fixed order (the reference is "na" for stages
    without one); the other factors are left None."""
    names = list(factors)
    cells: dict[Cell, None] = {}
    for values in itertools.product(*(FACTORS[n] for n in names)):
        kw = {**dict.fromkeys(FACTORS), **dict(zip(names, values))}
        if kw["stage"] not in REFERENCE_STAGES:
            kw["reference"] = NO_REFERENCE
        cells[Cell(**kw)] = None
    return list(cells)


Pair = tuple[tuple[str, Any], tuple[str, Any]]


def _pairs(cell: Cell) -> set[Pair]:
    items = [(k, v) for k, v in asdict(cell).items() if v is not None]
    return set(itertools.combinations(items, 2))


def _all_pairs(cells: Iterable[Cell]) -> set[Pair]:
    return set().union(*(_pairs(c) for c in cells))


def _cover(candidates: list[Cell], needed: set[Pair]) -> list[Cell]:
    """Greedy (AETG-like), deterministic: repeatedly the first candidate that holds the most needed pairs
    not yet held."""
    chosen, uncovered = [], set(needed)
    while uncovered:
        best = max(candidates, key=lambda c: len(_pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def pairwise() -> list[Cell]:
    """A covering array: every pair of factor values that a cell expected to train holds is held by a chosen
    cell expected to train (a refused cell trains nothing, so it covers nothing for them), and the pairs
    only refused cells hold (KTO with a precomputed reference, ...) by chosen refused cells."""
    cells = product()
    trained = [c for c in cells if expected_refusal(c) is None]
    refused = [c for c in cells if expected_refusal(c) is not None]
    return _cover(trained, _all_pairs(trained)) + _cover(refused, _all_pairs(refused) - _all_pairs(trained))


def _core_pairs_with_extras(cell: Cell) -> set[tuple[Pair, tuple[Any, ...]]]:
    """Each pair of the cell's core factor values, with its values of the other factors."""
    core = [(k, getattr(cell, k)) for k in CORE_FACTORS]
    extras = tuple(getattr(cell, k) for k in FACTORS if k not in CORE_FACTORS)
    return {(pair, extras) for pair in itertools.combinations(core, 2)}


def full_product() -> list[Cell]:
    """Every combination of stage, reference, LoRA, collator and accumulation (the product issue #25 names),
    each completed with a model source and a checkpoint kind: in turn, the ones that put the most pairs of
    core values of a cell that trains not yet seen with them (so every pair of values, the extra factors'
    included, is held), among equals the least used so far (greedy, deterministic)."""
    extras = [n for n in FACTORS if n not in CORE_FACTORS]
    options = product(extras)
    # (a refused cell trains nothing, so it shows nothing of a combination: only cells that train count)
    unseen = set().union(*(_core_pairs_with_extras(c) for c in product() if expected_refusal(c) is None))
    cells, used = [], dict.fromkeys(range(len(options)), 0)
    for base in product(CORE_FACTORS):
        fill = [Cell(**{**asdict(base), **{n: getattr(o, n) for n in extras}}) for o in options]
        trains = expected_refusal(base) is None
        i = max(range(len(fill)),
                key=lambda i: (len(_core_pairs_with_extras(fill[i]) & unseen) if trains else 0, -used[i]))
        used[i] += 1
        cells.append(fill[i])
        unseen -= _core_pairs_with_extras(fill[i])
    return cells


def uncovered_pairs(chosen: Iterable[Cell], cells: Iterable[Cell]) -> set[Pair]:
    """The value pairs some cell of ``cells`` holds that no cell of ``chosen`` holds."""
    return _all_pairs(cells) - _all_pairs(chosen)


# ---------------------------------------------------------------------------------------- expectations


def expected_refusal(cell: Cell) -> str | None:
    """For a cell that must be refused before any weights load: a phrase of the message, which names the fix."""
    if cell.reference == "adapter" and cell.lora == "full":
        return "set the lora group"
    if cell.stage == "kto" and cell.reference in ("precomputed", "none"):
        return "KTO needs a live reference (copy or adapter)"
    return None


# ---------------------------------------------------------------------------------------- inputs


def write_inputs(folder: Path) -> dict[str, Path]:
    """The data (``train.jsonl``, ``validation.jsonl`` of the sorting task) and a saved tiny Llama."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", TRAIN_ROWS, 1), ("validation", VAL_ROWS, 2)):
        with (data / f"{split}.jsonl").open("w") as f:
            for row in generate_pairs(n, seed):
                f.write(json.dumps(row) + "\n")
    model = folder / "model"
    torch.manual_seed(0)
    vocab = len(build_tokenizer())
    config = LlamaConfig(**{k: v for k, v in MODEL.items() if k != "model_type"}, vocab_size=vocab, pad_token_id=3)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    return {"data": data, "model": model}


def cell_config(cell: Cell, inputs: dict[str, Path], run_dir: Path, snapshot: Path | None = None) -> dict[str, Any]:
    """The YAML config of one cell's run."""
    model_class, data_class, data_extra = STAGES[cell.stage]
    model: dict[str, Any] = {"warmup_ratio": 0.2, "lr_decay": "linear",
                             "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}}
    if cell.source == "config":
        model["model_config"] = MODEL
    else:
        model["model"] = str(inputs["model"])
    if cell.lora == "lora":
        model["lora"] = LORA
    if cell.stage in REFERENCE_STAGES:
        model["reference"] = {
            "copy": "copy",
            "trdpo": {"class_path": "dpo_lightning.CopyReference", "init_args": {"sync_steps": 2, "sync_alpha": 0.5}},
            "adapter": "adapter",
            "precomputed": "precomputed",
            "none": "none",
        }[cell.reference]
        if cell.stage == "dpo" and cell.reference == "none":
            model["loss_type"] = "simpo"  # the losses reference 'none' is for
    batch = BATCH[cell.stage]
    data = {"tokenizer": "synthetic:sort", "dataset": str(inputs["data"]), "max_length": 32, "max_prompt_length": 16,
            "batch_size": batch, "eval_batch_size": 2 * batch, "seed": 0, "collator": cell.collator, **data_extra}
    checkpoint: dict[str, Any] = {"save_top_k": -1, "save_every_minutes": None}
    if cell.save == "steps":
        checkpoint["every_n_train_steps"] = SAVE_EVERY_STEPS
    trainer: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": EPOCHS,
        "accumulate_grad_batches": cell.accumulate, "val_check_interval": VAL_EVERY[cell.save],
        "check_val_every_n_epoch": None, "log_every_n_steps": LOG_EVERY, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run_dir),
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(run_dir / "runs"), "name": "cell", "default_hp_metric": False}},
    }
    if snapshot is not None:
        trainer["callbacks"] = [{"class_path": f"{__name__}.SnapshotAfterEpoch2Save",
                                 "init_args": {"dest": str(snapshot)}}]
    return {"seed_everything": 0, "trainer": trainer, "checkpoint": checkpoint,
            "model": {"class_path": model_class, "init_args": model},
            "data": {"class_path": data_class, "init_args": data}}


# ---------------------------------------------------------------------------------------- the interruption


class SnapshotAfterEpoch2Save(L.Callback):
    """At the first training batch after a checkpoint was written mid-way through the second epoch (so after
    every save and every log line of that moment), copy the run's folder to ``dest``, its event files
    flushed: what a run killed at that moment leaves on disk."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.saved_at: int | None = None
        self.done = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches of this epoch so far
        if self.saved_at is None and trainer.current_epoch == 1 and processed < trainer.num_training_batches:
            self.saved_at = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.saved_at is None or self.done:
            return
        self.done = True
        for logger in trainer.loggers:
            logger.save()
            flush = getattr(logger.experiment, "flush", None)
            if flush is not None:
                flush()
        shutil.copytree(trainer.log_dir, self.dest)
        Path(self.dest, "interrupted_at_step").write_text(str(self.saved_at))


# ---------------------------------------------------------------------------------------- running


@dataclass
class Result:
    cell: str
    outcome: str = ""  # "trained", "refused: ...", "refused late: ...", or what stopped the cell
    weights: str = ""  # a trained cell's final weights after the resume: "exact" or what differs
    logs: str = ""  # its logged scalars: "exact" or what differs
    resumed_from: str = ""
    batches_per_epoch: int | None = None
    seconds: float = 0.0

    @property
    def summary(self) -> str:
        if self.outcome != "trained":
            return self.outcome
        if self.weights == self.logs == "exact":
            return "exact"
        return "; ".join(f"{k}: {v}" for k, v in (("weights", self.weights), ("logs", self.logs)) if v != "exact")

    def as_expected(self, cell: Cell) -> bool:
        refusal = expected_refusal(cell)
        if refusal is not None:
            return self.outcome.startswith("refused:") and refusal in self.outcome
        return self.summary == "exact"


class _CountLoads:
    """Counts model weight loads (``dpo_lightning.models.loading.load_model`` / ``empty_model``) while active."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[_CountLoads]:
        import dpo_lightning.models.loading as stage

        originals = stage.load_model, stage.empty_model

        def counted(fn):
            def wrapper(*args, **kwargs):
                self.count += 1
                return fn(*args, **kwargs)

            return wrapper

        stage.load_model, stage.empty_model = counted(originals[0]), counted(originals[1])
        try:
            yield self
        finally:
            stage.load_model, stage.empty_model = originals


def _fit(config_path: Path, *extra: str) -> tuple[Any, str | None, int]:
    """``python -m dpo_lightning fit --config CONFIG EXTRA`` in this process: (trainer, error, weight loads).

    Its stdout and stderr go to ``CONFIG.log``; ``error`` is the exception, or the last line of stderr of a
    non-zero exit (``dpo_lightning: error: ...``)."""
    from dpo_lightning import cli

    loads = _CountLoads()
    captured = {}
    original = cli.cli_main

    def keep(*args, **kwargs):
        captured["cli"] = result = original(*args, **kwargs)
        return result

    stderr, stdout = io.StringIO(), io.StringIO()
    error = None
    argv = sys.argv
    with loads.active(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        cli.cli_main = keep
        # The command line as `python -m dpo_lightning` sees it; main() and LightningCLI read sys.argv.
        sys.argv = ["python -m dpo_lightning", "fit", "--config", str(config_path), *extra]
        try:
            cli.main()
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                error = (stderr.getvalue().strip().splitlines() or [f"exit {exit_.code}"])[-1]
        except Exception as err:  # noqa: BLE001  (recorded as the outcome)
            error = f"{type(err).__name__}: {err}"
        finally:
            cli.cli_main = original
            sys.argv = argv
    config_path.with_suffix(".log").write_text(stdout.getvalue() + stderr.getvalue() + (error or ""))
    trainer = captured["cli"].trainer if "cli" in captured else None
    return trainer, error, loads.count


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def scalars(run_dir: Path) -> tuple[dict[tuple[str, int], float], list[str]]:
    """Every scalar of the TensorBoard event files under ``run_dir`` by (tag, step), and the (tag, step)s
    logged twice with different values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[tuple[str, int], float] = {}
    conflicts = []
    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                key = (tag, event.step)
                if key in values and values[key] != event.value:
                    conflicts.append(f"{tag}@{event.step}: {values[key]!r} then {event.value!r}")
                values[key] = event.value
    return values, conflicts


def compare_logs(full: dict, resumed: dict, conflicts: list[str]) -> list[str]:
    out = [f"logged twice differently {c}" for c in conflicts]
    for key in sorted(set(full) | set(resumed)):
        tag, step = key
        if key not in resumed:
            out.append(f"{tag}@{step} missing after resume")
        elif key not in full:
            out.append(f"{tag}@{step} extra after resume")
        elif full[key] != resumed[key]:
            out.append(f"{tag}@{step}: {resumed[key]!r} vs {full[key]!r}")
    return out


def compare_tensors(full: dict[str, Any], resumed: dict[str, Any], what: str) -> list[str]:
    """What differs (bitwise) between two dicts of tensors."""
    import torch

    out = []
    if full.keys() != resumed.keys():
        out.append(f"{what} keys differ: {sorted(set(full) ^ set(resumed))[:4]}")
    differ = sorted(k for k in full.keys() & resumed.keys() if not torch.equal(full[k], resumed[k]))
    if differ:
        worst = max(float((full[k].float() - resumed[k].float()).abs().max()) for k in differ)
        out.append(f"{what}: {len(differ)} tensors differ (max abs {worst:.2e}), e.g. {differ[0]}")
    return out


def compare_weights(full: Path, resumed: Path) -> list[str]:
    """The final ``last.ckpt`` (step and ``state_dict``) and the Hugging Face export of two run folders."""
    import torch
    from safetensors.torch import load_file

    out = []
    sa, sb = (torch.load(_run_folder(d) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
              for d in (full, resumed))
    if sa["global_step"] != sb["global_step"]:
        out.append(f"global_step {sb['global_step']} vs {sa['global_step']}")
    out += compare_tensors(sa["state_dict"], sb["state_dict"], "last.ckpt")
    ea, eb = (load_file(_run_folder(d) / "hf_export" / "model.safetensors") for d in (full, resumed))
    return out + compare_tensors(ea, eb, "hf_export")


def _run_folder(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("runs/cell/version_*"))
    if len(found) != 1:
        raise FileNotFoundError(f"{len(found)} run folders under {run_dir}, expected 1")
    return found[0]


def run_cell(cell: Cell, inputs: dict[str, Path], folder: Path) -> Result:
    """Train, crash and resume one cell (see the module docstring); the outcome in one line."""
    import torch

    t0 = time.monotonic()
    result = Result(cell.name)
    old_cache = os.environ.get("DPO_LIGHTNING_CACHE")
    os.environ["DPO_LIGHTNING_CACHE"] = str(folder / "cache")  # precomputed reference log-probs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 16-wide model: threads only add overhead
    try:
        result.outcome = _run_cell(cell, inputs, folder, result)
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("DPO_LIGHTNING_CACHE", None)
        else:
            os.environ["DPO_LIGHTNING_CACHE"] = old_cache
        result.seconds = time.monotonic() - t0
    return result


def _run_cell(cell: Cell, inputs: dict[str, Path], folder: Path, result: Result) -> str:
    """Fills ``result`` in; returns its outcome."""
    run_dir, snapshot = folder / "run", folder / "snapshot"
    config = cell_config(cell, inputs, run_dir, snapshot)
    trainer, error, loads = _fit(_write_config(folder / "fit.yaml", config))
    if error is not None:
        return f"refused: {error}" if loads == 0 else f"refused late: {error}"
    result.batches_per_epoch = trainer.num_training_batches
    if not snapshot.exists():
        return "no checkpoint was written mid-way through epoch 2"
    result.resumed_from = f"step {(snapshot / 'interrupted_at_step').read_text()}"
    (snapshot / "interrupted_at_step").unlink()
    # The uninterrupted run moves aside; the run's folder becomes what the interrupted run left, and resumes.
    full = folder / "full"
    run_dir.rename(full)
    version = Path(trainer.log_dir).relative_to(run_dir)
    (run_dir / version).parent.mkdir(parents=True)
    snapshot.rename(run_dir / version)
    config = cell_config(cell, inputs, run_dir)
    _, error, _ = _fit(_write_config(folder / "resume.yaml", config), "--ckpt_path", "last")
    if error is not None:
        return f"resume failed: {error}"
    result.weights = _say(compare_weights(full, run_dir))
    full_logs, _ = scalars(full)
    resumed_logs, conflicts = scalars(run_dir)
    result.logs = _say(compare_logs(full_logs, resumed_logs, conflicts))
    return "trained"


def _say(problems: list[str], shown: int = 3) -> str:
    more = f" (+{len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more if problems else "exact"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help="the full product of the core factors (96 cells)")
    parser.add_argument("--all", action="store_true", help="the full product of every factor (384 cells)")
    parser.add_argument("--cell", action="append", default=[], help="a cell by name (repeatable)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]  # the checkout, not an installed copy
    cells = [Cell.parse(c) for c in args.cell] or (
        product() if args.all else full_product() if args.full else pairwise())
    inputs = write_inputs(args.out / "inputs")
    results = []
    for i, cell in enumerate(cells):
        result = run_cell(cell, inputs, args.out / cell.name)
        results.append(result)
        print(f"[{i + 1}/{len(cells)}] {cell.name:45s} {'ok ' if result.as_expected(cell) else 'BAD'} "
              f"{result.seconds:5.1f}s {result.summary}"
              + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = sum(not r.as_expected(c) for r, c in zip(results, cells))
    print(f"cells: {len(cells)}, as expected: {len(cells) - bad}, not: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
