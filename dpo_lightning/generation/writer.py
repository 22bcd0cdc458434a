"""Judging and writing what `GenerationModule` samples, durably (`JudgedSamplesWriter`).

`JudgedSamplesWriter` (a ``BasePredictionWriter``) locks the output folder, checks its manifest
against this run's settings (`manifest.check_manifest`), scores each batch's responses with a judge
(`judges.py` here) and appends one record per prompt to its rank's part file (`samples_io.py`, flushed
and fsynced), so a killed run loses at most the batch in flight; re-run with the same settings, it skips
the batches already written and gives the samples an uninterrupted run gives. SIGTERM cuts the batch
in flight short and stops the run with `Preempted`. At the end, rank 0 merges the parts into
``samples.jsonl`` (source order, each prompt once) and turns the scores into preference pairs
(``pairs.jsonl``, `generation/pairing.py`) that `PreferenceDataModule` reads, unless the manifest says they are
already made from these samples with these settings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from dpo_lightning.data.errors import warn
from dpo_lightning.generation.judges import Judge, check_options, judge_class, resolve_judge, warn_failures
from dpo_lightning.generation.manifest import check_manifest, prompt_keys, read_manifest, write_manifest
from dpo_lightning.generation.pairing import check_strategy
from dpo_lightning.generation.samples_io import (
    PAIRS_FILE,
    PART_GLOB,
    SAMPLES_FILE,
    SampleWriter,
    done_prompt_ids,
    merge_parts,
    part_path,
    write_pairs,
)
from dpo_lightning.models.loading import check_local_source
from dpo_lightning.training.callbacks import Preempted, PreemptionWatch, preemption_signal
from dpo_lightning.training.folders import FolderLock


class JudgedSamplesWriter(BasePredictionWriter):
    """Scores each batch's samples with a judge and appends one record per prompt, durably; merges
    the ranks' parts and writes the preference pairs at the end (docs/generate.md)."""

    def __init__(
        self,
        output_dir: str = "generated",
        judge: str | Any = None,
        pairing: Literal["all", "best_vs_worst", "best_vs_rest"] = "best_vs_worst",
        min_margin: float = 0.0,
        judge_options: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            output_dir: Folder of ``samples.jsonl`` and ``pairs.jsonl`` (and the parts of a run in progress).
            judge: ``function:package.module:function`` (prompt, response -> float), ``reward_model:<path>``,
                ``llm_pairwise:<path>`` or ``llm_score:<path>`` (docs/generate.md, Judges).
            pairing: How scores become pairs: best_vs_worst (one per prompt), best_vs_rest, or all.
            min_margin: Smallest score difference a pair needs.
            judge_options: Keyword arguments of the judge's class (``timeout_s``; ``batch_size``, ``max_length``;
                an LLM judge's ``template``, ``verdicts``); an option the class does not take is an error.
        """
        super().__init__(write_interval="batch")
        check_strategy(pairing, min_margin)
        self.judge_options = dict(judge_options or {})
        self.check_judge(judge, self.judge_options)
        self.output_dir = Path(output_dir)
        self.judge_spec = judge
        self.judge: Judge | None = None  # built in setup, on this rank's device
        self.pairing, self.min_margin = pairing, min_margin
        self._writer = None
        self._started = 0.0
        self._prompts_done = 0  # written by this run on this rank
        self._all_done = False
        self._done: set[str] = set()  # prompts written by an earlier run
        self._lock = None  # the output folder's FolderLock (rank 0), from setup to teardown
        self._watch = None  # the PreemptionWatch of the predict loop

    @staticmethod
    def check_judge(judge: Any, options: dict[str, Any] | None = None) -> None:
        """ValueError for a judge that cannot work, without loading a model: a function spec is imported,
        a reward model given as a local path must exist, an LLM judge's template and verdict tokens are
        checked with its tokenizer, ``options`` against the judge's class (the CLI calls this before
        building anything)."""
        options = options or {}
        if judge is None:
            raise ValueError("set a judge: function:package.module:function, reward_model:<path>, "
                             "llm_pairwise:<path> or llm_score:<path>")
        if isinstance(judge, Judge):
            resolve_judge(judge, **options)  # refuses options for a judge object
            return
        if not isinstance(judge, str):
            raise ValueError(f"judge must be a spec string or a Judge, got {type(judge).__name__}")
        kind, _, target = judge.partition(":")
        if kind == "function":
            resolve_judge(judge, **options)
        elif kind == "reward_model" and target:
            check_local_source(target, "reward_model judge")
            check_options(judge_class(kind), judge, options)
        elif kind in ("llm_pairwise", "llm_score") and target:
            judge_class(kind).check(target, **options)
        else:
            resolve_judge(judge)  # its error lists the accepted forms

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        spec, options = self.judge_spec, self.judge_options
        if isinstance(spec, Judge) or spec.startswith("function:"):
            self.judge = resolve_judge(spec, **options)
        else:
            self.judge = resolve_judge(spec, **{"device": str(pl_module.device), **options})
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "prompts"):
            raise ValueError("JudgedSamplesWriter needs the prompts' PromptDataModule as the trainer's datamodule")
        # Rank 0 takes the folder (one run at a time) and checks what it holds against this run's settings
        # (refused when they differ; pairs made with other pairing settings are marked stale); every rank
        # stops if that fails.
        error = None
        if trainer.global_rank == 0:
            try:
                self._take_folder(pl_module, datamodule)
            except Exception as err:  # noqa: BLE001 - sent to every rank, raised there
                error = err
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            self._release()
            raise error
        # Records made with other settings belong to another run: refused, not mixed in.
        self._done = done_prompt_ids(self.output_dir, settings=self._settings(pl_module))
        order = datamodule.prompts["prompt_id"]
        finished = sum(pid in self._done for pid in order)
        self._all_done = finished == len(order)
        datamodule.exclude(self._done)
        self._prompts_done = 0
        if finished:
            warn(f"{self.output_dir}: {finished} of {len(order)} prompts were sampled by an earlier run with these "
                 "settings; " + ("nothing left to sample" if self._all_done else f"sampling the other "
                                                                             f"{len(order) - finished}"))

    def _take_folder(self, pl_module: L.LightningModule, datamodule: Any) -> None:
        """Lock the output folder and write its manifest (after `manifest.check_manifest` checked the old one)."""
        self._lock = FolderLock(self.output_dir, "generate (output.output_dir)").acquire()
        prompts = datamodule.prompts
        keys = prompt_keys(prompts["prompt_id"], prompts["input_ids"])
        old = read_manifest(self.output_dir)
        manifest = check_manifest(self.output_dir, self._settings(pl_module), keys, _data_settings(datamodule),
                                  self._pairs_settings())
        stale = (old or {}).get("pairs")
        if stale and manifest["pairs"] is None and manifest["prompts"] == old.get("prompts"):
            made = {k: stale["settings"].get(k) for k in self._pairs_settings()}
            warn(f"{self.output_dir / 'pairs.jsonl'} was made with {_say(made)}; making it again from "
                 f"samples.jsonl with {_say(self._pairs_settings())}")
        write_manifest(self.output_dir, manifest)  # before anything else is written: stale pairs are marked so

    def _pairs_settings(self) -> dict[str, Any]:
        return {"pairing": self.pairing, "min_margin": self.min_margin}

    def _settings(self, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**pl_module.settings(), "judge": self.judge.spec()}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._writer = SampleWriter(part_path(self.output_dir, trainer.global_rank))
        self._started = time.perf_counter()
        # SIGTERM: the batch in flight is cut short (not written) and the run stops with Preempted. Every rank
        # stops at its own batch (no collective per batch: ranks may have different numbers of batches);
        # rank 0 passes the signal on to the ranks it started, as Lightning's handler, replaced here, does.
        launcher = getattr(trainer.strategy, "launcher", None)
        forward = launcher.kill if trainer.global_rank == 0 and getattr(launcher, "procs", None) else None
        self._watch = PreemptionWatch("cutting the batch in flight short (it is not written), then exiting", forward)
        self._watch.start()
        pl_module.stop_requested = lambda: preemption_signal() is not None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        # A batch with a prompt left to sample is sampled whole (its composition is the uninterrupted
        # run's, so are its samples); only its prompts not yet written are written.
        records = [r for r in prediction or [] if r["prompt_id"] not in self._done]
        if records:
            prompts = [r["prompt"] for r in records for _ in r["responses"]]
            responses = [s for r in records for s in r["responses"]]
            scores = self.judge.score(prompts, responses)
            settings = self._settings(pl_module)
            at = 0
            for record in records:
                k = len(record["responses"])
                self._writer.write({"prompt_id": record["prompt_id"], "prompt": record["prompt"],
                                    "responses": record["responses"], "scores": scores[at : at + k],
                                    "settings": settings})
                at += k
            self._prompts_done += len(records)
        self._show_progress(trainer, pl_module)
        if received := preemption_signal():
            self._close()
            total = len(trainer.datamodule.prompts)
            rank = f" (rank {trainer.global_rank}: its share)" if trainer.world_size > 1 else ""
            done = len(self._done) + self._prompts_done
            status = f"received {received}: {done} of {total} prompts are sampled in {self.output_dir}{rank}"
            status += ", each complete"
            raise Preempted(f"{status}; run the same command again to sample the rest", status)

    def _show_progress(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prompts done and generated tokens/s (this rank) on the predict progress bar, when there is one."""
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None and hasattr(bar, "set_postfix"):
            seconds = max(time.perf_counter() - self._started, 1e-9)
            bar.set_postfix(prompts=self._prompts_done, tokens_per_s=f"{pl_module.generated_tokens / seconds:.0f}",
                            refresh=False)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        seconds = max(time.perf_counter() - self._started, 1e-9)
        tokens = pl_module.generated_tokens
        rank_zero_info(f"generated {tokens} tokens for {self._prompts_done} prompts in {seconds:.1f} s on rank 0 "
                       f"({tokens / seconds:.1f} tokens/s)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Every rank, whether its predict loop ran or not (Lightning runs none over an empty loader: every
        batch done before): the judge's failures counted over ranks, then rank 0 merges and pairs."""
        if stage != "predict":
            return
        self._close()
        stats = [self.judge.stats]
        if trainer.world_size > 1:
            stats = [None] * trainer.world_size
            dist.all_gather_object(stats, self.judge.stats)
        trainer.strategy.barrier("generation_parts")
        try:
            if trainer.global_rank == 0:
                merged = stats[0]
                for other in stats[1:]:
                    merged = merged.merge(other)
                warn_failures(merged, self.judge.spec())
                self._finish(trainer)
            trainer.strategy.barrier("generation_merged")
        finally:
            self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()
        self._release()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _finish(self, trainer: L.Trainer) -> None:
        """Rank 0: the parts merged into samples.jsonl (source order, each prompt once), then the pairs,
        unless the manifest says they were made from these samples with these settings."""
        order = list(trainer.datamodule.prompts["prompt_id"])
        samples, pairs = self.output_dir / SAMPLES_FILE, self.output_dir / PAIRS_FILE
        if any(self.output_dir.glob(PART_GLOB)) or not samples.exists():
            merge_parts(self.output_dir, order)
        manifest = read_manifest(self.output_dir) or {}
        made = manifest.get("pairs")
        if made is not None and pairs.exists():
            rank_zero_info(f"{len(order)} prompts' samples in {samples}; pairs in {pairs}: up to date, nothing to do "
                           f"({made.get('summary', '')})")
            return
        if made is not None:  # the pairs file is gone: not valid until written again
            write_manifest(self.output_dir, {**manifest, "pairs": None})
        totals = write_pairs(samples, pairs, self.pairing, self.min_margin)
        summary = totals.summary(self.pairing, self.min_margin)
        write_manifest(self.output_dir, {**manifest, "pairs": {"settings": self._pairs_settings(),
                                                               "count": totals.pairs, "summary": summary}})
        rank_zero_info(f"{len(order)} prompts' samples in {samples}; pairs in {pairs}")


def _data_settings(datamodule: Any) -> dict[str, Any]:
    """The data settings that choose and tokenize the prompts, as recorded in the manifest (to name in a refusal)."""
    hp = datamodule.hparams
    keys = ("dataset", "dataset_config", "split", "limit", "max_prompt_length", "truncation_mode", "seed", "columns",
            "tokenizer")
    plain = (str, int, float, bool, type(None), dict, list)
    return {k: hp[k] if isinstance(hp.get(k), plain) else f"<{type(hp.get(k)).__name__}>" for k in keys if k in hp}


def _say(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())


__all__ = ["JudgedSamplesWriter"]
