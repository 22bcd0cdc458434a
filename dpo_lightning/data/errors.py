"""How the data path reports: `DataError` for bad data (with the source, row and field), `warn` for
what it drops, cuts or ignores (with a count), so that nothing is lost silently."""

from __future__ import annotations

import logging
from typing import NamedTuple

from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("dpo_lightning.data")


class DataError(ValueError):
    """Preference data that cannot be used as given; the message says where and why."""


class RowRef(NamedTuple):
    """Where a row comes from, so an error can point at it (`index` is 0-based within the split)."""

    source: str
    split: str
    index: int

    def error(self, field: str, problem: str) -> DataError:
        where = f"{self.source} (split {self.split!r}), row {self.index}, field {field!r}"
        return DataError(f"{where}: {problem}")


def warn(message: str, *args: object) -> None:
    """Log at WARNING (shown at the default log level; INFO is not) on global rank 0 only: every
    rank prepares the same data, and one line per fact is what the user should read."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.warning(message, *args, stacklevel=2)
