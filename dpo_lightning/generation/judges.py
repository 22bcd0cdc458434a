"""Judges: one number per (prompt, response) row, the scores that `pairing.make_pairs` turns into pairs.

One interface, `Judge.score(prompts, responses) -> list[float | None]` over aligned lists, and one
small class per kind, chosen by a short name (`resolve_judge`):

| spec | class | scores with |
|---|---|---|
| ``function:package.module:function`` | `FunctionJudge` | a Python function ``(prompt, response) -> float`` |
| ``reward_model:<path or hub id>`` | `RewardModelJudge` | an ``AutoModelForSequenceClassification`` with one label |
| ``llm_pairwise:<path or hub id>`` | `llm_judges.LLMPairwiseJudge` | a causal LM asked which of two is better |
| ``llm_score:<path or hub id>`` | `llm_judges.LLMScoreJudge` | a causal LM asked to rate one response |

A row the judge cannot score is None, never an abort: the function raised, returned something that is
not a finite number or ran past its timeout; the response has too many tokens for the reward model.
Each judge counts what failed and why in its `JudgeStats` (``judge.stats``), which `warn_failures`
reports as one warning line.

A new kind of judge subclasses `Judge`, implements `Judge.score_rows` and `Judge.spec`, and joins
`JUDGES` under its prefix: the class itself, or ``"module:Class"`` for one that lives in a module built on
this one (the LLM judges, `generation/llm_judges.py`), imported when a spec names it. A pairwise judge turns its
comparisons of one prompt's responses into per-response scores (`LLMPairwiseJudge`: mean win probability).
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import sys
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning._moved import import_module
from dpo_lightning.data.collate import right_pad
from dpo_lightning.data.errors import DataError, RowRef, warn
from dpo_lightning.data.formats import Text, UnpairedExample
from dpo_lightning.data.render import render_unpaired
from dpo_lightning.data.tokenize import TokenizeConfig, tokenize_completions
from dpo_lightning.data.tokenizer import load_tokenizer
from dpo_lightning.models.loading import check_vocab, load_model

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


# -------------------------------------------------------------------------------------------- functions


def import_function(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` (or ``"package.module:Class.method"``) -> the callable; ValueError
    naming ``spec`` when it does not parse, import or name a callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"function judge {spec!r}: expected 'package.module:function', "
                         "e.g. 'dpo_lightning.data.synthetic:sort_reward'")
    try:
        obj: Any = import_module(module_name)
    except Exception as err:  # ImportError, or whatever importing the module raised
        problem = f"{type(err).__name__}: {err}"
        raise ValueError(f"function judge {spec!r}: cannot import {module_name!r} ({problem})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"function judge {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"function judge {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _check_signature(function: Callable[..., Any], name: str) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have none; they are called as they are
        return
    try:
        signature.bind("prompt", "response")
    except TypeError as err:
        raise ValueError(f"function judge {name!r}: must take (prompt, response), but its signature is "
                         f"{signature} ({err})") from None


def _qualified_name(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


def _call(function: Callable[..., Any], prompt: Text, response: str) -> Any:
    try:
        return function(prompt, response)
    except Exception as err:
        return Failure(f"raised {type(err).__name__}", str(err))


def _call_with_timeout(function: Callable[..., Any], prompt: Text, response: str, timeout_s: float) -> Any:
    """`_call` in a daemon thread, waited for at most ``timeout_s``. Python cannot stop a thread: a call
    past its timeout runs on in the background (it never blocks the exit) and its result is dropped."""
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(_call(function, prompt, response))
        except BaseException as err:  # noqa: BLE001 - SystemExit in a thread would be lost silently
            box.append(Failure(f"raised {type(err).__name__}", str(err)))
        finally:
            done.set()

    threading.Thread(target=run, name="judge-function", daemon=True).start()
    if not done.wait(timeout_s):
        return Failure(f"timed out (> {timeout_s:g} s)")
    return box[0]


class FunctionJudge(Judge):
    """Scores each row with a Python function ``(prompt, response) -> float``, e.g. a verifier or a
    ground-truth reward (``dpo_lightning.data.synthetic:sort_reward`` for the bundled sorting task).

    The prompt is passed as the data holds it (a string, or a message list), the response as generated
    (a string). A row whose call raises, returns a non-number, NaN or infinity, or runs past
    ``timeout_s`` is None (counted in ``stats``); the run goes on.
    """

    def __init__(self, function: str | Callable[[Text, str], float], timeout_s: float | None = None) -> None:
        """
        Args:
            function: ``"package.module:function"`` (imported now, so a mistake fails before any generation)
                or a callable.
            timeout_s: Seconds one call may take; None for no limit. A call past it cannot be stopped
                (Python threads cannot be killed): it runs on in a background thread, its result dropped.
        """
        super().__init__()
        if timeout_s is not None and not (isinstance(timeout_s, numbers.Real) and 0 < timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
        if isinstance(function, str):
            self.function = import_function(function)
            self._spec = f"function:{function}"
        elif callable(function):
            self.function = function
            self._spec = f"function:{_qualified_name(function)}"
        else:
            raise ValueError(f"function judge: expected 'package.module:function' or a callable, got "
                             f"{type(function).__name__}")
        _check_signature(self.function, self._spec.removeprefix("function:"))
        self.timeout_s = timeout_s

    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        if self.timeout_s is None:
            return [_call(self.function, p, r) for p, r in zip(prompts, responses)]
        return [_call_with_timeout(self.function, p, r, self.timeout_s) for p, r in zip(prompts, responses)]

    def spec(self) -> str:
        return self._spec


# -------------------------------------------------------------------------------------------- reward models

# The judge measures a response's tokens itself (`max_length`, the model's positions), so nothing is cut.
_WHOLE = TokenizeConfig(max_length=sys.maxsize, max_prompt_length=None)


def _positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class RewardModelJudge(Judge):
    """Scores each row with a reward model: an ``AutoModelForSequenceClassification`` with one label, such
    as a `RewardModule` export (``runs/tiny_rm/version_0/hf_export``).

    A row is tokenized exactly as `PreferenceDataModule` tokenizes one side of a pair (the same
    `render_unpaired` / `tokenize_completions`: BOS, EOS after a string response, the chat template
    for message lists), without truncation, and right-padded with the tokenizer's pad id; the score is
    ``logits[:, 0]`` at the last token, as `RewardModule` reads it in training. Rows are batched by
    length (``batch_size`` per forward, no gradients, eval mode). A row longer than ``max_length`` or the
    model's positions, or with no response tokens, is None (counted in ``stats``).
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
    ) -> None:
        """
        Args:
            model: Path or hub id of the reward model, or a loaded model.
            tokenizer: The tokenizer it was trained with (path, hub id, ``synthetic:<name>`` or object);
                None: the one saved with ``model`` (a path or hub id).
            batch_size: Rows per forward.
            device: Where the model runs; None: a loaded model stays where it is, a path loads on CUDA when
                available, else the CPU.
            max_length: Longest prompt + response in tokens; longer rows get no score. None: the model's
                positions.
            dtype: The dtype to load ``model`` in (``float32``, ``bfloat16``, ``float16``); None: float32.
        """
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if isinstance(model, str):
            self._spec = f"reward_model:{model}"
            tokenizer = model if tokenizer is None else tokenizer
            self.model = load_model(model, auto_class=AutoModelForSequenceClassification, dtype=dtype)
            self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif isinstance(model, torch.nn.Module):
            self._spec = f"reward_model:{getattr(model, 'name_or_path', '') or type(model).__name__}"
            if tokenizer is None:
                raise ValueError(f"{self._spec}: give the tokenizer the reward model was trained with")
            if dtype is not None:
                raise ValueError(f"{self._spec}: dtype applies when loading a model from a path; convert the model "
                                 "object yourself")
            self.model = model if device is None else model.to(device)
        else:
            raise ValueError(f"reward model: expected a path, hub id or model, got {type(model).__name__}")
        self.tokenizer = load_tokenizer(tokenizer)
        config = self.model.config
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(f"{self._spec}: a reward model has one output (num_labels=1), this one has "
                             f"{getattr(config, 'num_labels', None)}; is it a RewardModule export?")
        pad = self.tokenizer.pad_token_id
        if config.pad_token_id is None:
            config.pad_token_id = pad  # as RewardModule does: the last token is found through it
        elif config.pad_token_id != pad:
            raise ValueError(f"{self._spec}: the model's pad_token_id {config.pad_token_id} is not the tokenizer's "
                             f"{pad}; rows padded with {pad} would be scored at the wrong token. Use the tokenizer "
                             "the model was trained with")
        check_vocab(self.model, len(self.tokenizer))
        positions = _positions(self.model)
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(f"{self._spec}: max_length={max_length} exceeds the model's {positions} positions")
        self.limit, self.limit_name = (
            (max_length, "max_length") if max_length is not None else (positions, "the model's positions")
        )
        self.batch_size = batch_size

    def spec(self) -> str:
        return self._spec

    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        if any(isinstance(p, list) for p in prompts) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self._spec}: the prompts are message lists but the tokenizer has no chat_template")
        out: list[Any] = [None] * len(prompts)
        rendered, rows = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            example = UnpairedExample(prompt, as_completion(prompt, response), True)
            try:
                rendered.append(render_unpaired(example, self.tokenizer, RowRef(self._spec, "judge", i)))
            except DataError as err:  # the chat template failed on this conversation
                out[i] = Failure("could not be rendered", str(err))
                continue
            rows.append(i)
        todo = []
        for i, side in zip(rows, tokenize_completions(rendered, self.tokenizer, _WHOLE)):
            if side.response_length == 0:
                out[i] = Failure("empty response", "no response tokens")
            elif self.limit is not None and len(side.input_ids) > self.limit:
                out[i] = Failure("too long", f"{len(side.input_ids)} tokens > {self.limit_name} {self.limit}")
            else:
                todo.append((i, side.input_ids))
        todo.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for (i, _), score in zip(chunk, self._forward([ids for _, ids in chunk])):
                    out[i] = score
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        lengths = torch.tensor([len(r) for r in rows])  # (b,)
        width = int(lengths.max())
        input_ids = right_pad(rows, self.tokenizer.pad_token_id, width)  # (b, T)
        attention_mask = (torch.arange(width) < lengths[:, None]).long()  # (b, T)
        out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        return out.logits[:, 0].float().tolist()  # (b,): the score at each row's last token


# -------------------------------------------------------------------------------------------- by name

# Spec prefix -> judge class (or "module:Class", imported when named); the rest of the spec is its first argument.
JUDGES: dict[str, type[Judge] | str] = {
    "function": FunctionJudge,
    "reward_model": RewardModelJudge,
    "llm_pairwise": "dpo_lightning.generation.llm_judges:LLMPairwiseJudge",
    "llm_score": "dpo_lightning.generation.llm_judges:LLMScoreJudge",
}

_FORMS = ("'function:package.module:function', 'reward_model:<path or hub id>', 'llm_pairwise:<path or hub id>', "
          "'llm_score:<path or hub id>', or a Judge instance")


def judge_class(kind: str) -> type[Judge]:
    """The class registered under a spec prefix (``"llm_pairwise"``...); KeyError for an unknown one."""
    entry = JUDGES[kind]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(import_module(module), name)
    return entry


def check_options(cls: type[Judge], spec: str, options: dict[str, Any]) -> None:
    """ValueError naming the option when ``cls`` does not take one of ``options`` (a typo in ``judge_options``)."""
    parameters = inspect.signature(cls.__init__).parameters
    takes = [name for name in list(parameters)[2:] if parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
             or parameters[name].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"judge {spec}: {cls.__name__} takes no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(takes)}")


def resolve_judge(spec: str | Judge, **options: Any) -> Judge:
    """A judge from its spec: ``"function:pkg.mod:fn"``, ``"reward_model:<path or hub id>"``,
    ``"llm_pairwise:<path or hub id>"``, ``"llm_score:<path or hub id>"`` or a `Judge` (returned as it is).
    ``options`` go to the class (``timeout_s=``, ``batch_size=``, ``template=``...)."""
    if isinstance(spec, Judge):
        if options:
            raise ValueError(f"judge options {sorted(options)} apply to a judge given by spec, not to {spec!r}")
        return spec
    if isinstance(spec, str):
        kind, sep, target = spec.partition(":")
        if sep and target and kind in JUDGES:
            cls = judge_class(kind)
            check_options(cls, spec, options)
            return cls(target, **options)
    raise ValueError(f"judge {spec!r}: expected {_FORMS}")


__all__ = [
    "JUDGES",
    "Failure",
    "FunctionJudge",
    "Judge",
    "JudgeStats",
    "RewardModelJudge",
    "as_completion",
    "as_score",
    "check_options",
    "import_function",
    "judge_class",
    "resolve_judge",
    "warn_failures",
]
