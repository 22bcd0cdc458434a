"""Iterative DPO: SFT, then rounds of generate -> judge -> pairs -> DPO, each stage in its own folder.

``python -m dpo_lightning iterate --config recipes/pipeline_tiny.yaml`` runs the stages through the
same commands a user runs (``fit`` with a stage recipe, ``generate`` with a generation recipe), adding
only what chains them: the previous stage's export as the next stage's model, the round's pairs as
DPO's data, and the reference (the initial SFT model, or the previous round's policy). Folders::

    <output_dir>/sft/stage/version_0/hf_export               the SFT model (round 0's policy)
    <output_dir>/round_1/generate/{samples,pairs}.jsonl     samples of round 0's policy, judged, paired
    <output_dir>/round_1/dpo/version_0/hf_export            round 1's policy
    ...
    <output_dir>/report.csv, report.png, tensorboard/       one row per round (round 0: the SFT model)

Each stage records in its folder (``stage.json``, written atomically before it starts) the settings it
runs with: the whole configuration its command resolves (`cli.resolved_config`) and which stages
made its inputs. A stage is done when that record says so and its output is complete (an export
carries its marker; ``generate``'s manifest says its pairs are written); a pipeline killed anywhere
and re-run with the same config skips finished stages, resumes a killed ``fit`` from its
``last.ckpt`` and a killed ``generate`` from the prompts it wrote. Re-run with other settings, the
first stage whose settings differ is refused, naming them: its output and every later round's were
made with the recorded ones. One run at a time per output folder (`folders.FolderLock`); SIGTERM stops
at the current stage's next safe point (an optimizer step, a written batch) or between stages, with
`Preempted` (exit 143): the same command resumes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.tensorboard import SummaryWriter

from dpo_lightning import cli
from dpo_lightning.cli.config_errors import ShortErrors
from dpo_lightning.data.errors import DataError, RowRef, warn
from dpo_lightning.data.formats import Layout, PreferenceExample, detect_layout, to_example
from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.sources import load_source
from dpo_lightning.data.synthetic import sort_exact
from dpo_lightning.generation.judges import resolve_judge
from dpo_lightning.generation.module import _until_eos
from dpo_lightning.generation.samples_io import PAIRS_FILE, read_manifest, write_jsonl_atomically
from dpo_lightning.generation.sampling import decode_response
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.logprobs import sequence_logps
from dpo_lightning.stages.export import EXPORT_MARKER
from dpo_lightning.training.callbacks import Preempted, PreemptionWatch, preemption_signal
from dpo_lightning.training.folders import (
    FolderError,
    FolderLock,
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


@dataclass
class Evaluation:
    """How each round's policy is measured on held-out prompts.

    Args:
        dataset: Prompt source (as ``PromptDataModule.dataset``).
        split: Its split of held-out prompts.
        limit: How many prompts.
        judge: ``function:pkg.mod:fn`` or ``reward_model:<folder>``: the score of a response.
        num_samples: Samples per prompt (temperature 1) for reward, win rate and KL.
        max_new_tokens: Longest sampled response.
        seed: Sampling seed.
        data_seed: Seed of a ``synthetic:`` dataset: the stage recipes' 0, whose validation prompts none of
            their training prompts repeat (with another seed, short prompts would).
        enabled: False: no report is computed (each round's folders are still written; the reason is logged),
            for runs where sampling the held-out prompts on one device would take longer than it is worth.
        device: Where the report's models run: ``auto`` (the first CUDA device if there is one, else the
            CPU), ``cpu``, ``cuda``, ``cuda:1``... The report runs on the global rank 0 process only.
        dtype: The report's models' dtype (``bfloat16``...); None: as saved (a 7B policy, its start and its
            reference in float32 take ~81 GB, more than one 80 GB GPU holds: use ``bfloat16`` there).
    """

    dataset: str = "synthetic:sort"
    split: str = "validation"
    limit: int | None = 200
    judge: str = "function:dpo_lightning.data.synthetic:sort_reward"
    num_samples: int = 4
    max_new_tokens: int = 12
    seed: int = 0
    data_seed: int = 0
    enabled: bool = True
    device: str = "auto"
    dtype: str | None = None


def iterate(
    output_dir: str,
    sft: Stage,
    generate: Stage,
    dpo: Stage,
    rounds: int = 3,
    reference: Literal["initial", "previous"] = "previous",
    mix_with: str | None = None,
    mix_limit: int | None = None,
    evaluation: Evaluation | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run (or resume) the pipeline; returns the report rows (round 0 is the SFT model).

    Args:
        output_dir: Folder of every stage's output and the report.
        sft: The SFT recipe (run first), or ``config`` naming an existing model to start from.
        generate: The generation recipe (``python -m dpo_lightning generate``) sampling each round's pairs.
        dpo: The DPO recipe each round trains with, from the previous round's policy on its pairs.
        rounds: Rounds of generate -> DPO after SFT.
        reference: DPO's reference in each round: ``previous`` (the policy the round starts from, the
            on-policy choice of RLHFlow and self-rewarding LMs: each round is a KL-regularised step from
            where the last one ended) or ``initial`` (the SFT model in every round: the policy stays
            within one KL budget of it overall).
        mix_with: Original preference data added to every round's pairs, as the source article does (a
            source as ``PreferenceDataModule.dataset``: a file, a hub name, ``synthetic:sort``); None: the
            round's own pairs only.
        mix_limit: How many original pairs (its first ones) to add; None: all.
        evaluation: How each round's policy is measured; see `Evaluation`.
        seed: Seed of the rounds' sampling: round r samples with seed ``1000 * seed + r`` (the stages'
            training seeds are their recipes' ``seed_everything``, set in their ``args``).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if reference not in ("initial", "previous"):
        raise ValueError(f"reference must be 'initial' or 'previous', got {reference!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = evaluation or Evaluation()
    if not _can_plot():  # said now, not when the report is written after every stage has trained
        warn(_NO_PLOT)
    watch = PreemptionWatch("stopping at the current stage's next safe point (an optimizer step, a written batch) "
                            "or before the next stage, then exiting")
    with FolderLock(out, "iterate (output_dir)"), watch:
        initial = _run_fit_stage(sft, out / "sft", "stage") if _is_recipe(sft.config) else sft.config
        policies = [initial]
        for r in range(1, rounds + 1):
            round_dir = out / f"round_{r}"
            pairs = _run_generate_stage(generate, policies[-1], round_dir / "generate", seed=1000 * seed + r)
            _check_pairs(pairs, r, mix_with)
            mixed = None
            if mix_with is not None:
                mixed = (pairs, mix_with, mix_limit, round_dir / "mixed_pairs.jsonl")
            ref = initial if reference == "initial" else None  # None: a frozen copy of the policy it starts from
            policy = _run_fit_stage(dpo, round_dir, "dpo", model=policies[-1], pairs=pairs, ref_model=ref, mix=mixed)
            policies.append(policy)
        _stop_if_preempted("the report")
        if not _report_runs_here(evaluation, out):
            return []
        return write_report(out, policies, initial, evaluation, reference, _timings(out, rounds))


def _report_runs_here(evaluation: Evaluation, out: Path) -> bool:
    """Whether this process writes the report: the global rank 0 one (every rank of a multi-GPU run runs
    ``iterate``; each stage's Trainer has set the rank), and only when ``evaluation.enabled``."""
    if not evaluation.enabled:
        log.warning("the report is skipped (evaluation.enabled is false): %s holds every round's folders, "
                    "and no report.csv", out)
        return False
    if getattr(rank_zero_only, "rank", 0) != 0:
        log.info("rank %d: the report is written by the global rank 0 process only", rank_zero_only.rank)
        return False
    return True


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
    settings when the recorded ones differ, or when the folder holds files but no record."""
    path = folder / STAGE_RECORD
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
        write_record(self.folder / STAGE_RECORD, self.record)
        if isinstance(err, SIGTERMException):  # Lightning's own stop (a SystemExit, status 0), before training began
            err = self._preempted("received SIGTERM before the stage's first step")
        if isinstance(err, self._preempted):
            raise self._preempted(f"{self.name} stage: {err.status}; run the same iterate command again to resume "
                                  "(finished stages are kept)") from None
        return False

    def done(self) -> None:
        self.record["done"] = True


def _timings(out: Path, rounds: int) -> dict[str, float]:
    """Wall time per round (round 0: SFT) from the stage records: the sum of the attempts' times."""
    folders = {"round_0": [out / "sft" / "stage"]}
    for r in range(1, rounds + 1):
        folders[f"round_{r}"] = [out / f"round_{r}" / "generate", out / f"round_{r}" / "dpo"]
    timings = {"round_0": 0.0}  # no SFT stage: the model given was not trained here
    for key, stages in folders.items():
        records = [read_record(folder / STAGE_RECORD) for folder in stages]
        if all(records):
            timings[key] = sum(record.get("seconds", 0.0) for record in records)
    return timings


def _check_pairs(pairs: Path, r: int, mix_with: str | None) -> None:
    """A round whose samples gave no pair: an error saying what to change (with ``mix_with``, a warning)."""
    made = (read_manifest(pairs.parent) or {}).get("pairs") or {}
    if made.get("count", 1) > 0:
        return
    why = (f"round {r}'s samples gave no preference pair ({made.get('summary', '')}): no prompt had two scored, "
           "non-empty responses whose scores differ by min_margin or more")
    if mix_with is not None:
        warn(f"{pairs}: {why}; the round's DPO trains on the {mix_with} pairs alone")
        return
    raise DataError(f"{pairs}: {why}, so DPO has nothing to train on. Sample more, or more varied, responses "
                    "(generate args --model.num_samples, --model.temperature), pair more of them (--output.pairing "
                    "all, a lower --output.min_margin), use a judge with finer scores, or add original pairs "
                    "(mix_with)")


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
        if mix is not None:
            mix_pairs(*mix)
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


# ------------------------------------------------------------------------------------------------ the report


@torch.no_grad()
def sample_with_ids(model, data, num_samples: int, max_new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """For each prompt of ``data`` (a `PromptDataModule`): ``num_samples`` sampled responses, as text and as
    the exact sampled ids (up to and including EOS), with the prompt ids."""
    tokenizer = data.tokenizer
    model.eval()
    out = []
    torch.manual_seed(seed)
    loader = data._loader(data.prompts, data.hparams.batch_size, shuffle=False)
    for batch in loader:
        ids = model.generate(input_ids=batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device), do_sample=True,
                             num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        width = batch["input_ids"].shape[1]
        for i, prompt in enumerate(batch["prompt"]):
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            samples = []
            for row in ids[i * num_samples : (i + 1) * num_samples, width:].cpu().tolist():
                row = _until_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
                samples.append((row, decode_response(tokenizer, prompt_ids, row)))
            out.append({"prompt": json.loads(prompt), "prompt_ids": prompt_ids, "samples": samples})
    return out


@torch.no_grad()
def response_logps(model, prompt_ids: list[int], responses: list[list[int]]) -> torch.Tensor:
    """Summed log-probs ``(n,)`` of each response's exact ids after the prompt, under ``model``."""
    rows = [prompt_ids + r for r in responses]
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, response) in enumerate(zip(rows, responses)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        if response:
            labels[i, len(prompt_ids) : len(row)] = torch.tensor(response, dtype=torch.long)
    logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
    return sequence_logps(logits, labels.to(model.device)).logps.cpu()


def evaluation_prompts(evaluation: Evaluation, tokenizer: Any):
    """The held-out prompts of ``evaluation`` as a `PromptDataModule` (batches of 64)."""
    return PromptDataModule(tokenizer=tokenizer, dataset=evaluation.dataset, split=evaluation.split,
                            limit=evaluation.limit, batch_size=64, seed=evaluation.data_seed, drop_columns=None)


def exact_check(dataset: str):
    """The task's ground-truth pass/fail check ``(prompt, response) -> bool``, or None when it has none."""
    if dataset == "synthetic:sort":
        return sort_exact
    return None


@torch.no_grad()
def greedy_exact_rate(model, data, check, max_new_tokens: int) -> float:
    """The share of ``data``'s prompts whose greedy answer (at most ``max_new_tokens``) passes ``check``."""
    tokenizer = data.tokenizer
    passed = total = 0
    for batch in data._loader(data.prompts, data.hparams.batch_size, shuffle=False):
        ids = model.generate(input_ids=batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for i, (prompt, row) in enumerate(zip(batch["prompt"], ids[:, batch["input_ids"].shape[1]:].cpu().tolist())):
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            row = _until_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
            passed += bool(check(json.loads(prompt), decode_response(tokenizer, prompt_ids, row)))
            total += 1
    return passed / max(total, 1)


def evaluate_policy(policy: str, start: str, reference: str, evaluation: Evaluation) -> dict[str, float]:
    """Mean judge score of the policy's samples on held-out prompts, win rate against ``start``'s samples
    (i-th sample against i-th sample; a tie counts half), and KL(policy || reference) estimated on the
    policy's samples as the mean of sum_t [log pi(y_t) - log ref(y_t)], with its standard error. For a
    task with a ground-truth pass/fail check (`exact_check`), first ``exact``: the share of the prompts
    whose greedy answer passes it."""
    data = evaluation_prompts(evaluation, policy)
    judge = resolve_judge(evaluation.judge)
    device = evaluation.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {name: load_causal_lm(path, dtype=evaluation.dtype).to(device).eval() for name, path in
              {"policy": policy, "start": start, "reference": reference}.items()}
    ours = sample_with_ids(models["policy"], data, evaluation.num_samples, evaluation.max_new_tokens, evaluation.seed)
    theirs = sample_with_ids(models["start"], data, evaluation.num_samples, evaluation.max_new_tokens, evaluation.seed)

    def score(rows: list[dict[str, Any]]) -> list[float | None]:
        prompts = [r["prompt"] for r in rows for _ in r["samples"]]
        return judge.score(prompts, [text for r in rows for _, text in r["samples"]])

    mine, base = score(ours), score(theirs)
    pairs = [(a, b) for a, b in zip(mine, base) if a is not None and b is not None]
    kls = []
    for row in ours:
        ids = [s for s, _ in row["samples"]]
        kls += (response_logps(models["policy"], row["prompt_ids"], ids)
                - response_logps(models["reference"], row["prompt_ids"], ids)).tolist()
    kl = torch.tensor(kls, dtype=torch.float64)
    scored = [s for s in mine if s is not None]
    check = exact_check(evaluation.dataset)
    exact = {} if check is None else {
        "exact": greedy_exact_rate(models["policy"], data, check, evaluation.max_new_tokens)}
    return {
        **exact,
        "reward": sum(scored) / max(len(scored), 1),
        "win_rate": sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / max(len(pairs), 1),
        "kl": kl.mean().item(),
        "kl_stderr": (kl.std().item() / math.sqrt(len(kls))) if len(kls) > 1 else 0.0,
    }


def write_report(
    out: Path, policies: list[str], initial: str, evaluation: Evaluation, reference: str,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``report.csv``, ``report.png`` and TensorBoard scalars: one row per round, recomputed from the round
    folders (the policies' exports and the pairs files)."""
    timings = timings or {}
    rows = []
    for r, policy in enumerate(policies):
        _stop_if_preempted(f"the report's round {r}")
        ref = initial if reference == "initial" or r == 0 else policies[r - 1]
        metrics = evaluate_policy(policy, initial, ref, evaluation)
        pairs = out / f"round_{r}" / "generate" / "pairs.jsonl"
        rows.append({
            "round": r, "policy": policy, **metrics,
            "pairs": sum(1 for _ in pairs.open()) if pairs.exists() else 0,
            "seconds": round(timings.get(f"round_{r}", float("nan")), 1),
        })
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "report.png")
    try:

        with SummaryWriter(str(out / "tensorboard")) as tb:
            for row in rows:
                for key in ("exact", "reward", "win_rate", "kl", "pairs"):
                    if key in row:
                        tb.add_scalar(f"pipeline/{key}", row[key], row["round"])
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        warn("tensorboard is not installed: the report is in report.csv and report.png only")
    return rows


_NO_PLOT = ("matplotlib is not installed: report.png will not be drawn (report.csv and TensorBoard hold the same "
            "numbers); `pip install matplotlib` to draw it")


def _can_plot() -> bool:
    """Whether matplotlib imports (a dependency, but an install without it must not fail after training)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    if not _can_plot():
        warn(_NO_PLOT)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    panels = [("reward", "held-out reward"), ("win_rate", "win rate vs SFT"), ("kl", "KL(policy || reference)")]
    if "exact" in rows[0]:
        panels.insert(0, ("exact", "greedy exact rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(rounds, [r[key] for r in rows], marker="o")
        ax.set_xlabel("round (0 = SFT)")
        ax.set_title(label)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m dpo_lightning iterate --config recipes/pipeline_tiny.yaml``."""
    class IterateParser(ShortErrors, ArgumentParser):
        """jsonargparse's parser with one- or two-line errors."""

    parser = IterateParser(prog="python -m dpo_lightning iterate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(iterate, as_positional=False)
    config = parser.parse_args(argv)
    init = parser.instantiate_classes(config)
    names = ("output_dir", "sft", "generate", "dpo", "rounds", "reference", "mix_with", "mix_limit", "evaluation",
             "seed")
    kwargs = {k: init[k] for k in names}
    rows = iterate(**kwargs)
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "policy"})
    return rows


__all__ = ["Evaluation", "Stage", "evaluate_policy", "iterate", "main", "mix_pairs", "write_report"]
