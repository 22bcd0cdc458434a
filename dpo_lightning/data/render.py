"""`PreferenceExample` -> the exact texts the model sees: the prompt alone and prompt+response per side.

Strings are concatenated as given (no separator is invented). Conversations go through the
tokenizer's chat template: the prompt with the generation prompt added, each full conversation
without it. The full text need not start with the prompt text (templates may render a prompt
differently on its own); `tokenize.py` finds the boundary at token level.

SFT rows: prompt/completion rows are rendered as unpaired examples are (`render_completion`); a
whole conversation (`render_conversation`) is rendered once, with, for each assistant turn, the two
renderings whose tokens bound it: the conversation before it with the generation prompt, and the
conversation up to and including it.
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from .errors import RowRef
from .formats import Message, PreferenceExample, Text, UnpairedExample, first_difference


class RenderedPair(NamedTuple):
    """Texts to tokenize; `add_eos` says whether the responses still need the EOS token."""

    prompt: str
    chosen: str  # the full sequence: prompt followed by the chosen response
    rejected: str
    add_eos: bool


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    generation_prompt: bool,
    ref: RowRef,
    field: str,
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises whatever the template author chose (often TemplateError)
        raise ref.error(field, f"the chat template failed on this conversation: {err}") from err
    return text


class RenderedCompletion(NamedTuple):
    """The texts of one unpaired example (KTO); `add_eos` as in `RenderedPair`."""

    prompt: str
    full: str  # the prompt followed by the completion
    add_eos: bool


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, ref: RowRef, field: str = "prompt") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ref.error(
            field,
            "is a list of messages but the tokenizer has no chat_template; use a tokenizer with one "
            "or set `tokenizer.chat_template`",
        )


def render(example: PreferenceExample, tokenizer: PreTrainedTokenizerBase, ref: RowRef) -> RenderedPair:
    """The prompt text and the two full texts of one pair."""
    if not example.conversational:
        # Standard rows carry no end-of-turn marker; EOS teaches the model where to stop.
        return RenderedPair(
            example.prompt, example.prompt + example.chosen, example.prompt + example.rejected, True
        )
    _check_chat_template(tokenizer, ref)
    return RenderedPair(
        prompt=_apply_template(tokenizer, example.prompt, True, ref, "prompt"),
        chosen=_apply_template(tokenizer, example.prompt + example.chosen, False, ref, "chosen"),
        rejected=_apply_template(tokenizer, example.prompt + example.rejected, False, ref, "rejected"),
        add_eos=False,  # the template closes the assistant turn itself
    )


def render_completion(
    prompt: Text, completion: Text, tokenizer: PreTrainedTokenizerBase, ref: RowRef
) -> RenderedCompletion:
    """The prompt text and the full text of a prompt and its completion, rendered exactly as a pair's side."""
    if isinstance(prompt, str):
        return RenderedCompletion(prompt, prompt + completion, True)
    _check_chat_template(tokenizer, ref)
    return RenderedCompletion(
        prompt=_apply_template(tokenizer, prompt, True, ref, "prompt"),
        full=_apply_template(tokenizer, prompt + completion, False, ref, "completion"),
        add_eos=False,
    )


def render_unpaired(
    example: UnpairedExample, tokenizer: PreTrainedTokenizerBase, ref: RowRef
) -> RenderedCompletion:
    """The prompt text and the full text of one unpaired example, rendered exactly as a pair's side."""
    return render_completion(example.prompt, example.completion, tokenizer, ref)


class RenderedConversation(NamedTuple):
    """A whole conversation's text, and per assistant turn the texts that bound its tokens: ``before``
    (the conversation before the turn, with the generation prompt) and ``through`` (up to and
    including the turn). Both are prefixes of ``full`` (checked)."""

    full: str
    turns: list[tuple[str, str]]  # (before, through) per assistant turn, in order


def render_conversation(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, ref: RowRef, turns: bool = True
) -> RenderedConversation:
    """Render ``messages`` with the chat template; with `turns`, also each assistant turn's bounds.

    A template that renders an earlier part differently once later turns follow (one that drops
    the reasoning of earlier assistant turns, say) has no token span per turn: a `DataError`.
    """
    _check_chat_template(tokenizer, ref, "messages")
    full = _apply_template(tokenizer, messages, False, ref, "messages")
    bounds = []
    for k, message in enumerate(messages if turns else ()):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:k], True, ref, "messages")
        last = k == len(messages) - 1
        through = full if last else _apply_template(tokenizer, messages[: k + 1], False, ref, "messages")
        for text, what in ((before, f"messages 0..{k - 1} with the generation prompt"), (through, f"messages 0..{k}")):
            if not full.startswith(text):
                raise ref.error(
                    "messages",
                    f"the chat template renders {what} differently once later turns follow (not a prefix of "
                    f"the whole conversation's rendering: {first_difference(text, full)}), so the tokens of "
                    f"assistant message {k} cannot be found; set completion_only_loss=False to train on every "
                    "token, or use a template that renders earlier turns the same way",
                )
        bounds.append((before, through))
    return RenderedConversation(full, bounds)
