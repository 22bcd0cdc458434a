"""The judge interface: one number per (prompt, response) row, the scores that `pairing.make_pairs` turns into pairs.

One interface, `Judge.score(prompts, responses) -> list[float | None]` over aligned lists, and one
small class per kind, each in its own file of this folder, chosen by a short name (`registry.resolve_judge`):

| spec | class | scores with |
|---|---|---|
| ``function:package.module:function`` | `function.FunctionJudge` | a Python function ``(prompt, response) -> float`` |
| ``reward_model:<path or hub id>`` | `reward_model.RewardModelJudge` | a sequence classifier with one label |
| ``llm_pairwise:<path or hub id>`` | `llm.LLMPairwiseJudge` | a causal LM asked which of two is better |
| ``llm_score:<path or hub id>`` | `llm.LLMScoreJudge` | a causal LM asked to rate one response |

A row the judge cannot score is None, never an abort: the function raised, returned something that is
not a finite number or ran past its timeout; the response has too many tokens for the reward model.
Each judge counts what failed and why in its `JudgeStats` (``judge.stats``), which `warn_failures`
reports as one warning line.

A new kind of judge is one file here: it subclasses `Judge`, implements `Judge.score_rows` and `Judge.spec`,
and joins `registry.JUDGES` under its prefix as ``"module:Class"``, imported when a spec names it. A pairwise
judge turns its comparisons of one prompt's responses into per-response scores (`LLMPairwiseJudge`: mean win
probability).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from dpo_lightning.data.collate import right_pad
from dpo_lightning.data.errors import warn
from dpo_lightning.data.formats import Text

log = logging.getLogger(__name__)

# How many examples of each failure reason the stats keep, and how long each may be.
MAX_EXAMPLES = 3
_EXAMPLE_CHARS = 200


class Failure(NamedTuple):
    """Why one row has no score. Rows with the same ``reason`` are counted together in `JudgeStats`."""

    reason: str  # e.g. "raised ValueError", "NaN", "timed out (> 2 s)", "too long"
    detail: str = ""  # e.g. the exception's message; shown as an example


@dataclass
class JudgeStats:
    """How many rows a judge scored and how many it could not, by reason, with a few examples each."""

    scored: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> rows
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to MAX_EXAMPLES details

    @property
    def total(self) -> int:
        return self.scored + sum(self.failed.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def record(self, failure: Failure | None) -> None:
        """Count one row: scored (None) or failed."""
        if failure is None:
            self.scored += 1
            return
        self.failed[failure.reason] += 1
        kept = self.examples.setdefault(failure.reason, [])
        if failure.detail and len(kept) < MAX_EXAMPLES:
            kept.append(_shorten(failure.detail))

    def merge(self, other: JudgeStats) -> JudgeStats:
        """These counts plus ``other``'s (e.g. gathered from the other ranks), as new stats."""
        out = JudgeStats(self.scored + other.scored, self.failed + other.failed)
        for stats in (self, other):
            for reason, details in stats.examples.items():
                kept = out.examples.setdefault(reason, [])
                kept.extend(details[: MAX_EXAMPLES - len(kept)])
        return out

    def message(self, spec: str) -> str | None:
        """The warning line, None when every row was scored: ``judge function:m:f: 3 of 800 responses
        could not be scored (2 raised ValueError: <first message>, 1 NaN); they are left out of the pairs``."""
        if not self.failed:
            return None
        parts = []
        for reason, count in sorted(self.failed.items(), key=lambda item: (-item[1], item[0])):
            example = self.examples.get(reason)
            parts.append(f"{count} {reason}" + (f": {example[0]}" if example else ""))
        return (f"judge {spec}: {self.n_failed} of {self.total} responses could not be scored ({', '.join(parts)}); "
                "they are left out of the pairs")


def warn_failures(stats: JudgeStats, spec: str) -> str | None:
    """Log `JudgeStats.message` as one WARNING (global rank 0 only, `data.errors.warn`); return it."""
    message = stats.message(spec)
    if message is not None:
        warn("%s", message)
    return message


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 3] + "..."


def as_score(value: Any) -> float | Failure:
    """A finite float, or the `Failure` saying why ``value`` is not one (NaN, infinite, not a number).

    ``bool`` is not a number here (a judge returning True/False is more likely a mistake than 1/0);
    numpy scalars and one-element tensors are.
    """
    not_a_number = Failure("not a number", f"returned {type(value).__name__} {_shorten(repr(value))}")
    if isinstance(value, (bool, str, bytes)):
        return not_a_number
    try:
        number = float(value)  # numbers.Real, numpy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError):
        return not_a_number
    if math.isnan(number):
        return Failure("NaN")
    if math.isinf(number):
        return Failure("infinite", f"returned {number}")
    return number


def as_completion(prompt: Text, response: Text) -> Text:
    """A generated response as the completion of ``prompt``, in the data formats' terms: after a string
    prompt the string itself; after a conversation (a message list) a string becomes one assistant
    message, ``[{"role": "assistant", "content": response}]``."""
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise ValueError(f"a string prompt takes a string response, got {type(response).__name__}")
        return response
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return list(response)


def check_batching(batch_size: Any, max_length: Any) -> None:
    """A model judge's ``batch_size`` (a positive int) and ``max_length`` (a positive int or None); ValueError."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")


def length_limit(model: torch.nn.Module, max_length: int | None, name: str) -> tuple[int | None, str]:
    """The longest row a model judge asks about and what sets it: ``(max_length, "max_length")``, else the
    model's positions (None when its config names none). ValueError, naming the judge, when ``max_length``
    exceeds the positions."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ValueError(f"{name}: max_length={max_length} exceeds the model's {positions} positions")
    return (max_length, "max_length") if max_length is not None else (positions, "the model's positions")


_Item = TypeVar("_Item")
_Out = TypeVar("_Out")


def forward_batches(model: torch.nn.Module, items: Sequence[_Item], batch_size: int,
                    forward: Callable[[list[_Item]], _Out]) -> list[tuple[list[_Item], _Out]]:
    """``forward`` over ``items`` ``batch_size`` at a time, in the order given, with ``model`` in eval mode (its
    mode restored after, also on an error): each chunk with what ``forward`` returned for it."""
    was_training = model.training
    model.eval()
    try:
        return [(chunk, forward(chunk)) for chunk in
                (list(items[start : start + batch_size]) for start in range(0, len(items), batch_size))]
    finally:
        model.train(was_training)


def padded_inputs(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """A model judge's batch: ``input_ids`` and ``attention_mask`` ``(b, T)`` right-padded with ``pad_id`` on
    ``device`` (causal: pads never reach a row), and the rows' lengths ``(b,)`` on the CPU."""
    lengths = torch.tensor([len(r) for r in rows])  # (b,)
    width = int(lengths.max())
    input_ids = right_pad(rows, pad_id, width)  # (b, T)
    attention_mask = (torch.arange(width) < lengths[:, None]).long()  # (b, T)
    return input_ids.to(device), attention_mask.to(device), lengths


class Judge(ABC):
    """Scores (prompt, response) rows; ``stats`` counts what it scored and what it could not, over all calls.

    Subclasses implement `score_rows` (a raw value or a `Failure` per row) and `spec`; `score` checks the
    values and counts them.
    """

    def __init__(self) -> None:
        self.stats = JudgeStats()

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float | None]:
        """One score per row of the aligned lists; None for a row that could not be scored (counted in
        ``stats`` with its reason)."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; give one prompt per response")
        values = self.score_rows(prompts, responses) if prompts else []
        if len(values) != len(prompts):
            name = type(self).__name__
            raise RuntimeError(f"{name}.score_rows returned {len(values)} values for {len(prompts)} rows")
        out: list[float | None] = []
        for value in values:
            checked = value if isinstance(value, Failure) else as_score(value)
            self.stats.record(checked if isinstance(checked, Failure) else None)
            out.append(None if isinstance(checked, Failure) else checked)
        return out

    @abstractmethod
    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        """Per row a score (any number) or a `Failure`; must not raise for one bad row."""

    @abstractmethod
    def spec(self) -> str:
        """A short description for the output's metadata, e.g. ``function:pkg.mod:fn``."""

    def reset_stats(self) -> JudgeStats:
        """The stats so far; counting starts again from zero."""
        stats, self.stats = self.stats, JudgeStats()
        return stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"


__all__ = ["Failure", "Judge", "JudgeStats", "as_completion", "as_score", "warn_failures"]
