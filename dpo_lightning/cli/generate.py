"""``python -m dpo_lightning generate``: LightningCLI over `GenerationModule` and `PromptDataModule`, sampling,
judging and pairing through ``trainer.predict``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dpo_lightning.cli.common import ShortErrorParser, instantiate_in_one_line, known_warnings_silenced
from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.generation import vllm_backend
from dpo_lightning.generation.module import GenerationModule
from dpo_lightning.generation.writer import JudgedSamplesWriter
from dpo_lightning.models.loading import check_local_source
from dpo_lightning.stages.preflight import (
    ConfigError,
)
from dpo_lightning.training.callbacks import (
    PreemptionWatch,
)


class GenerateCLI(LightningCLI):
    """``python -m dpo_lightning generate``: sample, judge and pair through ``trainer.predict``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.link_arguments("data.trust_remote_code", "model.trust_remote_code")
        parser.add_lightning_class_args(_writer_class(), "output")

    def before_instantiate_classes(self) -> None:
        # A backend that cannot run and a mistyped judge fail here, before the prompts and the weights load.
        config = self.config[self.subcommand]
        model, trainer = config.model, config.trainer
        vllm_backend.check_backend(model.backend, model.vllm, model.attn_implementation, model.temperature)
        if model.backend == "vllm":
            vllm_backend.check_trainer(trainer.accelerator, trainer.devices, trainer.num_nodes, trainer.strategy,
                                       trainer.precision)
            vllm_backend.require_vllm()
        _check_local_paths(config)
        output = config.output
        try:
            _writer_class().check_judge(output.judge, output.judge_options)
        except (ValueError, FileNotFoundError) as err:  # one line from `main`, not a traceback
            raise ConfigError(f"output.judge: {err}") from err

    def instantiate_classes(self) -> None:
        instantiate_in_one_line(self, super().instantiate_classes)


def _check_local_paths(config: Any) -> None:
    """`ConfigError` naming the option when ``model.model`` or ``data.tokenizer`` is a local path that does not exist
    (the usual cause: the training run that exports it has not run, or landed in another ``version_N``), before
    the prompts or any weights load."""
    for option, spec in (("model.model", config.model.get("model")), ("data.tokenizer", config.data.get("tokenizer"))):
        if not isinstance(spec, str):
            continue
        try:
            check_local_source(spec, option)
        except FileNotFoundError as err:
            hint = ("; it is a training run's export: run that fit first, or give the version_N it wrote"
                    if Path(spec).name == "hf_export" else "")
            raise ConfigError(f"{err}{hint}") from err


def _writer_class() -> type:

    return JudgedSamplesWriter


def _generate_options() -> dict[str, Any]:
    """What `generate_main` gives LightningCLI besides the arguments."""
    return {
        "model_class": GenerationModule,
        "datamodule_class": PromptDataModule,
        "seed_everything_default": 42,
        "auto_configure_optimizers": False,
        "save_config_callback": None,
        "parser_kwargs": {
            "allow_abbrev": False,  # a prefix of an option is a typo, not that option
            "prog": "python -m dpo_lightning generate",
            "description": "Sample N responses per prompt from a policy, score them with a judge, write "
            "samples.jsonl and preference pairs (pairs.jsonl) for DPO (docs/generate.md).",
        },
        "trainer_defaults": {"logger": False, "enable_checkpointing": False},
        "parser_class": ShortErrorParser,
    }


def generate_main(
    args: list[str] | None = None, run: bool = True, cli_class: type[GenerateCLI] = GenerateCLI
) -> GenerateCLI:
    """``python -m dpo_lightning generate --config recipes/tiny_generate.yaml`` (``args`` after ``generate``).

    A SIGTERM from the start (while the policy loads) stops the run at its first batch with `Preempted`."""
    with PreemptionWatch("stopping at the first batch, then exiting"), known_warnings_silenced():
        return cli_class(
            **_generate_options(),
            # Records go to disk as they finish; holding every prediction in memory too would only cost.
            args=["predict", "--return_predictions", "false", *(sys.argv[2:] if args is None else args)],
            run=run,
        )


