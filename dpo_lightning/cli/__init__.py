"""The command line: ``python -m dpo_lightning <subcommand>`` (also ``dpo-lightning``).

`SUBCOMMANDS` maps each subcommand that is not LightningCLI's own to the function that runs it, named as
``"module:function"`` and imported when chosen: ``iterate`` runs the pipeline, which runs the stage
commands of `fit` and `generate`, so the pipeline sits between this map and them and nothing imports upwards.
``fit``, ``validate`` and ``test`` go to LightningCLI (`fit.cli_main`); `generate` wires sampling and judging;
`settings.resolved_config` is a command's whole configuration, resolved without running it (`trainer_settings`: its
trainer settings, parsed only); `common` holds the parser with short errors (`config_errors`) and the warnings
silenced while a command runs.
"""

from __future__ import annotations

import sys

from dpo_lightning._moved import import_object
from dpo_lightning.cli.common import ShortErrorParser, known_warnings_silenced
from dpo_lightning.cli.fit import DPOLightningCLI, cli_main
from dpo_lightning.cli.generate import GenerateCLI, generate_main
from dpo_lightning.cli.settings import resolved_config, trainer_settings
from dpo_lightning.data.errors import DataError
from dpo_lightning.stages.export import ExportError
from dpo_lightning.stages.preflight import ConfigError
from dpo_lightning.training.callbacks import NonFiniteError, Preempted
from dpo_lightning.training.folders import FolderError
from dpo_lightning.training.integrity import CheckpointError
from dpo_lightning.training.preemption import stop_with_launcher

# subcommand -> "module:function(argv)"; the rest (fit, validate, test) are LightningCLI's
SUBCOMMANDS: dict[str, str] = {
    "export": "dpo_lightning.stages.export:main",
    "generate": "dpo_lightning.cli.generate:generate_main",
    "iterate": "dpo_lightning.pipeline.rounds:main",
}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``dpo-lightning`` / ``python -m dpo_lightning``.

    Errors the user can act on (bad data, a bad checkpoint, a diverging run, preemption) end the
    process with one line and a non-zero status instead of a traceback: 1 for errors, 143 when a
    preempted run saved its checkpoint (a scheduler can tell that from success and from failure), 130 when Ctrl-C
    stopped it after saving.
    """
    words = sys.argv[1:] if argv is None else argv
    stop_with_launcher()  # a rank Lightning started stops when its launcher is killed
    with known_warnings_silenced():
        try:
            if words[:1] and words[0] in SUBCOMMANDS:
                import_object(SUBCOMMANDS[words[0]])(words[1:])
            else:
                cli_main(argv)  # None: LightningCLI reads sys.argv itself
        except Preempted as err:
            print(f"dpo_lightning: {'interrupted' if err.signal_name == 'SIGINT' else 'preempted'}: {err}",
                  file=sys.stderr)
            sys.exit(err.exit_code)
        except (NonFiniteError, CheckpointError, DataError, ExportError, ConfigError, FolderError) as err:
            print(f"dpo_lightning: error: {err}", file=sys.stderr)
            sys.exit(1)


__all__ = [
    "SUBCOMMANDS",
    "DPOLightningCLI",
    "GenerateCLI",
    "ShortErrorParser",
    "cli_main",
    "generate_main",
    "main",
    "resolved_config",
    "trainer_settings",
]
