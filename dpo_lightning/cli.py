"""LightningCLI over DPOModule and PreferenceDataModule: ``python -m dpo_lightning fit --config ...``.

Recipes (``recipes/*.yaml``) choose model, data, precision, strategy and devices; this file
only wires them: shared values are given once and linked, and the defaults a user expects
(TensorBoard, progress bar, LR monitor, checkpoints on a validation metric, seeding, an HF
export at the end of ``fit``) are on unless a recipe says otherwise.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dpo_lightning.checkpoint import LatestModelCheckpoint
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.export import HFExport
from dpo_lightning.module import DPOModule

ACCURACY = "val/rewards/accuracies"
ACCURACY_FILENAME = "step{step}-acc{val/rewards/accuracies:.3f}"


class DPOLightningCLI(LightningCLI):
    """LightningCLI with dpo_lightning's links and default callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The tokenizer and the length budget are given once, in `data`, and linked to the model.
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.link_arguments("data.trust_remote_code", "model.trust_remote_code")
        parser.link_arguments("data.max_length", "model.max_length")
        # KTO trains on unpaired examples: paired data is split into desirable/undesirable ones.
        parser.link_arguments("model.loss_type", "data.unpaired", compute_fn=_is_kto)

        # last.ckpt is the latest state at every validation (Lightning's lags behind the top k).
        parser.add_lightning_class_args(LatestModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": ACCURACY,
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": ACCURACY_FILENAME,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def before_instantiate_classes(self) -> None:
        # KTO logs no pairwise accuracy (as in TRL): keep its best checkpoint by val/loss instead,
        # unless the user chose what to monitor.
        config = self.config[self.subcommand] if self.subcommand else self.config
        checkpoint = config.get("checkpoint")
        if checkpoint is None or not _is_kto(config.model.loss_type) or checkpoint.monitor != ACCURACY:
            return
        checkpoint.monitor = "val/loss"
        if checkpoint.mode == "max":
            checkpoint.mode = "min"
        if checkpoint.filename == ACCURACY_FILENAME:
            checkpoint.filename = "step{step}-loss{val/loss:.3f}"


def _is_kto(loss_type: str | list[str]) -> bool:
    return loss_type == "kto" or loss_type == ["kto"]


def cli_main(
    args: list[str] | None = None, run: bool = True, cli_class: type[DPOLightningCLI] = DPOLightningCLI
) -> DPOLightningCLI:
    """Build (and by default run) the CLI; ``args`` like the command line, None for ``sys.argv``."""
    return cli_class(
        DPOModule,
        PreferenceDataModule,
        seed_everything_default=42,
        trainer_defaults={
            # Checkpoint files are written to a temporary name and renamed into place.
            "plugins": [{"class_path": "dpo_lightning.checkpoint.AtomicCheckpointIO"}],
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "dpo"},
            },
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``dpo-lightning`` / ``python -m dpo_lightning``."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["export"]:
        from dpo_lightning.export import main as export_main

        export_main(words[1:])
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself
