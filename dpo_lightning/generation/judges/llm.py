"""LLM-as-judge: a local causal LM asked, through a prompt template, which of two responses is better
(`LLMPairwiseJudge`, spec ``llm_pairwise:<path>``) or to score one (`LLMScoreJudge`, ``llm_score:<path>``).

The verdict is read from the judge's next-token logits, never from sampled text: the logits of the
verdict tokens only (``A``/``B``, or the score digits) are softmaxed, so every row gets a probability
(pairwise) or an expected score (pointwise), and nothing has to be parsed. A pairwise judge asks both
orders, (a, b) and (b, a), and averages them, which cancels its position bias:

    p(a > b) = (P("A" | a shown first) + P("B" | b shown first)) / 2,   so   p(b > a) = 1 - p(a > b)

(exactly, in floats: `_combine`). As a `Judge` it scores each response by its mean win probability
against the other responses to the same prompt in the same call, so its scores rank the responses of
one prompt (what `pairing.make_pairs` needs) but are not an absolute reward.

A row is the template filled in (``{prompt}``, ``{response}`` or ``{response_a}``/``{response_b}``;
a message-list prompt as ``role: content`` lines), as one user message through the judge tokenizer's
chat template when it has one (generation prompt added), else as plain text with the tokenizer's BOS
rule. Rows are right-padded and batched ``batch_size`` at a time, sorted by length (identical rows are
asked once), in eval mode without gradients; only the last position's logits are computed
(``logits_to_keep``). Everything that can be checked without the weights (the template's placeholders,
the verdicts being single distinct known tokens, the chat template rendering) is checked by
`LLMJudge.check` and again on construction, so a mistake fails before any sampling. The templates, these
checks and a row's text are in `llm_prompts`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.data.formats import Text
from dpo_lightning.data.tokenizer import load_tokenizer
from dpo_lightning.generation.judges.base import (
    Failure,
    Judge,
    check_batching,
    forward_batches,
    length_limit,
    padded_inputs,
)
from dpo_lightning.generation.judges.llm_prompts import (
    PAIRWISE_TEMPLATE,
    SCORE_TEMPLATE,
    _as_chat,
    _check_known_words,
    _default_verdicts,
    check_template,
    fill,
    prompt_text,
    verdict_ids,
)
from dpo_lightning.generation.judges.registry import check_options
from dpo_lightning.models.loading import check_local_source, check_vocab, load_causal_lm


def _combine(q_ab: float, q_ba: float) -> float:
    """p(a > b) from P(first | a, b) and P(first | b, a): their mean ``(q_ab + 1 - q_ba) / 2``, computed for the
    orientation where it is >= 0.5 and as 1 minus that otherwise, so that swapping a and b gives exactly 1 - p."""
    half = 0.5 * (q_ab - q_ba)  # exact: a power-of-two scaling
    return 0.5 + half if half >= 0 else 1.0 - (0.5 - half)


class LLMJudge(Judge):
    """What the pairwise and the score judge share: the model, the template, the verdict tokens and the batched
    next-token forward. Subclasses set ``KIND``, ``PLACEHOLDERS``, ``DEFAULT_TEMPLATE``, ``DEFAULT_WORDS`` and
    implement `Judge.score_rows`."""

    KIND: ClassVar[str]
    PLACEHOLDERS: ClassVar[tuple[str, ...]]
    DEFAULT_TEMPLATE: ClassVar[str]
    DEFAULT_WORDS: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        template: str | None = None,
        verdicts: Sequence[str] | None = None,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        check_batching(batch_size, max_length)
        if isinstance(model, str):
            name = model
            tokenizer = model if tokenizer is None else tokenizer
        elif isinstance(model, torch.nn.Module):
            name = getattr(model, "name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise ValueError(f"{self.KIND}:{name}: give the judge model's tokenizer")
            if dtype is not None:
                raise ValueError(f"{self.KIND}:{name}: dtype applies when loading a model from a path")
        else:
            raise ValueError(f"{self.KIND} judge: expected a path, hub id or model, got {type(model).__name__}")
        self.name = name
        self.tokenizer, self.template, self.verdicts, self.verdict_ids = self._prepare(
            f"{self.KIND}:{name}", tokenizer, template, verdicts)
        if isinstance(model, str):
            self.model = load_causal_lm(model, dtype=dtype)  # trust_remote_code stays off
            self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        else:
            self.model = model if device is None else model.to(device)
        check_vocab(self.model, len(self.tokenizer))
        self.limit, self.limit_name = length_limit(self.model, max_length, f"{self.KIND}:{name}")
        self.batch_size = batch_size
        self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        digest = hashlib.sha256(json.dumps([self.template, list(self.verdicts)]).encode()).hexdigest()[:8]
        self._spec = f"{self.KIND}:{name}@{digest}"  # the digest: a resumed run refuses another template

    @classmethod
    def check(cls, model: str, tokenizer: str | PreTrainedTokenizerBase | None = None, template: str | None = None,
              verdicts: Sequence[str] | None = None, **options: Any) -> None:
        """What can be checked without loading the weights (the CLI calls this before anything is built): the
        path exists, the template's placeholders, the verdict tokens, the chat template renders; ValueError or
        FileNotFoundError naming the judge. ``options`` are checked by name only."""
        check_local_source(model, f"{cls.KIND} judge")
        check_options(cls, f"{cls.KIND}:{model}", options)
        cls._prepare(f"{cls.KIND}:{model}", model if tokenizer is None else tokenizer, template, verdicts)

    @classmethod
    def _prepare(cls, name: str, tokenizer: str | PreTrainedTokenizerBase, template: str | None,
                 verdicts: Sequence[str] | None) -> tuple[PreTrainedTokenizerBase, str, tuple[str, ...], list[int]]:
        template = cls.DEFAULT_TEMPLATE if template is None else template
        check_template(template, cls.PLACEHOLDERS, name)
        tokenizer = load_tokenizer(tokenizer)
        _check_known_words(tokenizer, template, name)
        verdicts = _default_verdicts(tokenizer, cls.DEFAULT_WORDS) if verdicts is None else tuple(verdicts)
        ids = verdict_ids(tokenizer, verdicts, name)
        cls._check_verdicts(verdicts, name)
        if getattr(tokenizer, "chat_template", None):
            try:
                _as_chat(tokenizer, fill(template, {p: "x" for p in cls.PLACEHOLDERS}))
            except Exception as err:  # jinja raises whatever the template author chose
                raise ValueError(f"{name}: the judge tokenizer's chat template fails on one user message: "
                                 f"{err}") from err
        return tokenizer, template, verdicts, ids

    @classmethod
    def _check_verdicts(cls, verdicts: tuple[str, ...], name: str) -> None:
        """Kind-specific rules on the verdicts (how many, what they mean)."""

    def spec(self) -> str:
        return self._spec

    def render(self, fields: dict[str, str]) -> list[int] | Failure:
        """The token ids of one question to the judge, or why there are none."""
        text = fill(self.template, fields)
        try:
            if getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer(_as_chat(self.tokenizer, text), add_special_tokens=False).input_ids
            else:
                ids = self.tokenizer(text).input_ids
        except Exception as err:  # the chat template failed on this row's text
            return Failure("could not be rendered", f"{type(err).__name__}: {err}")
        if self.limit is not None and len(ids) > self.limit:
            return Failure("too long", f"{len(ids)} tokens > {self.limit_name} {self.limit}")
        return ids

    def verdict_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """``(n, k)`` float64: the softmax over the k verdict tokens of the judge's next-token logits after each
        row. Rows are batched ``batch_size`` at a time in (length, ids) order, so the same rows always meet the
        same batches, whatever order they come in."""
        out = torch.empty(len(rows), len(self.verdict_ids), dtype=torch.float64)
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), rows[i]))
        for chunk, probs in forward_batches(self.model, order, self.batch_size,
                                            lambda chunk: self._forward([rows[i] for i in chunk])):
            out[chunk] = probs
        return out

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        input_ids, attention_mask, lengths = padded_inputs(rows, self.tokenizer.pad_token_id, device)  # (b, T), (b,)
        last = lengths - 1  # (b,): the position whose logits predict the verdict
        keep = torch.unique(last)  # (K,) sorted: only these positions' logits are computed
        extra = {"logits_to_keep": keep.to(device)} if self._keep_last else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **extra).logits  # (b, K, V), or (b, T, V) without logits_to_keep
        column = torch.searchsorted(keep, last) if self._keep_last else last
        picked = logits[torch.arange(len(rows), device=logits.device), column.to(logits.device)]  # (b, V)
        verdict = picked[:, self.verdict_ids].double()  # (b, k)
        return torch.softmax(verdict, dim=-1).cpu()


class _Questions:
    """The judge rows to ask, each distinct one once: `add` gives a row's index into ``rows``."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.rows: list[list[int]] = []

    def add(self, ids: list[int]) -> int:
        i = self.index.setdefault(tuple(ids), len(self.index))
        if i == len(self.rows):
            self.rows.append(ids)
        return i


def _prompt_key(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class LLMPairwiseJudge(LLMJudge):
    """Asks a causal LM which of two responses to a prompt is better, in both orders (``llm_pairwise:<path>``).

    `compare` gives p(first better than second) per row. As a `Judge`, each response's score is its mean win
    probability against every other response to the same prompt in the call (responses to one prompt with
    no other response: no score): the N samples of a prompt cost N(N-1) judge rows (fewer when texts repeat).
    """

    KIND = "llm_pairwise"
    PLACEHOLDERS = ("prompt", "response_a", "response_b")
    DEFAULT_TEMPLATE = PAIRWISE_TEMPLATE
    DEFAULT_WORDS = ("A", "B")

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        template: str | None = None,
        verdicts: Sequence[str] | None = None,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
    ) -> None:
        """
        Args:
            model: Path or hub id of the judge (a causal LM; its code is never trusted), or a loaded model.
            tokenizer: Its tokenizer (path, hub id, ``synthetic:<name>`` or object); None: the one saved with
                ``model``.
            template: The question, with ``{prompt}``, ``{response_a}`` (shown first) and ``{response_b}``;
                None: `PAIRWISE_TEMPLATE`.
            verdicts: The two answer tokens meaning "the first is better" and "the second is better"; None:
                ``A``, ``B`` after a chat template, ``" A"``, ``" B"`` in plain text. Each must be one token.
            batch_size: Judge rows per forward.
            device: Where the model runs; None: a loaded model stays where it is, a path loads on CUDA when
                available, else the CPU.
            max_length: Longest judge row in tokens; a longer one gets no verdict. None: the model's positions.
            dtype: The dtype to load ``model`` in; None: float32.
        """
        super().__init__(model, tokenizer, template, verdicts, batch_size, device, max_length, dtype)

    @classmethod
    def _check_verdicts(cls, verdicts: tuple[str, ...], name: str) -> None:
        if len(verdicts) != 2:
            raise ValueError(f"{name}: a pairwise judge takes 2 verdicts (first better, second better), got "
                             f"{list(verdicts)!r}")

    def compare(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        """p(first better than second) per row, both orders asked and averaged; None where a row could not be
        asked (too long, not renderable). Swapping ``first`` and ``second`` gives exactly 1 - p."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"{len(prompts)} prompts, {len(first)} first and {len(second)} second responses; "
                             "give one of each per row")
        return [None if isinstance(p, Failure) else p for p in self._compare(list(zip(prompts, first, second)))]

    def _compare(self, rows: list[tuple[Text, str, str]]) -> list[float | Failure]:
        questions = _Questions()
        plan: list[tuple[int, int] | float | Failure] = []
        for prompt, a, b in rows:
            if a == b:
                plan.append(0.5)  # both orders are the same question: (q + 1 - q) / 2
                continue
            text = prompt_text(prompt)
            slots = []
            for x, y in ((a, b), (b, a)):
                ids = self.render({"prompt": text, "response_a": x, "response_b": y})
                if isinstance(ids, Failure):
                    slots = ids
                    break
                slots.append(questions.add(ids))
            plan.append(slots if isinstance(slots, Failure) else tuple(slots))
        probs = self.verdict_probs(questions.rows)[:, 0].tolist() if questions.rows else []  # P(first is better)
        return [p if isinstance(p, (Failure, float)) else _combine(probs[p[0]], probs[p[1]]) for p in plan]

    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(_prompt_key(prompt), []).append(i)
        pairs = [(i, j) for rows in groups.values() for k, i in enumerate(rows) for j in rows[k + 1 :]]
        verdicts = self._compare([(prompts[i], responses[i], responses[j]) for i, j in pairs])
        wins: list[list[float]] = [[] for _ in prompts]
        failed: list[Failure | None] = [None] * len(prompts)
        for (i, j), p in zip(pairs, verdicts):
            if isinstance(p, Failure):
                failed[i] = failed[i] or p
                failed[j] = failed[j] or p
                continue
            wins[i].append(p)
            wins[j].append(1.0 - p)
        alone = Failure("no other response to compare with", "a pairwise judge needs >= 2 responses per prompt")
        return [sum(w) / len(w) if w else (failed[i] or alone) for i, w in enumerate(wins)]


class LLMScoreJudge(LLMJudge):
    """Asks a causal LM to rate one response (``llm_score:<path>``): the score is the expected rating under the
    softmax over the rating tokens, ``sum_i p_i * value_i``, where a rating token's value is its number."""

    KIND = "llm_score"
    PLACEHOLDERS = ("prompt", "response")
    DEFAULT_TEMPLATE = SCORE_TEMPLATE
    DEFAULT_WORDS = ("1", "2", "3", "4", "5")

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        template: str | None = None,
        verdicts: Sequence[str] | None = None,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
    ) -> None:
        """
        Args:
            model: Path or hub id of the judge (a causal LM; its code is never trusted), or a loaded model.
            tokenizer: Its tokenizer (path, hub id, ``synthetic:<name>`` or object); None: the one saved with
                ``model``.
            template: The question, with ``{prompt}`` and ``{response}``; None: `SCORE_TEMPLATE`.
            verdicts: The rating tokens, each a number (its value); None: ``1`` .. ``5`` after a chat template,
                ``" 1"`` .. ``" 5"`` in plain text. Each must be one token.
            batch_size: Judge rows per forward.
            device: Where the model runs; None: a loaded model stays where it is, a path loads on CUDA when
                available, else the CPU.
            max_length: Longest judge row in tokens; a longer one gets no score. None: the model's positions.
            dtype: The dtype to load ``model`` in; None: float32.
        """
        super().__init__(model, tokenizer, template, verdicts, batch_size, device, max_length, dtype)
        self.values = torch.tensor([float(v) for v in self.verdicts], dtype=torch.float64)  # (k,)

    @classmethod
    def _check_verdicts(cls, verdicts: tuple[str, ...], name: str) -> None:
        for verdict in verdicts:
            try:
                float(verdict)
            except ValueError:
                raise ValueError(f"{name}: rating token {verdict!r} is not a number; a score judge's verdicts are "
                                 "the ratings themselves (e.g. '1' .. '5')") from None

    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        out: list[Any] = []
        questions = _Questions()
        for prompt, response in zip(prompts, responses):
            ids = self.render({"prompt": prompt_text(prompt), "response": response})
            out.append(ids if isinstance(ids, Failure) else questions.add(ids))
        expected = (self.verdict_probs(questions.rows) @ self.values).tolist() if questions.rows else []  # (n,)
        return [row if isinstance(row, Failure) else expected[row] for row in out]


__all__ = [
    "PAIRWISE_TEMPLATE",
    "SCORE_TEMPLATE",
    "LLMJudge",
    "LLMPairwiseJudge",
    "LLMScoreJudge",
    "check_template",
    "verdict_ids",
]
