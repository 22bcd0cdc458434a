"""Raw split -> tokenized unpaired (KTO) examples, in the one ``datasets.map`` pass of `preprocess`.

Unpaired prompt/completion/label rows give one example each; pairs give two (chosen desirable, rejected
undesirable), so the output may have more rows than the input. The fields are `UNPAIRED_FIELDS`: prompt +
completion ids, where the completion starts, the label; `kto_collate.KTOCollator` batches them. KTO reads
no ``margin`` (a margin column is named among the ignored ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .formats import PreferenceExample, unpair
from .preprocess import Drop, RowPreprocessor, cut_bits, detect_rows, tokenize_rows
from .render import render_unpaired
from .tokenize import TokenizeConfig, tokenize_completions

# The per-example fields of unpaired data (KTO): prompt + completion ids, where the completion
# starts, and the label. The KTO collator slices prompt and completion apart to build its KL rows.
UNPAIRED_FIELDS = ("input_ids", "response_start", "desirable")


@dataclass(frozen=True)
class UnpairedPreprocessor(RowPreprocessor):
    """The ``datasets.map`` function for unpaired data: raw rows -> `UNPAIRED_FIELDS` + ``drop``.

    Unpaired rows give one example each; pairs give two (chosen desirable, rejected undesirable),
    so the output may have more rows than the input. A dropped pair leaves one placeholder row,
    except one made identical by truncation: both its examples are dropped (and counted).
    """

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        drop, desirable, rendered, kept, pairs = [], [], [], [], []
        for ref, example in self.examples(batch, indices):
            if isinstance(example, PreferenceExample):
                if self.drop_identical and example.identical:
                    drop.append(Drop.IDENTICAL)
                    desirable.append(False)
                    continue
                pairs.append((len(drop), len(drop) + 1))
                examples = unpair(example)
            else:
                examples = (example,)
            for unpaired in examples:
                kept.append(len(drop))
                drop.append(Drop.KEEP)
                desirable.append(unpaired.desirable)
                rendered.append(render_unpaired(unpaired, self.tokenizer, ref))
        out: dict[str, list[Any]] = {"input_ids": [[]] * len(drop), "response_start": [0] * len(drop)}
        out["desirable"], out["drop"], out["cut"] = desirable, [int(d) for d in drop], [0] * len(drop)
        for row, side in zip(kept, tokenize_completions(rendered, self.tokenizer, self.config)):
            if side.response_length == 0:
                out["drop"][row] = int(Drop.EMPTY_RESPONSE)
                continue
            out["input_ids"][row], out["response_start"][row] = side[:2]
            out["cut"][row] = cut_bits(side)
        for chosen, rejected in pairs:
            same = out["input_ids"][chosen] == out["input_ids"][rejected]
            if self.drop_identical and same and out["drop"][chosen] == out["drop"][rejected] == Drop.KEEP:
                out["drop"][chosen] = out["drop"][rejected] = int(Drop.IDENTICAL_AFTER_TRUNCATION)
        return out


def preprocess_unpaired_split(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    *,
    source: str,
    split: str,
    drop_identical: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Validate, render and tokenize one split as unpaired examples (from unpaired rows, or from pairs split
    in two); the result holds only `UNPAIRED_FIELDS`."""
    where = f"{source} (split {split!r})"
    layout = detect_rows(dataset, where)
    function = UnpairedPreprocessor(tokenizer, layout, config, source, split, drop_identical)
    return tokenize_rows(dataset, function, where, unit="examples", num_proc=num_proc)


__all__ = ["UNPAIRED_FIELDS", "UnpairedPreprocessor", "preprocess_unpaired_split"]
