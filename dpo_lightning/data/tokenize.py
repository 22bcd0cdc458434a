"""Pure: rendered texts -> token ids with the exact prompt/response boundary, then truncation.

The boundary. Tokenizing the prompt and the response separately gives a sequence the model never
sees at inference (BPE merges across the join: "Question: " + "Answer" is ``[Question, :, ĠAnswer]``,
not ``[Question, :, Ġ, Answer]``), and chat templates may render a prompt differently on its own.
So each side is tokenized whole, and its response starts where ``tokenize(prompt + response)``
stops agreeing with ``tokenize(prompt)``: the token-level common prefix. The response tokens are
then exactly the tokens the model must predict after the prompt; when a merge crosses the join,
the first response token also carries the prompt's last characters (the space above).

Special tokens: texts are tokenized with ``add_special_tokens=False``; BOS is prepended once when
the tokenizer would add one and the text (e.g. a chat template) does not already start with it;
EOS is appended to standard (non-template) responses when missing.

Truncation: the prompt to ``max_prompt_length`` first (``keep_end`` keeps its end, the part next
to the response; ``keep_start`` its start; a leading BOS always stays), then the whole sequence to
``max_length`` by cutting the end of the response. A side whose response ends up empty is
reported by `TokenizedSide.response_length` == 0 and the pair is dropped by the caller; the
tokens cut are reported too (``prompt_cut``, ``response_cut``), for the caller to count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
from transformers import PreTrainedTokenizerBase

from .render import RenderedCompletion, RenderedPair

TruncationMode: TypeAlias = Literal["keep_end", "keep_start"]
TRUNCATION_MODES: tuple[str, ...] = ("keep_end", "keep_start")


class TokenizeConfig(NamedTuple):
    max_length: int = 1024
    max_prompt_length: int | None = 512
    truncation_mode: TruncationMode = "keep_end"


class SpecialTokens(NamedTuple):
    bos: int | None  # the tokenizer's BOS id (None: it has none)
    add_bos: bool  # whether the tokenizer puts BOS in front of a text it encodes
    eos: int | None


class TokenizedSide(NamedTuple):
    """One side of a pair: the full ids and where the response starts (``input_ids[:response_start]``
    is the prompt; the collators use exactly these two), and how many tokens truncation removed
    from the prompt and from the response, so that cuts can be counted rather than silent."""

    input_ids: list[int]
    response_start: int
    prompt_cut: int = 0
    response_cut: int = 0

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """Probe the tokenizer once: does encoding a text put BOS in front?"""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return SpecialTokens(bos=bos, add_bos=bos is not None and probe[:1] == [bos], eos=tokenizer.eos_token_id)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists (vectorised; no per-token Python loop)."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return int(np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0])


def with_bos(ids: list[int], special: SpecialTokens) -> list[int]:
    """``ids`` with BOS in front when the tokenizer adds one and they do not already start with it."""
    if special.add_bos and ids[:1] != [special.bos]:
        return [special.bos, *ids]
    return ids


def truncate(ids: list[int], start: int, cfg: TokenizeConfig, keep_first: int = 0) -> TokenizedSide:
    """Cut the prompt to ``cfg.max_prompt_length`` (never its first `keep_first` ids, i.e. BOS),
    then the response so that the whole fits ``cfg.max_length``."""
    prompt, response = ids[:start], ids[start:]
    limit = cfg.max_prompt_length
    if limit is not None and len(prompt) > limit:
        head, body = prompt[:keep_first], prompt[keep_first:]
        room = max(limit - keep_first, 0)
        body = body[len(body) - room :] if cfg.truncation_mode == "keep_end" else body[:room]
        prompt = head + body
    kept = response[: max(cfg.max_length - len(prompt), 0)]
    return TokenizedSide(prompt + kept, len(prompt), start - len(prompt), len(response) - len(kept))


def tokenize_side(
    prompt_ids: list[int], full_ids: list[int], add_eos: bool, special: SpecialTokens, cfg: TokenizeConfig
) -> TokenizedSide:
    """Boundary, special tokens and truncation for one side (ids from ``add_special_tokens=False``)."""
    prompt_ids, full_ids = with_bos(prompt_ids, special), with_bos(full_ids, special)
    start = common_prefix_length(prompt_ids, full_ids)
    if add_eos and special.eos is not None and len(full_ids) > start and full_ids[-1] != special.eos:
        full_ids = [*full_ids, special.eos]
    keep_first = int(special.bos is not None and full_ids[:1] == [special.bos] and start > 0)
    return truncate(full_ids, start, cfg, keep_first)


def tokenize_pairs(
    rendered: Sequence[RenderedPair], tokenizer: PreTrainedTokenizerBase, cfg: TokenizeConfig
) -> list[tuple[TokenizedSide, TokenizedSide]]:
    """(chosen, rejected) sides for a batch of rendered pairs, with one batched tokenizer call."""
    special = special_tokens(tokenizer)
    n = len(rendered)
    texts = [r.prompt for r in rendered] + [r.chosen for r in rendered] + [r.rejected for r in rendered]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [
        (
            tokenize_side(ids[i], ids[n + i], r.add_eos, special, cfg),
            tokenize_side(ids[i], ids[2 * n + i], r.add_eos, special, cfg),
        )
        for i, r in enumerate(rendered)
    ]


def tokenize_completions(
    rendered: Sequence[RenderedCompletion], tokenizer: PreTrainedTokenizerBase, cfg: TokenizeConfig
) -> list[TokenizedSide]:
    """One side per unpaired example (KTO), with the same boundary, special tokens and truncation as pairs."""
    special = special_tokens(tokenizer)
    n = len(rendered)
    texts = [r.prompt for r in rendered] + [r.full for r in rendered]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [tokenize_side(ids[i], ids[n + i], r.add_eos, special, cfg) for i, r in enumerate(rendered)]
