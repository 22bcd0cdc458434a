"""LightningCLI over every training stage and data module: ``python -m dpo_lightning fit --config ...``.

Recipes (``recipes/*.yaml``) choose the stage (``model.class_path``; DPOModule when absent), the
data module (``data.class_path``; PreferenceDataModule when absent, which a KTO stage turns into
KTODataModule; SFTDataModule for SFT), the model, data, precision, strategy and devices; this file
only wires them: shared values are given once and linked, what a stage declares (the batch it
consumes, the metric its best checkpoint is chosen by) configures the data module and the
checkpoint, and the defaults a user expects (TensorBoard, progress bar, LR monitor, checkpoints,
seeding, an HF export at the end of
``fit``) are on unless a recipe says otherwise. Before any class is built, ``fit``/``validate``/``test``
run the preflight checks of `dpo_lightning.stages.preflight` (FSDP1, packing with flash attention, bf16 steps,
conversational rows without a chat template), so a wrong pairing fails before any weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dpo_lightning._moved import import_module
from dpo_lightning.cli.common import ShortErrorParser, instantiate_in_one_line, known_warnings_silenced
from dpo_lightning.cli.run_folders import (
    claim_evaluation_folder,
    claim_run_folder,
    logger_init_args,
    purge_logs_after,
    run_root,
)
from dpo_lightning.data import KTODataModule, PreferenceDataModule, SFTDataModule
from dpo_lightning.data.base import TokenizedDataModule
from dpo_lightning.references import reference_spec
from dpo_lightning.stages.base import CausalLMModule
from dpo_lightning.stages.checkpointing import FACTORIES_KEY
from dpo_lightning.stages.dpo import DPOModule, effective_reference
from dpo_lightning.stages.export import HFExport
from dpo_lightning.stages.options import recorded_groups
from dpo_lightning.stages.preflight import (
    ConfigError,
    check_chat_template,
    check_evaluation_split,
    check_packing_attention,
    check_sharded_checkpoint,
    check_strategy,
    check_trainer_counts,
    strategy_from_name,
    warn_update_resolution,
)
from dpo_lightning.training.callbacks import (
    LatestModelCheckpoint,
    NonFiniteGuard,
    StepProgressBar,
)
from dpo_lightning.training.folders import differences
from dpo_lightning.training.integrity import check_checkpoint
from dpo_lightning.training.optim import describe_config
from dpo_lightning.training.runs import (
    changed_hparams,
    claims_released_on_failure,
    find_last_checkpoint,
    read_checkpoint_header,
    version_of,
)

DATA_MODULES = (PreferenceDataModule, KTODataModule, SFTDataModule)  # named in the error for a stage's wrong data
PREFLIGHT_SUBCOMMANDS = ("fit", "validate", "test")  # those that load a model and read the training data's split
# What `--ckpt_path` does in each subcommand (fit resumes training; the others load the weights).
CKPT_VERBS = {"fit": "Resuming from", "validate": "Validating", "test": "Testing", "predict": "Predicting with"}
AUTO = "auto"  # checkpoint.monitor / filename: the stage's declared metric (CausalLMModule.checkpoint_monitor)


class DPOLightningCLI(LightningCLI):
    """LightningCLI with dpo_lightning's links and default callbacks."""

    def instantiate_classes(self) -> None:
        # A class's own ValueError (an unknown loss, a bad LoRA rank) arrives wrapped in jsonargparse's union
        # report; say it in one line, with the option group it came from.
        instantiate_in_one_line(self, super().instantiate_classes)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand")) if self.config.get("subcommand") else self.config
        if config is not None and config.get("model") is not None:
            _data_for_stage(config)  # before the resume check compares the data settings with the checkpoint's

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The stage (``model``) and ``data`` first, then ``trainer``: ``fit --help`` leads with what a user sets."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The tokenizer and the length budget are given once, in `data`, and linked to the model.
        defaults = {"model": {"class_path": _path(DPOModule)}, "data": {"class_path": _path(PreferenceDataModule)}}
        parser.set_defaults(defaults)
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")
        parser.link_arguments("data.init_args.trust_remote_code", "model.init_args.trust_remote_code")
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_length")

        # last.ckpt is always the latest state (Lightning's lags behind the top k); the best
        # checkpoint is chosen by the stage's declared metric unless the recipe names one.
        parser.add_lightning_class_args(LatestModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO,
                "checkpoint.save_last": True,
                "checkpoint.filename": AUTO,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # A NaN or inf loss or gradient stops the run before the step is applied.
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(HFExport, "export")

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (``last``: the newest run of the same name) and check it before anything loads.

        Replaces LightningCLI's version, which loads the whole checkpoint to read its
        hyper-parameters and then silently overrides the ones given now: here the configuration
        given now is what runs, and every value that differs from the checkpoint's is listed.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
            return
        logger = logger_init_args(config)
        root = run_root(logger)
        if ckpt_path == "last":
            found = find_last_checkpoint(root, config.get("checkpoint") and config.checkpoint.dirpath)
            if found is None:
                where = config.checkpoint.dirpath if config.get("checkpoint") and config.checkpoint.dirpath else root
                rank_zero_warn(f"--ckpt_path last: no last.ckpt under {where}; starting a new run from step 0")
                config.ckpt_path = None
                return
            config.ckpt_path = ckpt_path = str(found.path)
            version = found.version
        else:
            version = version_of(ckpt_path)
        check_checkpoint(ckpt_path)
        check_sharded_checkpoint(ckpt_path, strategy_from_name(config.trainer.get("strategy")), subcommand)
        # Continue in the resumed run's folder: its logs and checkpoints stay together. An evaluation of the
        # run's checkpoint logs in its own subfolder (version_N/validate), beside the training logs, not over them.
        if logger is not None and logger.get("version") is None and version is not None and root is not None:
            if Path(ckpt_path).resolve().is_relative_to((root / f"version_{version}").resolve()):
                logger.version = version if subcommand == "fit" else f"version_{version}/{subcommand}"
        checkpoint = config.get("checkpoint")
        if subcommand != "fit" and checkpoint is not None and checkpoint.get("dirpath") is None:
            # (Nothing is saved; the checkpoint callback's state restored from its own folder, without a warning.)
            checkpoint.dirpath = str(Path(ckpt_path).parent)
        header = read_checkpoint_header(ckpt_path)
        step = f" (optimizer step {header['global_step']}, epoch {header['epoch']})" if header else ""
        rank_zero_info(f"{CKPT_VERBS.get(subcommand, 'Loading')} {ckpt_path}{step}")
        if subcommand == "fit":  # (validate and test log no training steps)
            purge_logs_after(config, header.get("global_step") if header else None)
        changes = []
        if "hyper_parameters" in header and config.get("model") is not None:
            # The groups as the stage records them: `memory: null` in a config is the defaults it saved.
            current = recorded_groups(config.model.init_args.as_dict())
            if "reference" in current:  # `copy` and its class_path expansion are one setting
                current["reference"] = reference_spec(current["reference"])
                if issubclass(_stage_class(config), DPOModule):  # `copy` for reference-free losses is `none`
                    current["reference"] = effective_reference(current["reference"], current.get("ref_model"),
                                                               current.get("loss_type"))
            changes += changed_hparams(header["hyper_parameters"], current, "model")
        restored = []
        if FACTORIES_KEY in header and config.get("model") is not None:
            # The optimizer and scheduler are factories, not hyper-parameters: the checkpoint records them apart.
            init_args = config.model.init_args
            now = {key: describe_config(init_args.get(key)) for key in ("optimizer", "scheduler")}
            restored = differences(header[FACTORIES_KEY], now, "model.", label="checkpoint")
        if "datamodule_hyper_parameters" in header and config.get("data") is not None:
            data_now = config.data.init_args.as_dict()
            changes += changed_hparams(header["datamodule_hyper_parameters"], data_now, "data")
        if changes:
            rank_zero_warn(
                "resuming with settings that differ from the checkpoint's; the values given now apply:\n  "
                + "\n  ".join(changes)
            )
        if restored:
            rank_zero_warn(
                "resuming with optimizer or scheduler settings that differ from the checkpoint's; the checkpoint's "
                "apply (the optimizer and scheduler are restored with their state, learning rate included); to train "
                "with these, start a new run from the checkpoint's weights (export it, then --model.model):\n  "
                + "\n  ".join(restored)
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        stage = _stage_class(config)
        data = config.get("data")
        if data is not None:
            # The data module produces the batch the stage consumes (KTO: unpaired examples).
            _check_data_for_stage(stage, data.class_path)
        strategy = strategy_from_name(config.trainer.get("strategy"))
        if isinstance(strategy, dict):  # a class path given as a plain value on the command line
            config.trainer.strategy = Namespace(class_path=strategy["class_path"], init_args=Namespace())
        if self.subcommand in PREFLIGHT_SUBCOMMANDS:
            # Before any weights load: a bad combination fails in seconds, not after every rank loaded the model.
            self.check_settings(config)
            self.check_data(config)
        if self.subcommand == "fit":
            claim_run_folder(config)
        elif self.subcommand in ("validate", "test"):
            claim_evaluation_folder(config, self.subcommand)
        if self.subcommand in ("fit", None):  # None: built without running (run=False), for a fit of one's own
            _use_step_progress_bar(config.trainer)
        checkpoint = config.get("checkpoint")
        if checkpoint is not None:
            metric, mode = stage.checkpoint_monitor
            if checkpoint.monitor == AUTO:
                checkpoint.monitor, checkpoint.mode = metric, mode
            if checkpoint.filename == AUTO:
                name = checkpoint.monitor.rsplit("/", 1)[-1] if checkpoint.monitor else None
                checkpoint.filename = f"step{{step}}-{name}{{{checkpoint.monitor}:.3f}}" if name else "step{step}"

    def check_settings(self, config: Namespace) -> None:
        """Settings that cannot work (`preflight`): counts Lightning divides by, FSDP1, packing under flash
        attention; a warning for learning rates whose steps round away in bf16 weights."""
        trainer, model = config.trainer, config.model.init_args
        check_trainer_counts(trainer)
        check_strategy(trainer.get("strategy"))
        data = config.get("data")
        if data is not None:
            check_packing_attention(data.init_args.get("collator"), model.get("attn_implementation"))
        optimizer = model.get("optimizer")
        optimizer_args = optimizer.get("init_args") if isinstance(optimizer, Namespace) else None
        warn_update_resolution(
            trainer.get("precision"),
            optimizer_args.get("lr") if optimizer_args is not None else None,
            model.get("dtype"),
            lora=model.get("lora") is not None,
            optimizer=optimizer.get("class_path") if isinstance(optimizer, Namespace) else None,
        )

    def check_data(self, config: Namespace) -> None:
        """The first training rows against the tokenizer (`preflight.check_chat_template`), and for ``validate`` /
        ``test`` the split they evaluate (`preflight.check_evaluation_split`): reads data, no weights."""
        data = config.get("data")
        if data is not None:
            check_chat_template(data.class_path, data.init_args.as_dict())
            check_evaluation_split(self.subcommand, data.class_path, data.init_args.as_dict())


def _use_step_progress_bar(trainer: Namespace) -> None:
    """The training bar counts optimizer steps (``StepProgressBar``), unless the bar is off or the recipe
    names its own progress bar callback."""
    if trainer.get("enable_progress_bar") is False:
        return
    callbacks = list(trainer.get("callbacks") or [])
    if any("ProgressBar" in str(getattr(c, "class_path", type(c).__name__)) for c in callbacks):
        return
    callbacks.append(Namespace(class_path=_path(StepProgressBar), init_args=Namespace()))
    trainer.callbacks = callbacks


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _import(class_path: str) -> type:

    module, _, name = class_path.rpartition(".")
    return getattr(import_module(module), name)


def _stage_class(config: Namespace) -> type[CausalLMModule]:
    """The stage class a config chooses (``model.class_path``)."""
    return _import(config.model.class_path)


def _check_data_for_stage(stage: type[CausalLMModule], data_class_path: str) -> None:
    """ValueError before anything is built when the data module cannot make the stage's batches."""
    data = _import(data_class_path)
    makes = getattr(data, "batch_formats", None)
    if makes is None or stage.batch_format in makes:
        return
    fits = [_path(c) for c in DATA_MODULES if stage.batch_format in c.batch_formats]
    raise ConfigError(
        f"{stage.__name__} trains on {stage.batch_format!r} batches, which {data.__name__} does not make (it makes "
        f"{', '.join(repr(m) for m in makes)}); set data.class_path to {' or '.join(fits) or 'a data module for it'}"
    )


def _data_for_stage(config: Namespace) -> None:
    """The data module a stage that trains on unpaired examples (KTO) needs is `KTODataModule`: a config that
    gives such a stage `PreferenceDataModule` (the CLI's default, or a config written before KTODataModule, whose
    ``data.unpaired: true`` chose unpaired examples) gets KTODataModule with the same settings. ``data.unpaired``
    (deprecated: the data module's class says it) is dropped, with a warning naming the new setting."""
    data = config.get("data")
    if data is None or not isinstance(data.get("class_path"), str):
        return
    if _import(data.class_path) is not PreferenceDataModule:
        return
    init_args = data.init_args
    unpaired = init_args.get("unpaired")
    if "unpaired" in init_args:
        del init_args["unpaired"]
    if _stage_class(config).batch_format != KTODataModule.batch_formats[0]:
        if unpaired:  # `false` (what every saved DPO config says) is what a pair stage does: nothing to warn of
            rank_zero_warn(
                f"data.unpaired is deprecated and ignored (it was {unpaired}): unpaired (KTO) examples are "
                "data.class_path: dpo_lightning.KTODataModule; remove data.unpaired from the config",
                category=FutureWarning,
            )
        return
    if init_args.get("collator") in ("pad", "kto"):  # what KTO's collator was asked for before it had its own class
        init_args.collator = "auto"
    data.class_path = _path(KTODataModule)
    if unpaired is not None:
        rank_zero_warn(
            f"data.unpaired is deprecated: {_stage_class(config).__name__} trains on unpaired examples, which "
            "dpo_lightning.KTODataModule makes; data.class_path PreferenceDataModule + data.unpaired is read as "
            "data.class_path: dpo_lightning.KTODataModule (set that, and remove data.unpaired)",
            category=FutureWarning,
        )


def _fit_options() -> dict[str, Any]:
    """What `cli_main` gives LightningCLI besides the arguments."""
    return {
        "model_class": CausalLMModule,
        "datamodule_class": TokenizedDataModule,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "seed_everything_default": 42,
        # One optimizer knob: the stage's `model.optimizer`/`model.scheduler` (LightningCLI's top-level
        # --optimizer/--lr_scheduler would silently replace them and drop the warmup/decay schedule).
        "auto_configure_optimizers": False,
        "parser_kwargs": {
            # `--trainer.max_step 3` is a typo, not `--trainer.max_steps` (argparse took unique prefixes silently)
            "allow_abbrev": False,
            "prog": "python -m dpo_lightning",
            "description": "Preference tuning (DPO and relatives) on PyTorch Lightning. Subcommands: fit, validate, "
            "test, predict (below); `export CKPT OUT_DIR`: a training checkpoint to a Hugging Face folder "
            "(python -m dpo_lightning export --help); `generate --config ...`: sample responses from a policy, "
            "judge them and write preference pairs (python -m dpo_lightning generate --help); `iterate --config ...`: "
            "SFT then rounds of generate -> DPO, with a report (python -m dpo_lightning iterate --help).",
        },
        "trainer_defaults": {
            # TRL's habits: gradient-norm clipping at 1.0, a log line every 10 optimizer steps.
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 10,
            # Checkpoint files are written to a temporary name and renamed into place.
            "plugins": [{"class_path": "dpo_lightning.training.checkpoint.AtomicCheckpointIO"}],
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "dpo", "default_hp_metric": False},
            },
        },
        "save_config_kwargs": {"overwrite": True},
        "parser_class": ShortErrorParser,
    }


def cli_main(
    args: list[str] | None = None, run: bool = True, cli_class: type[DPOLightningCLI] = DPOLightningCLI
) -> DPOLightningCLI:
    """Build (and by default run) the CLI; ``args`` like the command line, None for ``sys.argv``. A run that fails
    (a setting refused after its ``version_N`` folder was claimed) leaves no empty run folder behind."""
    with known_warnings_silenced(), claims_released_on_failure():
        return cli_class(**_fit_options(), args=args, run=run)


