"""`PreferenceExample` -> the exact texts the model sees: the prompt alone and prompt+response per side.

Strings are concatenated as given (no separator is invented). Conversations go through the
tokenizer's chat template: the prompt with the generation prompt added, each full conversation
without it. The full text need not start with the prompt text (templates may render a prompt
differently on its own); `tokenize.py` finds the boundary at token level.
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from .errors import RowRef
from .formats import Message, PreferenceExample, UnpairedExample


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


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, ref: RowRef) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ref.error(
            "prompt",
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


def render_unpaired(
    example: UnpairedExample, tokenizer: PreTrainedTokenizerBase, ref: RowRef
) -> RenderedCompletion:
    """The prompt text and the full text of one unpaired example, rendered exactly as a pair's side."""
    if not example.conversational:
        return RenderedCompletion(example.prompt, example.prompt + example.completion, True)
    _check_chat_template(tokenizer, ref)
    return RenderedCompletion(
        prompt=_apply_template(tokenizer, example.prompt, True, ref, "prompt"),
        full=_apply_template(tokenizer, example.prompt + example.completion, False, ref, "completion"),
        add_eos=False,
    )
