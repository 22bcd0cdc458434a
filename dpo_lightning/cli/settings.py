"""The whole configuration a command runs with, resolved without building or running anything: what a pipeline
stage records as the settings that made its output."""

from __future__ import annotations

from typing import Any, Literal

from jsonargparse import Namespace

from dpo_lightning.cli.common import known_warnings_silenced
from dpo_lightning.cli.fit import DPOLightningCLI, _fit_options
from dpo_lightning.cli.generate import GenerateCLI, _generate_options


class _SettingsOnly:
    """Parses and checks a command's configuration; reads no data, builds and runs nothing."""

    def check_data(self, config: Namespace) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


class _FitSettings(_SettingsOnly, DPOLightningCLI):
    pass


class _GenerateSettings(_SettingsOnly, GenerateCLI):
    pass


class _ParseOnly(_SettingsOnly):
    """Parses a command's configuration and nothing more: the files it names are not checked, no folder claimed."""

    def before_instantiate_classes(self) -> None:
        pass


class _FitParse(_ParseOnly, DPOLightningCLI):
    pass


class _GenerateParse(_ParseOnly, GenerateCLI):
    pass


def resolved_config(command: Literal["fit", "generate"], args: list[str]) -> dict[str, Any]:
    """The configuration ``python -m dpo_lightning <command> ARGS`` runs with, every default filled in, as plain
    data (``config``, the recipe files' names, left out: their content is in it); nothing is read or built.
    What a pipeline stage records as the settings that made its output."""
    with known_warnings_silenced():
        return _resolved_config(command, args)


def trainer_settings(command: Literal["fit", "generate"], args: list[str]) -> dict[str, Any]:
    """The ``trainer`` settings ``python -m dpo_lightning <command> ARGS`` runs with (``devices``, ``num_nodes``, ...),
    parsed only: unlike `resolved_config`, the files the command names need not exist yet and no run folder is
    claimed (what `iterate` reads before its first stage, to tell how many processes each stage runs on)."""
    with known_warnings_silenced():
        # seed_everything false: a parse that seeds no random generator (nor says so on the console)
        return _resolved_config(command, [*args, "--seed_everything", "false"], parse_only=True)["trainer"]


def _resolved_config(command: Literal["fit", "generate"], args: list[str], parse_only: bool = False) -> dict[str, Any]:
    if command == "fit":
        cli_class = _FitParse if parse_only else _FitSettings
        config = cli_class(**_fit_options(), args=["fit", *args]).config["fit"]
    else:
        cli_class = _GenerateParse if parse_only else _GenerateSettings
        config = cli_class(**_generate_options(), args=["predict", *args]).config["predict"]
    out = config.as_dict()
    out.pop("config", None)
    return out
