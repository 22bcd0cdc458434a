"""What every command of the CLI shares: the parser with short errors, a class's own error at instantiation
said in one line, and the Lightning warnings silenced while a command runs."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dpo_lightning.cli.config_errors import ShortErrors, init_error
from dpo_lightning.stages.preflight import ConfigError

# Lightning warnings that are wrong about these stages, silenced while a command runs (never at import: the
# process's filters are its owner's):
KNOWN_WARNINGS = (
    # the frozen reference is meant to be in eval mode; Lightning warns about it at every fit
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # the metrics are synced as sums before they are logged (training/metrics.py): sync_dist would re-average them
    r"It is recommended to use `self\.log\('(train|val|test)(/|_)",
    # `generate`, `iterate`'s stages and Python callers hand LightningCLI their arguments on purpose
    "LightningCLI's args parameter is intended to run from within Python",
    # FSDP2 warns that the policy's output (logits, a view) would lose its pre-backward hook to an in-place op; the
    # stages apply none to it, and FSDP2 training matches one process (tests/test_distributed.py)
    r"FSDP2-wrapped module \(FSDP\w*(ForCausalLM|ForSequenceClassification|PeftModel\w*)\) returned a view tensor",
)


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """`KNOWN_WARNINGS` ignored inside, the warning filters as they were after."""
    with warnings.catch_warnings():
        for message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def instantiate_in_one_line(cli: LightningCLI, instantiate: Callable[[], None]) -> None:
    """``instantiate()`` (the CLI's ``super().instantiate_classes``), with a class's own ValueError (an unknown loss,
    a bad LoRA rank), which arrives wrapped in jsonargparse's union report, raised again as a one-line
    `ConfigError` naming the option group it came from (`config_errors.init_error`); the Trainer's refusal of its
    own options (`MisconfigurationException`: ``max_steps -5``) as ``trainer: <its message>``; any other error as
    it was."""
    try:
        instantiate()
    except MisconfigurationException as err:
        raise ConfigError(f"trainer: {' '.join(str(err).split())}") from err
    except ValueError as err:
        short = init_error(err, cli.config.get(cli.subcommand) if cli.subcommand else cli.config)
        if short is None:
            raise
        raise ConfigError(short) from err


class ShortErrorParser(ShortErrors, LightningArgumentParser):
    """The CLI's parser: LightningArgumentParser with one- or two-line errors."""


