"""Pure: rendered SFT rows -> token ids and labels (the loss mask), truncated.

Prompt/completion and text rows go through `tokenize.tokenize_completions`, the very boundary,
special tokens and truncation of a pair's side: the labels are the completion's tokens.

A conversation is tokenized whole, once. Each assistant turn's tokens are found with the same
common-prefix idea as the prompt/response boundary: the turn starts where the tokens of the
conversation before it (with the generation prompt) stop agreeing with the whole conversation's,
and ends where the tokens of the conversation up to and including it do. So a turn's labels hold
the template's end-of-turn tokens that close it, not the next turn's header, and a merge across a
join goes to the side the whole conversation's tokens put it on.

Labels are not shifted (position t is predicted from the logits at t - 1), and position 0 is never
a label: nothing precedes it. ``completion_only_loss=False`` labels every other token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from .render import RenderedCompletion, RenderedConversation
from .tokenize import TokenizeConfig, common_prefix_length, special_tokens, tokenize_completions, with_bos

IGNORE_INDEX = -100


class LabelledIds(NamedTuple):
    """One SFT sequence: ids, labels (-100 off the loss), and how many tokens truncation removed from
    the prompt and from the end, so that cuts can be counted rather than silent."""

    input_ids: list[int]
    labels: list[int]
    prompt_cut: int = 0
    end_cut: int = 0

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def label_spans(ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """``ids`` on the positions of `spans` (``[start, end)``), -100 elsewhere and always at position 0."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def tokenize_completion_rows(
    rendered: Sequence[RenderedCompletion],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TokenizeConfig,
    completion_only_loss: bool = True,
) -> list[LabelledIds]:
    """Prompt/completion (and text) rows: the completion's tokens labelled, or all with
    ``completion_only_loss=False``; the prompt cut to max_prompt_length, then the end to max_length."""
    out = []
    for side in tokenize_completions(rendered, tokenizer, cfg):
        start = side.response_start if completion_only_loss else 0
        labels = label_spans(side.input_ids, [(start, len(side.input_ids))])
        out.append(LabelledIds(side.input_ids, labels, side.prompt_cut, side.response_cut))
    return out


def tokenize_conversations(
    rendered: Sequence[RenderedConversation],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TokenizeConfig,
    completion_only_loss: bool = True,
) -> list[LabelledIds]:
    """Whole conversations: the assistant turns' tokens labelled (every token with
    ``completion_only_loss=False``, whose renderings carry no turns); the end cut to max_length."""
    special = special_tokens(tokenizer)
    texts = [r.full for r in rendered] + [text for r in rendered for turn in r.turns for text in turn]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids = [with_bos(list(x), special) for x in ids]
    out, next_turn = [], len(rendered)
    for i, conversation in enumerate(rendered):
        full = ids[i]
        if completion_only_loss:
            spans = []
            for _ in conversation.turns:
                before, through = ids[next_turn], ids[next_turn + 1]
                next_turn += 2
                spans.append((common_prefix_length(before, full), common_prefix_length(through, full)))
        else:
            spans = [(0, len(full))]
        labels = label_spans(full, spans)
        kept = full[: cfg.max_length]
        out.append(LabelledIds(kept, labels[: cfg.max_length], 0, len(full) - len(kept)))
    return out
