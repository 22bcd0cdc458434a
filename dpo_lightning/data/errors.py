"""`DataError`: bad preference data, reported before training with the source, row and field."""

from __future__ import annotations

from typing import NamedTuple


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
