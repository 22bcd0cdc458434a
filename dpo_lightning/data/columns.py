"""The dataset's column names -> ours (``columns``), columns left out (``drop_columns``), and the one
warning that names the columns no layout reads; applied to the raw splits before preprocessing.

Which layouts exist, and which columns each reads, depends on the kind of data (preference pairs,
unpaired KTO examples, SFT rows): a `Layouts` table says it, and every function here takes one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from datasets import DatasetDict

from .errors import DataError, warn
from .formats import LAYOUT_COLUMNS, OPTIONAL_COLUMNS, detect_layout
from .sources import check_decoded


@dataclass(frozen=True)
class Layouts:
    """The layouts of one kind of data: the columns each needs (in detection order), how the layout is
    told from a split's column names, and the columns a layout also reads when the data has them."""

    required: Mapping[Enum, tuple[str, ...]]
    detect: Callable[[Sequence[str], str], Enum]  # (column names, where) -> layout, or DataError
    optional: Mapping[Enum, tuple[str, ...]] = field(default_factory=dict)

    @property
    def fields(self) -> tuple[str, ...]:
        """Our field names, the keys ``columns`` may map: every column some layout reads."""
        names = [c for cols in (*self.required.values(), *self.optional.values()) for c in cols]
        return tuple(dict.fromkeys(names))

    def reads(self, layout: Enum, present: Sequence[str]) -> list[str]:
        """The columns `layout` reads from a split holding the columns `present`."""
        return [*self.required[layout], *(c for c in self.optional.get(layout, ()) if c in present)]


# Preference data: the pair layouts also read a per-pair `margin` when present (reward modelling).
PAIR_LAYOUTS = Layouts(LAYOUT_COLUMNS, detect_layout, OPTIONAL_COLUMNS)
# Unpaired (KTO) data: the same layouts, but nothing reads a margin, so it is an ignored column there.
UNPAIRED_LAYOUTS = Layouts(LAYOUT_COLUMNS, detect_layout)
FIELDS = PAIR_LAYOUTS.fields


def check_column_options(
    columns: Mapping[str, str] | None, drop_columns: Sequence[str] | None, fields: Sequence[str] = FIELDS
) -> None:
    """Settings that cannot work raise `ValueError` (at construction, before any data is read)."""
    columns, drop = dict(columns or {}), list(drop_columns or [])
    if unknown := [k for k in columns if k not in fields]:
        example = "prompt: question" if "prompt" in fields else f"{fields[0]}: their_name"
        raise ValueError(
            f"columns maps our field names to the dataset's ({{{example}, ...}}); unknown field(s) "
            f"{unknown}, expected some of {list(fields)}"
        )
    if bad := [v for v in columns.values() if not isinstance(v, str) or not v]:
        raise ValueError(f"columns: the dataset's column names must be non-empty strings, got {bad}")
    if len(set(columns.values())) < len(columns):
        raise ValueError(f"columns maps two fields to the same dataset column: {columns}")
    if both := sorted(set(drop) & set(columns.values())):
        raise ValueError(f"column(s) {both} are both read (columns) and dropped (drop_columns)")


def select_columns(
    raw: DatasetDict,
    splits: Sequence[str],
    source: str,
    columns: Mapping[str, str] | None = None,
    drop_columns: Sequence[str] | None = None,
    layouts: Layouts = PAIR_LAYOUTS,
) -> DatasetDict:
    """``raw`` with `splits` renamed to our field names and cut to the columns their layout (in
    `layouts`) reads.

    The other columns are named in one warning for all of `splits` (not one per split), except those
    listed in ``drop_columns``, which go without a word. A ``drop_columns`` name that none of `splits`
    has, a mapped column a split lacks, or one that would clash with a column of that name, is a
    `DataError`.
    """
    renames = {theirs: ours for ours, theirs in (columns or {}).items() if theirs != ours}
    drop = list(drop_columns or [])
    if missing := [c for c in drop if not any(c in raw[s].column_names for s in splits)]:
        names = sorted({c for s in splits for c in raw[s].column_names})
        raise DataError(f"{source}: drop_columns names column(s) {missing} that the data does not have ({names})")
    out, ignored, seen, where = dict(raw), {}, {}, []
    for split in splits:
        dataset = raw[split]
        here = f"{source} (split {split!r})"
        dataset = dataset.remove_columns([c for c in drop if c in dataset.column_names])
        for theirs, ours in renames.items():
            if theirs not in dataset.column_names:
                raise DataError(
                    f"{here}: columns maps {ours!r} to {theirs!r}, but there is no column {theirs!r} "
                    f"(columns: {dataset.column_names})"
                )
            if ours in dataset.column_names and ours not in renames:
                raise DataError(
                    f"{here}: columns maps {ours!r} to {theirs!r}, but the data also has a {ours!r} column; "
                    f"add {ours!r} to drop_columns to leave it out"
                )
        dataset = dataset.rename_columns(renames) if renames else dataset
        layout = layouts.detect(dataset.column_names, here)
        reads = layouts.reads(layout, dataset.column_names)
        if extra := [c for c in dataset.column_names if c not in reads]:
            ignored.update(dict.fromkeys(extra))
            seen[layout] = None
            where.append(split)
            dataset = dataset.select_columns(reads)
        out[split] = dataset
    data = DatasetDict(out)
    if renames:  # a renamed text column was not checked for mixed kinds on loading
        try:
            check_decoded(DatasetDict({s: data[s] for s in splits}), source)
        except DataError as err:
            raise DataError(f"{err} (the fields as named by columns={dict(columns or {})})") from None
    if ignored:
        needed = {layout: layouts.required[layout] for layout in seen}
        _warn_ignored(source, list(ignored), needed, where)
    return data


def _warn_ignored(source: str, ignored: list[str], needed: Mapping[Enum, tuple[str, ...]], splits: list[str]) -> None:
    reads = "; ".join(f"the {layout.value} layout reads only {', '.join(cols)}" for layout, cols in needed.items())
    where = f"split {splits[0]!r}" if len(splits) == 1 else f"splits {splits}"
    warn(
        f"{source}: ignoring column(s) {ignored} of {where}; {reads} (list them in drop_columns to drop "
        "them without this warning)"
    )
