"""`PromptDataModule`: prompts to sample responses for, from the same sources and formats as training data.

Layouts (the column set decides; the first match wins):

- ``prompt``: a string or a list of messages (the responses of preference, prompt/completion or KTO
  rows beside it are what sampling replaces; other columns are named once as unread);
- ``chosen`` + ``rejected`` without a prompt (implicit-prompt pairs such as Anthropic HH): the
  prompt is their common start, split exactly as `PreferenceDataModule` splits it;
- ``messages``: a conversation; the prompt is everything before its last assistant turn.

Each prompt is tokenized exactly as the data modules tokenize the prompt side of a row: a string
as it is (BOS when the tokenizer adds one), messages through the chat template with the
generation prompt; longer than ``max_prompt_length`` -> its start is cut (``keep_end``), counted in
a warning. Batches are left-padded for ``generate``. Every prompt has a stable ``prompt_id``
(`samples_io.prompt_id`), so a re-run can skip the prompts already done (`exclude`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from .base import TokenizedDataModule
from .columns import Layouts
from .errors import DataError, RowRef, warn
from .formats import Layout, Text, check_role_order, check_text, to_example
from .render import _apply_template, _check_chat_template
from .tokenize import TokenizeConfig, special_tokens, truncate

NO_LENGTH_LIMIT = 1 << 30  # prompts are cut by max_prompt_length only


def prompt_id(prompt: Any, index: int) -> str:
    """A prompt's id: the first 16 hex digits of the sha256 of ``index`` and the prompt's JSON (keys
    sorted), the same in every process and run. The index keeps a prompt that occurs twice in the
    source as two prompts."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"{int(index)}\n{text}".encode()).hexdigest()[:16]


class PromptLayout(str, Enum):
    PROMPT = "prompt"
    IMPLICIT_PAIR = "implicit_pair"
    MESSAGES = "messages"


PROMPT_LAYOUT_COLUMNS: dict[PromptLayout, tuple[str, ...]] = {
    PromptLayout.PROMPT: ("prompt",),
    PromptLayout.IMPLICIT_PAIR: ("chosen", "rejected"),
    PromptLayout.MESSAGES: ("messages",),
}


def detect_prompt_layout(columns: Sequence[str], source: str) -> PromptLayout:
    present = set(columns)
    for layout, needed in PROMPT_LAYOUT_COLUMNS.items():
        if present.issuperset(needed):
            return layout
    expected = "; ".join(f"{layout.value}: {', '.join(cols)}" for layout, cols in PROMPT_LAYOUT_COLUMNS.items())
    raise DataError(f"{source}: cannot find prompts in the columns {sorted(present)}; expected one of ({expected})")


# Rows that hold responses besides their prompt (preference pairs, prompt/completion, KTO rows): the
# responses are what sampling replaces, so they are read without the unread-columns warning.
PROMPT_LAYOUTS = Layouts(
    PROMPT_LAYOUT_COLUMNS, detect_prompt_layout, {PromptLayout.PROMPT: ("chosen", "rejected", "completion", "label")}
)


def extract_prompt(row: Mapping[str, Any], layout: PromptLayout, ref: RowRef) -> Text:
    """The prompt of one row, validated; a `DataError` naming the row and field otherwise."""
    if layout is PromptLayout.PROMPT:
        prompt = check_text(row["prompt"], "prompt", ref)
        if not prompt:
            raise ref.error("prompt", "is empty")
        if isinstance(prompt, list):
            check_role_order(prompt, "prompt", ref, response_from=len(prompt))
        return prompt
    if layout is PromptLayout.IMPLICIT_PAIR:
        prompt = to_example(row, Layout.IMPLICIT_PROMPT, ref).prompt
        if not prompt:
            raise ref.error("chosen", "no common prompt before the two responses")
        return prompt
    messages = check_text(row["messages"], "messages", ref)
    if isinstance(messages, str) or not messages:
        raise ref.error("messages", "expected a non-empty list of {'role', 'content'} messages")
    check_role_order(messages, "messages", ref, response_from=len(messages))
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    if last == 0:
        raise ref.error("messages", "opens with the assistant: no prompt before it")
    return messages[:last]


@dataclass(frozen=True)
class _PromptPreprocessor:
    """The ``datasets.map`` function: raw rows -> prompt (JSON), prompt ids, index, cut flag."""

    tokenizer: PreTrainedTokenizerBase
    layout: PromptLayout
    config: TokenizeConfig
    source: str
    split: str

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        special = special_tokens(self.tokenizer)
        columns = PROMPT_LAYOUT_COLUMNS[self.layout]
        out: dict[str, list[Any]] = {"prompt": [], "prompt_id": [], "index": [], "input_ids": [], "cut": []}
        for offset, index in enumerate(indices):
            ref = RowRef(self.source, self.split, index)
            prompt = extract_prompt({c: batch[c][offset] for c in columns}, self.layout, ref)
            if isinstance(prompt, list):
                _check_chat_template(self.tokenizer, ref)
                text = _apply_template(self.tokenizer, prompt, True, ref, "prompt")
            else:
                text = prompt
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if special.add_bos and ids[:1] != [special.bos]:
                ids = [special.bos, *ids]
            keep_first = int(special.bos is not None and ids[:1] == [special.bos])
            side = truncate(ids, len(ids), self.config, keep_first)
            out["prompt"].append(json.dumps(prompt, ensure_ascii=False))
            out["prompt_id"].append(prompt_id(prompt, index))
            out["index"].append(index)
            out["input_ids"].append(side.input_ids)
            out["cut"].append(side.prompt_cut > 0)
        return out


@dataclass(frozen=True)
class LeftPaddingCollator:
    """Prompts -> ``input_ids`` / ``attention_mask`` ``(B, T)`` left-padded for ``generate``, plus
    ``index`` ``(B,)`` and the ``prompt_id`` and ``prompt`` (JSON) strings of each row."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, width - n :] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, width - n :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([f["index"] for f in features], dtype=torch.long),
            "prompt_id": [f["prompt_id"] for f in features],
            "prompt": [f["prompt"] for f in features],
        }


class ShardWithoutPadding(DistributedSampler):
    """Rank ``r`` of ``n`` takes positions ``r, r + n, ...`` in order, with no repeats: generating for a
    prompt twice would write it twice. (A ``DistributedSampler`` subclass, so Lightning keeps it.)

    With ``skip`` (positions an earlier run finished), the rank's batches (its positions in runs of
    ``batch_size``) whose every position is in ``skip`` are left out and the others kept whole: each
    batch sampled is the batch an uninterrupted run samples, so the numerics of its forward passes
    (which may depend on the batch's shape and padding) are the same too.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, shuffle: bool = False, batch_size: int = 1,
                 skip: frozenset[int] | set[int] = frozenset()) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle)
        mine = list(range(self.rank, len(dataset), self.num_replicas))
        batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        self.positions = [p for b in batches if not all(q in skip for q in b) for p in b]

    def __iter__(self):
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


class PromptDataModule(TokenizedDataModule):
    """Prompts from the Hub, local files or a built-in task, tokenized once, left-padded in batches
    for sampling (``trainer.predict``); see docs/generate.md. The settings it shares with every data
    module are `TokenizedDataModule`'s (``*args, **kwargs``), but for those of training splits and
    lengths, which it sets itself."""

    collators = {"left_pad": LeftPaddingCollator}
    batch_formats = ("prompts",)

    def __init__(self, *args: Any, split: str = "train", limit: int | None = None, **kwargs: Any) -> None:
        """
        Args:
            split: The split whose prompts are sampled.
            limit: Use only the first ``limit`` prompts of the split (None: all).
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive or None, got {limit}")
        # One split, no validation, no length limit but the prompt's, no padding rounding.
        super().__init__(*args, train_split=split, val_split=None, val_fraction=None, test_split=None,
                         max_length=NO_LENGTH_LIMIT, eval_batch_size=None, pad_to_multiple_of=None,
                         collator="left_pad", **kwargs)
        self._exclude: set[str] = set()

    @property
    def _layouts(self) -> Layouts:
        return PROMPT_LAYOUTS

    @property
    def _unit(self) -> str:
        return "prompts"

    def _preprocess(self, dataset: Dataset, split: str) -> Dataset:
        hp = self.hparams
        where = f"{self.source_name} (split {split!r})"
        if len(dataset) == 0:
            raise DataError(f"{where}: the split has no rows")
        if hp.limit is not None:
            dataset = dataset.select(range(min(hp.limit, len(dataset))))
        layout = detect_prompt_layout(dataset.column_names, where)
        config = TokenizeConfig(NO_LENGTH_LIMIT, hp.max_prompt_length, hp.truncation_mode)
        function = _PromptPreprocessor(self.tokenizer, layout, config, self.source_name, split)
        mapped = dataset.map(function, batched=True, with_indices=True, remove_columns=dataset.column_names,
                             num_proc=hp.num_proc if hp.num_proc and hp.num_proc > 1 else None,
                             desc=f"Tokenizing prompts of {split}")
        if cut := int(sum(mapped["cut"])):
            warn(f"{where}: truncation cut {cut} of {len(mapped)} prompts to max_prompt_length="
                 f"{hp.max_prompt_length} tokens (truncation_mode={hp.truncation_mode})")
        return mapped.remove_columns("cut")

    # -- sampling ----------------------------------------------------------------------------------

    @property
    def prompts(self) -> Dataset:
        """All prompts of the split (``prompt`` as JSON, ``prompt_id``, ``index``, ``input_ids``)."""
        return self.splits["train"]

    def exclude(self, prompt_ids: set[str]) -> int:
        """Leave out of the next predict loader the batches whose every prompt is in ``prompt_ids`` (done by an
        earlier run; a batch with one prompt left is sampled whole, as an uninterrupted run batches it);
        returns how many of the prompts are done."""
        self._exclude = set(prompt_ids)
        return sum(pid in self._exclude for pid in self.prompts["prompt_id"])

    def predict_dataloader(self) -> DataLoader:
        dataset = self.prompts
        skip = {i for i, pid in enumerate(dataset["prompt_id"]) if pid in self._exclude} if self._exclude else set()
        trainer = getattr(self, "trainer", None)
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ShardWithoutPadding(dataset, num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0),
                                      batch_size=self.hparams.batch_size, skip=skip)
        return self._loader(dataset, self.hparams.batch_size, shuffle=False, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        raise TypeError("PromptDataModule feeds trainer.predict (generation), not training")


__all__ = ["LeftPaddingCollator", "PromptDataModule", "PromptLayout", "extract_prompt"]
