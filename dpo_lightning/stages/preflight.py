"""Checks that run before any weights load: a wrong setting fails in seconds, not after every rank loaded 7B.

Each check is a function over plain values (strings, numbers, a class and its init args), so the CLI
calls them on the parsed config (``DPOLightningCLI.before_instantiate_classes``) and Python code, or a
module's ``setup()``, can call them on what it has:

- `check_trainer_counts`: ``trainer.accumulate_grad_batches``, an integer ``val_check_interval`` and
  ``check_val_every_n_epoch`` below 1 (Lightning divides by them mid-fit: ``ZeroDivisionError``), a negative
  ``gradient_clip_val`` (it would turn each step around) are refused.
- `check_strategy`: FSDP1 (``FSDPStrategy``, ``"fsdp"``, ``"fsdp_cpu_offload"``) is refused;
  FSDP2 (``ModelParallelStrategy``) is the sharded path (docs/scale_out.md).
- `check_packing_attention`: the packing collator's dense 4D block-causal mask with a kernel that
  ignores it (flash attention) is refused: packed sequences would attend across each other.
- `update_resolution_warning` / `warn_update_resolution`: Adam steps too small for bf16 (or fp16)
  weights round away; a warning, not an error (docs/scale_out.md, "Precision").
- `check_reference`: an ``adapter`` reference without LoRA, or with a separate ``ref_model``, is refused
  (the stages call it before loading the policy).
- `check_evaluation_split`: ``validate`` / ``test`` without the split they evaluate (``data.val_split`` /
  ``data.test_split`` null or not in the source) is refused instead of evaluating nothing and exiting 0.
- `check_chat_template`: conversational training rows with a tokenizer that has no chat template
  raise the `DataError` the data path would raise only after the model loaded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn

from dpo_lightning._moved import import_module
from dpo_lightning.data.base import TokenizedDataModule
from dpo_lightning.data.columns import select_columns
from dpo_lightning.data.errors import DataError, RowRef
from dpo_lightning.data.formats import to_example
from dpo_lightning.data.sft_formats import Conversation, SFTLayout, to_sft_example
from dpo_lightning.data.sources import load_source


class ConfigError(ValueError):
    """Settings that cannot work together, found before anything loads; the CLI prints its one line."""

# Attention kernels that apply the packing collator's (R, 1, L, L) additive mask exactly (tested on CPU);
# None is transformers' default (sdpa).
MASK_KERNELS = (None, "sdpa", "eager")
# Collators whose rows hold several sequences isolated by that mask (pack: sequences; share: prefix-shared pairs).
PACKED_COLLATORS = ("pack", "share")
# Significand bits (the implicit one included) of the half-precision weight formats.
SIGNIFICAND_BITS = {"bfloat16": 8, "float16": 11}
# The magnitude of a typical weight of a trained transformer's linear layers (Llama-2-7B: std ~0.02).
TYPICAL_WEIGHT = 1e-2
PREVIEW_ROWS = 8  # training rows `check_chat_template` reads
# The split each evaluating subcommand reads: the data module's option naming it, and what the subcommand does.
EVALUATED_SPLITS = {"validate": ("val_split", "validate"), "test": ("test_split", "test")}


# ---------------------------------------------------------------------------------------------- trainer


def check_trainer_counts(trainer: Any) -> None:
    """`ConfigError` naming the ``trainer`` option whose value Lightning would divide by (or step against):
    ``accumulate_grad_batches`` and an integer ``val_check_interval`` or ``check_val_every_n_epoch`` below 1
    (a ``ZeroDivisionError`` after the data and the model loaded, or a modulo by a negative count), a negative
    ``gradient_clip_val`` (it scales each gradient by a negative factor). ``trainer``: its options, as a
    mapping or a jsonargparse Namespace."""
    at_least_one = {
        "accumulate_grad_batches": trainer.get("accumulate_grad_batches"),
        "check_val_every_n_epoch": trainer.get("check_val_every_n_epoch"),
    }
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):  # a float is a fraction of an epoch
        at_least_one["val_check_interval"] = interval
    for name, value in at_least_one.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"trainer.{name} must be >= 1, got {value}" + (
                " (null: validate by val_check_interval only)" if name == "check_val_every_n_epoch" else ""))
    clip = trainer.get("gradient_clip_val")
    if isinstance(clip, int | float) and not isinstance(clip, bool) and clip < 0:
        raise ConfigError(f"trainer.gradient_clip_val must be >= 0 (null or 0: no clipping), got {clip}")


# ---------------------------------------------------------------------------------------------- strategy


def _class_from_path(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError):
        return None  # Lightning reports an unknown class itself


def _strategy_class(strategy: Any) -> type | None:
    """The class a ``trainer.strategy`` value names: a registry name, a class path, a config
    (``{class_path, init_args}``), a class or an instance."""
    if strategy is None:
        return None
    if isinstance(strategy, type):
        return strategy
    if isinstance(strategy, str):

        if strategy in StrategyRegistry:
            return StrategyRegistry[strategy]["strategy"]
        return _class_from_path(strategy)
    class_path = strategy.get("class_path") if isinstance(strategy, Mapping) else getattr(strategy, "class_path", None)
    if isinstance(class_path, str):
        return _class_from_path(class_path)
    return type(strategy)


LIGHTNING_STRATEGIES = "lightning.pytorch.strategies"


def strategy_from_name(strategy: Any) -> Any:
    """``trainer.strategy`` as the Trainer takes it: a class path given as a plain value on the command line
    (``--trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy``, which the parser keeps as a
    string) becomes ``{class_path: ...}``; a name Lightning does not register is a `ConfigError`, not its
    traceback after the data was read."""
    if not isinstance(strategy, str) or strategy.lower() == "auto" or strategy.lower() in StrategyRegistry:
        return strategy
    path = strategy if "." in strategy else f"{LIGHTNING_STRATEGIES}.{strategy}"  # (ModelParallelStrategy)
    cls = _class_from_path(path)
    if isinstance(cls, type) and issubclass(cls, Strategy):
        return {"class_path": path, "init_args": {}}
    names = ", ".join(n for n in ("auto", "ddp", "ddp_spawn", "single_device") if n == "auto" or n in StrategyRegistry)
    raise ConfigError(
        f"trainer.strategy={strategy!r} is neither a strategy name ({names}, ...) nor a strategy class; for FSDP2 use "
        f"--trainer.strategy {LIGHTNING_STRATEGIES}.ModelParallelStrategy (docs/scale_out.md)"
    )


def check_sharded_checkpoint(ckpt_path: str, strategy: Any, subcommand: str) -> None:
    """ConfigError for a sharded FSDP2 checkpoint (a folder) outside FSDP2, which cannot read it (it was an
    ``IsADirectoryError`` traceback), with the two ways that work."""
    cls = _strategy_class(strategy)
    if not Path(ckpt_path).is_dir() or (isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)):
        return
    raise ConfigError(
        f"--ckpt_path {ckpt_path} is a sharded FSDP2 checkpoint, which only --trainer.strategy ModelParallelStrategy "
        f"reads; {subcommand} under it, or export the policy (python -m dpo_lightning export {ckpt_path} DIR) and "
        "give --model.model DIR"
    )


def check_strategy(strategy: Any) -> None:
    """ValueError for FSDP1: dpo_lightning can neither resume nor export its checkpoints."""
    cls = _strategy_class(strategy)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, FSDPStrategy)):
        return
    name = strategy if isinstance(strategy, str) else f"{cls.__module__}.{cls.__name__}"
    raise ConfigError(
        f"trainer.strategy={name} is FSDP1, which dpo_lightning does not support: its checkpoints cannot be resumed "
        "or exported (the frozen reference is left out of them, FSDP1 loads strictly, and the weights sit under "
        "other keys); use FSDP2, lightning.pytorch.strategies.ModelParallelStrategy, the supported sharded path "
        "(docs/scale_out.md)"
    )


# ---------------------------------------------------------------------------------------------- packing


def check_packing_attention(collator: str | None, attn_implementation: str | None) -> None:
    """ValueError when packed rows (``pack``, ``share``) meet an attention kernel that ignores their 4D mask."""
    if collator not in PACKED_COLLATORS or attn_implementation in MASK_KERNELS:
        return
    raise ConfigError(
        f"data.collator={collator} with model.attn_implementation={attn_implementation}: the {collator} collator "
        "isolates the sequences of a row with a dense 4D block mask, which this kernel does not apply, so packed "
        "sequences would attend to each other; use attn_implementation sdpa or eager with packed rows, or "
        "data.collator: pad (or auto) with flash attention"
    )


# ---------------------------------------------------------------------------------------------- precision


def check_reference(reference: str, lora: Any, ref_model: Any) -> None:
    """``reference`` (a strategy's short name) against the ``lora`` group and ``ref_model``: the ``adapter``
    reference is the LoRA policy with its adapters off, so it needs LoRA and no model of its own."""
    if reference != "adapter":
        return
    if lora is None:
        raise ConfigError("model.reference 'adapter' is the policy with its LoRA adapters off: set the lora group "
                          "(model.lora, e.g. {r: 16}), or use reference: copy")
    if ref_model is not None:
        raise ConfigError("model.reference 'adapter' uses the policy's own base weights: leave model.ref_model "
                          "unset, or use reference: copy to compare against it")


def _dtype_name(dtype: Any) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16``, ``"bfloat16"``, ``"bf16"``; None when unset."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name
    )


def trained_weights_dtype(precision: str | int | None, dtype: Any = None, lora: bool = False) -> str | None:
    """The dtype the optimizer updates in place: ``bf16-true`` / ``16-true`` convert every weight;
    otherwise the weights keep ``model.dtype`` (mixed precision autocasts the compute, not the weights),
    except LoRA adapters, which PEFT keeps in float32 over a half-precision base."""
    precision = str(precision) if precision is not None else ""
    if precision.startswith("bf16-true"):
        return "bfloat16"
    if precision.startswith("16-true"):
        return "float16"
    if lora:
        return "float32"
    return _dtype_name(dtype)


def update_resolution_warning(
    precision: str | int | None,
    lr: float | None,
    dtype: Any = None,
    *,
    lora: bool = False,
    optimizer: str | None = None,
    loaded: bool = False,
) -> str | None:
    """The warning for Adam-family updates that round away in half-precision weights, or None.

    An Adam step moves a weight by about ``lr`` whatever the gradient's scale. A weight ``w`` stored with
    ``p`` significand bits lies in some ``[2**e, 2**(e+1))`` where numbers are ``2**(e-p+1)`` apart; a step
    below half that spacing, ``2**(e-p) > |w| * 2**-(p+1)``, rounds back to ``w``. bf16 (p = 8) and
    ``|w| ~ 1e-2``: steps below 1e-2 * 2**-9 = 1.95e-5 leave the weight as it was.

    Args:
        precision: ``trainer.precision`` (``bf16-true``, ``bf16-mixed``, ``32-true``, ...).
        lr: the optimizer's learning rate (None: the stage's default AdamW, lr 1e-6).
        dtype: ``model.dtype``, or the trained parameters' dtype when called from a module.
        lora: LoRA adapters are trained (kept in float32 unless ``precision`` converts them).
        optimizer: the optimizer's class path; only the Adam family moves weights by ~lr per step.
        loaded: ``dtype`` is the dtype the weights loaded in with ``model.dtype`` unset (the checkpoint's own,
            transformers 5's default), not one the configuration asked for.
    """
    if optimizer is not None and "adam" not in optimizer.rsplit(".", 1)[-1].lower():
        return None
    weights = trained_weights_dtype(precision, dtype, lora)
    if weights not in SIGNIFICAND_BITS:
        return None
    lr = 1e-6 if lr is None else float(lr)
    floor = TYPICAL_WEIGHT * 2.0 ** -(SIGNIFICAND_BITS[weights] + 1)
    if lr >= floor:
        return None
    fix = (
        "keep fp32 master weights: trainer.precision bf16-mixed with model.dtype float32, or under FSDP2 "
        "precision 32-true, model.dtype float32 and model.memory.fsdp_mixed_precision: true (bf16 compute)"
    )
    setting = (f"model.dtype unset (the weights loaded in the checkpoint's {_dtype_name(dtype)})" if loaded
               else f"model.dtype={_dtype_name(dtype)}")
    return (
        f"trainer.precision={precision} with {setting} trains {weights} weights, and lr={lr:g} "
        f"is below {floor:.1e}: an Adam step moves a weight by ~lr, less than half the spacing of {weights} numbers "
        f"around |w|={TYPICAL_WEIGHT:g} ({SIGNIFICAND_BITS[weights]} significant bits), so most updates round away "
        f"and training stalls; {fix} (docs/scale_out.md, Precision)"
    )


def warn_update_resolution(*args: Any, **kwargs: Any) -> str | None:
    """`update_resolution_warning`, issued as a rank-zero warning; returns the message (None: nothing to say)."""
    message = update_resolution_warning(*args, **kwargs)
    if message:
        rank_zero_warn(message)
    return message


# ---------------------------------------------------------------------------------------------- data


@contextlib.contextmanager
def _quiet_data_warnings() -> Iterator[None]:
    """The data module warns about ignored columns when it builds; reading a few rows here should not too."""
    log = logging.getLogger("dpo_lightning.data")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _conversational(example: Any) -> bool:
    """A row the chat template must render: a conversation, or a prompt given as messages."""
    return isinstance(example, Conversation) or isinstance(example.prompt, list)


def build_data_module(cls: type[TokenizedDataModule], init_args: Mapping[str, Any]) -> TokenizedDataModule:
    """``cls(**init_args)``: validates the settings and reads nothing yet. A setting the class refuses (a batch size
    of 0, a collator it does not have) is a `ConfigError` naming the group and the class, ``data (KTODataModule):
    unknown collator 'share'; ...``, which the CLI prints in one line; a `DataError` stays one."""
    try:
        return cls(**dict(init_args))
    except (DataError, ConfigError):
        raise
    except ValueError as err:
        raise ConfigError(f"data ({cls.__name__}): {' '.join(str(err).split())}") from err


def check_chat_template(data_class: type | str, init_args: Mapping[str, Any], rows: int = PREVIEW_ROWS) -> None:
    """`DataError` when the first training rows are conversations and the tokenizer has no chat template.

    Reads the rows the way the data module will (`load_source`, its column selection and layout
    detection, the row validation of `formats` / `sft_formats`), and loads the tokenizer only when a
    row needs its template. A data module of another kind (not a ``TokenizedDataModule``) is not checked.

    Args:
        data_class: the data module class or its class path (``data.class_path``).
        init_args: its init arguments (``data.init_args``), as given to the class.
        rows: how many rows of the training split to read.
    """
    cls = _class_from_path(data_class) if isinstance(data_class, str) else data_class
    if not (isinstance(cls, type) and issubclass(cls, TokenizedDataModule)):
        return
    module = build_data_module(cls, init_args)
    hp = module.hparams
    source, split = module.source_name, hp.train_split
    with _quiet_data_warnings():
        raw = load_source(
            module._dataset_spec, hp.dataset_config, default_split=split, seed=hp.seed, cache_dir=hp.cache_dir
        )
        if split not in raw:
            raise DataError(f"{source}: no split {split!r} (available: {sorted(raw)})")
        head = raw[split].select(range(min(rows, len(raw[split]))))
        head = select_columns(
            DatasetDict({split: head}), [split], source, hp.get("columns"), hp.get("drop_columns"), module._layouts
        )[split]
    layout = module._layouts.detect(head.column_names, f"{source} (split {split!r})")
    convert = to_sft_example if isinstance(layout, SFTLayout) else to_example
    examples = [convert(row, layout, RowRef(source, split, i)) for i, row in enumerate(head)]
    if not any(_conversational(e) for e in examples):
        return
    tokenizer = module.tokenizer
    if getattr(tokenizer, "chat_template", None):
        return
    name = module._tokenizer_spec if isinstance(module._tokenizer_spec, str) else getattr(tokenizer, "name_or_path", "")
    raise DataError(
        f"data.tokenizer {name!r} has no chat_template, but the rows of data.dataset {source!r} (split {split!r}) are "
        "conversations (lists of messages), which only a chat template can render; use the tokenizer of an "
        "instruct/chat model (e.g. meta-llama/Llama-2-7b-chat-hf), or a tokenizer whose tokenizer_config.json has a "
        "chat_template (checked before any weights load)"
    )



def check_evaluation_split(subcommand: str | None, data_class: type | str, init_args: Mapping[str, Any]) -> None:
    """`ConfigError` when ``validate`` (``test``) has nothing to evaluate: ``data.val_split`` (``data.test_split``)
    is null or names a split the source does not have (a held-out ``val_fraction`` counts for ``validate``).
    Lightning would run over no batches and exit 0 with a warning about a zero-length loader. Reads the source's
    split names (`load_source`), no rows; other subcommands and data modules of another kind are not checked."""
    option, verb = EVALUATED_SPLITS.get(subcommand or "", (None, None))
    cls = _class_from_path(data_class) if isinstance(data_class, str) else data_class
    if option is None or not (isinstance(cls, type) and issubclass(cls, TokenizedDataModule)):
        return
    module = build_data_module(cls, init_args)
    hp = module.hparams
    if subcommand == "validate" and hp.get("val_fraction") is not None:
        return  # validation rows are held out of the train split
    split = hp.get(option)
    with _quiet_data_warnings():
        raw = load_source(
            module._dataset_spec, hp.dataset_config, default_split=hp.train_split, seed=hp.seed, cache_dir=hp.cache_dir
        )
    if split is not None and split in raw:
        return
    given = f"data.{option} is null" if split is None else f"data.{option} {split!r} is not one of its splits"
    also = " (or data.val_fraction to hold out part of the train split)" if subcommand == "validate" else ""
    raise ConfigError(
        f"{subcommand}: nothing to {verb}: data.dataset {module.source_name!r} has the splits {sorted(raw)} and "
        f"{given}; set data.{option} to one of them{also}"
    )
