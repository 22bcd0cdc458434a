"""``val_fraction``: a seeded held-out part of the tokenized train split, and how much of it leaks.

Preference data often repeats pairs (scraped twice, or the same prompt and answers under several
ids). Holding out a fraction of such data puts copies of some validation pairs in the training
split, and their validation metrics then measure memorisation. `count_in` counts those pairs by
their token ids after truncation (the exact sequences the model sees), from arrow buffers, so it
costs one pass over the ids and no Python lists of tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from datasets import Dataset

_BATCH = 4096


def hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): ``fraction`` of the rows, drawn with ``seed``, go to validation."""
    parts = dataset.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def _cells(column: pa.Array) -> Iterator[object]:
    """Hashable values of one column: the bytes of each id list, the value of each scalar."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy()  # offsets index `values`
        return (values[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:]))
    return iter(column.to_pylist())


def row_keys(dataset: Dataset) -> Iterator[int]:
    """A hash of each row over all its columns (token ids, response starts, labels)."""
    for batch in dataset.with_format("arrow").iter(batch_size=_BATCH):
        columns = [_cells(batch.column(name).combine_chunks()) for name in batch.column_names]
        yield from (hash(cells) for cells in zip(*columns))


def count_in(validation: Dataset, train: Dataset) -> int:
    """How many validation rows also occur in train, token for token."""
    seen = set(row_keys(train))
    return sum(key in seen for key in row_keys(validation))
