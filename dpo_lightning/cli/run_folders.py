"""The run folders of `fit`, `validate` and `test` (``<save_dir>/<name>/version_N``), read from the logger's config
before any class is built: a new run claims its folder, a resumed one continues in its own, an evaluation logs
beside the run it evaluates (or in ``<name>/<subcommand>/version_K``), and TensorBoard forgets a killed run's steps."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_only

from dpo_lightning.training.runs import claim_version


def first_logger(config: Namespace) -> Namespace | None:
    """The (first) logger's config, as a Namespace with ``class_path`` and ``init_args``; None for none or ``false``."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger if isinstance(logger, Namespace) else None


def logger_init_args(config: Namespace) -> Namespace | None:
    """The init args of a logger configured with ``save_dir`` (TensorBoard, CSV), else None."""
    logger = first_logger(config)
    init_args = getattr(logger, "init_args", None) if logger is not None else None
    return init_args if init_args is not None and init_args.get("save_dir") is not None else None


def purge_logs_after(config: Namespace, step: int | None) -> None:
    """A run killed without a final save (``kill -9``, a node failure) logged steps after its last checkpoint; the
    resumed run logs them again. TensorBoard's ``purge_step`` (a session start at ``step + 1`` in the new event
    file) makes TensorBoard drop the killed run's events from that step on, so the run's logs read as one run's."""
    logger = first_logger(config)
    if step is None or logger is None or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return
    if logger.init_args.get("purge_step") is None:
        logger.init_args.purge_step = int(step) + 1


def run_root(logger: Namespace | None) -> Path | None:
    """``<save_dir>/<name>``, the folder holding the ``version_N`` run folders."""
    if logger is None:
        return None
    return Path(logger.save_dir) / (logger.get("name") or "")


def claim_run_folder(config: Namespace) -> None:
    """Give a new run its own ``version_N`` folder, claimed atomically (rank 0 decides; the trainer
    broadcasts its log_dir to the other ranks); `cli_main` gives it back if the run fails while it is empty."""
    logger = logger_init_args(config)
    if logger is None or logger.get("version") is not None or rank_zero_only.rank != 0:
        return
    logger.version = claim_version(run_root(logger))


def claim_evaluation_folder(config: Namespace, subcommand: str) -> None:
    """``validate``/``test`` not of a run's checkpoint log to ``<save_dir>/<name>/<subcommand>/version_K``: an
    evaluation never takes a training run's ``version_N`` (the next ``fit`` still gets the number recipes expect)."""
    logger = logger_init_args(config)
    if logger is None or logger.get("version") is not None or rank_zero_only.rank != 0:
        return
    logger.version = f"{subcommand}/version_{claim_version(run_root(logger) / subcommand)}"
