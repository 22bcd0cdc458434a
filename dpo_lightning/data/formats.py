"""Preference rows in TRL's column conventions -> one internal form, `PreferenceExample`.

Accepted layouts (the column names decide the layout; the value types decide text vs conversation):

- explicit prompt: ``prompt``, ``chosen``, ``rejected``; strings (standard) or lists of
  ``{"role", "content"}`` messages (conversational, rendered later by the chat template);
  ``chosen`` / ``rejected`` may also be whole conversations that repeat the prompt (UltraFeedback
  binarized: a string ``prompt`` that is their user turn, or a message-list ``prompt`` they start
  with); the repeat is checked against ``prompt`` and cut off, leaving the responses;
- implicit prompt: only ``chosen`` / ``rejected``, each the whole conversation (Anthropic HH
  strings ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` or message lists); the prompt is their
  common prefix;
- unpaired: ``prompt``, ``completion``, ``label`` (KTO): one completion and a bool (desirable or
  not), strings or messages -> `UnpairedExample`. `unpair` turns a pair into two unpaired examples.

The pair layouts also read an optional numeric ``margin`` column (`OPTIONAL_COLUMNS`, checked by
`check_margin`), the per-pair margin a reward model is trained with (TRL's RewardTrainer).

Every check raises `DataError` naming the source, row and field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, NamedTuple, TypeAlias

from .errors import DataError, RowRef

Message: TypeAlias = dict[str, Any]
Text: TypeAlias = str | list[Message]

# Anthropic HH separates turns with these; the response starts after the last assistant marker.
HH_ASSISTANT_MARKER = "\n\nAssistant:"

# Which role may follow which; `None` is the start of the conversation.
_NEXT_ROLES: dict[str | None, frozenset[str]] = {
    None: frozenset({"system", "developer", "user"}),
    "system": frozenset({"user"}),
    "developer": frozenset({"user"}),
    "user": frozenset({"assistant"}),
    "assistant": frozenset({"user", "tool"}),
    "tool": frozenset({"tool", "assistant"}),
}
ROLES = frozenset(r for r in _NEXT_ROLES if r is not None)


class Layout(str, Enum):
    """Which columns carry the data."""

    EXPLICIT_PROMPT = "explicit_prompt"  # prompt / chosen / rejected
    IMPLICIT_PROMPT = "implicit_prompt"  # chosen / rejected hold the whole conversation
    UNPAIRED = "unpaired"  # prompt / completion / label (KTO)


LAYOUT_COLUMNS: dict[Layout, tuple[str, ...]] = {
    Layout.EXPLICIT_PROMPT: ("prompt", "chosen", "rejected"),
    Layout.IMPLICIT_PROMPT: ("chosen", "rejected"),
    Layout.UNPAIRED: ("prompt", "completion", "label"),
}

# Columns a layout reads when the data has them: the pairs' reward margin. Unpaired (KTO) data never
# reads it (`columns.UNPAIRED_LAYOUTS`), so there it is named among the ignored columns.
OPTIONAL_COLUMNS: dict[Layout, tuple[str, ...]] = {
    Layout.EXPLICIT_PROMPT: ("margin",),
    Layout.IMPLICIT_PROMPT: ("margin",),
}


class PreferenceExample(NamedTuple):
    """One pair: a prompt and two responses, all strings or all message lists.

    For strings the model sees ``prompt + chosen``; for messages it sees the chat template's
    rendering of ``prompt + chosen``.
    """

    prompt: Text
    chosen: Text
    rejected: Text

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected


class UnpairedExample(NamedTuple):
    """One completion of a prompt, labelled desirable (True) or undesirable (False), for KTO."""

    prompt: Text
    completion: Text
    desirable: bool

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def unpair(example: PreferenceExample) -> tuple[UnpairedExample, UnpairedExample]:
    """A pair as two unpaired examples: (prompt, chosen, desirable) and (prompt, rejected, undesirable)."""
    return (
        UnpairedExample(example.prompt, example.chosen, True),
        UnpairedExample(example.prompt, example.rejected, False),
    )


def detect_layout(columns: Sequence[str], source: str) -> Layout:
    """The layout named by the column set (the first match in `LAYOUT_COLUMNS` order wins)."""
    present = set(columns)
    for layout, needed in LAYOUT_COLUMNS.items():
        if present.issuperset(needed):
            return layout
    expected = "; ".join(f"{layout.value}: {', '.join(cols)}" for layout, cols in LAYOUT_COLUMNS.items())
    raise DataError(
        f"{source}: cannot tell the data format from the columns {sorted(present)}; "
        f"expected one of these column sets ({expected}); missing column(s) "
        f"{sorted(set(LAYOUT_COLUMNS[Layout.EXPLICIT_PROMPT]) - present)} for prompt/chosen/rejected pairs"
    )


def _check_messages(value: Sequence[Any], field: str, ref: RowRef) -> list[Message]:
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            kind = type(message).__name__
            raise ref.error(field, f"message {i} is a {kind}, expected a {{'role', 'content'}} dict")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ref.error(field, f"message {i} has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise ref.error(field, f"message {i} ({role}) has content of type {kind}, expected str")
        # Arrow gives every struct the union of all keys; drop the absent ones (None) again.
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def check_text(value: Any, field: str, ref: RowRef) -> Text:
    """A string or a validated list of messages; anything else, or an empty value, is a `DataError`."""
    if value is None:
        raise ref.error(field, "value is missing (null)")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _check_messages(value, field, ref)
    raise ref.error(
        field, f"expected a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}"
    )


def check_role_order(messages: Sequence[Message], field: str, ref: RowRef, response_from: int) -> None:
    """Roles follow `_NEXT_ROLES`; the response (from `response_from` on) opens with the assistant."""
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in _NEXT_ROLES[previous]:
            after = f"after {previous!r}" if previous else "at the start"
            raise ref.error(field, f"roles out of order: message {i} has role {role!r} {after}")
        previous = role
    if response_from < len(messages):
        _check_response_start(messages[response_from:], field, ref)


def _check_response_start(response: Sequence[Message], field: str, ref: RowRef) -> None:
    if response and response[0]["role"] != "assistant":
        role = response[0]["role"]
        raise ref.error(field, f"the response must start with an assistant message, got {role!r}")


def split_implicit_text(
    chosen: str, rejected: str, marker: str = HH_ASSISTANT_MARKER
) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) from two whole conversations.

    The common character prefix can run into the response: both HH responses often start with
    the same word (" I", " Sure"). So the prompt is cut back to the end of the last `marker`
    inside the common prefix; without a marker, back to the last whitespace, so each response
    keeps its leading space the way HH responses do.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut >= 0:
        end = cut + len(marker)
    elif chosen == rejected:  # dropped later as identical; any split will do
        end = len(common)
    else:
        end = len(common)
        while end > 0 and not common[end - 1].isspace():
            end -= 1
        while end > 0 and common[end - 1].isspace():
            end -= 1
    return chosen[:end], chosen[end:], rejected[end:]


def split_implicit_messages(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen response, rejected response): the longest common message prefix, cut back
    so that each response opens with the assistant (a shared assistant turn stays in the response)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:
        n = len(chosen) - 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def first_difference(a: str, b: str) -> str:
    """Where two texts first differ, with a little of each, for an error message."""
    at = len(os.path.commonprefix([a, b]))
    return f"first difference at character {at}: {a[at:at + 20]!r} versus {b[at:at + 20]!r}"


def _brief(message: Message) -> str:
    content = message["content"]
    return f"{message['role']}: {content[:40]!r}{'...' if len(content) > 40 else ''}"


def _unrepeat_text_prompt(
    prompt: str, chosen: list[Message], rejected: list[Message], ref: RowRef
) -> tuple[list[Message], list[Message], list[Message]]:
    """A string ``prompt`` with whole conversations on each side (HuggingFaceH4/ultrafeedback_binarized):
    the conversation prompt is the sides' common message prefix, whose first (or last) user turn must
    be ``prompt`` as given; the rest of each side is its response."""
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise ref.error(field, "is empty")
        if value[0]["role"] == "assistant":
            raise ref.error(
                field,
                "expected a string like 'prompt', or the whole conversation repeating 'prompt' as its user "
                "turn; got a list of messages that opens with the assistant",
            )
        check_role_order(value, field, ref, response_from=len(value))
    shared, chosen_response, rejected_response = split_implicit_messages(chosen, rejected)
    users = [m["content"] for m in shared if m["role"] == "user"]
    if not users:  # the sides differ before their first user turn ends
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            first = next((m["content"] for m in value if m["role"] == "user"), None)
            if first is None:
                raise ref.error(field, "has no user turn to repeat 'prompt'")
            if first != prompt:
                raise ref.error(field, f"its user turn differs from 'prompt' ({first_difference(first, prompt)})")
        raise ref.error("rejected", "does not start with the same conversation as 'chosen'")
    if prompt not in (users[0], users[-1]):
        raise ref.error(
            "chosen",
            f"the user turn it shares with 'rejected' differs from 'prompt' ({first_difference(users[0], prompt)}); "
            "a conversation that repeats the prompt must repeat it exactly",
        )
    if chosen != rejected:
        for field, value in (("chosen", chosen_response), ("rejected", rejected_response)):
            if not value:
                raise ref.error(field, "the response after the repeated prompt is empty")
            _check_response_start(value, field, ref)
    return shared, chosen_response, rejected_response


def _unrepeat_messages_prompt(prompt: list[Message], side: list[Message], field: str, ref: RowRef) -> list[Message]:
    """A side that does not open with the assistant repeats the message-list ``prompt``: checked, cut off."""
    if not side or side[0]["role"] == "assistant":
        return side
    for i, message in enumerate(prompt):
        if i >= len(side) or side[i] != message:
            found = f"message {i} is {_brief(side[i])}" if i < len(side) else f"it has only {len(side)} messages"
            raise ref.error(
                field,
                f"opens with a {side[0]['role']} message, so it should repeat 'prompt' before the response, but "
                f"{found} where 'prompt' has {_brief(message)}",
            )
    check_role_order(side, field, ref, response_from=len(prompt))
    if len(side) == len(prompt):
        raise ref.error(field, "the response after the repeated prompt is empty")
    return side[len(prompt):]


def _explicit_pair(row: Mapping[str, Any], ref: RowRef) -> PreferenceExample:
    prompt, chosen, rejected = (check_text(row[f], f, ref) for f in ("prompt", "chosen", "rejected"))
    if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        return PreferenceExample(*_unrepeat_text_prompt(prompt, chosen, rejected, ref))
    conversational = isinstance(prompt, list)
    if conversational and not prompt:
        raise ref.error("prompt", "is an empty list of messages")
    sides = {}
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list) != conversational:
            kind = "a list of messages" if conversational else "a string"
            raise ref.error(field, f"expected {kind} like 'prompt', got {type(value).__name__}")
        if not value:
            raise ref.error(field, "is empty")
        if conversational:
            value = _unrepeat_messages_prompt(prompt, value, field, ref)
            check_role_order(prompt + value, field, ref, response_from=len(prompt))
        sides[field] = value
    return PreferenceExample(prompt, sides["chosen"], sides["rejected"])


def _implicit_pair(
    row: Mapping[str, Any], ref: RowRef, marker: str = HH_ASSISTANT_MARKER
) -> PreferenceExample:
    chosen, rejected = check_text(row["chosen"], "chosen", ref), check_text(row["rejected"], "rejected", ref)
    if isinstance(chosen, list) != isinstance(rejected, list):
        kind = type(rejected).__name__
        raise ref.error("rejected", f"expected the same kind of value as 'chosen', got {kind}")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise ref.error(field, "is empty")
    if isinstance(chosen, list):
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            check_role_order(value, field, ref, response_from=len(value))
        prompt, chosen_response, rejected_response = split_implicit_messages(chosen, rejected)
        if not prompt:
            raise ref.error("chosen", "no common prompt: the conversations differ from the first message")
    else:
        prompt, chosen_response, rejected_response = split_implicit_text(chosen, rejected, marker)
    if chosen != rejected:
        for field, value in (("chosen", chosen_response), ("rejected", rejected_response)):
            if not value:
                raise ref.error(field, "the response after the common prompt is empty")
            if isinstance(value, list):
                _check_response_start(value, field, ref)
    return PreferenceExample(prompt, chosen_response, rejected_response)


def check_margin(value: Any, ref: RowRef) -> float:
    """A pair's ``margin``: a finite number (a bool, a string such as CSV's ``"0.5"``, or null is a `DataError`)."""
    if value is None:
        raise ref.error("margin", "value is missing (null); give every pair a margin, or drop the column")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ref.error("margin", f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ref.error("margin", f"expected a finite number, got {value!r}")
    return float(value)


def check_prompt_completion(row: Mapping[str, Any], ref: RowRef) -> tuple[Text, Text]:
    """``prompt`` and ``completion``: both strings, or both message lists whose roles follow on (the
    completion opening with the assistant); the completion not empty."""
    prompt, completion = check_text(row["prompt"], "prompt", ref), check_text(row["completion"], "completion", ref)
    conversational = isinstance(prompt, list)
    if conversational and not prompt:
        raise ref.error("prompt", "is an empty list of messages")
    if isinstance(completion, list) != conversational:
        kind = "a list of messages" if conversational else "a string"
        raise ref.error("completion", f"expected {kind} like 'prompt', got {type(completion).__name__}")
    if not completion:
        raise ref.error("completion", "is empty")
    if conversational:
        check_role_order(prompt + completion, "completion", ref, response_from=len(prompt))
    return prompt, completion


def _unpaired(row: Mapping[str, Any], ref: RowRef) -> UnpairedExample:
    prompt, completion = check_prompt_completion(row, ref)
    label = row["label"]
    # Only a real bool: 0/1 or "True" (CSV reads strings) are more likely a mistake than a label.
    if not isinstance(label, bool):
        raise ref.error("label", f"expected a bool (true: desirable, false: undesirable), got {label!r}")
    return UnpairedExample(prompt, completion, label)


# Layout -> row converter: pairs for the pairwise layouts, one labelled completion for UNPAIRED.
ROW_CONVERTERS: dict[Layout, Callable[[Mapping[str, Any], RowRef], PreferenceExample | UnpairedExample]] = {
    Layout.EXPLICIT_PROMPT: _explicit_pair,
    Layout.IMPLICIT_PROMPT: _implicit_pair,
    Layout.UNPAIRED: _unpaired,
}


def to_example(row: Mapping[str, Any], layout: Layout, ref: RowRef) -> PreferenceExample | UnpairedExample:
    """Validate one row: a `PreferenceExample` for the paired layouts, an `UnpairedExample` for UNPAIRED."""
    return ROW_CONVERTERS[layout](row, ref)
