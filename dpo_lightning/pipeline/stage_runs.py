"""One stage of the pipeline run in its own folder: the settings it records (``stage.json``), skipped when
done, refused when its settings changed, resumed when stopped (`_run_fit_stage`, `_run_generate_stage`).

Every process of a multi-process run goes through each stage; only the global rank 0 one writes its record and
its mixed pairs, which the others wait for (`ranks`) and read to take the same decisions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from dpo_lightning import cli
from dpo_lightning.data.errors import RowRef
from dpo_lightning.data.formats import Layout, PreferenceExample, detect_layout, to_example
from dpo_lightning.data.sources import load_source
from dpo_lightning.generation.manifest import read_manifest
from dpo_lightning.generation.samples_io import PAIRS_FILE, write_jsonl_atomically
from dpo_lightning.pipeline.ranks import global_rank, wait_for_rank_zero
from dpo_lightning.stages.export import EXPORT_MARKER
from dpo_lightning.training.callbacks import Preempted, preemption_signal
from dpo_lightning.training.folders import (
    FolderError,
    differences,
    plain,
    read_record,
    say_differences,
    write_record,
)

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage's recipe and extra command-line arguments.

    Args:
        config: A recipe (``recipes/tiny_sft.yaml``); for ``sft`` also an existing export folder or hub id
            to start from (then no SFT runs).
        args: More arguments, as on the command line (``["--trainer.max_steps", "100"]``).
    """

    config: str
    args: list[str] = field(default_factory=list)


STAGE_RECORD = "stage.json"


def _stop_if_preempted(next_step: str) -> None:
    if received := preemption_signal():
        raise Preempted(f"received {received}: stopped before {next_step}, every stage before it is complete; run "
                        "the same iterate command again to continue")


def _made_by(path: str | Path | None) -> str | None:
    """Which run made ``path``: the id of the pipeline stage that wrote it (an export
    ``<stage>/version_0/hf_export``, a pairs file ``<stage>/pairs.jsonl``), else the creation time in an
    export's marker (an export made again at the same path is another input); None for anything else (a
    hub id)."""
    if path is None:
        return None
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        if (folder / STAGE_RECORD).is_file():
            return (read_record(folder / STAGE_RECORD) or {}).get("id")
    if (path / EXPORT_MARKER).is_file():
        with contextlib.suppress(ValueError):
            return f"export created {(read_record(path / EXPORT_MARKER) or {}).get('created')}"
    return None


def _begin_stage(folder: Path, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The stage's record (``folder/stage.json``): written (not done) when there is none; `FolderError` naming the
    settings when the recorded ones differ, or when the folder holds files but no record.

    A rank > 0 writes nothing: it waits for rank 0's record and checks the same settings against it. Its decisions
    are rank 0's because the record it reads says what rank 0's said: rank 0 writes a record once, when the stage
    starts (the settings never change after), and marks it done only after the stage ran; a stage that runs holds
    collectives (the Trainer's process group, the export's barrier) that every rank takes part in, so rank 0
    cannot mark it done before this rank, reading it now, has joined the stage too."""
    path = folder / STAGE_RECORD
    if global_rank() > 0:
        wait_for_rank_zero(path, f"the {name} stage's record")
    record = read_record(path)
    if record is None:
        if folder.is_dir() and any(p.name != STAGE_RECORD for p in folder.iterdir()):
            raise FolderError(f"{folder}: holds files but no {STAGE_RECORD} (written by an older dpo_lightning, or by "
                              "hand), so what made them cannot be told; move it away or use another output_dir")
        record = {"stage": name, "id": uuid.uuid4().hex[:16], "settings": plain(settings), "done": False,
                  "seconds": 0.0}
        write_record(path, record)
        return record
    if changed := differences(record.get("settings"), settings):
        raise FolderError(f"{folder}: the {name} stage was made with other settings ({say_differences(changed)}); "
                          f"its output and every later round's come from the recorded ones, so the pipeline does not "
                          f"go on with these: use another output_dir, the settings recorded in {path}, or remove "
                          "this stage's folder and every later round's to redo them")
    return record


class _Attempt:
    """Runs one attempt of a stage: its wall time is added to the record, which is marked done when the
    attempt ends with the output complete. A preemption is re-raised with the pipeline's resume line."""

    def __init__(self, folder: Path, record: dict[str, Any], name: str) -> None:
        self.folder, self.record, self.name = folder, record, name

    def __enter__(self) -> _Attempt:
        _stop_if_preempted(f"the {self.name} stage")
        self.started = time.perf_counter()
        self._preempted = Preempted
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> bool:
        self.record["seconds"] = self.record.get("seconds", 0.0) + time.perf_counter() - self.started
        if global_rank() == 0:  # the record is rank 0's (`_begin_stage`)
            write_record(self.folder / STAGE_RECORD, self.record)
        if isinstance(err, SIGTERMException):  # Lightning's own stop (a SystemExit, status 0), before training began
            err = self._preempted("received SIGTERM before the stage's first step")
        if isinstance(err, self._preempted):
            raise self._preempted(f"{self.name} stage: {err.status}; run the same iterate command again to resume "
                                  "(finished stages are kept)") from None
        return False

    def done(self) -> None:
        self.record["done"] = True


def _is_recipe(config: str) -> bool:
    return config.endswith((".yaml", ".yml"))


def _export_done(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).exists() and (folder / "config.json").exists()


def _run_fit_stage(
    stage: Stage, root: Path, name: str, *, model: str | None = None, pairs: Path | None = None,
    ref_model: str | None = None, mix: tuple[Path, str, int | None, Path] | None = None,
) -> str:
    """``fit`` with the stage's recipe into ``root/name/version_0``; resumed from ``last.ckpt`` if a
    previous attempt was killed; skipped if its record says done and its export is complete. With ``mix``
    ((pairs, original, limit, out): `mix_pairs`' arguments), it trains on the mixed pairs. Returns the
    export folder."""
    run_dir = root / name / "version_0"
    export = run_dir / "hf_export"
    data = mix[3] if mix is not None else pairs
    args = ["--config", stage.config, *stage.args,
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false"]
    if model is not None:
        args += ["--model.model_config", "null", "--model.model", model, "--data.tokenizer", model]
    if ref_model is not None:
        args += ["--model.ref_model", ref_model]
    if data is not None:
        args += ["--data.dataset", str(data), "--data.val_split", "null", "--data.val_fraction", "0.05"]
        if pairs is not None and pairs.name == "pairs.jsonl" and mix is None:
            # generated pairs carry their scores, which DPO does not read
            args += ["--data.drop_columns", "[score_chosen, score_rejected, prompt_id]"]
    label = f"{root.name}/{name}"
    settings = {"config": cli.resolved_config("fit", args),
                "inputs": {"model": _made_by(model), "pairs": _made_by(pairs), "ref_model": _made_by(ref_model)},
                "mix": None if mix is None else {"with": mix[1], "limit": mix[2]}}
    record = _begin_stage(root / name, label, settings)
    if record["done"] and _export_done(export):
        log.info("%s: done, skipped", export)
        return str(export)
    with _Attempt(root / name, record, label) as attempt:
        if mix is not None and global_rank() == 0:
            mix_pairs(*mix)
        elif mix is not None:  # the same rows each attempt, written atomically: an earlier attempt's file will do
            wait_for_rank_zero(mix[3], f"the {label} stage's mixed pairs")
        resume = ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
        cli.cli_main(["fit", *args, *(resume if (run_dir / "checkpoints" / "last.ckpt").exists() else [])])
        if not _export_done(export):
            raise RuntimeError(f"the {name} stage ended without its export {export}")
        attempt.done()
    return str(export)


def _run_generate_stage(stage: Stage, policy: str, folder: Path, seed: int) -> Path:
    """``generate`` with the stage's recipe from ``policy`` into ``folder``; skipped when its record says done
    and its manifest says the pairs are written; resumed (prompts already written are skipped) when a
    previous attempt was stopped."""
    pairs = folder / PAIRS_FILE
    args = ["--config", stage.config, *stage.args, "--model.model", policy, "--data.tokenizer", policy,
            "--model.seed", str(seed), "--output.output_dir", str(folder), "--trainer.enable_progress_bar", "false"]
    label = f"{folder.parent.name}/{folder.name}"
    settings = {"config": cli.resolved_config("generate", args), "inputs": {"model": _made_by(policy)}}
    record = _begin_stage(folder, label, settings)

    def complete() -> bool:
        return pairs.exists() and (read_manifest(folder) or {}).get("pairs") is not None

    if record["done"] and complete():
        log.info("%s: done, skipped", pairs)
        return pairs
    with _Attempt(folder, record, label) as attempt:
        cli.generate_main(args)
        if not complete():
            raise RuntimeError(f"the generate stage ended without {pairs}")
        attempt.done()
    return pairs


def mix_pairs(pairs: Path, original: str, limit: int | None, out: Path) -> Path:
    """The round's pairs followed by the first ``limit`` pairs of ``original`` (any pair layout, read and
    checked as `PreferenceDataModule` reads it), as prompt/chosen/rejected rows in ``out``, written
    atomically, the same rows each time (the round's DPO stage writes it before each attempt)."""
    raw = load_source(original, default_split="train")["train"]
    layout = detect_layout(raw.column_names, original)
    if layout is Layout.UNPAIRED:
        raise ValueError(f"mix_with {original!r} holds unpaired (KTO) rows; DPO rounds need pairs")
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in map(json.loads, pairs.open())]
    for i, row in enumerate(raw):
        example = to_example(row, layout, RowRef(original, "train", i))
        assert isinstance(example, PreferenceExample)
        rows.append(example._asdict())
    write_jsonl_atomically(out, rows)
    log.info("%s: %d generated + %d original pairs", out, len(rows) - len(raw), len(raw))
    return out
