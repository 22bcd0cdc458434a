"""SFT rows in TRL's column conventions -> `Conversation` or `Completion`, validated.

Layouts (the column set decides; the first match in `SFT_LAYOUT_COLUMNS` order wins):

- ``messages``: a whole conversation (a list of ``{"role", "content"}`` messages) with at least one
  assistant turn; rendered by the chat template, trained on the assistant turns -> `Conversation`;
- ``prompt`` + ``completion``: strings, or message lists (the completion opening with the assistant),
  checked as unpaired (KTO) rows are -> `Completion`;
- ``text``: a plain string, trained on every token -> `Completion` with an empty prompt.

Preference pairs are not an SFT layout; ``columns: {completion: chosen}`` with ``drop_columns:
[rejected]`` reads their chosen side as prompt/completion rows. Every check raises `DataError`
naming the source, row and field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, NamedTuple

from .columns import Layouts
from .errors import DataError, RowRef
from .formats import Message, Text, check_prompt_completion, check_role_order, check_text


class SFTLayout(str, Enum):
    """Which columns carry an SFT row."""

    MESSAGES = "messages"  # a whole conversation
    PROMPT_COMPLETION = "prompt_completion"  # prompt + completion
    TEXT = "text"  # plain text


SFT_LAYOUT_COLUMNS: dict[SFTLayout, tuple[str, ...]] = {
    SFTLayout.MESSAGES: ("messages",),
    SFTLayout.PROMPT_COMPLETION: ("prompt", "completion"),
    SFTLayout.TEXT: ("text",),
}


class Conversation(NamedTuple):
    """A whole conversation; the loss is on its assistant turns."""

    messages: list[Message]


class Completion(NamedTuple):
    """A prompt and its completion (both strings or both message lists); the loss is on the completion.
    A ``text`` row is a completion of the empty prompt."""

    prompt: Text
    completion: Text


def detect_sft_layout(columns: Sequence[str], source: str) -> SFTLayout:
    """The SFT layout named by the column set (the first match in `SFT_LAYOUT_COLUMNS` order wins)."""
    present = set(columns)
    for layout, needed in SFT_LAYOUT_COLUMNS.items():
        if present.issuperset(needed):
            return layout
    expected = "; ".join(f"{layout.value}: {', '.join(cols)}" for layout, cols in SFT_LAYOUT_COLUMNS.items())
    hint = ""
    if {"chosen", "rejected"} <= present:
        read_chosen = (
            "columns: {completion: chosen}" if "prompt" in present
            else "columns: {text: chosen} (strings) or {messages: chosen} (conversations)"
        )
        hint = (
            "; these look like preference pairs, which are not an SFT layout: to train on the chosen responses, "
            f"set {read_chosen} and drop_columns: [rejected]"
        )
    raise DataError(
        f"{source}: cannot tell the SFT data format from the columns {sorted(present)}; expected one of these "
        f"column sets ({expected}){hint}"
    )


SFT_LAYOUTS = Layouts(SFT_LAYOUT_COLUMNS, detect_sft_layout)


def _conversation(row: Mapping[str, Any], ref: RowRef) -> Conversation:
    messages = check_text(row["messages"], "messages", ref)
    if isinstance(messages, str):
        raise ref.error("messages", "expected a list of {'role', 'content'} messages, got str")
    if not messages:
        raise ref.error("messages", "is an empty list of messages")
    check_role_order(messages, "messages", ref, response_from=len(messages))
    if not any(m["role"] == "assistant" for m in messages):
        raise ref.error("messages", "has no assistant turn, so nothing to train on")
    return Conversation(messages)


def _completion(row: Mapping[str, Any], ref: RowRef) -> Completion:
    return Completion(*check_prompt_completion(row, ref))


def _text(row: Mapping[str, Any], ref: RowRef) -> Completion:
    text = row["text"]
    if text is None:
        raise ref.error("text", "value is missing (null)")
    if not isinstance(text, str):
        raise ref.error("text", f"expected a string, got {type(text).__name__}")
    if not text:
        raise ref.error("text", "is empty")
    return Completion("", text)


SFT_ROW_CONVERTERS: dict[SFTLayout, Callable[[Mapping[str, Any], RowRef], Conversation | Completion]] = {
    SFTLayout.MESSAGES: _conversation,
    SFTLayout.PROMPT_COMPLETION: _completion,
    SFTLayout.TEXT: _text,
}


def to_sft_example(row: Mapping[str, Any], layout: SFTLayout, ref: RowRef) -> Conversation | Completion:
    """Validate one SFT row of `layout`."""
    return SFT_ROW_CONVERTERS[layout](row, ref)

