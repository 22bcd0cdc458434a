"""Export a trained policy in Hugging Face format (safetensors, config, tokenizer, generation config).

At the end of ``fit`` the :class:`HFExport` callback writes ``<run dir>/hf_export``; any Lightning
checkpoint can be exported later with ``python -m dpo_lightning export CKPT OUTPUT_DIR``.

An export replaces its output folder as a whole, so it only goes where nothing else can be lost
(``stages/export_folder.py``: a new or empty folder, or a previous export). Weights that are not finite are
never exported.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.data.tokenizer import resolve_tokenizer
from dpo_lightning.models.loading import load_model, unsharded_lora_copy, wrap_lora
from dpo_lightning.stages.base import stage_class_of
from dpo_lightning.stages.checkpointing import (
    EXPORT_DTYPE_KEY,
    FROZEN_BASE_KEY,
    POLICY_CONFIG_KEY,
    check_frozen_base,
    fingerprint,
    frozen_parameters,
)
from dpo_lightning.stages.export_folder import (
    EXPORT_MARKER,
    AdapterExport,
    ExportError,
    _honour_umask,
    _move_into_place,
    _write_marker,
    check_export_destination,
    remove_orphaned_exports,
)
from dpo_lightning.training.checkpoint import _HOST
from dpo_lightning.training.distributed import consolidate_checkpoint, full_state_dict, is_sharded
from dpo_lightning.training.integrity import CheckpointError, check_checkpoint

log = logging.getLogger(__name__)

def export_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | Path,
    state_dict: dict[str, Any] | None = None,
    adapter: AdapterExport = "merged",
    *,
    source: str | None = None,
    keep: Iterable[str | Path] = (),
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``output_dir``, atomically.

    ``state_dict`` replaces the model's own weights, e.g. the full weights gathered from an
    FSDP2-sharded model (:func:`dpo_lightning.training.distributed.full_state_dict`), or those of a
    checkpoint for a model built on the meta device. ``dtype`` casts the floating-point weights
    (and the config's ``dtype``, so ``from_pretrained`` loads them as such); None keeps them.

    A PEFT (LoRA) policy is exported ``merged`` (adapters folded into a copy of the base weights:
    a plain model for ``AutoModelForCausalLM``) or as the ``adapter`` alone (for
    ``PeftModel.from_pretrained`` on top of the base model).

    Everything is written to a sibling temporary folder first and renamed into place, so a
    crash mid-export never leaves a half-written model where a finished one is expected.
    ``output_dir`` must pass :func:`check_export_destination` (with ``keep``), before the work
    and again just before the rename; ``source`` (what the weights come from) goes into the
    marker file. Raises :class:`ExportError` if any weight is NaN or infinite.
    """
    output_dir, keep = Path(output_dir), list(keep)
    check_export_destination(output_dir, keep)
    if _is_peft(model) and adapter == "merged":
        # Merge into a copy: the trained module keeps its adapters.
        model = copy.deepcopy(model).merge_and_unload()
    if dtype is not None and not _is_peft(model):  # an adapter alone keeps its own dtype
        weights = state_dict if state_dict is not None else model.state_dict()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    bad = _nonfinite(state_dict if state_dict is not None else model.state_dict())
    if bad:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ExportError(f"the policy has {len(bad)} non-finite tensor(s) ({names}): refusing to export NaN or inf")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_exports(output_dir)
    # The writer's host and pid in the name: a later export can tell a killed one's leftovers from a live one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.{_HOST}-{os.getpid()}.", dir=output_dir.parent))
    try:
        if tokenizer is not None:
            _fill_special_token_ids(model, tokenizer)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if dtype is not None and not _is_peft(model):
            _record_dtype(tmp / "config.json", dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generative = getattr(model, "can_generate", lambda: True)()  # not a reward model's score head
        if not (tmp / "generation_config.json").exists() and not _is_peft(model) and generative:
            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        _write_marker(tmp, source=source, adapter=adapter)
        _honour_umask(tmp)
        check_export_destination(output_dir, keep)  # the folder may have changed during the export
        _move_into_place(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _record_dtype(config_json: Path, dtype: torch.dtype) -> None:
    """Write the export's weight dtype into its config (``save_pretrained`` records the model's)."""
    config = json.loads(config_json.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_export_dtype(dtype: str | None, compute_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``auto``: the dtype training computed in (bf16 for a bf16 run); ``keep``/None: the weights' own;
    else ``float32``, ``bfloat16`` or ``float16``."""
    if dtype in (None, "keep"):
        return None
    name = str(compute_dtype).removeprefix("torch.") if dtype == "auto" else dtype
    if dtype == "auto" and compute_dtype is None:
        return None
    if name not in _DTYPES:
        raise ExportError(f"export dtype {dtype!r}: choose auto, keep, {', '.join(_DTYPES)}")
    return _DTYPES[name]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ExportDtype = Literal["auto", "keep", "float32", "bfloat16", "float16"]


def _nonfinite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        name for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _is_peft(model: Any) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def _fill_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a config-built model the tokenizer's special ids, so ``generate`` stops at EOS."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is None:
            continue
        if getattr(model.config, name, None) is None:
            setattr(model.config, name, value)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, name, None) is None:
            setattr(gen, name, value)


def _plain_dirname(dirname: str) -> str:
    """``dirname`` if it names a folder inside the run directory; ``.``, ``..``, absolute paths refused."""
    parts = PurePath(dirname).parts
    if not parts or PurePath(dirname).is_absolute() or ".." in parts or dirname.startswith("~"):
        raise ExportError(
            f"export dirname {dirname!r}: must name a new folder inside the run directory, "
            "not '.', '..', an absolute path or one leading out of it"
        )
    return dirname


class HFExport(L.Callback):
    """At the end of ``fit``, export the policy to ``<run dir>/<dirname>`` on rank 0.

    The destination is checked when ``fit`` starts (:func:`check_export_destination`, keeping the
    run's checkpoint folders and the checkpoint resumed from), so a bad ``dirname`` fails before
    any training, not after it.
    """

    def __init__(
        self, dirname: str = "hf_export", adapter: AdapterExport = "merged", dtype: ExportDtype = "auto"
    ) -> None:
        """
        Args:
            dirname: Folder of the export inside the run directory (the logger's log_dir); a
                previous export there is replaced, anything else there is refused.
            adapter: For a LoRA policy: export the merged model, or the adapter weights alone.
            dtype: Weights dtype of the export: ``auto`` the dtype training computed in (bf16 for a
                bf16 run, 2 bytes per parameter), ``keep`` the weights' own (fp32 master weights), or a name.
        """
        self.dirname = _plain_dirname(dirname)
        self.adapter = adapter
        resolve_export_dtype(dtype, None)  # a bad name fails when the run is configured
        self.dtype = dtype

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: on every rank
        error = None
        if trainer.is_global_zero:
            try:
                check_export_destination(run_dir / self.dirname, _kept(trainer))
            except ExportError as e:
                error = str(e)
        # Every rank stops together (one raising alone would leave the others in a collective).
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise ExportError(f"{error} (HFExport dirname {self.dirname!r})")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        # Under FSDP2 gathering the full weights is a collective: every rank takes part.
        state = full_state_dict(pl_module.model) if is_sharded(pl_module.model) else None
        # Trainer.log_dir broadcasts from rank 0, a collective too: read it on every rank.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        failure: BaseException | None = None
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None)
            compute = pl_module.compute_dtype() if hasattr(pl_module, "compute_dtype") else None
            model = pl_module.model
            try:
                if state is not None and _is_peft(model):  # a sharded PEFT model can be neither copied nor merged
                    model, state = unsharded_lora_copy(model, state), None
                    if self.adapter == "merged":  # the copy is ours: merged in place, not copied again
                        model = model.merge_and_unload()
                out = export_hf(
                    model, tokenizer, run_dir / self.dirname, state, adapter=self.adapter,
                    source=f"end of fit, step {trainer.global_step}", keep=_kept(trainer),
                    dtype=resolve_export_dtype(self.dtype, compute),
                )
            except Exception as e:  # refused, non-finite weights, full disk ...
                failure = e
            else:
                rank_zero_info(f"Hugging Face export of {getattr(pl_module, 'exported_as', 'the policy')}: {out}")
                final = {k: f"{v.item():.4f}" for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
                if final:
                    rank_zero_info(f"Last validation: {final}")
                if trainer.logger is not None:
                    logger = trainer.logger
                    hint = f"  (tensorboard --logdir {run_dir})" if type(logger).__name__ == "TensorBoardLogger" else ""
                    rank_zero_info(f"{type(logger).__name__} logs: {logger.log_dir}{hint}")
        # Rank 0's failure reaches every rank, which would otherwise wait in the barrier forever.
        error = trainer.strategy.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}", src=0)
        if failure is not None:
            raise failure
        if error is not None:
            raise ExportError(f"the export on rank 0 failed: {error}")
        trainer.strategy.barrier("hf_export")


def _kept(trainer: L.Trainer) -> list[str | Path]:
    """What an export must not replace: the checkpoint folders of this run, the checkpoint resumed from."""
    kept: list[str | Path] = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if trainer.ckpt_path:
        kept.append(trainer.ckpt_path)
    return kept


def export_checkpoint(
    ckpt_path: str | Path, output_dir: str | Path, adapter: AdapterExport = "merged", dtype: ExportDtype = "auto"
) -> Path:
    """Export the policy of any stage's checkpoint (a file, or a sharded FSDP2 folder) in HF format.

    Only the policy's weights are read: no optimizer state, no reference model, and for a
    full-parameter checkpoint not even the model source (the policy is built on the meta device
    from the config the checkpoint carries). A LoRA checkpoint loads its base model from the
    source and merges the adapters (``adapter="merged"``) or exports them alone. ``dtype`` as
    :func:`resolve_export_dtype` (``auto``: the dtype training computed in).

    Raises :class:`~dpo_lightning.training.integrity.CheckpointError` for a missing, truncated or corrupt
    checkpoint and :class:`ExportError` for a destination the export must not replace, both
    before loading anything.
    """
    ckpt_path = Path(ckpt_path)
    check_checkpoint(ckpt_path)
    check_export_destination(output_dir, keep=[ckpt_path])
    checkpoint, state = _read_policy(ckpt_path)
    stage = stage_class_of(checkpoint)
    hparams = checkpoint.get("hyper_parameters") or {}
    target = resolve_export_dtype(dtype, checkpoint.get(EXPORT_DTYPE_KEY))
    common = {"adapter": adapter, "source": str(ckpt_path.resolve()), "keep": [ckpt_path], "dtype": target}
    if hparams.get("lora") is None and POLICY_CONFIG_KEY in checkpoint:
        model = _meta_policy(stage, checkpoint[POLICY_CONFIG_KEY], target)
        tokenizer = resolve_tokenizer(hparams.get("tokenizer"), hparams.get("trust_remote_code", False))
        return export_hf(model, tokenizer, output_dir, state_dict=state, **common)
    if hparams.get("lora") is not None and POLICY_CONFIG_KEY in checkpoint:
        model = _lora_policy(stage, checkpoint, hparams, state)
        tokenizer = resolve_tokenizer(hparams.get("tokenizer"), hparams.get("trust_remote_code", False))
        return export_hf(model, tokenizer, output_dir, **common)
    # A checkpoint written before the policy's config was recorded: rebuild its whole module.
    if ckpt_path.is_dir():

        with tempfile.TemporaryDirectory() as tmp:
            torch.save(consolidate_checkpoint(ckpt_path), Path(tmp) / "full.ckpt")
            module = stage.load_from_checkpoint(Path(tmp) / "full.ckpt", map_location="cpu", weights_only=True)
    else:
        module = stage.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return export_hf(module.model, module.tokenizer, output_dir, **common)


def _read_policy(ckpt_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's non-tensor part, and the policy's weights (keys without ``model.``).

    A file is memory-mapped, so only the policy's tensors are read; of a sharded folder only the
    policy's entries are loaded (:func:`dpo_lightning.training.distributed.consolidate_checkpoint` with a prefix).
    """
    if ckpt_path.is_dir():

        checkpoint = consolidate_checkpoint(ckpt_path, only="state_dict.model.")
    else:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    weights = checkpoint.get("state_dict") or {}
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    return checkpoint, state


def _meta_policy(stage: type, config: Mapping[str, Any], dtype: torch.dtype | None) -> PreTrainedModel:
    """The policy's architecture without weights (meta device): the export writes the checkpoint's."""
    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = stage.auto_model_class.from_config(cfg)
    if dtype is not None:
        model.to(dtype)
    return model


def _lora_policy(stage: type, checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], state: dict[str, Any]) -> Any:
    """A LoRA policy: its base loaded from the source (or built from the recorded config), the checkpoint's
    adapters (and base weights, when it holds them) loaded on top."""
    source = hparams.get("model") if FROZEN_BASE_KEY in checkpoint else None
    load = {"dtype": hparams.get("dtype"), "trust_remote_code": hparams.get("trust_remote_code", False)}
    if source is not None:
        base = load_model(source, auto_class=stage.auto_model_class, **load, **stage.model_overrides)
    else:  # the checkpoint holds every weight: the architecture is enough
        fields = dict(checkpoint["dpo_lightning_policy_config"])
        base = stage.auto_model_class.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    model = wrap_lora(base, **hparams["lora"], task_type=stage.lora_task_type)
    if FROZEN_BASE_KEY in checkpoint:
        frozen = frozen_parameters(model)
        check_frozen_base(checkpoint[FROZEN_BASE_KEY], fingerprint(frozen))
        state = {**{k: v.detach() for k, v in frozen.items()}, **state}
    model.load_state_dict(state, strict=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_lightning export",
        description="Export the policy of a training checkpoint (any stage) in Hugging Face format (safetensors).",
    )
    parser.add_argument("ckpt_path", help="Lightning checkpoint written by `fit`")
    parser.add_argument(
        "output_dir",
        help="folder to write: new, empty, or a previous export (replaced); "
        "loadable with AutoModelForCausalLM.from_pretrained",
    )
    parser.add_argument(
        "--adapter", choices=["merged", "adapter"], default="merged",
        help="for a LoRA policy: the merged model (default) or the adapter weights alone",
    )
    parser.add_argument(
        "--dtype", choices=["auto", "keep", *_DTYPES], default="auto",
        help="weights dtype of the export: auto (default) the dtype training computed in (bf16 for a bf16 run), "
        "keep the checkpoint's own (fp32 master weights), or a dtype",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt_path, args.output_dir, args.adapter, args.dtype)
    except (CheckpointError, ExportError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"Exported to {out}")


# (the destination's names, from export_folder, stay importable from here)
__all__ = ["EXPORT_MARKER", "ExportError", "HFExport", "check_export_destination", "export_checkpoint", "export_hf",
           "main", "remove_orphaned_exports", "resolve_export_dtype"]
